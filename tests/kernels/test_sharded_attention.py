"""The dispatcher's Pallas path on several devices: the kernel per shard inside shard_map.

Runs in a subprocess with 4 fake CPU devices (XLA_FLAGS must be set before JAX starts) on a
fsdp=2 x model=2 mesh, the kernel interpreted, against the float64 references of
`references.py`: forward and gradients, every mask kind at once, grouped-query heads.
"""

import importlib
import json
import os
import subprocess
import sys
import unittest.mock

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh

from fomo_jax import sharding

# The package's `attention` is the function; the dispatcher module holds the choice rule.
dispatcher = importlib.import_module("fomo_jax.kernels.attention")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORKER = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from fomo_jax import sharding
from fomo_jax import kernels
from tests.kernels.references import dense_attention_grads, numpy_attention, visibility

mesh = sharding.make_mesh(data=1, fsdp=2, model=2)
report = {}


def run(name, batch, heads, kv_heads, mesh_arg, context, implementation="pallas"):
    rng = np.random.default_rng(batch * 10 + heads)
    t, d = 19, 32
    q = rng.standard_normal((batch, t, heads, d)).astype(np.float32)
    k, v = (rng.standard_normal((batch, t, kv_heads, d)).astype(np.float32) for _ in "kv")
    w = rng.standard_normal(q.shape).astype(np.float32)  # float64 here trips JAX's x64 cache
    kv_mask = rng.random((batch, t)) > 0.2
    kv_mask[0] = False  # batch row 0: no valid key at all
    prefix = rng.integers(0, t + 1, batch)
    segments = np.sort(rng.integers(0, 3, (batch, t)), axis=1)
    masks = dict(causal=True, kv_mask=kv_mask, prefix_length=prefix, segment_ids=segments)

    def loss(q, k, v):
        out = kernels.attention(q, k, v, **masks, implementation=implementation, mesh=mesh_arg)
        return jnp.sum(out * w), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    rows = NamedSharding(mesh, P(sharding.BATCH if batch % 2 == 0 else None, None, "model"))
    args = [jax.device_put(x, rows) for x in (q, k, v)]
    if context:
        with jax.set_mesh(mesh):
            jaxpr = str(jax.make_jaxpr(step)(*args))
            (_, out), grads = step(*args)
    else:
        jaxpr = str(jax.make_jaxpr(step)(*args))
        (_, out), grads = step(*args)
    vis = visibility(batch, t, t, True, kv_mask, prefix, segments)
    want = numpy_attention(q, k, v, vis, d**-0.5)
    want_grads = dense_attention_grads(q, k, v, vis, d**-0.5, w.astype(np.float64))
    shard_q = f"f32[{batch // 2 if batch % 2 == 0 else batch},{t},{heads // 2},{d}]"
    report[name] = dict(
        out=float(np.abs(np.asarray(out) - want).max()),
        grads=max(float(np.abs(np.asarray(g) - e).max()) for g, e in zip(grads, want_grads)),
        grad_scale=max(float(np.abs(e).max()) for e in want_grads),
        shard_map=jaxpr.count("shard_map["),
        pallas=jaxpr.count("pallas_call["),
        shard_shapes=shard_q in jaxpr,
    )


run("mesh argument", 4, 4, 2, mesh, False)
run("set_mesh context", 4, 4, 4, None, True)
run("batch of 3 (not split)", 3, 2, 2, mesh, False)
run("no mesh", 4, 4, 4, None, False)
run("xla with mesh", 4, 4, 4, mesh, False, implementation="xla")
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def report():
    proc = subprocess.run(
        [sys.executable, "-c", WORKER],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["mesh argument", "set_mesh context", "batch of 3 (not split)"])
def test_pallas_runs_per_shard_and_matches_float64_reference(report, case):
    """Causal + key padding + prefix + packed segments, forward and d(q, k, v); the kernel runs
    inside shard_map on per-shard shapes (batch / fsdp, heads / model; a batch of 3 whole)."""
    r = report[case]
    assert r["shard_map"] >= 1 and r["pallas"] >= 1 and r["shard_shapes"], r
    assert r["out"] < 2e-5 and r["grads"] < 2e-5, r
    assert r["grad_scale"] > 0.1, r


def test_without_a_mesh_nothing_changes(report):
    """No mesh argument and no `jax.set_mesh`: the kernel is called whole as before (XLA
    gathers its operands); the XLA backend ignores the mesh."""
    for case in ("no mesh", "xla with mesh"):
        r = report[case]
        assert r["shard_map"] == 0 and r["out"] < 2e-5 and r["grads"] < 2e-5, (case, r)
    assert report["no mesh"]["pallas"] >= 1 and report["xla with mesh"]["pallas"] == 0


def test_choice_on_several_devices():
    """On a GPU with 8 devices the fused kernel is chosen for long keys only when the mesh is
    known (abstract meshes suffice: the choice reads axis sizes only)."""
    long_q = jnp.zeros((8, 4096, 8, 64), jnp.bfloat16)
    masks = dict(causal=True, kv_mask=None, prefix_length=None, segment_ids=None)
    mesh = AbstractMesh((2, 2, 1, 2), sharding.AXES)
    with (
        unittest.mock.patch.object(jax, "default_backend", return_value="gpu"),
        unittest.mock.patch.object(jax, "device_count", return_value=8),
    ):
        assert dispatcher._choose(long_q, long_q, **masks) == "cudnn"
        assert dispatcher._choose(long_q, long_q, **masks, mesh=mesh) == "pallas"
        assert dispatcher._mesh(mesh) is mesh
        assert dispatcher._mesh(None) is None  # no jax.set_mesh here
        assert dispatcher._mesh(AbstractMesh((1, 1, 1, 1), sharding.AXES)) is None
