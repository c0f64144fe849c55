"""benchmarks/scale.py --smoke: the scale report's table on tiny models (in a subprocess, since
the fake CPU devices must be configured before JAX starts)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fomo_jax import families, models, sharding
from fomo_jax import params as params_lib
from fomo_jax.models.llama import LlamaConfig
from fomo_jax.models.vlm import VLMConfig, abstract_vlm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ("model", "params (M)", "devices", "mesh (data x fsdp x fsdp_t x model)", "batch",
           "params/dev (MiB)", "ideal params/dev (MiB)", "opt/dev (MiB)", "(p+o) x N/N0",
           "args/dev (MiB)", "temp/dev (MiB)", "TFLOP/dev", "AG", "RS", "AR", "CP", "A2A",
           "compile (s)")  # fmt: skip


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("scale") / "scale")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "scale.py"),
                             "--smoke", "--out", out],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    with open(out + ".json") as f, open(out + ".md") as g:
        return json.load(f), g.read()


def reference_param_bytes(shape: tuple) -> int:
    """One device's float32 parameter bytes of the smoke's tiny VLM, in float64 numpy: each
    leaf's size divided by the product of the mesh axes its spec splits it over."""
    import jax

    sizes = dict(zip(sharding.AXES, shape, strict=True))
    lm = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16)  # fmt: skip
    config = VLMConfig(vision=models.get_config("tiny"), lm=lm, image_token_id=500)
    params = params_lib.split(abstract_vlm(config))[1]
    mesh = jax.sharding.AbstractMesh(tuple(shape), sharding.AXES)
    specs = sharding.tree_specs(params, mesh, families.get("vlm").rules)
    total = 0.0
    for path, leaf in params_lib.flatten(params).items():
        spec = params_lib.flatten(specs)[path]
        axes = [a for e in spec if e for a in (e if isinstance(e, tuple) else (e,))]
        splits = np.prod([sizes[a] for a in axes], dtype=np.float64)
        total += np.prod(leaf.shape, dtype=np.float64) * np.dtype(leaf.dtype).itemsize / splits
    return int(total)


def test_rows_cover_the_matrix(report):
    data, _ = report
    cells = {(r["model"], r["kind"], r["devices"], r["remat"]) for r in data["rows"]}
    want = {("tiny-VLM", k, n, "none") for k in ("fsdp", "fsdp_tp") for n in (2, 8)}
    assert cells == want
    for r in data["rows"]:
        mesh = (r["data"], r["fsdp"], r["fsdp_transpose"], r["model_axis"])
        assert int(np.prod(mesh)) == r["devices"], r
        assert r["model_axis"] == (2 if r["kind"] == "fsdp_tp" else 1), r
        assert r["batch"] == data["per_device_batch"] * r["devices"]
        assert r["temp_bytes"] > 0 and r["flops_per_device"] > 0 and r["compile_seconds"] > 0
        assert set(r["collectives"]) == {"all-gather", "reduce-scatter", "all-reduce",
                                         "collective-permute", "all-to-all"}  # fmt: skip


def test_param_and_optimizer_bytes_per_device(report):
    data, _ = report
    for r in data["rows"]:
        want = reference_param_bytes((r["data"], r["fsdp"], r["fsdp_transpose"], r["model_axis"]))
        assert r["param_bytes"] == want, r
        # AdamW: mu and nu shaped (and sharded) like the params, plus the int32 step count
        assert r["opt_bytes"] == 2 * want + 4, r
        # the compiled step's arguments hold the params and optimizer state (and the batch)
        assert r["param_bytes"] + r["opt_bytes"] <= r["argument_bytes"], r


def test_param_bytes_fall_with_the_mesh(report):
    data, _ = report
    for model in ("tiny-VLM",):
        for kind in ("fsdp", "fsdp_tp"):
            two, eight = (next(r for r in data["rows"] if (r["model"], r["kind"], r["devices"],
                                                           r["remat"]) == (model, kind, n, "none"))
                          for n in (2, 8))  # fmt: skip
            assert eight["param_bytes"] < 0.5 * two["param_bytes"], (model, kind)
            assert eight["param_bytes"] >= two["param_bytes_total"] / 8
            assert eight["collectives"]["all-gather"] > 0  # FSDP gathers the parameters


def test_activations_are_split_over_the_batch(report):
    """The global batch grows with the mesh (2 examples per device), so a device's share of
    the work must not: temporaries and XLA's FLOPs per device stay flat from 2 to 8 devices.
    Without the models' batch constraint (`sharding.constrain_batch`) XLA split activations
    on the features instead, every device computing the whole batch: 4.1 -> 10.3 MiB of
    temporaries from 2 to 8 devices (benchmarks/results/scale_cpu.md)."""
    data, _ = report
    for kind in ("fsdp", "fsdp_tp"):
        two, eight = (next(r for r in data["rows"] if (r["kind"], r["devices"]) == (kind, n))
                      for n in (2, 8))  # fmt: skip
        assert eight["temp_bytes"] < 1.2 * two["temp_bytes"], (kind, two, eight)
        assert eight["flops_per_device"] < 1.2 * two["flops_per_device"], (kind, two, eight)


def test_markdown_table(report):
    data, text = report
    header = next(line for line in text.splitlines() if line.startswith("| model |"))
    assert tuple(c.strip() for c in header.strip("|").split("|")) == COLUMNS
    table = [line for line in text.splitlines()
             if line.startswith("| tiny")]  # fmt: skip
    assert len(table) == len(data["rows"])
    assert "proxy for an accelerator's" in text
