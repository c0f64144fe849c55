"""LLaVA-style vision-language models: CLIP image tower -> projector -> decoder LM.

The image tower is CLIP's ViT without its embedding head (`image/...`); its features come from
a selectable block (`vision_feature_layer`, HF's index into the tower's hidden states: 0 is the
input of the first block, -1 the last block's output, -2 the penultimate; a tuple of layers is
concatenated along the features), with the class token dropped (`default`) or kept (`full`).
A connector (`connector`, `fomo_jax.models.connectors`: `linear`, LLaVA's `mlp2x_gelu`, the
default and the checkpoint layout: `connector/linear_1`, `projector_hidden_act`,
`connector/linear_2`, HF's `gelu` being the exact erf form; VILA's `mlp_downsample`; Idefics2's
`perceiver`) maps them to the LM's width, and fusion puts them in the token sequence: each
image occupies `image_seq_length` copies of `image_token_id`, and its visual tokens replace
those embeddings in order (HF's convention). `fusion` sets the attention: `interleave` (fully
autoregressive: causal over everything) or `prefix` (PaliGemma: each row's first
`prefix_length` tokens, its images and prompt, attend to each other both ways, the answer
after them causally; the attention dispatcher's prefix mask). Everything after the fusion is
the LM (`lm/...`, `fomo_jax.models.llama`), so a text-only batch of an `interleave` VLM gives
exactly the LM's logits.

Call: `vlm(token_ids, images) -> logits [B, T, V]`, `images` float32 normalised pixels
[B, H, W, 3] (one image per row) or [B, N, H, W, 3] (N per row), with `image_valid` [B] or
[B, N] marking the images that exist (rows without images, rows with fewer); the k-th run of
image tokens in the batch (row-major) takes the k-th valid image.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fomo_jax.models import adapters as adapters_lib
from fomo_jax.models import connectors
from fomo_jax.models.clip import CLIPConfig, VisionTower, shape_only
from fomo_jax.models.llama import Decoder, LlamaConfig, decode

FEATURE_STRATEGIES = ("default", "full")
FUSIONS = ("interleave", "prefix")
PROJECTOR_ACTIVATIONS = connectors.ACTIVATIONS


@dataclasses.dataclass(frozen=True)
class VLMConfig:
    """A LLaVA-style VLM. `vision`: the image tower's CLIP architecture (its `text` part and
    `embed_dim` are unused); `lm`: the decoder's; `connector` and its options: see
    `fomo_jax.models.connectors` (`projector_*` for the MLP connectors, `perceiver_*` for the
    Perceiver: latents, depth, heads, KV heads, head size, activation, the pre-MLP's hidden
    size, None for the LM's intermediate size)."""

    vision: CLIPConfig
    lm: LlamaConfig
    image_token_id: int
    vision_feature_layer: int | tuple[int, ...] = -2
    vision_feature_select_strategy: str = "default"
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    fusion: str = "interleave"
    connector: str = "mlp2x_gelu"
    perceiver_latents: int = 64
    perceiver_depth: int = 3
    perceiver_heads: int = 16
    perceiver_kv_heads: int = 4
    perceiver_head_dim: int = 96
    perceiver_act: str = "silu"
    perceiver_projection_size: int | None = None
    # LoRA / DoRA / VeRA on the image tower's and the LM's block linears (`models.adapters`;
    # paths `image/transformer/resblocks/{i}/...`, `lm/transformer/resblocks/{i}/...`).
    adapter: adapters_lib.AdapterConfig | None = None

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion={self.fusion!r}; expected one of {FUSIONS}")
        if self.connector not in connectors.CONNECTORS:
            raise ValueError(f"connector={self.connector!r}; expected one of "
                             f"{sorted(connectors.CONNECTORS)}")  # fmt: skip
        if self.connector == "mlp_downsample" and self.vision_feature_select_strategy != "default":
            raise ValueError("connector='mlp_downsample' merges 2x2 patches of the grid: it "
                             "needs vision_feature_select_strategy='default' (no class "
                             "token)")  # fmt: skip
        if self.connector == "perceiver" and self.perceiver_heads % self.perceiver_kv_heads:
            raise ValueError(f"perceiver_heads={self.perceiver_heads} is not a multiple of "
                             f"perceiver_kv_heads={self.perceiver_kv_heads}")  # fmt: skip
        if self.perceiver_act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(f"perceiver_act={self.perceiver_act!r} is not supported")
        if self.vision_feature_select_strategy not in FEATURE_STRATEGIES:
            raise ValueError(
                f"vision_feature_select_strategy={self.vision_feature_select_strategy!r}; "
                f"expected one of {FEATURE_STRATEGIES}"
            )
        if self.projector_hidden_act not in PROJECTOR_ACTIVATIONS:
            raise ValueError(
                f"projector_hidden_act={self.projector_hidden_act!r} is not supported; expected "
                f"one of {sorted(PROJECTOR_ACTIVATIONS)}"
            )
        layers = self.feature_layers
        depth = self.vision.vision.layers
        if any(not -depth - 1 <= layer <= depth for layer in layers):
            raise ValueError(
                f"vision_feature_layer={self.vision_feature_layer!r} outside the image tower's "
                f"{depth + 1} hidden states"
            )
        if not 0 <= self.image_token_id < self.lm.vocab_size + self.lm.added_tokens:
            raise ValueError(
                f"image_token_id={self.image_token_id} outside the LM's vocabulary of "
                f"{self.lm.vocab_size} (+ {self.lm.added_tokens} added tokens)"
            )
        if isinstance(self.vision_feature_layer, list):
            object.__setattr__(self, "vision_feature_layer", tuple(self.vision_feature_layer))

    @property
    def feature_layers(self) -> tuple[int, ...]:
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, tuple | list) else (layer,)

    @property
    def image_seq_length(self) -> int:
        """Visual tokens per image (image tokens each image occupies in the sequence)."""
        v = self.vision.vision
        patches = (v.image_size // v.patch_size) ** 2
        return connectors.visual_tokens(self, patches + (self.vision_feature_select_strategy
                                                         == "full"))  # fmt: skip

    def replace(self, **changes) -> VLMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VLMConfig:
        d = dict(d)
        d["vision"] = CLIPConfig.from_dict(d["vision"])
        d["lm"] = LlamaConfig.from_dict(d["lm"])
        if isinstance(d.get("vision_feature_layer"), list):
            d["vision_feature_layer"] = tuple(d["vision_feature_layer"])
        if d.get("adapter") is not None:
            d["adapter"] = adapters_lib.AdapterConfig(**d["adapter"])
        return cls(**d)


class VisionLanguageModel(nnx.Module):
    """`image` (CLIP ViT), `connector` (projector), `lm` (decoder)."""

    def __init__(self, cfg: VLMConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        sites = adapters_lib.Sites(cfg.adapter)
        self.image = VisionTower(cfg.vision, rngs=rngs, sites=sites, projection=False)
        self.connector = connectors.make(cfg, rngs=rngs)
        self.lm = Decoder(cfg.lm, rngs=rngs, sites=sites)
        shared = sites.finish()
        if shared is not None:  # VeRA's shared random matrices
            self.adapter_shared = shared

    def image_features(self, pixels, mask=None):
        """float32 [n, H, W, 3] normalised pixels -> [n, image_seq_length, LM width]; `mask`
        [n, tokens] marks the image tower's real tokens for the Perceiver (None: all)."""
        layers = self.config.feature_layers
        depth = self.config.vision.vision.layers
        upto = max(layer % (depth + 1) for layer in layers)
        states = self.image.hidden_states(jnp.asarray(pixels, jnp.float32), upto=upto)
        x = jnp.concatenate([states[layer % (depth + 1)] for layer in layers], axis=-1)
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]  # drop the class token
        return self.connector(x, mask).astype(jnp.float32)

    def embed(self, token_ids, images=None, image_valid=None):
        """The fused input embeddings [B, T, LM width]: token embeddings with every image
        token's replaced by its image's visual token."""
        hidden = self.lm.embed(token_ids)
        is_image = jnp.asarray(token_ids) == self.config.image_token_id
        seq = self.config.image_seq_length
        if images is None:
            check_image_tokens(token_ids, self.config.image_token_id, 0, seq)
            return hidden
        images = jnp.asarray(images)
        if images.ndim == 4:
            images = images[:, None]
        batch, per_row = images.shape[:2]
        if image_valid is None:
            valid = np.ones((batch, per_row), bool)
        else:
            valid = image_valid
        valid = jnp.asarray(valid, bool).reshape(batch * per_row)
        if not isinstance(valid, jax.core.Tracer):
            check_image_tokens(token_ids, self.config.image_token_id, int(np.sum(valid)), seq)
        features = self.image_features(images.reshape(batch * per_row, *images.shape[2:]))
        # The k-th image token of the batch (row-major) is visual token k % seq of the
        # (k // seq)-th valid image.
        rank = jnp.cumsum(is_image.reshape(-1)) - 1
        order = jnp.argsort(~valid, stable=True)  # valid images first, in batch order
        image = order[jnp.clip(rank // seq, 0, batch * per_row - 1)]
        visual = features[image, rank % seq].reshape(hidden.shape)
        return jnp.where(is_image[..., None], visual, hidden)

    def __call__(
        self, token_ids, images=None, *, image_valid=None, attention_mask=None, positions=None,
        cache=None, cache_index=None, prefix_length=None,
    ):  # fmt: skip
        """Logits [B, T, V] (float32); with `cache`, (logits, updated cache), as
        `LanguageModel.__call__` (decoding steps pass text tokens only). `prefix` fusion:
        `prefix_length` [B] (each row's image slots and prompt, which attend to each other
        both ways; the answer after them is causal) is required except when decoding."""
        if self.config.fusion == "prefix" and prefix_length is None and cache_index is None:
            raise ValueError("fusion='prefix' needs prefix_length: the image and prompt tokens "
                             "of each row")  # fmt: skip
        if self.config.fusion == "interleave" and prefix_length is not None:
            raise ValueError("prefix_length is for fusion='prefix'; this VLM is 'interleave'")
        hidden = self.embed(token_ids, images, image_valid)
        return decode(self.lm, hidden, attention_mask, positions, cache, cache_index,
                      prefix_length)  # fmt: skip


def check_image_tokens(token_ids, image_token_id, images: int, seq: int) -> None:
    """Host ids only: the image tokens must be `images` x `seq` (an error naming both)."""
    if isinstance(token_ids, jax.core.Tracer):
        return
    tokens = int(np.sum(np.asarray(token_ids) == image_token_id))
    if tokens != images * seq:
        raise ValueError(
            f"{tokens} image tokens (id {image_token_id}) in token_ids, but {images} images x "
            f"image_seq_length {seq} = {images * seq} visual tokens"
        )


def create_vlm(cfg: VLMConfig, seed: int = 0) -> VisionLanguageModel:
    return VisionLanguageModel(cfg, rngs=nnx.Rngs(seed))


def abstract_vlm(cfg: VLMConfig) -> VisionLanguageModel:
    """The structure for `cfg` without weights (for loading checkpoints into)."""
    with shape_only():
        return VisionLanguageModel(cfg, rngs=nnx.Rngs(0))
