"""The CLIP family: two towers trained with the contrastive loss, evaluated zero-shot.

Batches carry uint8 `images` (normalized on the device) and int32 `token_ids`; the loss is
CLIP's symmetric InfoNCE over the whole (global) batch; the parameter groups are the towers
(`logit_scale` belongs to the text tower, as in the reference's per-tower merges); the
evaluator is the benchmark's zero-shot classification and retrieval (A_KA, A_ZS, GM; spec §10).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from fomo_jax import evaluate as evaluate_lib
from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.families.base import Data, Family, LossFn, Params
from fomo_jax.models import clip as clip_lib
from fomo_jax.tokenizer import load_tokenizer
from fomo_jax.train.losses import clip_loss

METRIC_KEYS = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean")


def forward(graphdef: nnx.GraphDef):
    """forward(params, batch) -> (image_emb, text_emb, logit_scale); either input may be
    absent from `batch` (its embedding is then None)."""

    def apply(params, batch):
        model = params_lib.merge(graphdef, params)
        has_images = "images" in batch or "pixels" in batch
        pixels = clip_lib.batch_pixels(batch) if has_images else None
        image, text, _ = model(pixels, batch.get("token_ids"))
        return image, text, model.logit_scale[...]

    return apply


class Evaluator:
    """The benchmark's zero-shot evaluation (`fomo_jax.evaluate.Evaluator`) of CLIP params."""

    def __init__(self, inner: evaluate_lib.Evaluator):
        self.inner = inner

    def evaluate(self, graphdef, params, *, subset: bool) -> dict:
        per_dataset = self.inner.evaluate(params_lib.merge(graphdef, params), subset=subset)
        return dict(self.inner.summary(per_dataset), per_dataset=per_dataset)

    def subset_manifest(self) -> dict:
        return self.inner.subset_manifest()


class Clip(Family):
    name = "clip"
    metric_keys = METRIC_KEYS
    groups = ("image", "text")
    batch_keys = ("images", "token_ids")
    rules = sharding.CLIP_RULES
    adapter_targets = clip_lib.ADAPTER_TARGETS

    def model_config(self, config: ml_collections.ConfigDict) -> clip_lib.CLIPConfig:
        if config.theta0.checkpoint:
            model_config = models.load_pretrained(config.theta0.checkpoint).config
        else:
            model_config = models.get_config(config.model.name)
            if config.model.context_length:
                text = dataclasses.replace(model_config.text,
                                           context_length=config.model.context_length)  # fmt: skip
                model_config = model_config.replace(text=text)
        model_config = models.with_memory_options(model_config, config.model)  # remat, scan
        return model_config.replace(
            dtype=config.model.dtype, attention_implementation=config.model.attention_implementation
        )

    def tokenizer(self, config, model_config):
        tokenizer = load_tokenizer(config.tokenizer,
                                   context_length=model_config.text.context_length)  # fmt: skip
        if tokenizer.vocab_size > model_config.text.vocab_size:  # else only the export would fail
            raise ValueError(
                f"config.tokenizer={config.tokenizer!r} has {tokenizer.vocab_size} ids, more "
                f"than the model's text vocabulary of {model_config.text.vocab_size}"
            )
        return tokenizer

    def abstract_model(self, model_config) -> clip_lib.CLIP:
        return clip_lib.abstract_clip(model_config)

    def init_model(self, model_config, seed: int) -> clip_lib.CLIP:
        return models.create_model(model_config, seed=seed)

    def load_params(self, path: str, model_config) -> Params:
        return jax.device_get(params_lib.split(models.load_pretrained(path))[1])

    def loss(self, graphdef) -> LossFn:
        apply = forward(graphdef)

        def loss_fn(params, batch, key):
            image, text, logit_scale = apply(params, batch)
            loss, metrics = clip_loss(image, text, logit_scale)
            return loss, metrics, {}

        return loss_fn

    def step_metrics(self, params) -> dict:
        return {"logit_scale": params["logit_scale"]}

    def image_size(self, model_config) -> int:
        return model_config.vision.image_size

    def abstract_batch(self, model_config, batch_size: int, input_format: str = "images"):
        """uint8 `images` as the runner feeds them (or normalized float `pixels`) and int32
        `token_ids`."""
        if input_format not in ("images", "pixels"):
            raise ValueError(f"input_format={input_format!r}; expected 'images' or 'pixels'")
        size = model_config.vision.image_size
        dtype = jnp.uint8 if input_format == "images" else jnp.float32
        context = model_config.text.context_length
        return {
            input_format: jax.ShapeDtypeStruct((batch_size, size, size, 3), dtype),
            "token_ids": jax.ShapeDtypeStruct((batch_size, context), jnp.int32),
        }

    def group_of(self, path: str) -> str:
        return "image" if path.startswith("image/") else "text"

    def linear_paths(self, model_config) -> list[str]:
        return clip_lib.linear_paths(model_config)

    def evaluator(self, config, data: Data, model_config, tokenizer, *, mesh=None,
                  cache_dir=None) -> Evaluator:  # fmt: skip
        return Evaluator(evaluate_lib.Evaluator(
            data.root, data.datasets, tokenizer, self.image_size(model_config),
            batch_size=config.eval.batch_size, subset_seed=config.seed, cache_dir=cache_dir,
            mesh=mesh, rules=self.rules,
        ))  # fmt: skip

    def export(self, params, model_config, directory: str, tokenizer) -> None:
        model = params_lib.merge(self.graphdef(model_config), params)
        models.export_hf(model, directory, tokenizer=tokenizer)


FAMILY = Clip()
