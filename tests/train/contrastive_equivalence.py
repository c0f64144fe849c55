"""Worker for tests/train/test_contrastive.py: the chunked losses on 8 fake CPU devices against
the dense ones (loss, gradients, metrics) on several meshes and chunk sizes.

Run in its own process because the 8 fake CPU devices must be configured before JAX starts:
    python tests/train/contrastive_equivalence.py
Prints one JSON object: per case the largest relative differences from the dense loss.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from fomo_jax import runtime, sharding  # noqa: E402
from fomo_jax.train import losses  # noqa: E402

BATCH, DIM = 32, 6
MESHES = {"8 data": (8, 1, 1), "2 data x 4 fsdp": (2, 4, 1)}
CHUNKS = (4, 1)  # 4 rows per device: one and four chunks per ring step


def dense(kind):
    if kind == "clip":
        return lambda x, y, s, b: losses.clip_loss(x, y, s)
    return losses.siglip_loss


def chunked(kind, **kwargs):
    if kind == "clip":
        return lambda x, y, s, b: losses.chunked_clip_loss(x, y, s, **kwargs)
    return lambda x, y, s, b: losses.chunked_siglip_loss(x, y, s, b, **kwargs)


def value_and_grads(fn, inputs, in_shardings=None):
    grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3), has_aux=True),
                   in_shardings=in_shardings)  # fmt: skip
    (loss, metrics), grads = grad(*inputs)
    return jax.device_get((loss, metrics, grads))


def ring_steps(fn, inputs, in_shardings) -> int:
    """Collective permutes in the compiled loss and gradients (the ring; 0: no shard_map)."""
    grad = jax.jit(jax.grad(lambda *a: fn(*a)[0], argnums=(0, 1, 2, 3)), in_shardings=in_shardings)
    return grad.lower(*inputs).as_text().count("collective_permute")


def differences(got, want):
    """Largest relative error of the loss and of each gradient (scaled by its largest
    entry), and whether the metrics are equal."""
    (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads) = got, want
    errors = {"loss": abs(float(loss) - float(ref_loss)) / abs(float(ref_loss))}
    for name, g, r in zip(("image", "text", "logit_scale", "logit_bias"), grads, ref_grads,
                          strict=True):  # fmt: skip
        errors[name] = float(np.max(np.abs(g - r)) / max(np.max(np.abs(r)), 1e-30))
    errors["metrics_equal"] = all(float(metrics[k]) == float(ref_metrics[k]) for k in ref_metrics)
    errors["metrics"] = {k: float(v) for k, v in metrics.items()}
    return errors


def main():
    runtime.enable_compilation_cache()
    assert len(jax.devices()) == 8, jax.devices()
    rng = np.random.default_rng(0)
    image, text = rng.standard_normal((2, BATCH, DIM)).astype(np.float32)
    # Texts 5 and 9 (on devices 1 and 2) are equal and image 9 points their way: row 9's
    # maximum is a tie that jnp.argmax resolves to 5 (wrong) though the ring meets 9 first.
    text[5], image[9] = text[9], 2 * text[9]
    inputs = (image, text, np.float32(2.3), np.float32(-1.5))
    report = {}
    for kind in ("clip", "siglip"):
        want = value_and_grads(dense(kind), inputs)
        report[f"{kind} dense"] = {"metrics": {k: float(v) for k, v in want[1].items()}}
        for name, shape in MESHES.items():
            mesh = sharding.make_mesh(*shape)
            rows = NamedSharding(mesh, P(sharding.BATCH))
            shardings = (rows, rows, NamedSharding(mesh, P()), NamedSharding(mesh, P()))
            for chunk in CHUNKS:
                fn = chunked(kind, mesh=mesh, chunk_size=chunk)
                got = value_and_grads(fn, inputs, shardings)
                report[f"{kind} {name} chunk {chunk}"] = dict(
                    differences(got, want), ring=ring_steps(fn, inputs, shardings)
                )
            if name != "8 data":
                continue
            # the mesh of jax.set_mesh, and no mesh at all (one shard, partitioned by XLA)
            with jax.set_mesh(mesh):
                got = value_and_grads(chunked(kind, chunk_size=2), inputs, shardings)
                ring = ring_steps(chunked(kind, chunk_size=2), inputs, shardings)
            report[f"{kind} {name} context mesh"] = dict(differences(got, want), ring=ring)
            got = value_and_grads(chunked(kind, chunk_size=2), inputs, shardings)
            ring = ring_steps(chunked(kind, chunk_size=2), inputs, shardings)
            report[f"{kind} {name} no mesh"] = dict(differences(got, want), ring=ring)
    report["train step ring"] = train_step_ring()
    print(json.dumps(report))


def train_step_ring() -> int:
    """Collective permutes in the runner's jitted train step (`step.jit_step`) of a tiny CLIP
    with `config.loss="clip_chunked"` on 2 data x 4 fsdp: the step is traced under its mesh,
    so the chunked loss takes the ring."""
    import functools

    import jax.numpy as jnp
    import ml_collections

    from fomo_jax import families, models
    from fomo_jax import params as params_lib
    from fomo_jax.continual import methods
    from fomo_jax.train import optimizer
    from fomo_jax.train import step as step_lib

    config = ml_collections.ConfigDict({"family": "clip", "loss": "clip_chunked", "seed": 0})
    family = families.get("clip").configured(config)
    model_config = models.get_config("tiny")
    method = methods.get("finetune")
    method.setup(methods.Context(config=config, family=family, model_config=model_config,
                                 tokenizer=None, data=None, workdir="",
                                 steps_per_task=1))  # fmt: skip
    params = params_lib.split(family.init_model(model_config, 0))[1]
    mesh, tx, key = sharding.make_mesh(2, 4, 1), optimizer.adamw(), step_lib.step_key(0)
    state = jax.eval_shape(lambda: step_lib.fresh_state(params, method, tx, key))
    shardings = step_lib.shardings_of(state, mesh, family.rules)
    fn = functools.partial(step_lib.step_fn, loss_fn=family.loss(method.graphdef), tx=tx,
                           method=method, family=family, multipliers=None)  # fmt: skip
    lowered = step_lib.jit_step(fn, mesh, shardings).lower(
        state, family.abstract_batch(model_config, 16), jax.ShapeDtypeStruct((), jnp.float32)
    )
    return lowered.as_text().count("collective_permute")


if __name__ == "__main__":
    main()
