"""A model family that is not CLIP, for the tests: two small MLPs over the runner's batches.

`pixels/` embeds an average-pooled image, `words/` the mean of a caption's byte embeddings; the
loss is a symmetric InfoNCE written here; the evaluator reports the three metric keys as the
retrieval accuracy of fixed batches (the stream's first update pool: knowledge; the pretraining
pool: retention). Nothing here is shared with the CLIP family, so a run of this family through
the runner shows that the loop asks the family for everything model-specific.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fomo_jax import params as params_lib
from fomo_jax.data import pipeline
from fomo_jax.families.base import Family
from fomo_jax.models import adapters
from fomo_jax.tokenizer import load_tokenizer


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    image_size: int = 16
    pool: int = 4  # average-pooling window
    context_length: int = 48
    vocab_size: int = 260
    width: int = 32
    adapter: adapters.AdapterConfig | None = None

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


class _Pixels(nnx.Module):
    def __init__(self, cfg, sites, rngs):
        features = (cfg.image_size // cfg.pool) ** 2 * 3
        self.hidden = sites.linear("pixels/hidden", features, cfg.width, rngs=rngs)
        self.out = sites.linear("pixels/out", cfg.width, cfg.width, rngs=rngs)

    def __call__(self, images, pool):
        x = images.astype(jnp.float32) / 255.0 - 0.5
        b, s, _, c = x.shape
        x = x.reshape(b, s // pool, pool, s // pool, pool, c).mean(axis=(2, 4)).reshape(b, -1)
        return self.out(jax.nn.gelu(self.hidden(x)))


class _Words(nnx.Module):
    def __init__(self, cfg, sites, rngs):
        self.embed = nnx.Embed(cfg.vocab_size, cfg.width, rngs=rngs)
        self.out = sites.linear("words/out", cfg.width, cfg.width, rngs=rngs)

    def __call__(self, ids):
        mask = (ids > 0)[..., None].astype(jnp.float32)
        mean = (self.embed(ids) * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        return self.out(mean)


class MLP(nnx.Module):
    def __init__(self, cfg: MLPConfig, rngs: nnx.Rngs):
        self.config = cfg
        sites = adapters.Sites(cfg.adapter)
        self.pixels = _Pixels(cfg, sites, rngs)
        self.words = _Words(cfg, sites, rngs)
        shared = sites.finish()
        if shared is not None:
            self.adapter_shared = shared

    def __call__(self, images, ids):
        return self.pixels(images, self.config.pool), self.words(ids)


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True).clip(1e-6)


def info_nce(a, b, scale=10.0):
    logits = scale * _unit(a) @ _unit(b).T
    labels = jnp.arange(logits.shape[0])
    rows = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[labels, labels])
    cols = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[labels, labels])
    return 0.5 * (rows + cols), jnp.mean(jnp.argmax(logits, axis=1) == labels)


class Evaluator:
    def __init__(self, family, data, model_config, tokenizer):
        self.family = family
        size = model_config.image_size
        task_batch = next(iter(data.update_batches(0, 32, 1)))
        pool = pipeline.pool_batches(
            data.pool, batch_size=32, steps=1, seed=7, tokenizer=tokenizer, image_size=size,
            num_threads=0,
        )  # fmt: skip
        pool_batch = next(iter(pool.dataset()))
        self.sets = {"task0": task_batch,
                     "pool": {k: pool_batch[k] for k in family.batch_keys}}  # fmt: skip

    def evaluate(self, graphdef, params, *, subset: bool) -> dict:
        model = params_lib.merge(graphdef, params)
        scores = {}
        for name, batch in self.sets.items():
            a, b = model(jnp.asarray(batch["images"]), jnp.asarray(batch["token_ids"]))
            scores[name] = 100 * float(info_nce(a, b)[1])
        ka, zs = scores["task0"], scores["pool"]
        return {"knowledge_accumulation": ka, "zero_shot_retention": zs,
                "geometric_mean": float(np.sqrt(ka * zs)),
                "per_dataset": {k: {"accuracy": v} for k, v in scores.items()}}  # fmt: skip

    def subset_manifest(self) -> dict:
        return {}


class MLPFamily(Family):
    name = "mlp"
    metric_keys = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean")
    groups = ("pixels", "words")
    batch_keys = ("images", "token_ids")
    rules = ()  # replicated everywhere
    adapter_targets = {"reference": r"(pixels|words)/out", "all_linear": r"(pixels/\w+|words/out)"}

    def model_config(self, config):
        return MLPConfig(context_length=config.model.context_length)

    def tokenizer(self, config, model_config):
        return load_tokenizer(config.tokenizer, context_length=model_config.context_length)

    def abstract_model(self, model_config):
        return nnx.eval_shape(lambda: MLP(model_config, nnx.Rngs(0)))

    def init_model(self, model_config, seed):
        return MLP(model_config, nnx.Rngs(seed))

    def loss(self, graphdef):
        def loss_fn(params, batch, key):
            a, b = params_lib.merge(graphdef, params)(batch["images"], batch["token_ids"])
            loss, accuracy = info_nce(a, b)
            return loss, {"accuracy": accuracy}, {}

        return loss_fn

    def image_size(self, model_config):
        return model_config.image_size

    def abstract_batch(self, model_config, batch_size):
        s, length = model_config.image_size, model_config.context_length
        return {"images": jax.ShapeDtypeStruct((batch_size, s, s, 3), jnp.uint8),
                "token_ids": jax.ShapeDtypeStruct((batch_size, length), jnp.int32)}  # fmt: skip

    def group_of(self, path):
        return path.split("/")[0] if path.startswith(("pixels/", "words/")) else "words"

    def linear_paths(self, model_config):
        return ["pixels/hidden", "pixels/out", "words/out"]

    def evaluator(self, config, data, model_config, tokenizer, *, mesh=None, cache_dir=None):
        return Evaluator(self, data, model_config, tokenizer)

    def export(self, params, model_config, directory, tokenizer):
        os.makedirs(directory, exist_ok=True)
        np.savez(os.path.join(directory, "params.npz"), **params_lib.flatten(params))


FAMILY = MLPFamily()
