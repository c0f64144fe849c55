"""Merge functions of spec/fif.md §9 as pure, jittable pytree transformations.

Every function takes parameter pytrees (nested dicts as `fomo_jax.params.split` returns, or flat
dicts whose keys such as `visual.transformer.resblocks.3.attn.in_proj_weight` are kept as they
are) and returns the same structure. Conventions shared by all of them:

- θ0 (`base`) is the anchor of task vectors τ_i = θ_i − θ0; it is always the zero-shot weights
  of the tower being merged.
- Every floating-point leaf merges (including `logit_scale`). Arithmetic runs in float32 (or in
  the leaf's dtype if wider) and the result is cast back to each leaf's dtype, so bfloat16 trees
  accumulate in float32. Integer and bool leaves pass through from `base` (from the first tree
  for the base-less `interpolate` / `slerp`).
- `exclude`: regular expressions searched (`re.search`) in each leaf's path string, as
  `fomo_jax.params.key_path_str` writes it (`image/transformer/resblocks/3/attn/q_proj/kernel`;
  a flat dict's key is its path). Excluded leaves pass through like integer leaves.
- TIES-family trim scope: `trim="global"` uses one threshold per model over all merged leaves of
  the tree given (the runner merges one tower at a time, which is the reference's per-tower trim;
  aliases "tower", "model"); `trim="per_leaf"` treats each leaf as its own TIES problem
  (threshold and majority sign per leaf; alias "tensor").
- k-th smallest values are exact: radix selection on the float32 bit patterns of the
  (non-negative) magnitudes, a histogram of the high 16 bits over all merged leaves, then one of
  the low 16 bits among the entries sharing the rank's high half. Integer counts, no sort, no
  concatenation; the histograms of sharded leaves are sharded reductions.
- Randomised merges take an explicit key. The key of leaf `path` is
  `leaf_key = fold_in(key, zlib.crc32(path.encode()))`; DARE's draw for model i is
  `uniform(fold_in(leaf_key, i), (size,), float32).reshape(shape)`; `random_merge` draws
  `randint(leaf_key, (size,), 0, n).reshape(shape)`. So a leaf's draws depend only on the key
  and its path, not on the other leaves (exclusions, tower splits).
- LiNeS: `lines(base, merged)` rescales any merged tree's task vector by depth; the task-vector
  merges also take `lines=` (True, a dict of `alpha`/`beta`/`shape`, or an (α, β, shape) tuple)
  to apply s in place of the scale λ without the extra rounding of a round trip:
  `ties(base, trees, lines=True)` ≈ `lines(base, ties(base, trees, scale=1))`.

The functions are plain Python over pytrees and run leaf by leaf: called eagerly (or through
`merge(name, ...)`) each leaf's arithmetic is one compiled program, cached per leaf shape and
configuration, so a merge holds its inputs, its result and one leaf's temporaries, never a
model-sized temporary (the TIES family makes two histogram passes for the thresholds, one for
the majority sign and one to merge; DARE remakes its draws from the leaf keys in each pass).
A leaf sharded over a mesh (NamedSharding) is merged in place: the result keeps its sharding.
Under `jax.jit` (configuration static, e.g. `jax.jit(ties, static_argnames=("prune_fraction",
"merge", "trim"))`) the same code traces into one program.
`streamed(...)` merges many models leaf by leaf (and chunk by chunk) from files, holding only the
base, the result and one chunk per model.
"""

from __future__ import annotations

import functools
import math
import os
import re
import urllib.parse
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from fomo_jax.params import key_path_str

MERGE_MODES = ("mean", "sum", "max")
TRIMS = {
    "global": "global",
    "tower": "global",
    "model": "global",
    "per_leaf": "per_leaf",
    "tensor": "per_leaf",
}
LINES_SHAPES: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "quadratic": lambda x: x * x,
    "sqrt": math.sqrt,
}
SLERP_DOT_THRESHOLD = 0.9995
SLERP_NORM_EPS = 1e-8

# `resblocks.{i}` / `resblocks/{i}` as a whole path component; the text before it is the tower.
_BLOCK = re.compile(r"(?:^|[/.])resblocks[/.](\d+)(?=[/.]|$)")


# ----------------------------------------------------------------------------- leaf plumbing


def _dtype(leaf) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    return np.dtype(dtype if dtype is not None else jnp.asarray(leaf).dtype)


def _shape(leaf) -> tuple:
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else np.shape(leaf)


def _is_float(leaf) -> bool:
    return bool(jnp.issubdtype(_dtype(leaf), jnp.floating))


def _compute_dtype(dtype) -> np.dtype:
    return np.dtype(jnp.promote_types(dtype, jnp.float32))


def _rules(exclude) -> list[re.Pattern]:
    if exclude is None:
        return []
    if isinstance(exclude, str):
        exclude = [exclude]
    return [re.compile(rule) for rule in exclude]


