"""Parameter-efficient adapters on a model's linears: LoRA, DoRA and VeRA (spec §8.2).

A model builds its adaptable linears through `Sites` (CLIP: the transformer linears of both
towers). A CLIP built from `CLIPConfig(..., adapter=AdapterConfig("lora", 4, targets))`
replaces every selected `nnx.Linear` with an `AdaptedLinear`, whose adapter parameters sit in
the params tree next to the frozen base weights::

    image/transformer/resblocks/3/attn/q_proj/kernel     [in, out]  base (frozen)
    image/transformer/resblocks/3/attn/q_proj/lora_a     [in, r]    LoRA / DoRA
    image/transformer/resblocks/3/attn/q_proj/lora_b     [r, out]   LoRA / DoRA
    image/transformer/resblocks/3/attn/q_proj/dora_m     [out]      DoRA magnitude
    image/transformer/resblocks/3/attn/q_proj/vera_d     [r]        VeRA
    image/transformer/resblocks/3/attn/q_proj/vera_b     [out]      VeRA
    adapter_shared/vera_64x64/random_a                   [in, r]    VeRA, frozen, shared
    adapter_shared/vera_64x64/random_b                   [r, out]   VeRA, frozen, shared

Layout. The spec writes torch's W in R^{out x in}; flax kernels are W^T in R^{in x out}, so the
spec's A in R^{r x in} is stored as `lora_a` = A^T [in, r] and B in R^{out x r} as `lora_b` =
B^T [r, out]; the spec's W + s.B.A is the kernel W^T + s.lora_a @ lora_b, and DoRA's "per output
row" norm is the norm of a kernel *column*.

Forward (always factorized; no dense W + dW is formed):
  LoRA  y = x W + s (x A) B + bias
  DoRA  y = (m / sg(||V||)) * (x W + s (x A) B) + bias, V = W + s A B, per output unit; the norm
        is a constant for backprop (sg = stop_gradient) and is itself computed without forming V:
        ||V_o||^2 = ||W_o||^2 + 2s <B_o, (A^T W)_o> + s^2 B_o^T (A^T A) B_o — O(r in out) work and
        no [in, out] temporary besides W itself.
  VeRA  y = x W + s (((x A_r) * d) B_r) * b + bias.
with s = `AdapterConfig.scale` (1: the reference has no alpha/r factor).

Initialisation (spec §8.2): A Kaiming-uniform with a = sqrt(r), i.e. U(-bound, bound) with
bound = sqrt(6 / ((1 + r) fan_in)) where fan_in is torch's second dimension (in for A and VeRA's
A_r, r for VeRA's B_r); B = 0; m = ||W|| per output unit; VeRA d = 0 and b = 0.1 (the
reference's choice). Random values come from `AdapterConfig.seed` folded with the leaf's path
(crc32), so they do not depend on the model's own initialisation, the model built with an adapter
and `add_adapters(plain_params, config)` agree leaf for leaf, and VeRA's frozen matrices can be
re-made from the recorded seed.

VeRA sharing. One (A_r, B_r) pair per kernel shape [in, out] for the whole model (both towers;
the reference keys its class-level dicts by dimension the same way), so Q, K and V of every block
share one pair while each layer has its own b and d. The pair is one pair of `nnx.Param` objects
owned by `CLIP.adapter_shared` and referenced by every `AdaptedLinear` of that shape. NNX stores a
shared Variable once, at the first path of its (alphabetical) graph traversal, which for the
top-level `adapter_shared` comes before `image` and `text`; so `params_lib.split(model)` holds each
pair exactly once, at `adapter_shared/vera_{in}x{out}/random_{a,b}`, checkpoints carry it, and
`params_lib.merge` re-establishes the sharing. They are `nnx.Param`s; training rules keep them
frozen through `trainable(path)` (false for them).

Targets: a regex that must fully match module paths such as
`image/transformer/resblocks/3/attn/q_proj`; a model family names its sets of them (CLIP's
"reference" and "all_linear", `models.clip.ADAPTER_TARGETS`). `blocks` restricts to those
transformer-block indices in every stack (empty: all). Only the linears a model builds through
`Sites` can be adapted, and every adapter created has a forward path.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fomo_jax import params as params_lib

KINDS = ("lora", "dora", "vera")
SHARED = "adapter_shared"  # top-level owner of VeRA's shared matrices (sorts before image/text)
LEAVES = {
    "lora": ("lora_a", "lora_b"),
    "dora": ("lora_a", "lora_b", "dora_m"),
    "vera": ("vera_d", "vera_b"),
}
_LAYER_LEAVES = frozenset(name for names in LEAVES.values() for name in names)
VERA_B_INIT = 0.1
_BLOCK = re.compile(r"/resblocks/(\d+)/")  # a transformer block's index in a module path
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """Which adapter, where, and how it is initialised.

    kind: "lora", "dora" or "vera". rank: r. targets: a regex fully matching the module paths
    of the adapted linears, like `text/transformer/resblocks/0/mlp/c_fc` (a model family names
    its sets, e.g. CLIP's `models.clip.ADAPTER_TARGETS`). blocks: transformer-block indices
    adapted in every stack (empty: all). scale: s in W + s.dW. seed: the random adapter values
    (A; VeRA's shared matrices).
    """

    kind: str
    rank: int
    targets: str
    blocks: tuple[int, ...] = ()
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"adapter kind={self.kind!r}; expected one of {KINDS}")
        if int(self.rank) != self.rank or self.rank < 1:
            raise ValueError(f"adapter rank={self.rank!r}; expected a positive integer")
        blocks = tuple(int(b) for b in self.blocks)
        if any(b < 0 for b in blocks):
            raise ValueError(f"adapter blocks={blocks}: indices must be >= 0")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "seed", int(self.seed))
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(
                f"adapter targets={self.targets!r} is not a valid regex: {e}"
            ) from None

    @property
    def pattern(self) -> str:
        return self.targets

    def selects(self, module_path: str) -> bool:
        """Whether the linear at `module_path` (e.g. `image/transformer/resblocks/0/attn/q_proj`)
        gets an adapter."""
        if not re.fullmatch(self.pattern, module_path):
            return False
        if not self.blocks:
            return True
        block = _BLOCK.search(f"/{module_path}/")
        return block is not None and int(block.group(1)) in self.blocks


def adapter_config(config) -> AdapterConfig:
    """The AdapterConfig of an AdapterConfig or a model config with an adapter."""
    adapter = getattr(config, "adapter", config)
    if not isinstance(adapter, AdapterConfig):
        raise ValueError(f"expected an AdapterConfig or a CLIPConfig with one, got {config!r}")
    return adapter


def plain_config(config):
    """The same model config without an adapter (the structure `merge_adapters` returns)."""
    return config.replace(adapter=None)


# --- path predicates (the rule a PEFT method trains by) ---------------------------------------


def is_adapter(path: str) -> bool:
    """Whether a '/'-joined parameter path is an adapter leaf (trainable or frozen)."""
    return is_frozen_adapter(path) or path.rsplit("/", 1)[-1] in _LAYER_LEAVES


def is_frozen_adapter(path: str) -> bool:
    """VeRA's shared random matrices: part of the model and its checkpoints, never trained."""
    return path == SHARED or path.startswith(SHARED + "/")


def trainable(path: str) -> bool:
    """The PEFT training rule: adapter leaves except VeRA's frozen random matrices."""
    return is_adapter(path) and not is_frozen_adapter(path)


# --- initialisation -----------------------------------------------------------------------------


def kaiming_uniform(key, shape, fan_in: int, rank: int) -> jax.Array:
    """torch's kaiming_uniform_(a=sqrt(rank)): U(-b, b), b = sqrt(6 / ((1 + rank) fan_in))."""
    bound = math.sqrt(6.0 / ((1 + rank) * fan_in))
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def _path_key(root, path: str):
    return jax.random.fold_in(root, zlib.crc32(path.encode()))


def _root_key(seed_or_key):
    if isinstance(seed_or_key, int | np.integer):
        return jax.random.key(int(seed_or_key))
    return seed_or_key


def shared_name(in_dim: int, out_dim: int) -> str:
    return f"vera_{in_dim}x{out_dim}"


def init_vera_shared(seed: int, in_dim: int, out_dim: int, rank: int) -> dict[str, jax.Array]:
    """VeRA's frozen pair for kernels of shape [in, out]: `random_a` = A_r^T [in, r] (fan_in
    in) and `random_b` = B_r^T [r, out] (torch fan_in r), a pure function of the seed."""
    root, name = jax.random.key(seed), f"{SHARED}/{shared_name(in_dim, out_dim)}"
    return {
        "random_a": kaiming_uniform(
            _path_key(root, f"{name}/random_a"), (in_dim, rank), in_dim, rank
        ),
        "random_b": kaiming_uniform(
            _path_key(root, f"{name}/random_b"), (rank, out_dim), rank, rank
        ),
    }


def init_layer(kind: str, kernel, rank: int, key, module_path: str) -> dict[str, jax.Array]:
    """Fresh adapter leaves of one linear with float32 `kernel` [in, out] (dW = 0 at init)."""
    in_dim, out_dim = kernel.shape
    if kind == "vera":
        return {
            "vera_d": jnp.zeros((rank,), jnp.float32),
            "vera_b": jnp.full((out_dim,), VERA_B_INIT, jnp.float32),
        }
    leaves = {
        "lora_a": kaiming_uniform(
            _path_key(key, f"{module_path}/lora_a"), (in_dim, rank), in_dim, rank
        ),
        "lora_b": jnp.zeros((rank, out_dim), jnp.float32),
    }
    if kind == "dora":
        leaves["dora_m"] = jnp.sqrt(jnp.sum(jnp.square(jnp.asarray(kernel, jnp.float32)), axis=0))
    return leaves


# --- forward ------------------------------------------------------------------------------------


def dora_norm(kernel, lora_a, lora_b, scale: float) -> jax.Array:
    """||W + s.A.B|| per output unit (kernel column) in float32, without forming the sum:
    ||W_o||^2 + 2s sum_r B[r,o] (A^T W)[r,o] + s^2 sum_r B[r,o] ((A^T A) B)[r,o]."""
    kernel, a, b = (jnp.asarray(t, jnp.float32) for t in (kernel, lora_a, lora_b))
    cross = jnp.sum(b * jnp.matmul(a.T, kernel, precision=_HIGHEST), axis=0)
    gram = jnp.matmul(a.T, a, precision=_HIGHEST)
    square = jnp.sum(b * jnp.matmul(gram, b, precision=_HIGHEST), axis=0)
    sq = jnp.sum(jnp.square(kernel), axis=0) + 2 * scale * cross + scale**2 * square
    return jnp.sqrt(jnp.maximum(sq, 0.0))


class AdaptedLinear(nnx.Linear):
    """An `nnx.Linear` (same `kernel`, `bias`, same random init) plus a factorized adapter.

    Built by `Sites.linear`; the adapter leaves do not draw from the model's rngs, so the base
    weights equal those of the plain model at the same seed.
    """

    def __init__(
        self, in_features, out_features, *, path: str, adapter: AdapterConfig, shared, **kwargs
    ):
        super().__init__(in_features, out_features, **kwargs)
        self.kind, self.scale = adapter.kind, adapter.scale
        kernel = self.kernel.get_value()
        root = jax.random.key(adapter.seed)
        make = lambda k: init_layer(adapter.kind, k, adapter.rank, root, path)
        abstract = isinstance(kernel, jax.ShapeDtypeStruct)
        leaves = jax.eval_shape(make, kernel) if abstract else make(kernel)
        for name, value in leaves.items():
            setattr(self, name, nnx.Param(value))
        if adapter.kind == "vera":
            pair = shared.pair(in_features, out_features, abstract)
            self.random_a, self.random_b = pair["random_a"], pair["random_b"]

    def __call__(self, inputs):
        dtype = self.dtype or jnp.result_type(inputs, self.kernel.get_value())
        cast = lambda t: jnp.asarray(t[...], dtype)
        x = jnp.asarray(inputs, dtype)

        def matmul(lhs, rhs):
            dims = (((lhs.ndim - 1,), (0,)), ((), ()))
            return jax.lax.dot_general(lhs, rhs, dims, precision=self.precision)

        y = matmul(x, cast(self.kernel))
        if self.kind == "vera":
            hidden = matmul(x, cast(self.random_a)) * cast(self.vera_d)
            y = y + self.scale * matmul(hidden, cast(self.random_b)) * cast(self.vera_b)
        else:
            y = y + self.scale * matmul(matmul(x, cast(self.lora_a)), cast(self.lora_b))
        if self.kind == "dora":
            norm = jax.lax.stop_gradient(
                dora_norm(self.kernel[...], self.lora_a[...], self.lora_b[...], self.scale)
            )
            y = y * (self.dora_m[...] / norm).astype(dtype)
        if self.bias is not None:
            y = y + cast(self.bias)
        return y


class Sites:
    """Builds the adaptable linears of one model: plain `nnx.Linear`s, or `AdaptedLinear`s
    where the config's adapter selects the module path. A plain Python helper passed to
    constructors (never stored on a module); it also collects VeRA's shared pairs for the
    model's `adapter_shared`."""

    def __init__(self, adapter: AdapterConfig | None):
        self.adapter = adapter
        self.pairs: dict[str, nnx.Dict] = {}
        self.adapted: list[str] = []
        self.offered: list[str] = []  # every linear built here

    def linear(self, path: str, in_features: int, out_features: int, **kwargs) -> nnx.Linear:
        self.offered.append(path)
        if self.adapter is None or not self.adapter.selects(path):
            return nnx.Linear(in_features, out_features, **kwargs)
        self.adapted.append(path)
        return AdaptedLinear(
            in_features, out_features, path=path, adapter=self.adapter, shared=self, **kwargs
        )

    def pair(self, in_dim: int, out_dim: int, abstract: bool) -> nnx.Dict:
        name = shared_name(in_dim, out_dim)
        if name not in self.pairs:
            make = lambda: init_vera_shared(self.adapter.seed, in_dim, out_dim, self.adapter.rank)
            values = jax.eval_shape(make) if abstract else make()
            self.pairs[name] = nnx.Dict({k: nnx.Param(v) for k, v in values.items()})
        return self.pairs[name]

    def finish(self) -> nnx.Dict | None:
        """Checks the selection; returns the shared-matrix owner (VeRA) or None."""
        if self.adapter is None:
            return None
        if not self.adapted:
            example = self.offered[0] if self.offered else "none"
            raise ValueError(
                f"adapter targets={self.adapter.targets!r}, blocks={self.adapter.blocks} select "
                f"no linear of this model (paths look like {example!r})"
            )
        blocks = [_BLOCK.search(f"/{p}/") for p in self.offered]
        depth = 1 + max((int(b.group(1)) for b in blocks if b), default=-1)
        if any(b >= depth for b in self.adapter.blocks):
            raise ValueError(
                f"adapter blocks={self.adapter.blocks}: the model's stacks have {depth} blocks"
            )
        return nnx.Dict(self.pairs) if self.pairs else None


# --- pure-tree operations ---------------------------------------------------------------------


def _module_paths(flat: dict[str, Any]) -> list[str]:
    return [k[: -len("/kernel")] for k in flat if k.endswith("/kernel")]


def add_adapters(params, config, key=None):
    """Plain base params (e.g. θ0 of a CLIP without adapter) -> the params tree of the CLIP built
    from `config` (a CLIPConfig with an adapter, or an AdapterConfig) with fresh adapter leaves:
    A Kaiming-uniform from a key derived from the adapter seed (or from `key`, if given) and the
    leaf path, B = 0, m = ||W||, VeRA d = 0, b = 0.1 and the shared matrices from the seed (always
    the seed, so they stay reproducible from the config)."""
    adapter = adapter_config(config)
    flat = params_lib.flatten(params)
    if any(is_adapter(k) for k in flat):
        raise ValueError("add_adapters expects plain params; these already hold adapter leaves")
    root = _root_key(adapter.seed if key is None else key)
    out, pairs = dict(flat), {}
    modules = [m for m in _module_paths(flat) if adapter.selects(m)]
    if not modules:
        raise ValueError(f"adapter targets={adapter.targets!r} select no linear in these params")
    for module in modules:
        kernel = jnp.asarray(flat[f"{module}/kernel"], jnp.float32)
        for name, value in init_layer(adapter.kind, kernel, adapter.rank, root, module).items():
            out[f"{module}/{name}"] = value
        if adapter.kind == "vera":
            pair = shared_name(*kernel.shape)
            if pair not in pairs:
                pairs[pair] = init_vera_shared(adapter.seed, *kernel.shape, adapter.rank)
    for pair, values in pairs.items():
        for name, value in values.items():
            out[f"{SHARED}/{pair}/{name}"] = value
    return params_lib.unflatten(out)


def split_adapters(params):
    """(base, adapters): the plain tree (loadable into a CLIP without adapter) and the adapter
    leaves (including VeRA's shared matrices), both nested dicts."""
    flat = params_lib.flatten(params)
    base = {k: v for k, v in flat.items() if not is_adapter(k)}
    adapters = {k: v for k, v in flat.items() if is_adapter(k)}
    return params_lib.unflatten(base), params_lib.unflatten(adapters)


def merge_adapters(params, adapters=None, *, config):
    """Fold the adapters exactly into the base kernels; returns a plain params tree.

    `params` holds base and adapters, or only the base with `adapters` (as `split_adapters`
    returns them) given separately; `config` (CLIPConfig or AdapterConfig) supplies the kind and
    the scale s. In flax layout: LoRA W + s.A@B; DoRA m * V / ||V|| per kernel column with
    V = W + s.A@B; VeRA W + s.((A_r * d) @ B_r) * b.
    """
    adapter = adapter_config(config)
    flat = params_lib.flatten(params)
    if adapters is not None:
        flat.update(params_lib.flatten(adapters))
    s = adapter.scale
    out = {k: v for k, v in flat.items() if not is_adapter(k)}
    for module in _module_paths(flat):
        names = {n for n in _LAYER_LEAVES if f"{module}/{n}" in flat}
        if not names:
            continue
        if names != set(LEAVES[adapter.kind]):
            raise ValueError(f"{module}: adapter leaves {sorted(names)} are not {adapter.kind}'s")
        leaf = lambda n, module=module: jnp.asarray(flat[f"{module}/{n}"], jnp.float32)
        kernel = leaf("kernel")
        if adapter.kind == "vera":
            pair = f"{SHARED}/{shared_name(*kernel.shape)}"
            a, b = (jnp.asarray(flat[f"{pair}/{n}"], jnp.float32) for n in ("random_a", "random_b"))
            delta = jnp.matmul(a * leaf("vera_d"), b, precision=_HIGHEST) * leaf("vera_b")
            merged = kernel + s * delta
        else:
            merged = kernel + s * jnp.matmul(leaf("lora_a"), leaf("lora_b"), precision=_HIGHEST)
            if adapter.kind == "dora":
                merged = merged * (leaf("dora_m") / jnp.linalg.norm(merged, axis=0))
        out[f"{module}/kernel"] = merged
    return params_lib.unflatten(out)
