"""Decoder language models of the Llama family (Llama, Mistral, Qwen2, SmolLM) in Flax NNX.

What real checkpoints define: RMSNorm, rotary position embeddings (RoPE) with the checkpoint's
`rope_theta` (and the `linear` and `llama3` scalings), a SwiGLU MLP, grouped-query attention,
optional q/k/v biases (Qwen2) and output-projection bias (Llama's `attention_bias`), a tied or
untied output head, and `head_dim` from the config. Attention goes through the one dispatcher
(`fomo_jax.kernels.attention`), so the Pallas kernel serves the LM as it serves CLIP.

Parameters are float32; matmuls run in the configured compute dtype while RMSNorm, softmax and
the residual stream stay in float32 (as CLIP does). Paths sit under `lm/` with one depth index
per block, in the layout CLIP uses (`lm/transformer/resblocks/{i}/attn/q_proj/kernel`), so
LiNeS, sharding rules and per-block selections read the depth the same way; the leaf names
otherwise follow the HF keys they come from (`input_layernorm`, `o_proj`, `gate_proj`, ...).

Call: `model(token_ids) -> logits [B, T, V]`; with `attention_mask` [B, T] (1 = token, 0 =
padding), `positions` [B, T] (default 0..T-1, as HF's forward), `inputs_embeds` [B, T, H]
instead of ids (the VLM's fused sequence), and a KV cache for decoding (`init_cache`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from fomo_jax import kernels
from fomo_jax.kernels.attention import IMPLEMENTATIONS
from fomo_jax.models import stack
from fomo_jax.models.clip import _default_option, _init, _normal, shape_only

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
ROPE_TYPES = ("default", "linear", "llama3")
_ONES = _init(nnx.initializers.ones)
_ZEROS = _init(nnx.initializers.zeros)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture of one decoder LM (HF `LlamaConfig` and its relatives, by their names
    where they exist). `rope_scaling` is a sorted tuple of (key, value) pairs (hashable; the
    config is static in a jitted function), e.g. (("factor", 8.0), ("rope_type", "llama3"))."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple = ()
    qkv_bias: bool = False  # Qwen2: q/k/v have biases; Llama's attention_bias: q/k/v and o
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    sliding_window: int | None = None  # attention window; longer inputs are refused
    model_type: str = "llama"
    dtype: str = "float32"  # compute dtype
    attention_implementation: str | None = None
    initializer_range: float = 0.02
    # Tokens added after a checkpoint's vocabulary (a VLM's image, wrapper and end-of-utterance
    # ids): ids vocab_size .. vocab_size + added_tokens - 1 have their own embedding and output
    # rows (`lm/added_embeddings`, `lm/added_head`), so they can train while the LM is frozen;
    # `fold_added_tokens` makes them ordinary rows of a vocabulary that much larger (export).
    added_tokens: int = 0
    # Memory / compile levers of the blocks (`fomo_jax.models.stack`): "none", "full" or
    # "save_matmuls" rematerialisation; scan over the blocks (not while decoding with a KV
    # cache: that runs the loop). Same parameters either way.
    remat: str = "none"
    scan: bool = False

    def __post_init__(self):
        stack.check_options(self.remat, self.scan)
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if self.added_tokens < 0:
            raise ValueError(f"added_tokens={self.added_tokens} must be >= 0")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation={self.attention_implementation!r}; expected one of "
                f"{IMPLEMENTATIONS}"
            )
        scaling = dict(self.rope_scaling)
        kind = scaling.get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise ValueError(
                f"rope_scaling.rope_type={kind!r} is not supported (supported: {ROPE_TYPES})"
            )
        object.__setattr__(self, "rope_scaling", tuple(sorted(scaling.items())))

    def __repr__(self):
        # The dataclass repr without `remat`, `scan` at their defaults: configs read (and key
        # caches) as before the fields existed.
        fields = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if not _default_option(self, f.name)
        ]
        return f"{type(self).__qualname__}({', '.join(fields)})"

    def replace(self, **changes) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LlamaConfig:
        d = dict(d)
        d["rope_scaling"] = tuple(tuple(item) for item in d.get("rope_scaling", ()))
        return cls(**d)


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
    """Inverse frequencies [head_dim // 2] of RoPE, with the config's scaling (float32)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    scaling = dict(cfg.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":  # positions / factor
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # Llama 3.1: long wavelengths scaled, a smooth band in between
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return jnp.where(medium, smoothed, scaled)
    return inv_freq


def apply_rope(x, positions, inv_freq):
    """x [B, T, H, D] rotated by positions [B, T] (HF's rotate_half convention: the first and
    second halves of the head dimension are the pairs)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, out_dtype):
        self.scale = nnx.Param(_ONES(None, (dim,), jnp.float32))
        self.eps, self.out_dtype = eps, out_dtype

    def __call__(self, x):
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (self.scale[...] * x).astype(self.out_dtype)


def _linear(cfg, in_features, out_features, bias, std, rngs, sites=None, path=""):
    """A linear of the decoder; through `sites` (adapters) when given, at module `path`."""
    kwargs = dict(use_bias=bias, dtype=jnp.dtype(cfg.dtype), kernel_init=_normal(std),
                  bias_init=_ZEROS, rngs=rngs)  # fmt: skip
    if sites is None:
        return nnx.Linear(in_features, out_features, **kwargs)
    return sites.linear(path, in_features, out_features, **kwargs)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs, sites=None, path=""):
        h, d, std = cfg.hidden_size, cfg.head_dim, cfg.initializer_range
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        at = dict(rngs=rngs, sites=sites)
        self.q_proj = _linear(cfg, h, q, cfg.qkv_bias, std, path=f"{path}/q_proj", **at)
        self.k_proj = _linear(cfg, h, kv, cfg.qkv_bias, std, path=f"{path}/k_proj", **at)
        self.v_proj = _linear(cfg, h, kv, cfg.qkv_bias, std, path=f"{path}/v_proj", **at)
        self.o_proj = _linear(cfg, q, h, cfg.o_bias, std, path=f"{path}/o_proj", **at)
        self.cfg = cfg

    def __call__(self, x, positions, inv_freq, kv_mask, cache=None, cache_index=None,
                 prefix_length=None):  # fmt: skip
        cfg = self.cfg
        batch, length, _ = x.shape
        q = self.q_proj(x).reshape(batch, length, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(batch, length, cfg.num_key_value_heads, cfg.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_cache = None
        if cache is not None:  # write this step's keys and values at their slots
            start = 0 if cache_index is None else cache_index
            new_cache = {
                name: jax.lax.dynamic_update_slice_in_dim(
                    cache[name], value.astype(cache[name].dtype), start, axis=1
                )
                for name, value in (("k", k), ("v", v))
            }
        if cache_index is not None:  # decoding: one query against every valid cached slot
            k, v = new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype)
            out = kernels.attention(q, k, v, kv_mask=kv_mask,
                                    implementation=cfg.attention_implementation)  # fmt: skip
        else:  # the input attends to itself, causally (its first prefix_length bidirectionally)
            out = kernels.attention(q, k, v, causal=True, kv_mask=kv_mask,
                                    prefix_length=prefix_length,
                                    implementation=cfg.attention_implementation)  # fmt: skip
        out = self.o_proj(out.reshape(batch, length, cfg.num_attention_heads * cfg.head_dim))
        return out, new_cache


class MLP(nnx.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs, sites=None, path=""):
        h, m, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        at = dict(rngs=rngs, sites=sites)
        self.gate_proj = _linear(cfg, h, m, cfg.mlp_bias, std, path=f"{path}/gate_proj", **at)
        self.up_proj = _linear(cfg, h, m, cfg.mlp_bias, std, path=f"{path}/up_proj", **at)
        self.down_proj = _linear(cfg, m, h, cfg.mlp_bias, std, path=f"{path}/down_proj", **at)
        self.activation = cfg.hidden_act

    def __call__(self, x):
        return self.down_proj(ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)); the residual stream in float32."""

    def __init__(self, cfg: LlamaConfig, *, rngs, sites=None, path=""):
        dtype = jnp.dtype(cfg.dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, rngs=rngs, sites=sites, path=f"{path}/attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg, rngs=rngs, sites=sites, path=f"{path}/mlp")

    def __call__(self, x, positions, inv_freq, kv_mask, cache=None, cache_index=None,
                 prefix_length=None):  # fmt: skip
        out, cache = self.attn(
            self.input_layernorm(x), positions, inv_freq, kv_mask, cache, cache_index,
            prefix_length,
        )  # fmt: skip
        x = x + out.astype(jnp.float32)
        return x + self.mlp(self.post_attention_layernorm(x)).astype(jnp.float32), cache


class Transformer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs, sites=None):
        self.resblocks = nnx.List([
            DecoderBlock(cfg, rngs=rngs, sites=sites, path=f"lm/transformer/resblocks/{i}")
            for i in range(cfg.num_hidden_layers)
        ])  # fmt: skip


class Decoder(nnx.Module):
    """Embedding, blocks, final norm and output head (the parameters under `lm/`)."""

    def __init__(self, cfg: LlamaConfig, *, rngs, sites=None):
        """`sites` (`models.adapters.Sites`): adapters on the blocks' linears, when given."""
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, embedding_init=_normal(cfg.initializer_range),
            rngs=rngs,
        )  # fmt: skip
        self.transformer = Transformer(cfg, rngs=rngs, sites=sites)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, jnp.dtype(cfg.dtype))
        if not cfg.tie_word_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, False,
                                   cfg.initializer_range, rngs)  # fmt: skip
        if cfg.added_tokens:
            init = _normal(cfg.initializer_range)
            self.added_embeddings = nnx.Param(
                init(rngs.params(), (cfg.added_tokens, cfg.hidden_size), jnp.float32)
            )
            if not cfg.tie_word_embeddings:
                self.added_head = nnx.Param(
                    init(rngs.params(), (cfg.hidden_size, cfg.added_tokens), jnp.float32)
                )
        self.cfg = cfg

    def embed(self, token_ids):
        ids = jnp.asarray(token_ids, jnp.int32)
        if not self.cfg.added_tokens:
            return self.embed_tokens(ids).astype(jnp.float32)
        vocab = self.cfg.vocab_size
        base = self.embed_tokens(jnp.minimum(ids, vocab - 1)).astype(jnp.float32)
        added = self.added_embeddings[...][jnp.clip(ids - vocab, 0, self.cfg.added_tokens - 1)]
        return jnp.where((ids >= vocab)[..., None], added.astype(jnp.float32), base)

    def logits(self, hidden):
        """[B, T, vocab_size + added_tokens] float32."""
        hidden = self.norm(hidden)
        if self.cfg.tie_word_embeddings:
            table = self.embed_tokens.embedding[...].astype(hidden.dtype)
            logits = jnp.einsum("bth,vh->btv", hidden, table, preferred_element_type=jnp.float32)
        else:
            logits = self.lm_head(hidden).astype(jnp.float32)
        if not self.cfg.added_tokens:
            return logits
        if self.cfg.tie_word_embeddings:
            head = self.added_embeddings[...].T
        else:
            head = self.added_head[...]
        added = jnp.einsum("bth,hv->btv", hidden, head.astype(hidden.dtype),
                           preferred_element_type=jnp.float32)  # fmt: skip
        return jnp.concatenate([logits, added], axis=-1)

    def __call__(self, hidden, positions, kv_mask, cache=None, cache_index=None,
                 prefix_length=None):  # fmt: skip
        inv_freq = rope_frequencies(self.cfg)
        if cache is None:  # training and scoring: the config's remat and scan

            def call(block, h):
                return block(h, positions, inv_freq, kv_mask, None, cache_index, prefix_length)[0]

            hidden = stack.run(self.transformer.resblocks, hidden, call, remat=self.cfg.remat,
                               scan=self.cfg.scan)  # fmt: skip
            return self.logits(hidden), None
        new_cache = []  # with a KV cache: the loop, whatever remat and scan say
        for i, block in enumerate(self.transformer.resblocks):
            hidden, layer_cache = block(
                hidden, positions, inv_freq, kv_mask, cache[i], cache_index, prefix_length
            )
            new_cache.append(layer_cache)
        return self.logits(hidden), new_cache


