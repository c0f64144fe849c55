"""The VLM family: an image tower, a connector and a decoder LM trained on the next token.

Batches are `fomo_jax.data.vlm_batches.collate`'s arrays: `tokens` with image slots, uint8
`images` [B, N, S, S, 3] (normalised on the device) with `image_valid`, `attention_mask`,
`loss_mask` (the target at t+1) and `prefix_length` (read by `prefix` fusion only). The loss is
`vlm_batches.next_token_loss`, normalised per supervised token (`FAMILY`, "token": HF and
VILA) or per example (`PER_EXAMPLE`, "example": big_vision); `config.family` names the one a
run uses, so its config records it ("vlm" or "fomo_jax.families.vlm:PER_EXAMPLE"). The
parameter groups are `image`, `connector` and `lm` (per-group merges, learning-rate
multipliers, locking); the sharding rules are `sharding.LM_RULES` (Megatron x FSDP).

Adapters (the PEFT methods) go on the block linears of the image tower and the LM
(`adapter_targets`: "lm", "lm_attention", "all_linear"); with `config.trainable` rules a run can
train a fresh connector in full next to them. In the continual runner the family trains on the
synthetic vision-language world (`config.data.benchmark="vlm_synth"`, `data.vlm_stream`: its
data, θ0's staged recipe) with the world's word tokenizer (`config.tokenizer="words"`) and is
evaluated by `fomo_jax.evaluate_vlm` (A_KA, A_ZS, their geometric mean and text retention).
A batch whose `images` hold no image slot ([B, 0, ...]: text-only jobs such as LM pretraining)
skips the image tower.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from fomo_jax import evaluate_vlm, sharding
from fomo_jax import params as params_lib
from fomo_jax.data import vlm_batches
from fomo_jax.families.base import Family, LossFn, Params
from fomo_jax.models import clip as clip_lib
from fomo_jax.models import hf_lm, vlm

LM_LINEARS = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj",
              "mlp/up_proj", "mlp/down_proj")  # fmt: skip


def pixels(images) -> jax.Array:
    """uint8 [..., S, S, 3] -> CLIP-normalised float32 pixels (on the device)."""
    return clip_lib.batch_pixels({"images": jnp.asarray(images)})


class VLM(Family):
    name = "vlm"
    metric_keys = evaluate_vlm.METRIC_KEYS
    groups = ("image", "connector", "lm")
    batch_keys = ("tokens", "images", "image_valid", "attention_mask", "loss_mask",
                  "prefix_length")  # fmt: skip
    rules = sharding.LM_RULES
    adapter_targets = {
        "lm": r"lm/transformer/resblocks/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)",
        "lm_attention": r"lm/transformer/resblocks/\d+/attn/(q|k|v|o)_proj",
        "all_linear": (r"image/transformer/resblocks/\d+/(attn/(q|k|v|out)_proj|mlp/(c_fc|c_proj))"
                       r"|lm/transformer/resblocks/\d+/(attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"),
    }  # fmt: skip

    def __init__(self, normalization: str = "token", sources: tuple[str, ...] = ()):
        if normalization not in vlm_batches.NORMALIZATIONS:
            raise ValueError(f"normalization={normalization!r}; expected one of "
                             f"{vlm_batches.NORMALIZATIONS}")  # fmt: skip
        self.normalization = normalization
        # Named sources: batches carry `source` [B] (an index into them) and the step logs
        # each source's loss (`loss/<source>`, the mean over its rows' supervised tokens; 0
        # for a source without rows in the batch).
        self.sources = tuple(sources)
        if self.sources:
            self.batch_keys = (*VLM.batch_keys, "source")

    def configured(self, config):
        """With the synthetic world's data, the family that logs each source's loss."""
        super().configured(config)
        data = config.get("data") or {}
        if data.get("benchmark") == "vlm_synth" and not self.sources:
            from fomo_jax.data import vlm_synth

            return VLM(self.normalization, vlm_synth.SOURCES)
        return self

    # ---- model -----------------------------------------------------------------------------
    def model_config(self, config: ml_collections.ConfigDict) -> vlm.VLMConfig:
        """θ0's checkpoint's architecture (a LLaVA checkpoint) or `config.model.vlm`, a dict of
        `VLMConfig` fields whose `vision` may name a CLIP variant."""
        from fomo_jax import models

        if config.theta0.checkpoint:
            model_config = hf_lm.load_pretrained(config.theta0.checkpoint).config
            return models.with_memory_options(model_config, config.model)  # remat, scan
        if "vlm" not in config.model:
            raise ValueError("config.model.vlm: the VLM's architecture (VLMConfig fields) is "
                             "missing, and no θ0 checkpoint is given")  # fmt: skip
        fields = dict(config.model.vlm.to_dict())
        if isinstance(fields.get("vision"), str):
            fields["vision"] = models.get_config(fields["vision"]).to_dict()
        return models.with_memory_options(vlm.VLMConfig.from_dict(fields), config.model)

    def tokenizer(self, config, model_config):
        """The synthetic world's word tokenizer (`config.tokenizer="words"`), whose size the LM's
        vocabulary (and its added tokens) must hold."""
        from fomo_jax.data import vlm_synth

        if config.tokenizer != "words":
            raise ValueError(f"config.tokenizer={config.tokenizer!r}: the VLM family trains on "
                             "the synthetic world, whose tokenizer is 'words'")  # fmt: skip
        tokenizer = vlm_synth.WordTokenizer()
        vocabulary = model_config.lm.vocab_size + model_config.lm.added_tokens
        if vocabulary < tokenizer.vocab_size:
            raise ValueError(
                f"the LM's vocabulary of {vocabulary} ids is smaller than the "
                f"world's {tokenizer.vocab_size} (config.model.vlm.lm.vocab_size)"
            )
        if model_config.image_token_id != tokenizer.image_id:
            raise ValueError(
                f"config.model.vlm.image_token_id={model_config.image_token_id}, "
                f"but the world's image token is {tokenizer.image_id}"
            )
        return tokenizer

    def abstract_model(self, model_config) -> vlm.VisionLanguageModel:
        return vlm.abstract_vlm(model_config)

    def init_model(self, model_config, seed: int) -> vlm.VisionLanguageModel:
        return vlm.create_vlm(model_config, seed=seed)

    def load_params(self, path: str, model_config) -> Params:
        return jax.device_get(params_lib.split(hf_lm.load_pretrained(path))[1])

    # ---- training --------------------------------------------------------------------------
    def loss(self, graphdef) -> LossFn:
        normalization, sources = self.normalization, self.sources

        def loss_fn(params, batch, key):
            model = params_lib.merge(graphdef, params)
            prefix = batch["prefix_length"] if model.config.fusion == "prefix" else None
            images = pixels(batch["images"]) if batch["images"].shape[1] else None
            logits = model(batch["tokens"], images,
                           image_valid=batch["image_valid"],
                           attention_mask=batch["attention_mask"],
                           prefix_length=prefix)  # fmt: skip
            loss = vlm_batches.next_token_loss(logits, batch["tokens"], batch["loss_mask"],
                                               normalization)  # fmt: skip
            supervised = jnp.sum(jnp.asarray(batch["loss_mask"], jnp.float32)[:, :-1])
            metrics = {"supervised_tokens": supervised}
            if sources:
                metrics.update(source_losses(logits, batch, sources))
            return loss, metrics, {}

        return loss_fn

    def image_size(self, model_config) -> int:
        return model_config.vision.vision.image_size

    def abstract_batch(self, model_config, batch_size: int, *, length: int | None = None,
                       max_images: int = 1) -> dict:  # fmt: skip
        """The batch's arrays as `jax.ShapeDtypeStruct`s; `length` defaults to one image's
        slots (and two wrappers) plus 32 text tokens."""
        length = length or model_config.image_seq_length + 2 + 32
        size = self.image_size(model_config)
        shape = jax.ShapeDtypeStruct
        return {
            "tokens": shape((batch_size, length), jnp.int32),
            "images": shape((batch_size, max_images, size, size, 3), jnp.uint8),
            "image_valid": shape((batch_size, max_images), jnp.bool_),
            "attention_mask": shape((batch_size, length), jnp.bool_),
            "loss_mask": shape((batch_size, length), jnp.bool_),
            "prefix_length": shape((batch_size,), jnp.int32),
        } | ({"source": shape((batch_size,), jnp.int32)} if self.sources else {})

    # ---- parameter paths -------------------------------------------------------------------
    def group_of(self, path: str) -> str:
        group = path.split("/", 1)[0]
        if group not in self.groups:
            raise ValueError(f"{path}: not under image/, connector/ or lm/")
        return group

    def linear_paths(self, model_config) -> list[str]:
        """Every linear of the image tower's and the LM's transformer blocks."""
        image = [f"image/transformer/resblocks/{i}/{name}"
                 for i in range(model_config.vision.vision.layers)
                 for name in clip_lib.LINEAR_NAMES]  # fmt: skip
        lm = [f"lm/transformer/resblocks/{i}/{name}"
              for i in range(model_config.lm.num_hidden_layers) for name in LM_LINEARS]  # fmt: skip
        return image + lm

    # ---- evaluation and export -------------------------------------------------------------
    def evaluator(self, config, data, model_config, tokenizer, *, mesh=None, cache_dir=None):
        """The synthetic world's evaluation (`evaluate_vlm`) on one process."""
        if not hasattr(data, "world"):
            raise ValueError("the VLM family is evaluated on the synthetic world: "
                             "config.data.benchmark='vlm_synth'")  # fmt: skip
        return evaluate_vlm.Evaluator(data.world, tokenizer, model_config,
                                      items=config.eval.kinds.to_dict(), skills=data.tasks,
                                      batch_size=config.eval.batch_size)  # fmt: skip

    def export(self, params, model_config, directory: str, tokenizer) -> None:
        """A LLaVA checkpoint (transformers' layout; the `mlp2x_gelu` connector only)."""
        hf_lm.export_hf(params_lib.merge(self.graphdef(model_config), params), directory)


def source_losses(logits, batch, sources) -> dict:
    """{"loss/<source>": mean next-token loss of the batch's rows of each source} (0 where a
    source has no supervised token in the batch)."""
    logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[:, :-1], axis=-1)
    mask = jnp.asarray(batch["loss_mask"], jnp.float32)[:, :-1]
    targets = jnp.asarray(batch["tokens"])[:, 1:, None]
    nll = (-jnp.take_along_axis(logp, targets, axis=-1)[..., 0] * mask).sum(axis=1)
    rows = jax.nn.one_hot(batch["source"], len(sources), dtype=jnp.float32)  # [B, S]
    total, count = rows.T @ nll, rows.T @ mask.sum(axis=1)
    mean = total / jnp.maximum(count, 1.0)
    return {f"loss/{name}": mean[i] for i, name in enumerate(sources)}


FAMILY = VLM("token")
PER_EXAMPLE = VLM("example")
