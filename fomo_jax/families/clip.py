"""The CLIP family: two towers trained with the contrastive loss, evaluated zero-shot.

Batches carry uint8 `images` (normalized on the device) and int32 `token_ids`; the loss is
CLIP's symmetric InfoNCE over the whole (global) batch, or another of `losses.LOSSES` that
`config.loss` picks (`FAMILY.configured(config)`: a chunked form on the mesh, SigLIP's sigmoid
loss, whose model then carries a learnable `logit_bias`); the parameter groups are the towers
(`logit_scale` and `logit_bias` belong to the text tower, as in the reference's per-tower
merges); the evaluator is the benchmark's zero-shot classification and retrieval (A_KA, A_ZS,
GM; spec §10).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from fomo_jax import evaluate as evaluate_lib
from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.families.base import Data, Family, LossFn, Params
from fomo_jax.models import clip as clip_lib
from fomo_jax.tokenizer import load_tokenizer
from fomo_jax.train import losses

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


# SigLIP's initial log-temperature and bias (Zhai et al. 2023: t' = log 10, b = -10).
SIGLIP_LOGIT_SCALE_INIT, SIGLIP_LOGIT_BIAS_INIT = math.log(10.0), -10.0


class Clip(Family):
    """The CLIP family with contrastive loss `loss` (`losses.LOSSES`, `config.loss`)."""

    name = "clip"
    metric_keys = METRIC_KEYS
    groups = ("image", "text")
    batch_keys = ("images", "token_ids")
    rules = sharding.CLIP_RULES
    adapter_targets = clip_lib.ADAPTER_TARGETS

    def __init__(self, loss: str = "clip", chunk_size: int = losses.DEFAULT_CHUNK):
        self.contrastive = losses.check_loss(loss)
        self.sigmoid = loss in losses.SIGMOID_LOSSES
        self.chunk_size = chunk_size

    def configured(self, config: ml_collections.ConfigDict) -> Clip:
        """The family with `config.loss` (default "clip") and, for the chunked losses,
        `config.loss_chunk_size` texts per block (default `losses.DEFAULT_CHUNK`)."""
        chunk = config.get("loss_chunk_size", losses.DEFAULT_CHUNK)
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"config.loss_chunk_size={chunk!r}; expected a positive integer")
        return with_loss(config.get("loss", "clip"), chunk)

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
        model_config = model_config.replace(
            dtype=config.model.dtype, attention_implementation=config.model.attention_implementation
        )
        if self.sigmoid and model_config.logit_bias is None:  # SigLIP's b and t' (a CLIP θ0
            # keeps its own scale and gets the bias, `load_params`)
            scale = model_config.logit_scale_init
            if not config.theta0.checkpoint:
                scale = SIGLIP_LOGIT_SCALE_INIT
            model_config = model_config.replace(
                logit_bias=SIGLIP_LOGIT_BIAS_INIT, logit_scale_init=scale
            )
        return model_config

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
        """The checkpoint's params; a SigLIP run from a CLIP checkpoint (no `logit_bias`)
        starts the bias at `model_config.logit_bias`."""
        params = jax.device_get(params_lib.split(models.load_pretrained(path))[1])
        if model_config.logit_bias is not None and "logit_bias" not in params:
            params["logit_bias"] = np.asarray(model_config.logit_bias, np.float32)
        return params

    def loss(self, graphdef) -> LossFn:
        """The contrastive loss `self.contrastive` of a batch; the chunked forms split the
        batch over the mesh of `jax.set_mesh` (else one shard, chunk by chunk)."""
        apply = forward(graphdef)
        kind, chunk = self.contrastive, self.chunk_size

        def loss_fn(params, batch, key):
            image, text, logit_scale = apply(params, batch)
            if kind == "clip":
                loss, metrics = losses.clip_loss(image, text, logit_scale)
            elif kind == "clip_chunked":
                loss, metrics = losses.chunked_clip_loss(image, text, logit_scale,
                                                         chunk_size=chunk)  # fmt: skip
            else:
                if "logit_bias" not in params:
                    raise ValueError(f"config.loss={kind!r} needs the model's logit_bias "
                                     "(CLIPConfig.logit_bias); these params have none")  # fmt: skip
                if kind == "siglip":
                    loss, metrics = losses.siglip_loss(image, text, logit_scale,
                                                       params["logit_bias"])  # fmt: skip
                else:
                    loss, metrics = losses.chunked_siglip_loss(
                        image, text, logit_scale, params["logit_bias"], chunk_size=chunk
                    )
            return loss, metrics, {}

        return loss_fn

    def step_metrics(self, params) -> dict:
        metrics = {"logit_scale": params["logit_scale"]}
        if "logit_bias" in params:
            metrics["logit_bias"] = params["logit_bias"]
        return metrics

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


@functools.cache
def with_loss(loss: str, chunk_size: int = losses.DEFAULT_CHUNK) -> Clip:
    """The CLIP family with contrastive loss `loss` (one instance per loss and chunk size;
    the dense losses ignore the chunk size)."""
    if loss in ("clip", "siglip"):
        chunk_size = losses.DEFAULT_CHUNK
    return FAMILY if loss == "clip" else Clip(loss, chunk_size)


FAMILY = Clip()