class LanguageModel(nnx.Module):
    """A decoder LM: `model(token_ids) -> logits [B, T, V]` (float32)."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.lm = Decoder(cfg, rngs=rngs)

    def __call__(
        self,
        token_ids=None,
        *,
        attention_mask=None,
        positions=None,
        inputs_embeds=None,
        cache=None,
        cache_index=None,
    ):
        """Logits [B, T, V]; with `cache`, (logits, updated cache).

        token_ids: int [B, T] (or `inputs_embeds` [B, T, hidden]). attention_mask: [B, T]
        (without a cache) or [B, cache length] (decoding), 1 for tokens, 0 for padding.
        positions: [B, T] RoPE positions, default 0..T-1 (decoding: required). cache: from
        `init_cache`; without `cache_index` the input is a prompt written at slots 0..T-1 (a
        prefill), with it one token (T = 1) written at slot `cache_index` that attends to
        every slot `attention_mask` marks.
        """
        if inputs_embeds is None:
            hidden = self.lm.embed(token_ids)
        else:
            hidden = jnp.asarray(inputs_embeds, jnp.float32)
        return decode(self.lm, hidden, attention_mask, positions, cache, cache_index)


def decode(decoder: Decoder, hidden, attention_mask=None, positions=None, cache=None,
           cache_index=None, prefix_length=None):  # fmt: skip
    """The decoder on input embeddings [B, T, hidden] (see `LanguageModel.__call__`);
    `prefix_length` [B]: the first positions of each row attend to each other both ways
    (prefix-LM; the rest stays causal)."""
    batch, length = hidden.shape[:2]
    window = decoder.cfg.sliding_window
    span = length if cache is None else cache[0]["k"].shape[1]
    if window is not None and span > window:
        raise ValueError(
            f"sliding_window={window} is shorter than the input ({span} positions); "
            "sliding-window attention is not implemented"
        )
    if cache_index is not None and length != 1:
        raise ValueError(f"decoding with a cache takes one token per step, got {length}")
    if cache_index is not None and prefix_length is not None:
        raise ValueError("prefix_length shapes the prompt's attention: pass it to the prefill")
    if positions is None:
        if cache_index is not None:
            raise ValueError("decoding with a cache needs `positions`")
        positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    kv_mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    prefix = None if prefix_length is None else jnp.asarray(prefix_length, jnp.int32)
    logits, cache = decoder(hidden, jnp.asarray(positions), kv_mask, cache, cache_index, prefix)
    return logits if cache is None else (logits, cache)


def fold_added_tokens(params: dict, cfg: LlamaConfig) -> tuple[dict, LlamaConfig]:
    """(params, config) with the added tokens as ordinary rows of a vocabulary of
    vocab_size + added_tokens (the same logits; what a checkpoint stores). `params` holds the
    decoder under `lm/` (a LanguageModel's or a VLM's tree)."""
    if not cfg.added_tokens:
        return params, cfg
    lm = dict(params["lm"])
    embed = dict(lm["embed_tokens"])
    embed["embedding"] = jnp.concatenate([embed["embedding"], lm.pop("added_embeddings")])
    lm["embed_tokens"] = embed
    if not cfg.tie_word_embeddings:
        head = dict(lm["lm_head"])
        head["kernel"] = jnp.concatenate([head["kernel"], lm.pop("added_head")], axis=1)
        lm["lm_head"] = head
    folded = cfg.replace(vocab_size=cfg.vocab_size + cfg.added_tokens, added_tokens=0)
    return dict(params, lm=lm), folded


def init_cache(cfg: LlamaConfig, batch: int, length: int, dtype=None) -> list[dict]:
    """An empty KV cache: per block {"k", "v"}: [batch, length, kv heads, head_dim]."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (batch, length, cfg.num_key_value_heads, cfg.head_dim)
    return [
        {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
        for _ in range(cfg.num_hidden_layers)
    ]


def create_lm(cfg: LlamaConfig, seed: int = 0) -> LanguageModel:
    return LanguageModel(cfg, rngs=nnx.Rngs(seed))


def abstract_lm(cfg: LlamaConfig) -> LanguageModel:
    """The structure for `cfg` without weights (for loading checkpoints into)."""
    with shape_only():
        return LanguageModel(cfg, rngs=nnx.Rngs(0))
