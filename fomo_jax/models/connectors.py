"""Connectors of a VLM: image-tower features [n, tokens, C] -> visual tokens [n, m, LM width].

A registry keyed by `VLMConfig.connector`:

- `linear`: one linear map (LLaVA-1; VILA's `linear`). m = tokens.
- `mlp2x_gelu`: linear_2(act(linear_1(x))) (LLaVA-1.5, VILA; the layout of HF LLaVA's
  `multi_modal_projector`, which the checkpoint import and export read and write). m = tokens.
- `mlp_downsample`: VILA's downsampling projector: every 2x2 block of neighbouring patches is
  concatenated into one token of 4C features (row-major over the blocks, the block's four
  patches row-major; an odd grid is padded with zeros on the right and at the bottom), then
  LayerNorm, linear, GELU, linear. m = ceil(g / 2)^2 for a g x g patch grid: 4x fewer tokens.
- `perceiver`: Idefics2's connector: a SwiGLU modality projection to the LM width (the pre-MLP),
  then `perceiver_depth` blocks in which `perceiver_latents` learned latents (initialised to
  ones) attend, with grouped-query attention and no causal mask, to concat(context, latents),
  each block with RMSNorms on latents and context, a residual, an RMSNorm and a SwiGLU MLP of 4x
  the width; a final RMSNorm. m = perceiver_latents. A context padding mask ([n, tokens], True
  for real features) keeps padded features out of every key and value.

`make(cfg, rngs)` builds `cfg.connector`'s module; `visual_tokens(cfg)` is its m.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from fomo_jax import kernels
from fomo_jax.models.clip import _ONES, _ZEROS, _normal
from fomo_jax.models.clip import ACTIVATIONS as CLIP_ACTIVATIONS
from fomo_jax.models.llama import ACTIVATIONS as LM_ACTIVATIONS
from fomo_jax.models.llama import RMSNorm

ACTIVATIONS = {**LM_ACTIVATIONS, **CLIP_ACTIVATIONS}


def _linear(n_in, n_out, bias, dtype, rngs, std=0.02):
    return nnx.Linear(n_in, n_out, use_bias=bias, dtype=dtype, kernel_init=_normal(std),
                      bias_init=_ZEROS, rngs=rngs)  # fmt: skip


def _features(cfg) -> int:
    return cfg.vision.vision.width * len(cfg.feature_layers)


def _dtype(cfg):
    return jnp.dtype(cfg.lm.dtype)


class Linear(nnx.Module):
    """`linear`: one linear map to the LM width."""

    def __init__(self, cfg, *, rngs):
        self.linear = _linear(_features(cfg), cfg.lm.hidden_size, cfg.projector_bias, _dtype(cfg),
                              rngs)  # fmt: skip

    def __call__(self, x, mask=None):
        return self.linear(x)


class MLP2x(nnx.Module):
    """`mlp2x_gelu` (LLaVA's projector): linear_2(act(linear_1(x)))."""

    def __init__(self, cfg, *, rngs):
        width, dtype, bias = cfg.lm.hidden_size, _dtype(cfg), cfg.projector_bias
        self.linear_1 = _linear(_features(cfg), width, bias, dtype, rngs)
        self.linear_2 = _linear(width, width, bias, dtype, rngs)
        self.activation = cfg.projector_hidden_act

    def __call__(self, x, mask=None):
        return self.linear_2(ACTIVATIONS[self.activation](self.linear_1(x)))


def downsample_2x2(x):
    """[n, g*g, C] patch features (row-major grid) -> [n, ceil(g/2)^2, 4C]: each 2x2 block's
    four patches (top-left, top-right, bottom-left, bottom-right) concatenated."""
    n, tokens, c = x.shape
    g = math.isqrt(tokens)
    if g * g != tokens:
        raise ValueError(f"mlp_downsample needs a square patch grid; got {tokens} tokens")
    x = x.reshape(n, g, g, c)
    if g % 2:  # pad the last row and column with zeros
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        g += 1
    x = x.reshape(n, g // 2, 2, g // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (g // 2) ** 2, 4 * c)


class Downsample(nnx.Module):
    """`mlp_downsample` (VILA): 2x2 neighbours concatenated -> LayerNorm -> linear -> GELU ->
    linear."""

    def __init__(self, cfg, *, rngs):
        features, width, dtype = 4 * _features(cfg), cfg.lm.hidden_size, _dtype(cfg)
        self.norm = nnx.LayerNorm(features, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
        self.linear_1 = _linear(features, width, cfg.projector_bias, dtype, rngs)
        self.linear_2 = _linear(width, width, cfg.projector_bias, dtype, rngs)

    def __call__(self, x, mask=None):
        x = self.norm(downsample_2x2(x).astype(jnp.float32))
        return self.linear_2(jax.nn.gelu(self.linear_1(x), approximate=False))


class SwiGLU(nnx.Module):
    """down(act(gate(x)) * up(x)), no biases (Idefics2's MLP)."""

    def __init__(self, n_in, hidden, n_out, activation, dtype, rngs):
        self.gate_proj = _linear(n_in, hidden, False, dtype, rngs)
        self.up_proj = _linear(n_in, hidden, False, dtype, rngs)
        self.down_proj = _linear(hidden, n_out, False, dtype, rngs)
        self.activation = activation

    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nnx.Module):
    """Latents (queries) attend to concat(context, latents) (keys, values); grouped-query."""

    def __init__(self, cfg, *, rngs):
        width, dtype = cfg.lm.hidden_size, _dtype(cfg)
        heads, kv_heads, dim = cfg.perceiver_heads, cfg.perceiver_kv_heads, cfg.perceiver_head_dim
        self.q_proj = _linear(width, heads * dim, False, dtype, rngs)
        self.k_proj = _linear(width, kv_heads * dim, False, dtype, rngs)
        self.v_proj = _linear(width, kv_heads * dim, False, dtype, rngs)
        self.o_proj = _linear(heads * dim, width, False, dtype, rngs)
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim
        self.implementation = cfg.lm.attention_implementation

    def __call__(self, latents, context, kv_mask):
        n, m, _ = latents.shape
        both = jnp.concatenate([context, latents], axis=1)
        q = self.q_proj(latents).reshape(n, m, self.heads, self.dim)
        k = self.k_proj(both).reshape(n, both.shape[1], self.kv_heads, self.dim)
        v = self.v_proj(both).reshape(n, both.shape[1], self.kv_heads, self.dim)
        out = kernels.attention(q, k, v, kv_mask=kv_mask, implementation=self.implementation)
        return self.o_proj(out.reshape(n, m, self.heads * self.dim))


class PerceiverBlock(nnx.Module):
    def __init__(self, cfg, *, rngs):
        width, eps, dtype = cfg.lm.hidden_size, cfg.lm.rms_norm_eps, _dtype(cfg)
        self.latents_norm = RMSNorm(width, eps, dtype)
        self.context_norm = RMSNorm(width, eps, dtype)
        self.attn = PerceiverAttention(cfg, rngs=rngs)
        self.post_attention_norm = RMSNorm(width, eps, dtype)
        self.mlp = SwiGLU(width, 4 * width, width, cfg.perceiver_act, dtype, rngs)

    def __call__(self, latents, context, kv_mask):
        latents = latents + self.attn(self.latents_norm(latents), self.context_norm(context),
                                      kv_mask)  # fmt: skip
        return latents + self.mlp(self.post_attention_norm(latents))


class Perceiver(nnx.Module):
    """`perceiver` (Idefics2): pre-MLP, then learned latents resample the context."""

    def __init__(self, cfg, *, rngs):
        width, dtype = cfg.lm.hidden_size, _dtype(cfg)
        hidden = cfg.perceiver_projection_size or cfg.lm.intermediate_size
        self.modality_projection = SwiGLU(_features(cfg), hidden, width, cfg.perceiver_act, dtype,
                                          rngs)  # fmt: skip
        self.latents = nnx.Param(_ONES(None, (cfg.perceiver_latents, width), jnp.float32))
        self.layers = nnx.List([PerceiverBlock(cfg, rngs=rngs)
                                for _ in range(cfg.perceiver_depth)])  # fmt: skip
        self.norm = RMSNorm(width, cfg.lm.rms_norm_eps, dtype)

    def __call__(self, x, mask=None):
        """x [n, tokens, C]; mask [n, tokens] bool, True for real features (None: all)."""
        context = self.modality_projection(x)
        n = context.shape[0]
        latents = jnp.broadcast_to(self.latents[...], (n, *self.latents.shape)).astype(
            context.dtype
        )
        context_mask = jnp.ones(context.shape[:2], bool) if mask is None else jnp.asarray(mask)
        kv_mask = jnp.concatenate([context_mask, jnp.ones(latents.shape[:2], bool)], axis=1)
        for layer in self.layers:
            latents = layer(latents, context, kv_mask)
        return self.norm(latents)


CONNECTORS = {"linear": Linear, "mlp2x_gelu": MLP2x, "mlp_downsample": Downsample,
              "perceiver": Perceiver}  # fmt: skip


def make(cfg, *, rngs) -> nnx.Module:
    return CONNECTORS[cfg.connector](cfg, rngs=rngs)


def visual_tokens(cfg, tokens: int) -> int:
    """Visual tokens per image out of `cfg.connector` for `tokens` feature tokens."""
    if cfg.connector == "mlp_downsample":
        half = (math.isqrt(tokens) + 1) // 2  # the grid's side after 2x2 merging
        return half * half
    if cfg.connector == "perceiver":
        return cfg.perceiver_latents
    return tokens
