"""Worker for tests/test_sharding.py: same losses and gradients on every mesh as on one device,
for a tiny CLIP (contrastive loss over the global batch) and a tiny VLM (next-token loss on
collated pairs, documents, SFT and text; `meshes_vlm`).

Run in its own process because the 8 fake CPU devices must be configured before JAX starts:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_equivalence.py
Prints one JSON object with the largest differences from the single-device run.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from fomo_jax import models, runtime, sharding  # noqa: E402
from fomo_jax import params as params_lib  # noqa: E402
from fomo_jax.continual.loop import finetuning  # noqa: E402
from fomo_jax.data import synthetic  # noqa: E402
from fomo_jax.data import vlm_batches as vb  # noqa: E402
from fomo_jax.families import clip  # noqa: E402
from fomo_jax.families import vlm as vlm_family  # noqa: E402
from fomo_jax.models import llama, vlm  # noqa: E402
from fomo_jax.tokenizer import ByteTokenizer  # noqa: E402
from fomo_jax.train import optimizer  # noqa: E402
from fomo_jax.train.losses import clip_loss  # noqa: E402

MESHES = {  # (data, fsdp, fsdp_transpose, model)
    "1x1": (1, 1, 1, 1),
    "8 data": (8, 1, 1, 1),
    "4 data x 2 model": (4, 1, 1, 2),
    "2 data x 4 fsdp": (2, 4, 1, 1),
    "2 data x 2 fsdp x 2 fsdp_transpose": (2, 2, 2, 1),
}


def make(shape):
    data, fsdp, transpose, model = shape
    return sharding.make_mesh(data, fsdp, model, devices=jax.devices()[: int(np.prod(shape))],
                              fsdp_transpose=transpose)  # fmt: skip


STEPS, BATCH, LR = 3, 16, 1e-3


def batches(cfg):
    source = synthetic.SyntheticPairs(STEPS * BATCH, cfg.vision.image_size, seed=7)
    tok = ByteTokenizer(cfg.text.context_length)
    out = []
    for s in range(STEPS):
        examples = [source[i] for i in range(s * BATCH, (s + 1) * BATCH)]
        out.append(
            {
                "pixels": synthetic.normalize(np.stack([e["image"] for e in examples])),
                "token_ids": tok([e["text"] for e in examples]),
            }
        )
    return out


def max_abs_diff(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    )


def vlm_batches(cfg):
    rng = np.random.default_rng(7)

    def image():
        return rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)

    kinds = [lambda: vb.pair(image(), "a red cube on the left"),
             lambda: vb.sft([("what is it?", "a dax")], image()),
             lambda: vb.document([image(), "two blue things", "more text here"]),
             lambda: vb.text("plain words only")]  # fmt: skip
    specials = vb.Specials(image=cfg.image_token_id, eos=258, eou=261, pad=0, wrapper=260)
    encode = lambda s: [b + 1 for b in s.encode()]  # noqa: E731
    return [vb.collate([kinds[i % 4]() for i in range(BATCH)], encode, specials,
                       cfg.image_seq_length, 64, 1, 32) for _ in range(STEPS)]  # fmt: skip


def loss_and_metrics(graphdef, family=clip.FAMILY):
    """(params, batch) -> (loss, metrics): the family's loss without its key."""
    loss_fn = family.loss(graphdef)

    def apply(params, batch):
        loss, metrics, _ = loss_fn(params, batch, None)
        return loss, metrics

    return apply


def run(graphdef, params, data, mesh, tx, family=clip.FAMILY,
        path="image/transformer/resblocks/0/attn/q_proj/kernel"):  # fmt: skip
    """Initial loss and gradients, then the losses of STEPS train steps, on `mesh`."""
    step, state = finetuning(graphdef, tx, mesh, params, family=family)
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, state.params)
    grad_fn = jax.jit(
        jax.value_and_grad(loss_and_metrics(graphdef, family), has_aux=True),
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=((sharding.replicated(mesh), sharding.replicated(mesh)), shardings),
    )
    (loss0, _), grads = grad_fn(jax.device_put(params, shardings), data[0])
    losses = []
    for batch in data:
        state, metrics = step(state, batch, LR)
        losses.append(float(metrics["loss"]))
    kernel = params_lib.flatten(state.params)[path]
    moments = [
        leaf
        for key, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
        if params_lib.key_path_str(key) == path
    ]
    return (
        float(loss0),
        jax.device_get(grads),
        losses,
        {
            "q_proj_spec": str(tuple(kernel.sharding.spec)),
            "q_proj_shard_shape": list(kernel.addressable_shards[0].data.shape),
            "q_proj_moment_shard_shapes": [
                list(m.addressable_shards[0].data.shape) for m in moments
            ],
            "batch_shard_rows": BATCH // sharding.batch_shards(mesh),
        },
    )


