"""CLIP (ViT image tower + causal text transformer) as Flax NNX modules.

Layout and names follow OpenCLIP (`ln_pre`, `transformer.resblocks.{i}`, `ln_1`, `attn`,
`ln_2`, `mlp.c_fc`, `mlp.c_proj`, `ln_post`, `ln_final`), so a parameter path reads like the
OpenCLIP state-dict key it came from. Parameters are float32; matmuls run in the configured
compute dtype (bfloat16 on accelerators) while LayerNorm, softmax and the residual stream stay
in float32.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fomo_jax import kernels
from fomo_jax.kernels.attention import IMPLEMENTATIONS
from fomo_jax.models import adapters as adapters_lib
from fomo_jax.models import stack
from fomo_jax.models.adapters import AdapterConfig

# OpenAI CLIP normalisation statistics (spec/fif.md §2.6), used by every CLIP here.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

# The linears of a transformer block adapters may target, and the named sets of them:
# "reference" = the reference's effective set {q, k, v, c_proj} in every block of both towers;
# "all_linear" adds out_proj and c_fc (the corrected variant).
LINEAR_NAMES = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/out_proj", "mlp/c_fc",
                "mlp/c_proj")  # fmt: skip
ADAPTER_TARGETS = {
    "reference": r"(image|text)/transformer/resblocks/\d+/(attn/(q|k|v)_proj|mlp/c_proj)",
    "all_linear": (
        r"(image|text)/transformer/resblocks/\d+/(attn/(q|k|v|out)_proj|mlp/(c_fc|c_proj))"
    ),
}

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf form (LAION models)
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
}


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Everything that fixes a CLIP's architecture and numerics."""

    embed_dim: int = 512
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5
    logit_scale_init: float = math.log(1 / 0.07)
    dtype: str = "float32"  # compute dtype; parameters are always float32
    attention_implementation: str | None = None
    # LoRA / DoRA / VeRA on the transformer linears (fomo_jax.models.adapters); None: plain CLIP.
    adapter: AdapterConfig | None = None
    # SigLIP's learnable logit bias b (its initial value, -10 in the paper); None: no such leaf.
    logit_bias: float | None = None
    # Memory / compile levers of both towers' blocks (`fomo_jax.models.stack`): "none", "full"
    # or "save_matmuls" rematerialisation; scan over the blocks. Same parameters either way.
    remat: str = "none"
    scan: bool = False

    def __post_init__(self):
        if self.adapter is not None and not isinstance(self.adapter, AdapterConfig):
            raise ValueError(f"adapter={self.adapter!r}; expected an AdapterConfig or None")
        stack.check_options(self.remat, self.scan)
        if self.attention_implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"attention_implementation={self.attention_implementation!r}; "
                f"expected one of {IMPLEMENTATIONS}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation={self.activation!r}; expected one of {sorted(ACTIVATIONS)}"
            )
        for name, tower in (("vision", self.vision), ("text", self.text)):
            if tower.width % tower.heads:
                raise ValueError(
                    f"{name} width {tower.width} is not divisible by heads {tower.heads}"
                )
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError(
                f"image_size {self.vision.image_size} is not a multiple of "
                f"patch_size {self.vision.patch_size}"
            )

    def __repr__(self):
        # The dataclass repr, leaving out `adapter` and `logit_bias` when None (and `remat`,
        # `scan` at their defaults) so that plain configs read (and key caches such as θ0's)
        # exactly as before the fields existed.
        fields = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.repr
            and not (f.name in ("adapter", "logit_bias") and getattr(self, f.name) is None)
            and not _default_option(self, f.name)
        ]
        return f"{type(self).__qualname__}({', '.join(fields)})"

    def replace(self, **changes) -> CLIPConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """A JSON-serializable dict; `CLIPConfig.from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPConfig:
        d = dict(d)
        d["vision"] = VisionConfig(**d.get("vision", {}))
        d["text"] = TextConfig(**d.get("text", {}))
        if d.get("adapter") is not None:
            d["adapter"] = AdapterConfig(**d["adapter"])
        return cls(**d)


def _default_option(cfg, name: str) -> bool:
    """Whether field `name` is one of the memory levers (`stack.OPTIONS`) at its default."""
    return name in stack.OPTIONS and getattr(cfg, name) == stack.OPTIONS[name]


# encode_text trims padding to a multiple of this many tokens (bounds the compiled shapes).
TEXT_LENGTH_BUCKET = 8

_SHAPE_ONLY = contextvars.ContextVar("shape_only", default=False)


def _init(base):
    """An initializer that returns only a ShapeDtypeStruct inside `shape_only()`.

    Used to build the module structure for loading a checkpoint without allocating or
    tracing a whole random initialisation (`nnx.eval_shape` over a large CLIP spends seconds
    in flax's per-variable tracer checks).
    """

    def init(key, shape, dtype=jnp.float32):
        if _SHAPE_ONLY.get():
            return jax.eval_shape(functools.partial(base, shape=shape, dtype=dtype), key)
        return base(key, shape, dtype)

    return init


def _normal(std):
    return _init(nnx.initializers.normal(stddev=std))


_ZEROS, _ONES = _init(nnx.initializers.zeros), _init(nnx.initializers.ones)


class LayerNorm(nnx.LayerNorm):
    """LayerNorm computed in float32, returning `out_dtype` (params `scale`, `bias`)."""

    def __init__(self, dim, eps, out_dtype, *, rngs):
        super().__init__(
            dim, epsilon=eps, dtype=jnp.float32, scale_init=_ONES, bias_init=_ZEROS, rngs=rngs
        )
        self.out_dtype = out_dtype

    def __call__(self, x):
        return super().__call__(x.astype(jnp.float32)).astype(self.out_dtype)


class Attention(nnx.Module):
    def __init__(
        self, width, heads, dtype, attn_std, out_std, implementation, *, rngs, sites=None, path=""
    ):
        sites = sites or adapters_lib.Sites(None)

        def linear(name, std):
            return sites.linear(
                f"{path}/{name}", width, width, dtype=dtype, kernel_init=_normal(std),
                bias_init=_ZEROS, rngs=rngs,
            )  # fmt: skip

        self.q_proj = linear("q_proj", attn_std)
        self.k_proj = linear("k_proj", attn_std)
        self.v_proj = linear("v_proj", attn_std)
        self.out_proj = linear("out_proj", out_std)
        self.heads = heads
        self.implementation = implementation

    def __call__(self, x, *, causal=False, kv_mask=None):
        batch, length, width = x.shape
        split = lambda t: t.reshape(batch, length, self.heads, width // self.heads)
        out = kernels.attention(
            split(self.q_proj(x)),
            split(self.k_proj(x)),
            split(self.v_proj(x)),
            causal=causal,
            kv_mask=kv_mask,
            implementation=self.implementation,
        )
        return self.out_proj(out.reshape(batch, length, width))


class MLP(nnx.Module):
    def __init__(
        self, width, mlp_dim, activation, dtype, fc_std, proj_std, *, rngs, sites=None, path=""
    ):
        sites = sites or adapters_lib.Sites(None)
        self.c_fc = sites.linear(
            f"{path}/c_fc", width, mlp_dim, dtype=dtype, kernel_init=_normal(fc_std),
            bias_init=_ZEROS, rngs=rngs,
        )  # fmt: skip
        self.c_proj = sites.linear(
            f"{path}/c_proj", mlp_dim, width, dtype=dtype, kernel_init=_normal(proj_std),
            bias_init=_ZEROS, rngs=rngs,
        )  # fmt: skip
        self.activation = activation

    def __call__(self, x):
        return self.c_proj(ACTIVATIONS[self.activation](self.c_fc(x)))


class ResidualBlock(nnx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(
        self, width, heads, mlp_dim, layers, cfg: CLIPConfig, *, rngs, sites=None, path=""
    ):
        dtype = jnp.dtype(cfg.dtype)
        # OpenCLIP's initialisation: residual-branch outputs shrink with depth.
        attn_std, proj_std, fc_std = (
            width**-0.5,
            width**-0.5 * (2 * layers) ** -0.5,
            (2 * width) ** -0.5,
        )
        self.ln_1 = LayerNorm(width, cfg.layer_norm_eps, dtype, rngs=rngs)
        self.attn = Attention(
            width, heads, dtype, attn_std, proj_std, cfg.attention_implementation, rngs=rngs,
            sites=sites, path=f"{path}/attn",
        )  # fmt: skip
        self.ln_2 = LayerNorm(width, cfg.layer_norm_eps, dtype, rngs=rngs)
        self.mlp = MLP(
            width, mlp_dim, cfg.activation, dtype, fc_std, proj_std, rngs=rngs, sites=sites,
            path=f"{path}/mlp",
        )  # fmt: skip

    def __call__(self, x, *, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal).astype(jnp.float32)
        return x + self.mlp(self.ln_2(x)).astype(jnp.float32)


class Transformer(nnx.Module):
    def __init__(
        self, width, heads, mlp_dim, layers, cfg: CLIPConfig, *, rngs, sites=None, path=""
    ):
        block = functools.partial(
            ResidualBlock, width, heads, mlp_dim, layers, cfg, rngs=rngs, sites=sites
        )
        self.resblocks = nnx.List([block(path=f"{path}/resblocks/{i}") for i in range(layers)])
        self.remat, self.scan = cfg.remat, cfg.scan

    def __call__(self, x, *, causal=False, upto: int | None = None, collect: bool = False):
        """The blocks on x (the first `upto` of them); with `collect`, [x, after block 0, ...]
        (`stack.run`, with the config's remat and scan)."""
        return stack.run(
            self.resblocks[:upto], x, lambda block, h: block(h, causal=causal), remat=self.remat,
            scan=self.scan, collect=collect,
        )  # fmt: skip


class VisionTower(nnx.Module):
    """ViT: patchify, class token, positions, ln_pre, blocks, ln_post on the class token, proj."""

    def __init__(self, cfg: CLIPConfig, *, rngs, sites=None, projection: bool = True):
        """`projection=False`: no `proj` (a vision encoder without CLIP's embedding head, as
        HF's `CLIPVisionModel` inside a LLaVA checkpoint)."""
        v = cfg.vision
        self.cfg = v
        self.dtype = jnp.dtype(cfg.dtype)
        scale = v.width**-0.5
        grid = v.image_size // v.patch_size
        # Patch embedding kept in conv (HWIO) layout; applied as patchify + matmul.
        self.patch_embed = nnx.Param(
            _init(nnx.initializers.lecun_normal())(
                rngs.params(), (v.patch_size, v.patch_size, 3, v.width)
            )
        )
        self.class_embedding = nnx.Param(_normal(scale)(rngs.params(), (v.width,)))
        self.positional_embedding = nnx.Param(
            _normal(scale)(rngs.params(), (grid * grid + 1, v.width))
        )
        self.ln_pre = LayerNorm(v.width, cfg.layer_norm_eps, jnp.float32, rngs=rngs)
        self.transformer = Transformer(
            v.width, v.heads, v.mlp_dim, v.layers, cfg, rngs=rngs, sites=sites,
            path="image/transformer",
        )  # fmt: skip
        self.ln_post = LayerNorm(v.width, cfg.layer_norm_eps, jnp.float32, rngs=rngs)
        if projection:
            self.proj = nnx.Param(_normal(scale)(rngs.params(), (v.width, cfg.embed_dim)))

    def __call__(self, pixels):
        """pixels: float [batch, H, W, 3], normalized. Returns (embedding, intermediates)."""
        x = self.transformer(self.ln_pre(self._embed(pixels)))
        pooled = self.ln_post(x[:, 0])
        return pooled @ self.proj[...], {"tokens": x, "pre_logits": pooled}

    def hidden_states(self, pixels, upto: int | None = None) -> list[jax.Array]:
        """[after ln_pre, after block 0, ..., after block L-1] (HF's `hidden_states` of a
        `CLIPVisionModel`), each float32 [batch, 1 + patches, width]; with `upto`, only the
        first `upto + 1` of them (the later blocks are not run)."""
        return self.transformer(self.ln_pre(self._embed(pixels)), upto=upto, collect=True)

    def _embed(self, pixels):
        """Patch embeddings with the class token first, plus positions: [batch, 1 + n, width]."""
        v = self.cfg
        batch, height, width, channels = pixels.shape
        if (height, width, channels) != (v.image_size, v.image_size, 3):
            raise ValueError(
                f"image tower expects [batch, {v.image_size}, {v.image_size}, 3] "
                f"pixels, got {pixels.shape}"
            )
        p, g = v.patch_size, v.image_size // v.patch_size
        patches = pixels.reshape(batch, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(batch, g * g, p * p * 3)
        kernel = self.patch_embed[...].reshape(p * p * 3, v.width)
        x = jnp.einsum(
            "bnk,kw->bnw",
            patches.astype(self.dtype),
            kernel.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        cls = jnp.broadcast_to(self.class_embedding[...], (batch, 1, v.width))
        return jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...]


class TextTower(nnx.Module):
    """Causal transformer pooled at the end-of-text token (the largest id in each row)."""

    def __init__(self, cfg: CLIPConfig, *, rngs, sites=None):
        t = cfg.text
        self.cfg = t
        self.token_embedding = nnx.Embed(
            t.vocab_size, t.width, embedding_init=_normal(0.02), rngs=rngs
        )
        self.positional_embedding = nnx.Param(
            _normal(0.01)(rngs.params(), (t.context_length, t.width))
        )
        self.transformer = Transformer(
            t.width, t.heads, t.mlp_dim, t.layers, cfg, rngs=rngs, sites=sites,
            path="text/transformer",
        )  # fmt: skip
        self.ln_final = LayerNorm(t.width, cfg.layer_norm_eps, jnp.float32, rngs=rngs)
        self.proj = nnx.Param(_normal(t.width**-0.5)(rngs.params(), (t.width, cfg.embed_dim)))

    def __call__(self, token_ids):
        """token_ids: int [batch, length <= context]. Returns (embedding, intermediates)."""
        batch, length = token_ids.shape
        if length > self.cfg.context_length:
            raise ValueError(
                f"text tower has context {self.cfg.context_length}, got token ids of "
                f"length {length}"
            )
        x = self.token_embedding(token_ids) + self.positional_embedding[:length]
        x = self.ln_final(self.transformer(x, causal=True))
        pooled = x[jnp.arange(batch), jnp.argmax(token_ids, axis=-1)]
        return pooled @ self.proj[...], {"tokens": x, "pre_logits": pooled}


class CLIP(nnx.Module):
    """Two towers and the learnable log-temperature `logit_scale`.

    With `cfg.adapter` set, the selected transformer linears carry LoRA / DoRA / VeRA adapters
    (`fomo_jax.models.adapters`); for VeRA, `adapter_shared` owns the frozen random matrices
    that the adapted linears of each shape share.
    """

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        sites = adapters_lib.Sites(cfg.adapter)
        self.image = VisionTower(cfg, rngs=rngs, sites=sites)
        self.text = TextTower(cfg, rngs=rngs, sites=sites)
        self.logit_scale = nnx.Param(jnp.asarray(cfg.logit_scale_init, jnp.float32))
        if cfg.logit_bias is not None:  # SigLIP's bias (config.loss "siglip*")
            self.logit_bias = nnx.Param(jnp.asarray(cfg.logit_bias, jnp.float32))
        shared = sites.finish()
        if shared is not None:
            self.adapter_shared = shared

    def __call__(self, pixels=None, token_ids=None):
        """Projected, un-normalized embeddings of either or both inputs, plus intermediates."""
        image_emb = text_emb = None
        out = {}
        if pixels is not None:
            image_emb, out["image"] = self.image(pixels)
        if token_ids is not None:
            text_emb, out["text"] = self.text(token_ids)
        return image_emb, text_emb, out

    def encode_image(self, pixels):
        """float32 NHWC normalized pixels -> [batch, embed_dim] (not L2-normalized)."""
        if _traced(pixels, self.logit_scale[...]):
            return _tower_forward(self, "image", pixels)
        return _encoder(self, "image")(pixels)

    def encode_text(self, token_ids):
        """int32 [batch, context] ids (EOT = row max, padding after) -> [batch, embed_dim].

        Host (numpy) inputs are cut to `text_width` columns: with causal attention no later
        position can reach a pooled token, so the result is unchanged while short captions
        cost a fraction of the full context. Device arrays are encoded as given (a caller
        feeding a batch sharded across processes cuts it first, from the whole batch).
        """
        if _traced(token_ids, self.logit_scale[...]):
            return _tower_forward(self, "text", token_ids)
        if isinstance(token_ids, jax.Array):
            return _encoder(self, "text")(token_ids)
        ids = np.asarray(token_ids)
        if ids.ndim == 2 and 0 < ids.shape[1] <= self.text.cfg.context_length:
            ids = ids[:, : text_width(ids)]
        return _encoder(self, "text")(ids)


def text_width(ids: np.ndarray) -> int:
    """The columns of a token batch that matter: through its last EOT (the row maximum),
    rounded up to a multiple of `TEXT_LENGTH_BUCKET` (few distinct shapes to compile)."""
    ids = np.asarray(ids)
    needed = int(np.max(np.argmax(ids, axis=1))) + 1
    length = -(-needed // TEXT_LENGTH_BUCKET) * TEXT_LENGTH_BUCKET
    return min(length, ids.shape[1])


def _traced(*values) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in values)


def _tower_forward(model: CLIP, tower: str, inputs):
    if tower == "image":
        return model.image(jnp.asarray(inputs, jnp.float32))[0]
    return model.text(jnp.asarray(inputs, jnp.int32))[0]


@functools.partial(jax.jit, static_argnames=("graphdef", "tower"))
def _apply_tower(params, inputs, *, graphdef, tower):
    return _tower_forward(nnx.merge(graphdef, params), tower, inputs)


class _Encoder:
    """A tower of one module as a jitted function of its *current* weights.

    `nnx.jit` walks the module graph on every call (~4 ms for a CLIP, more than a small
    forward pass). This walks it once, keeps the Variables, and reads their values per call,
    so in-place weight updates are seen (replacing submodules is not). The jitted function
    is shared by every module of the same structure.
    """

    def __init__(self, model: CLIP, tower: str):
        graphdef, params = nnx.split(model, nnx.Param)
        pure = nnx.to_pure_dict(params)
        self.graphdef, self.tower = graphdef, tower
        paths, self.treedef = jax.tree_util.tree_flatten_with_path(pure)
        variables = dict(nnx.iter_graph(model))
        self.variables = [variables[tuple(k.key for k in path)] for path, _ in paths]

    def __call__(self, inputs):
        params = self.treedef.unflatten([v.get_raw_value() for v in self.variables])
        return _apply_tower(params, inputs, graphdef=self.graphdef, tower=self.tower)


# Weakly keyed: an entry goes away with its module.
_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _encoder(model: CLIP, tower: str) -> _Encoder:
    encoders = _ENCODERS.setdefault(model, {})
    if tower not in encoders:
        encoders[tower] = _Encoder(model, tower)
    return encoders[tower]


@contextlib.contextmanager
def shape_only():
    """Inside, modules are built with ShapeDtypeStruct leaves and no arrays are allocated."""
    token = _SHAPE_ONLY.set(True)
    try:
        yield
    finally:
        _SHAPE_ONLY.reset(token)


def abstract_clip(cfg: CLIPConfig) -> CLIP:
    """The CLIP structure for `cfg` without weights (for loading checkpoints into)."""
    with shape_only():
        return CLIP(cfg, rngs=nnx.Rngs(0))


def batch_pixels(batch: dict) -> jax.Array:
    """Normalized float pixels of a batch: uint8 `images` are normalized on the device (4x less
    to send than floats), or the batch carries normalized float `pixels`."""
    if "pixels" in batch:
        return batch["pixels"]
    images = batch["images"].astype(jnp.float32) / 255.0
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def linear_paths(cfg: CLIPConfig) -> list[str]:
    """Module paths of every adaptable linear of the transformer blocks of both towers."""
    return [
        f"{tower}/transformer/resblocks/{i}/{name}"
        for tower, layers in (("image", cfg.vision.layers), ("text", cfg.text.layers))
        for i in range(layers)
        for name in LINEAR_NAMES
    ]