class _Trees:
    """Leaves of an anchor tree and of n trees of the same structure, with their paths."""

    def __init__(self, anchor, trees: Sequence, exclude=None, *, what="tree"):
        flat, self.treedef = jax.tree_util.tree_flatten_with_path(anchor)
        self.paths = [key_path_str(path) for path, _ in flat]
        self.anchor = [leaf for _, leaf in flat]
        self.trees = []
        for i, tree in enumerate(trees):
            structure = jax.tree_util.tree_structure(tree)
            if structure != self.treedef:
                raise ValueError(
                    f"{what} {i} does not have the structure of the base tree: "
                    f"{structure} vs {self.treedef}"
                )
            leaves = self.treedef.flatten_up_to(tree)
            for path, leaf, anchor_leaf in zip(self.paths, leaves, self.anchor, strict=True):
                if _shape(leaf) != _shape(anchor_leaf):
                    raise ValueError(
                        f"{what} {i}: leaf {path} has shape {_shape(leaf)}, the base tree's has "
                        f"{_shape(anchor_leaf)}"
                    )
            self.trees.append(leaves)
        rules = _rules(exclude)
        self.merged = [
            j
            for j, (path, leaf) in enumerate(zip(self.paths, self.anchor, strict=True))
            if _is_float(leaf) and not any(rule.search(path) for rule in rules)
        ]

    def models(self, j: int) -> list:
        """Leaf j of every tree, as given."""
        return [tree[j] for tree in self.trees]

    def size(self, j: int) -> int:
        return int(np.prod(np.shape(self.anchor[j]), dtype=np.int64))

    def out(self, j: int) -> dict:
        """The static arguments of a kernel producing leaf j: the anchor leaf's dtype and, for
        a leaf sharded over a mesh, its sharding (the result keeps it)."""
        sharding = getattr(self.anchor[j], "sharding", None)
        return {
            "out_dtype": _dtype(self.anchor[j]).name,
            "out_sharding": sharding if isinstance(sharding, NamedSharding) else None,
        }

    def build(self, results: dict[int, Any]):
        """The output tree: merged leaves (already in the anchor leaf's dtype) and the rest
        passed through from the anchor."""
        leaves = [results.get(j, leaf) for j, leaf in enumerate(self.anchor)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _check_trees(trees, name: str, exactly: int | None = None) -> list:
    if isinstance(trees, dict) or not isinstance(trees, Sequence):
        raise TypeError(f"{name}: trees must be a list of pytrees, got {type(trees).__name__}")
    trees = list(trees)
    if not trees:
        raise ValueError(f"{name}: needs at least one tree")
    if exactly is not None and len(trees) != exactly:
        raise ValueError(f"{name} merges exactly {exactly} models, got {len(trees)}")
    return trees


def _check_trim(trim: str) -> str:
    if trim not in TRIMS:
        raise ValueError(f"trim={trim!r}; expected one of {sorted(TRIMS)}")
    return TRIMS[trim]


def _check_fraction(name: str, value: float, *, upper_open: bool = True) -> float:
    value = float(value)
    if not (0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{name}={value} must lie in [0, 1)")
    return value


def _rank(fraction: float, n: int) -> int:
    """⌊p·N⌋, computed as the reference does (int of the float product)."""
    return int(math.floor(fraction * n))


def _lower_rank(kind: str, k: int) -> int | None:
    """The 0-based rank of the trim's lower threshold for k = ⌊p·N⌋ (None: no lower bound).
    TIES and DARE-TIES keep entries ≥ the k-th smallest, counted from 1 as `torch.kthvalue`
    does (k = 0 keeps every entry); Breadcrumbs keeps entries ≥ a_k of the sorted a_0 ≤ … ≤
    a_{N−1} (spec §9)."""
    if k == 0:
        return None
    return k if kind == "breadcrumbs" else k - 1


def leaf_key(key, path: str):
    """The key of the leaf at `path`: fold_in(key, crc32(path)), stable across processes."""
    return jax.random.fold_in(key, zlib.crc32(path.encode("utf-8")))


def _cast(x):
    """A leaf in its compute dtype (float32, or its own dtype if wider)."""
    x = jnp.asarray(x)
    return x.astype(_compute_dtype(x.dtype))


def _tracing(*values) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(values))


@functools.lru_cache(maxsize=1024)
def _jitted(fn, static: tuple, out_sharding):
    return jax.jit(functools.partial(fn, **dict(static)), out_shardings=out_sharding)


def _leafwise(fn, *arrays, out_sharding=None, **static):
    """fn(*arrays, **static) for one leaf (or one leaf's statistics).

    Called eagerly it runs as one compiled program per (fn, static arguments, shapes), cached,
    so a merge's temporaries are one leaf's, never a whole model's. Python floats among
    `arrays` (scales) are traced weakly typed, as constants would be, so LiNeS's per-depth
    scales share one program. `out_sharding` (a leaf's NamedSharding) is the result's
    sharding. Under an outer trace (a merge inside `jax.jit`) it
    is traced inline, and the merge is one program as before."""
    if _tracing(arrays, static):
        return fn(*arrays, **static)
    return _jitted(fn, tuple(sorted(static.items())), out_sharding)(*arrays)


def _uniform(key, i, shape):
    """DARE's u for model i of a leaf with key `key`: uniform(fold_in(key, i), (size,))
    reshaped to `shape`."""
    return _draw(jax.random.uniform, jax.random.fold_in(key, i), shape)


def _draw(sample, key, shape, *args):
    """sample(key, (size,), *args).reshape(shape). With partitionable threefry (jax's default)
    the draw of the flat shape equals the draw of `shape` (counters are flat indices), and
    drawing `shape` directly keeps a sharded leaf's draw sharded."""
    if jax.config.jax_threefry_partitionable:
        return sample(key, shape, *args)
    size = int(np.prod(shape, dtype=np.int64))
    return sample(key, (size,), *args).reshape(shape)


# ----------------------------------------------------------------------------- LiNeS


def _lines_config(lines) -> tuple[float, float, str] | None:
    if lines is None or lines is False:
        return None
    if lines is True:
        return (0.5, 0.5, "linear")
    if isinstance(lines, dict):
        unknown = set(lines) - {"alpha", "beta", "shape"}
        if unknown:
            raise ValueError(f"lines: unknown keys {sorted(unknown)}; use alpha, beta, shape")
        return (
            float(lines.get("alpha", 0.5)),
            float(lines.get("beta", 0.5)),
            lines.get("shape", "linear"),
        )
    alpha, beta, shape = lines
    return (float(alpha), float(beta), shape)


def block_index(path: str) -> tuple[str, int] | None:
    """(tower prefix, block index) of a path inside `…resblocks.{i}…` / `…resblocks/{i}…`."""
    match = _BLOCK.search(path)
    if match is None:
        return None
    return path[: match.start()], int(match.group(1))


def lines_scales(paths: Sequence[str], alpha=0.5, beta=0.5, shape="linear") -> list[float]:
    """LiNeS scale s(ℓ) = α + β·g(ℓ/(L − 1)) per path; L = blocks of the path's tower (the
    prefix before `resblocks`), counted over `paths`; s = α outside blocks and when L = 1."""
    if shape not in LINES_SHAPES:
        raise ValueError(f"LiNeS shape={shape!r}; expected one of {sorted(LINES_SHAPES)}")
    g = LINES_SHAPES[shape]
    parsed = [block_index(path) for path in paths]
    blocks: dict[str, int] = {}
    for entry in parsed:
        if entry is not None:
            blocks[entry[0]] = max(blocks.get(entry[0], 0), entry[1] + 1)
    scales = []
    for entry in parsed:
        if entry is None:
            scales.append(float(alpha))
        else:
            depth = blocks[entry[0]] - 1
            scales.append(float(alpha + beta * g(entry[1] / depth if depth > 0 else 0.0)))
    return scales


def _leaf_scales(paths: Sequence[str], scale, lines) -> list:
    """The multiplier of each leaf's task vector: λ, or LiNeS's s(ℓ), which replaces λ."""
    config = _lines_config(lines)
    if config is None:
        return [scale] * len(paths)
    if isinstance(scale, jax.core.Tracer) or float(scale) != 1:
        raise ValueError("LiNeS replaces the scale λ: pass scale=1 together with lines")
    return lines_scales(paths, *config)


def _scales(t: _Trees, scale, lines) -> dict[int, Any]:
    scales = _leaf_scales(t.paths, scale, lines)
    return {j: scales[j] for j in t.merged}


def _weights(n: int, weights=None, weighting=None) -> list[float]:
    """Interpolation weights: given (n entries summing to 1), from a §8.3 `weighting`, or
    uniform."""
    if weighting is not None:
        if weights is not None:
            raise ValueError("interpolation: give weights or weighting, not both")
        return interpolation_weights(n, weighting)
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in np.asarray(weights, np.float64).reshape(-1)]
    if len(weights) != n:
        raise ValueError(f"interpolation: {len(weights)} weights for {n} models")
    if abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"interpolation weights must sum to 1, got {sum(weights)!r}")
    return weights