def compare(graphdef, params, data, tx, family, path):
    """{mesh: differences from one device} of `family`'s loss, gradients and steps."""
    one = sharding.make_mesh(devices=jax.devices()[:1])
    ref_loss, ref_grads, ref_losses, _ = run(graphdef, params, data, one, tx, family, path)
    out = {}
    for name, shape in MESHES.items():
        mesh = make(shape)
        loss0, grads, losses, layout = run(graphdef, params, data, mesh, tx, family, path)
        leaves = zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads),
                     strict=True)  # fmt: skip
        out[name] = dict(
            layout, loss=abs(loss0 - ref_loss),
            step_losses=max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
            grad_scale=max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads)),
            grads_close=all(np.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in leaves),
        )  # fmt: skip
    return out


def compare_vlm(tx):
    """The VLM (LLaVA layout, interleave fusion) on every mesh."""
    lm = llama.LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8)  # fmt: skip
    cfg = vlm.VLMConfig(vision=models.get_config("tiny"), lm=lm, image_token_id=259)
    graphdef, params = params_lib.split(vlm.create_vlm(cfg, seed=0))
    return compare(graphdef, jax.device_get(params), vlm_batches(cfg), tx, vlm_family.FAMILY,
                   "lm/transformer/resblocks/0/attn/q_proj/kernel")  # fmt: skip


def per_shard_loss(graphdef, params, batch, mesh):
    """The wrong loss: each data shard contrasts only against its own local batch."""
    model = params_lib.merge(graphdef, params)
    image, text, _ = model(jnp.asarray(batch["pixels"]), jnp.asarray(batch["token_ids"]))
    local = jax.shard_map(
        lambda i, t, s: jax.lax.pmean(clip_loss(i, t, s)[0], "data"),
        mesh=mesh,
        in_specs=(P("data"), P("data"), P()),
        out_specs=P(),
    )
    return float(local(image, text, params["logit_scale"]))


def main():
    runtime.enable_compilation_cache()
    assert len(jax.devices()) == 8, jax.devices()
    model = models.create_model("tiny", seed=0)
    graphdef, params = params_lib.split(model)
    params = jax.device_get(params)
    data = batches(model.config)
    tx = optimizer.adamw()

    # Reference: plain jit on one device, no mesh.
    one = sharding.make_mesh(devices=jax.devices()[:1])
    ref_loss, ref_grads, ref_losses, _ = run(graphdef, params, data, one, tx)
    plain = jax.jit(jax.value_and_grad(loss_and_metrics(graphdef), has_aux=True))
    (plain_loss, _), plain_grads = plain(params, data[0])

    report = {"reference_losses": ref_losses, "meshes": {}}
    report["plain_vs_1x1"] = {
        "loss": abs(float(plain_loss) - ref_loss),
        "grads": max_abs_diff(plain_grads, ref_grads),
    }
    for name, shape in MESHES.items():
        mesh = make(shape)
        loss0, grads, losses, layout = run(graphdef, params, data, mesh, tx)
        report["meshes"][name] = dict(
            layout,
            loss=abs(loss0 - ref_loss),
            grads=max_abs_diff(grads, ref_grads),
            grad_scale=max(float(np.max(np.abs(g))) for g in jax.tree_util.tree_leaves(grads)),
            step_losses=max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        )
        # Per-leaf relative check as chex would do it (atol 1e-5, rtol 1e-4).
        report["meshes"][name]["grads_close"] = all(
            np.allclose(a, b, atol=1e-5, rtol=1e-4)
            for a, b in zip(
                jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads), strict=True
            )
        )
    report["meshes_vlm"] = compare_vlm(tx)
    eight = sharding.make_mesh(8, 1, 1)
    report["per_shard_loss_minus_global"] = per_shard_loss(graphdef, params, data[0], eight) - (
        ref_loss
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