def lines(base, tree, alpha=0.5, beta=0.5, shape="linear", *, exclude=None):
    """LiNeS: θ0 + s ⊙ (θ − θ0) with s(ℓ) = α + β·g(ℓ/(L − 1)) by transformer block ℓ.

    Apply it to a merged tree to get θ = θ0 + s ⊙ τ_merged, e.g.
    `lines(base, ties(base, trees, scale=1))` (or pass `lines=` to the merge itself)."""
    t = _Trees(base, [tree], exclude)
    scales = lines_scales(t.paths, alpha, beta, shape)
    return t.build(
        {
            j: _leafwise(_scaled_tau, t.anchor[j], t.models(j)[0], scales[j], **t.out(j))
            for j in t.merged
        }
    )


def _scaled_tau(base, theta, s, *, out_dtype):
    b = _cast(base)
    return (b + s * (_cast(theta) - b)).astype(out_dtype)


# ----------------------------------------------------------------------------- exact selection
# The k-th smallest of non-negative floats by radix selection on their float32 bit patterns
# (monotone in the value): a histogram of the high 16 bits over all leaves gives each rank's
# high half, then a histogram of the low 16 bits among the entries with that high half gives
# the rest. Exact (integer counts), no sort, no concatenation; a leaf's histogram is its own
# compiled program, and the histograms of sharded leaves are sharded reductions.

_HALVES = ((16, 16), (0, 16))  # (shift, width) of the two passes, high half first
_BINS = (1 << 16) + 2


def _histogram(bits, found, *, shift: int, width: int):
    """bits[i]: model i's uint32 bit patterns (any shape); found (n, r): the bits above
    `shift + width` of each rank's answer. Returns (n, r, 2^width + 2) uint32 counts: [0] of
    entries whose high bits are below found's, [1 + d] of those equal to found's with digit
    d in bits [shift, shift + width), [-1] of those above."""
    top = shift + width
    rows = []
    for i, x in enumerate(bits):
        digit = ((x >> shift) & ((1 << width) - 1)).astype(jnp.int32)
        prefix = x >> top if top < 32 else jnp.zeros_like(x)
        per_rank = []
        for r in range(found.shape[1]):
            want = found[i, r] >> top if top < 32 else jnp.uint32(0)
            index = jnp.where(
                prefix < want, 0, jnp.where(prefix == want, 1 + digit, (1 << width) + 1)
            )
            counts = jnp.zeros((1 << width) + 2, jnp.uint32)
            per_rank.append(counts.at[index].add(jnp.uint32(1)))
        rows.append(jnp.stack(per_rank))
    return jnp.stack(rows)


@functools.partial(jax.jit, static_argnames=("shift", "width"))
def _next_digits(found, hist, targets, *, shift: int, width: int):
    """found with bits [shift, shift + width) set: the smallest digit d whose count of
    entries ≤ (found's high bits, d, all ones below) reaches the 1-based target rank."""
    cum = jnp.cumsum(hist[..., :-1], axis=-1, dtype=jnp.uint32)
    digit = jnp.sum(cum[..., 1:-1] < targets[None, :, None], axis=-1, dtype=jnp.uint32)
    return found | (digit << shift)


def _select(histogram_of, n: int, ranks: Sequence[int]):
    """(n, len(ranks)) float32: entry [i, r] is the ranks[r]-th smallest (0-based) of model
    i's values. histogram_of(found, shift, width) sums `_histogram` over all leaves."""
    targets = jnp.asarray(np.asarray(ranks, np.int64) + 1, jnp.uint32)
    found = jnp.zeros((n, len(ranks)), jnp.uint32)
    for shift, width in _HALVES:
        hist = histogram_of(found, shift, width)
        found = _next_digits(found, hist, targets, shift=shift, width=width)
    return jax.lax.bitcast_convert_type(found, jnp.float32)


def _bits(x):
    return jax.lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), jnp.uint32)


def _kth_smallest(values: list[list], ranks: Sequence[int]):
    """Exact order statistics. values[i] lists the non-negative float leaves of model i (all
    models have the same leaves); returns the float32 array (n, len(ranks)) whose entry [i, r]
    is the ranks[r]-th smallest (0-based) of model i's entries."""
    n = len(values)

    def histogram_of(found, shift, width):
        total = 0
        for leaves in zip(*values, strict=True):
            bits = [_bits(x) for x in leaves]
            total = total + _histogram(bits, found, shift=shift, width=width)
        return total

    return _select(histogram_of, n, ranks)


# ----------------------------------------------------------------------------- leaf kernels
# Elementwise building blocks shared by the in-memory merges and `streamed`, so both compute
# every entry with the same operations.


def _interp_leaf(thetas, weights):
    out = weights[0] * thetas[0]
    for w, x in zip(weights[1:], thetas[1:], strict=True):
        out = out + w * x
    return out


def _sum(xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


def _magmax_leaf(taus):
    best = taus[0]
    for x in taus[1:]:
        best = jnp.where(jnp.abs(x) > jnp.abs(best), x, best)
    return best


def _tall_leaf(taus, threshold, tall_lambda):
    total = _sum(taus)
    votes = _sum([(jnp.abs(x) > tall_lambda * jnp.abs(total - x)).astype(jnp.int32) for x in taus])
    return jnp.where(votes >= threshold, total, jnp.zeros_like(total))


def _trim(taus, lo, hi):
    """τ̂_i: entries with lo_i ≤ |τ_i| ≤ hi_i kept (lo/hi None: no bound)."""
    out = []
    for i, x in enumerate(taus):
        keep = None
        if lo is not None:
            keep = jnp.abs(x) >= lo[i]
        if hi is not None:
            upper = jnp.abs(x) <= hi[i]
            keep = upper if keep is None else keep & upper
        out.append(x if keep is None else jnp.where(keep, x, jnp.zeros_like(x)))
    return out


def _elected(hats):
    return jnp.sign(_sum(hats))


def _sign_total(hats):
    """Σ of the elected signs over the entries of one leaf (int32)."""
    return jnp.sum(_elected(hats).astype(jnp.int32))


def _disjoint(hats, majority, mode):
    sign = _elected(hats)
    sigma = jnp.where(sign == 0, majority.astype(sign.dtype), sign)
    agree = [jnp.sign(x) == sigma for x in hats]
    if mode == "max":
        return sigma * functools.reduce(
            jnp.maximum, [jnp.where(a, jnp.abs(x), 0) for a, x in zip(agree, hats, strict=True)]
        )
    total = _sum([jnp.where(a, x, 0) for a, x in zip(agree, hats, strict=True)])
    if mode == "sum":
        return total
    count = _sum([(a & (x != 0)).astype(jnp.int32) for a, x in zip(agree, hats, strict=True)])
    return total / jnp.maximum(count, 1).astype(total.dtype)


# ----------------------------------------------------------------------------- per-leaf merges
# Each takes one leaf of θ0 and of the models (as given: numpy or jax arrays) and returns the
# merged leaf in `out_dtype`; `_leafwise` runs it as one compiled program per leaf shape.


def _interp_kernel(base, thetas, s, *, weights, out_dtype):
    if s is None:
        return _interp_leaf([_cast(x) for x in thetas], weights).astype(out_dtype)
    b = _cast(base)
    return (b + s * _interp_leaf([_cast(x) - b for x in thetas], weights)).astype(out_dtype)


def _task_arithmetic_kernel(base, thetas, s, *, out_dtype):
    b = _cast(base)
    return (b + s * _sum([_cast(x) - b for x in thetas])).astype(out_dtype)


def _magmax_kernel(base, thetas, s, *, out_dtype):
    b = _cast(base)
    return (b + s * _magmax_leaf([_cast(x) - b for x in thetas])).astype(out_dtype)


def _tall_kernel(base, thetas, s, *, threshold, tall_lambda, out_dtype):
    b = _cast(base)
    taus = [_cast(x) - b for x in thetas]
    return (b + s * _tall_leaf(taus, threshold, tall_lambda)).astype(out_dtype)


def _random_kernel(base, thetas, key, s, *, out_dtype):
    b = _cast(base)
    taus = [_cast(x) - b for x in thetas]
    choice = _draw(jax.random.randint, key, b.shape, 0, len(taus))
    selected = taus[0]
    for i in range(1, len(taus)):
        selected = jnp.where(choice == i, taus[i], selected)
    return (b + s * selected).astype(out_dtype)


def _slerp_kernel(a, b, *, t, out_dtype):
    v0, v1 = _cast(a), _cast(b)
    n0, n1 = jnp.sqrt(jnp.sum(v0 * v0)), jnp.sqrt(jnp.sum(v1 * v1))
    u0 = jnp.where(n0 > SLERP_NORM_EPS, v0 / jnp.where(n0 > SLERP_NORM_EPS, n0, 1), v0)
    u1 = jnp.where(n1 > SLERP_NORM_EPS, v1 / jnp.where(n1 > SLERP_NORM_EPS, n1, 1), v1)
    c = jnp.sum(u0 * u1)
    lerp = (1 - t) * v0 + t * v1
    parallel = jnp.abs(c) > SLERP_DOT_THRESHOLD
    omega = jnp.arccos(jnp.clip(c, -1, 1))
    sin_omega = jnp.where(parallel, 1, jnp.sin(omega))
    spherical = (jnp.sin((1 - t) * omega) / sin_omega) * v0 + (jnp.sin(t * omega) / sin_omega) * v1
    return jnp.where(parallel, lerp, spherical).astype(out_dtype)


def _model_stock_kernel(base, a, b, *, eps, out_dtype):
    theta0 = _cast(base)
    t1, t2 = _cast(a) - theta0, _cast(b) - theta0
    norms = jnp.sqrt(jnp.sum(t1 * t1)) * jnp.sqrt(jnp.sum(t2 * t2))
    c = jnp.clip(jnp.sum(t1 * t2) / (norms + eps), -1, 1)
    # max(·, 0) keeps XLA from folding 1 + ε (= 1 in float32) before adding c.
    r = 2 * c / (jnp.maximum(c + 1, 0) + eps)
    return (r * (_cast(a) + _cast(b)) / 2 + (1 - r) * theta0).astype(out_dtype)


# ----------------------------------------------------------------------------- merges


def interpolate(trees, weights=None, *, base=None, exclude=None, lines=None):
    """θ = Σ_i w_i θ_i (uniform weights when None; n entries summing to 1).

    Integer and excluded leaves pass through from `base` if given, else from the first tree.
    With `lines` (needs `base`): θ = θ0 + s ⊙ Σ_i w_i τ_i."""
    trees = _check_trees(trees, "interpolation")
    n = len(trees)
    if not isinstance(weights, jax.core.Tracer):
        weights = tuple(_weights(n, weights))
    scales = {}
    if lines is not None and lines is not False:
        if base is None:
            raise ValueError("interpolation with LiNeS needs base (θ0)")
        t = _Trees(base, trees, exclude)
        scales = _scales(t, 1, lines)
    else:
        t = _Trees(trees[0] if base is None else base, trees, exclude)
    return t.build(
        {
            j: _leafwise(
                _interp_kernel,
                t.anchor[j] if scales else None,
                t.models(j),
                scales.get(j),
                weights=weights,
                **t.out(j),
            )
            for j in t.merged
        }
    )


def slerp(tree_a, tree_b, t=0.5, *, base=None, exclude=None):
    """Per-tensor spherical interpolation of raw weights; t is the weight of tree_b.

    Unit copies use the Frobenius norm (a tensor with norm ≤ 1e-8 is left unnormalised); if
    |cos| > 0.9995 it falls back to (1 − t)·a + t·b."""
    tr = _Trees(tree_a if base is None else base, [tree_a, tree_b], exclude)
    return tr.build(
        {j: _leafwise(_slerp_kernel, *tr.models(j), t=t, **tr.out(j)) for j in tr.merged}
    )


def task_arithmetic(base, trees, scale=1.0, *, exclude=None, lines=None):
    """θ = θ0 + λ·Σ_i τ_i."""
    t = _Trees(base, _check_trees(trees, "task_arithmetic"), exclude)
    scales = _scales(t, scale, lines)
    return t.build(
        {
            j: _leafwise(_task_arithmetic_kernel, t.anchor[j], t.models(j), scales[j], **t.out(j))
            for j in t.merged
        }
    )


def magmax(base, trees, scale=1.0, *, exclude=None):
    """Per entry the τ_i of largest magnitude (the first on ties); θ = θ0 + λ·τ_sel."""
    t = _Trees(base, _check_trees(trees, "magmax"), exclude)
    return t.build(
        {
            j: _leafwise(_magmax_kernel, t.anchor[j], t.models(j), scale, **t.out(j))
            for j in t.merged
        }
    )


def random_merge(base, trees, key, scale=1.0, *, exclude=None):
    """Per entry the τ_i of a uniformly random i (drawn from the leaf's key, see the module
    docstring); θ = θ0 + λ·τ_sel."""
    t = _Trees(base, _check_trees(trees, "random"), exclude)
    return t.build(
        {
            j: _leafwise(
                _random_kernel,
                t.anchor[j],
                t.models(j),
                leaf_key(key, t.paths[j]),
                scale,
                **t.out(j),
            )
            for j in t.merged
        }
    )


def model_stock(base, tree_a, tree_b, eps=1e-8, *, exclude=None):
    """Per tensor: c = ⟨τ1, τ2⟩/(‖τ1‖‖τ2‖ + ε) clipped to [−1, 1], r = 2c/(c + 1 + ε),
    θ = r·(θ1 + θ2)/2 + (1 − r)·θ0."""
    t = _Trees(base, [tree_a, tree_b], exclude)
    return t.build(
        {
            j: _leafwise(_model_stock_kernel, t.anchor[j], *t.models(j), eps=eps, **t.out(j))
            for j in t.merged
        }
    )


def tall_masks(base, trees, threshold=2, tall_lambda=0.4, scale=1.0, *, exclude=None):
    """TALL masks / consensus merging: m_i = [|τ_i| > λ_t·|Σ_j τ_j − τ_i|], keep entries with
    Σ_i m_i ≥ κ (`threshold`), θ = θ0 + λ·(Σ_i τ_i) ⊙ consensus. κ = 0 is task arithmetic
    (the reference default); κ = 2 is the method's intended setting."""
    t = _Trees(base, _check_trees(trees, "tall_masks"), exclude)
    config = {"threshold": threshold, "tall_lambda": tall_lambda}
    return t.build(
        {
            j: _leafwise(_tall_kernel, t.anchor[j], t.models(j), scale, **config, **t.out(j))
            for j in t.merged
        }
    )


# ----------------------------------------------------------------------------- TIES family


def _hats(kind, base, thetas, key, lo, hi, *, p):
    """τ̂_i of one leaf: TIES / Breadcrumbs keep lo_i ≤ |τ_i| ≤ hi_i; DARE keeps entries
    whose draw u ≥ lo_i, rescaled by 1/(1 − p)."""
    b = _cast(base)
    taus = [_cast(x) - b for x in thetas]
    if kind != "dare_ties":
        return _trim(taus, lo, hi)
    hats = []
    for i, tau in enumerate(taus):
        keep = _uniform(key, i, b.shape) >= lo[i] if lo is not None else True
        hats.append(jnp.where(keep, tau / jnp.asarray(1 - p, tau.dtype), 0).astype(tau.dtype))
    return hats


def _ties_histogram(base, thetas, key, found, *, kind, shift, width):
    """`_histogram` of one leaf's trim values: |τ_i| (TIES, Breadcrumbs) or DARE's u_i."""
    if kind == "dare_ties":
        values = [_uniform(key, i, np.shape(base)) for i in range(len(thetas))]
    else:
        b = _cast(base)
        values = [jnp.abs(_cast(x) - b) for x in thetas]
    return _histogram([_bits(v) for v in values], found, shift=shift, width=width)


def _ties_sign_total(base, thetas, key, lo, hi, *, kind, p):
    return _sign_total(_hats(kind, base, thetas, key, lo, hi, p=p))


def _ties_apply(base, thetas, key, lo, hi, majority, s, *, kind, p, mode, out_dtype):
    hats = _hats(kind, base, thetas, key, lo, hi, p=p)
    return (_cast(base) + s * _disjoint(hats, majority, mode)).astype(out_dtype)


def _ties_family(kind, base, trees, key, scale, prune_fraction, top_prune_fraction, merge, trim,
                 exclude, lines):  # fmt: skip
    """TIES / DARE-TIES / Breadcrumbs, leaf by leaf: per trim group (the tree, or each leaf)
    the exact thresholds (two histogram passes over the group's leaves), the majority sign
    (one pass), then the merge (one pass). DARE's draws are made again in each pass from the
    leaf's key rather than kept: they would be a model's worth per merged model."""
    if merge not in MERGE_MODES:
        raise ValueError(f"merge={merge!r}; expected one of {MERGE_MODES}")
    trim = _check_trim(trim)
    p = _check_fraction("prune_fraction", prune_fraction)
    q = _check_fraction("top_prune_fraction", top_prune_fraction)
    t = _Trees(base, _check_trees(trees, kind), exclude)
    n = len(t.trees)
    scales = _scales(t, scale, lines)
    keys = {j: leaf_key(key, t.paths[j]) if kind == "dare_ties" else None for j in t.merged}

    def inputs(j):
        return t.anchor[j], t.models(j), keys[j]

    results = {}
    for group in [t.merged] if trim == "global" else [[j] for j in t.merged]:
        size = sum(t.size(j) for j in group)
        k_low, k_high = _rank(p, size), _rank(q, size)
        if kind == "breadcrumbs" and k_low + k_high >= size:
            raise ValueError(
                f"breadcrumbs: ⌊p·N⌋ + ⌊q·N⌋ = {k_low} + {k_high} ≥ N = {size} "
                f"(prune_fraction={p}, top_prune_fraction={q}) removes every entry"
            )
        low = _lower_rank(kind, k_low)
        ranks = ([low] if low is not None else []) + (
            [size - 1 - k_high] if kind == "breadcrumbs" and k_high > 0 else []
        )
        lo = hi = None
        if ranks:

            def histogram_of(found, shift, width, group=group):
                total = 0
                for j in group:
                    total = total + _leafwise(
                        _ties_histogram, *inputs(j), found, kind=kind, shift=shift, width=width
                    )
                return total

            found = _select(histogram_of, n, ranks)
            if low is not None:
                lo = found[:, 0]
            if kind == "breadcrumbs" and k_high > 0:
                hi = found[:, -1]
        total = sum(_leafwise(_ties_sign_total, *inputs(j), lo, hi, kind=kind, p=p) for j in group)
        majority = jnp.sign(total)
        for j in group:
            results[j] = _leafwise(
                _ties_apply, *inputs(j), lo, hi, majority, scales[j], kind=kind, p=p,
                mode=merge, **t.out(j),
            )  # fmt: skip
    return t.build(results)


def ties(
    base,
    trees,
    scale=1.0,
    prune_fraction=0.7,
    merge="mean",
    trim="global",
    *,
    exclude=None,
    lines=None,
):
    """TIES: trim (keep |τ_i| ≥ its k-th smallest, k = ⌊pN⌋ counted from 1 as in
    `torch.kthvalue`, k = 0 keeping all; ties kept), elect σ = sign(Σ τ̂_i) with
    zeros set to sign(Σ σ), disjoint merge of the entries agreeing with σ (mean / sum / max),
    θ = θ0 + λ·τ_merged."""
    return _ties_family(
        "ties", base, trees, None, scale, prune_fraction, 0.0, merge, trim, exclude, lines
    )


def dare_ties(
    base,
    trees,
    key,
    scale=1.0,
    prune_fraction=0.7,
    merge="mean",
    trim="global",
    *,
    exclude=None,
    lines=None,
):
    """DARE-TIES: TIES whose trim keeps entries with u ≥ the k-th smallest u (k = ⌊pN⌋, from
    1; u ~ U(0, 1) per entry and model) and rescales them by 1/(1 − p)."""
    return _ties_family(
        "dare_ties", base, trees, key, scale, prune_fraction, 0.0, merge, trim, exclude, lines
    )


def breadcrumbs(
    base,
    trees,
    prune_fraction=0.7,
    top_prune_fraction=0.01,
    scale=1.0,
    merge="mean",
    trim="global",
    *,
    exclude=None,
    lines=None,
):
    """Model Breadcrumbs + TIES election: keep a_{⌊pN⌋} ≤ |τ_i| ≤ a_{N−1−⌊qN⌋} (sorted
    magnitudes a); ValueError if ⌊pN⌋ + ⌊qN⌋ ≥ N."""
    return _ties_family(
        "breadcrumbs",
        base,
        trees,
        None,
        scale,
        prune_fraction,
        top_prune_fraction,
        merge,
        trim,
        exclude,
        lines,
    )


# ----------------------------------------------------------------------------- registry

MERGES: dict[str, Callable] = {
    "interpolation": interpolate,
    "slerp": slerp,
    "task_arithmetic": task_arithmetic,
    "ties": ties,
    "dare_ties": dare_ties,
    "breadcrumbs": breadcrumbs,
    "magmax": magmax,
    "random": random_merge,
    "model_stock": model_stock,
    "tall_masks": tall_masks,
}
ALIASES = {"interpolate": "interpolation", "breadcrumbs_ties": "breadcrumbs"}
NEEDS_KEY = ("dare_ties", "random")
TWO_MODELS = ("slerp", "model_stock")
LINES_MERGES = ("interpolation", "task_arithmetic", "ties", "dare_ties", "breadcrumbs")


def canonical_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in MERGES:
        raise ValueError(f"unknown merge {name!r}; known: {sorted(MERGES)}")
    return name


def _call(name, base, trees, key, kwargs):
    """Uniform calling convention: base = θ0, trees = list of models."""
    if name == "interpolation":
        kwargs = dict(kwargs)
        weighting = kwargs.pop("weighting", None)
        if weighting is not None:
            kwargs["weights"] = _weights(len(trees), kwargs.get("weights"), weighting)
        return interpolate(trees, base=base, **kwargs)
    if name == "slerp":
        return slerp(*trees, base=base, **kwargs)
    if name == "model_stock":
        return model_stock(base, *trees, **kwargs)
    if name in NEEDS_KEY:
        return MERGES[name](base, trees, key, **kwargs)
    return MERGES[name](base, trees, **kwargs)


def merge(name: str, base, trees, *, key=None, jit: bool = True, **kwargs):
    """Merge `trees` (a list) with anchor `base` = θ0 by the named method, e.g.
    `merge("ties", theta0, [theta1, theta2], prune_fraction=0.2)`. Keyword arguments are the
    function's (all static); `key` is required by dare_ties and random; `weighting` (§8.3) may
    replace `weights` for interpolation; `lines` applies to the task-vector merges only.
    The merge runs leaf by leaf, each leaf's arithmetic a compiled program cached per shape
    and configuration; jit=False runs it op by op instead (`jax.disable_jit`)."""
    name = canonical_name(name)
    trees = _check_trees(trees, name, 2 if name in TWO_MODELS else None)
    if name in NEEDS_KEY and key is None:
        raise ValueError(f"{name} is randomised: pass key=")
    if kwargs.get("lines") not in (None, False) and name not in LINES_MERGES:
        raise ValueError(f"LiNeS applies to the task-vector merges {LINES_MERGES}, not {name!r}")
    if name == "interpolation" and kwargs.get("weights") is not None:
        kwargs["weights"] = [float(w) for w in np.asarray(kwargs["weights"]).reshape(-1)]
    if not jit:
        with jax.disable_jit():
            return _call(name, base, trees, key, kwargs)
    return _call(name, base, trees, key, kwargs)


def interpolation_weights(n: int, weighting: str | None = None) -> list[float]:
    """Offline-merge weights of spec §8.3 for positions i = 1 … n (oldest to newest), summing
    to 1: null/uniform, linear, sqrt, quadratic, cubic, fifth, tenth, exp (2^(i−1)),
    log (ln(i + 1)), and reverse_<name> (the same list reversed)."""
    if n < 1:
        raise ValueError(f"interpolation_weights: n={n} < 1")
    name = "uniform" if weighting in (None, "null", "none", "uniform") else str(weighting)
    reverse = name.startswith("reverse_")
    if reverse:
        name = name[len("reverse_") :]
        name = "uniform" if name in ("null", "none") else name
    i = np.arange(1, n + 1, dtype=np.float64)
    table = {
        "uniform": np.ones_like(i),
        "linear": i,
        "sqrt": np.sqrt(i),
        "quadratic": i**2,
        "cubic": i**3,
        "fifth": i**5,
        "tenth": i**10,
        "exp": 2.0 ** (i - 1),
        "log": np.log(i + 1),
    }
    if name not in table:
        raise ValueError(
            f"unknown interpolation weighting {weighting!r}; expected null or one of "
            f"{sorted(table)} (optionally reverse_<name>)"
        )
    w = table[name] / table[name].sum()
    return [float(x) for x in (w[::-1] if reverse else w)]


# ----------------------------------------------------------------------------- streamed merging

STREAMED = ("interpolation", "task_arithmetic", "magmax", "tall_masks", "ties", "breadcrumbs")


def leaf_filename(path: str) -> str:
    return urllib.parse.quote(path, safe="") + ".npy"


def save_npy(tree, directory: str) -> None:
    """Write every leaf of `tree` as `<directory>/<quoted path>.npy`."""
    os.makedirs(directory, exist_ok=True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        np.save(os.path.join(directory, leaf_filename(key_path_str(path))), np.asarray(leaf))


def npy_reader(directories: Sequence[str]) -> Callable[[int, str], np.ndarray]:
    """read(i, path): model i's leaf as a read-only memmap of the file `save_npy` wrote."""
    directories = list(directories)

    def read(i: int, path: str) -> np.ndarray:
        return np.load(os.path.join(directories[i], leaf_filename(path)), mmap_mode="r")

    return read


@functools.lru_cache(maxsize=256)
def _chunk_kernel(name: str, n: int, config: tuple, out_dtype: str | None):
    """Jitted (base chunk, model chunks, extra) → result chunk (cast to out_dtype) for the
    per-entry part of a merge; the same kernels as the in-memory merges."""
    cfg = dict(config)

    def finish(x):
        return x if out_dtype is None else x.astype(out_dtype)

    def kernel(base, thetas, extra):
        thetas = [x.astype(_compute_dtype(x.dtype)) for x in thetas]
        if name == "interpolation":
            return finish(_interp_leaf(thetas, cfg["weights"]))
        b = base.astype(_compute_dtype(base.dtype))
        taus = [x - b for x in thetas]
        if name == "interpolation_lines":
            return finish(b + extra["s"] * _interp_leaf(taus, cfg["weights"]))
        if name == "task_arithmetic":
            return finish(b + extra["s"] * _sum(taus))
        if name == "magmax":
            return finish(b + extra["s"] * _magmax_leaf(taus))
        if name == "tall_masks":
            return finish(b + extra["s"] * _tall_leaf(taus, cfg["threshold"], cfg["tall_lambda"]))
        if name == "magnitudes":
            return [jax.lax.bitcast_convert_type(jnp.abs(x), jnp.uint32) for x in taus]
        hats = _trim(taus, extra.get("lo"), extra.get("hi"))
        if name == "sign_total":
            return _sign_total(hats)
        if name == "ties":
            return finish(b + extra["s"] * _disjoint(hats, extra["majority"], cfg["merge"]))
        raise AssertionError(name)

    return jax.jit(kernel)


def _as_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    # .npy files of ml_dtypes (bfloat16) load as raw void records of the right width.
    return x.view(dtype) if x.dtype != dtype and x.dtype.kind == "V" else x


class _StreamedSelection:
    """Exact k-th smallest magnitudes per model over a stream of uint32 bit patterns: a
    65,536-bin histogram of the high 16 bits, then one of the low 16 bits inside the bin that
    holds each rank (two streamed passes)."""

    def __init__(self, n: int, ranks: Sequence[int]):
        self.n, self.ranks = n, list(ranks)
        self.high = np.zeros((n, 1 << 16), np.int64)

    def add_high(self, i: int, bits: np.ndarray) -> None:
        self.high[i] += np.bincount(bits >> 16, minlength=1 << 16)

    def settle_high(self) -> None:
        cum = np.cumsum(self.high, axis=1)
        self.bins = np.zeros((self.n, len(self.ranks)), np.int64)
        self.residual = np.zeros_like(self.bins)
        for i in range(self.n):
            for r, k in enumerate(self.ranks):
                b = int(np.searchsorted(cum[i], k + 1, side="left"))
                self.bins[i, r] = b
                self.residual[i, r] = k - (cum[i, b - 1] if b > 0 else 0)
        self.low = np.zeros((self.n, len(self.ranks), 1 << 16), np.int64)

    def add_low(self, i: int, bits: np.ndarray) -> None:
        high = bits >> 16
        for r in range(len(self.ranks)):
            inside = bits[high == self.bins[i, r]]
            if inside.size:
                self.low[i, r] += np.bincount(inside & 0xFFFF, minlength=1 << 16)

    def values(self) -> np.ndarray:
        out = np.zeros((self.n, len(self.ranks)), np.uint32)
        for i in range(self.n):
            for r in range(len(self.ranks)):
                cum = np.cumsum(self.low[i, r])
                low = int(np.searchsorted(cum, self.residual[i, r] + 1, side="left"))
                out[i, r] = (int(self.bins[i, r]) << 16) | low
        return out.view(np.float32)


def streamed(
    name: str,
    base,
    read: Callable[[int, str], Any],
    n: int,
    *,
    exclude=None,
    lines=None,
    chunk_size: int = 1 << 18,
    **kwargs,
):
    """Merge n models read leaf by leaf: `read(i, path)` returns model i's leaf at `path` (a
    `fomo_jax.params.key_path_str` path) as an array sliceable along its flattened entries —
    ideally a memmap (`npy_reader`), which is called again for every chunk so that at most one
    chunk of `chunk_size` entries per model is resident. `base` is θ0 (for interpolation
    without LiNeS a tree of `jax.ShapeDtypeStruct` suffices; pass-through leaves then come from
    model 0). Returns the merged tree of numpy arrays, equal to the in-memory merge.

    Supported: interpolation (weights / weighting), task_arithmetic, magmax, tall_masks (one
    pass), ties and breadcrumbs (global or per-leaf trim: two histogram passes for the exact
    thresholds, one for the majority sign, one to merge). Memory: base + result + a few
    chunks per model."""
    name = canonical_name(name)
    if name not in STREAMED:
        raise ValueError(f"streamed merging supports {STREAMED}, not {name!r}")
    if n < 1:
        raise ValueError("streamed: needs at least one model")
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    paths = [key_path_str(path) for path, _ in flat]
    anchor = [
        leaf if isinstance(leaf, jax.ShapeDtypeStruct) else np.asarray(leaf) for _, leaf in flat
    ]
    rules = _rules(exclude)
    merged = [
        j
        for j, (path, leaf) in enumerate(zip(paths, anchor, strict=True))
        if _is_float(leaf) and not any(rule.search(path) for rule in rules)
    ]
    lines_config = _lines_config(lines)
    if lines_config is not None and name not in LINES_MERGES:
        raise ValueError(f"LiNeS applies to the task-vector merges {LINES_MERGES}, not {name!r}")
    scales = _leaf_scales(paths, kwargs.pop("scale", 1.0), lines)

    config: dict[str, Any] = {}
    kernel_name = name
    if name == "interpolation":
        weights = _weights(n, kwargs.pop("weights", None), kwargs.pop("weighting", None))
        config["weights"] = tuple(weights)
        if lines_config is not None:
            kernel_name = "interpolation_lines"
    elif name == "tall_masks":
        config["threshold"] = kwargs.pop("threshold", 2)
        config["tall_lambda"] = kwargs.pop("tall_lambda", 0.4)
    elif name in ("ties", "breadcrumbs"):
        config["merge"] = kwargs.pop("merge", "mean")
        if config["merge"] not in MERGE_MODES:
            raise ValueError(f"merge={config['merge']!r}; expected one of {MERGE_MODES}")
        trim = _check_trim(kwargs.pop("trim", "global"))
        p = _check_fraction("prune_fraction", kwargs.pop("prune_fraction", 0.7))
        q = _check_fraction(
            "top_prune_fraction", kwargs.pop("top_prune_fraction", 0.01 if name != "ties" else 0)
        )
        kernel_name = "ties"
    if kwargs:
        raise TypeError(f"streamed {name}: unexpected arguments {sorted(kwargs)}")

    def is_array(leaf):
        return not isinstance(leaf, jax.ShapeDtypeStruct)

    def chunks(j):
        size = int(np.prod(anchor[j].shape, dtype=np.int64))
        for start in range(0, max(size, 1), chunk_size):
            yield start, min(start + chunk_size, size)

    def base_chunk(j, start, stop):
        if not is_array(anchor[j]):
            return np.zeros(0, np.float32)
        return anchor[j].reshape(-1)[start:stop]

    def model_chunks(j, start, stop):
        dtype = np.dtype(anchor[j].dtype)
        out = []
        for i in range(n):
            leaf = read(i, paths[j])
            out.append(_as_dtype(np.asarray(leaf.reshape(-1)[start:stop]), dtype))
            del leaf
        return out

    def run(kind, j, start, stop, extra, out_dtype=None):
        kernel = _chunk_kernel(kind, n, tuple(sorted(config.items())), out_dtype)
        return kernel(base_chunk(j, start, stop), model_chunks(j, start, stop), extra)

    results: dict[int, np.ndarray] = {}

    def write(j, extra):
        dtype = np.dtype(anchor[j].dtype)
        out = np.empty(anchor[j].shape, dtype)
        flat_out = out.reshape(-1)
        for start, stop in chunks(j):
            flat_out[start:stop] = np.asarray(run(kernel_name, j, start, stop, extra, dtype.name))
        results[j] = out

    if kernel_name != "ties":
        for j in merged:
            write(j, {"s": np.float32(scales[j])})
    else:
        groups = [merged] if trim == "global" else [[j] for j in merged]
        for group in groups:
            size = sum(int(np.prod(anchor[j].shape, dtype=np.int64)) for j in group)
            k_low, k_high = _rank(p, size), _rank(q, size)
            if name == "breadcrumbs" and k_low + k_high >= size:
                raise ValueError(
                    f"breadcrumbs: ⌊p·N⌋ + ⌊q·N⌋ = {k_low} + {k_high} ≥ N = {size} "
                    f"(prune_fraction={p}, top_prune_fraction={q}) removes every entry"
                )
            low = _lower_rank(name, k_low)
            ranks = ([low] if low is not None else []) + (
                [size - 1 - k_high] if name == "breadcrumbs" and k_high > 0 else []
            )
            bounds: dict[str, np.ndarray] = {}
            if ranks:
                selection = _StreamedSelection(n, ranks)
                for stage in ("high", "low"):
                    for j in group:
                        for start, stop in chunks(j):
                            bits = run("magnitudes", j, start, stop, {})
                            for i in range(n):
                                getattr(selection, f"add_{stage}")(i, np.asarray(bits[i]))
                    if stage == "high":
                        selection.settle_high()
                found = selection.values()
                if low is not None:
                    bounds["lo"] = found[:, 0]
                if name == "breadcrumbs" and k_high > 0:
                    bounds["hi"] = found[:, -1]
            total = 0
            for j in group:
                for start, stop in chunks(j):
                    total += int(run("sign_total", j, start, stop, bounds))
            majority = np.int32(np.sign(total))
            for j in group:
                write(j, {**bounds, "s": np.float32(scales[j]), "majority": majority})

    leaves = []
    for j, leaf in enumerate(anchor):
        if j in results:
            leaves.append(results[j])
        elif is_array(leaf):
            leaves.append(leaf)
        else:
            leaves.append(_as_dtype(np.array(read(0, paths[j])), np.dtype(leaf.dtype)))
    return jax.tree_util.tree_unflatten(treedef, leaves)
