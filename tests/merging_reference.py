"""The in-memory merges of fomo_jax.merging as they were before the leaf-by-leaf rewrite
(commit d473ea4): whole-tree pytree arithmetic, the global trim a bisection over all leaves at
once. Kept verbatim as the reference the leaf-by-leaf merges must equal bit for bit."""

from __future__ import annotations

import functools
import inspect
import math
import re
import types
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
            self.trees.append(self.treedef.flatten_up_to(tree))
        rules = _rules(exclude)
        self.merged = [
            j
            for j, (path, leaf) in enumerate(zip(self.paths, self.anchor, strict=True))
            if _is_float(leaf) and not any(rule.search(path) for rule in rules)
        ]

    def leaf(self, i: int, j: int):
        """Leaf j of tree i in its compute dtype."""
        x = jnp.asarray(self.trees[i][j])
        return x.astype(_compute_dtype(x.dtype))

    def base(self, j: int):
        x = jnp.asarray(self.anchor[j])
        return x.astype(_compute_dtype(x.dtype))

    def taus(self, j: int) -> list:
        base = self.base(j)
        return [self.leaf(i, j) - base for i in range(len(self.trees))]

    def build(self, results: dict[int, Any]):
        """The output tree: merged leaves cast to the anchor leaf's dtype, the rest passed
        through from the anchor."""
        leaves = [
            results[j].astype(_dtype(leaf)) if j in results else leaf
            for j, leaf in enumerate(self.anchor)
        ]
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


def _by_size(key, t: _Trees, leaves: Sequence[int], draw, models: int | None = None):
    """Per-leaf random draws, {j: array of leaf j's shape} (or {j: [array per model]}).

    Leaf j's key is `leaf_key(key, path_j)`, model i's key `fold_in(leaf key, i)`, and its
    draw is `draw(key, (size,))` reshaped to the leaf's shape. The keys of all leaves come from
    one vmapped computation and leaves of equal size share one vmapped draw (exactly equal to
    drawing leaf by leaf), because every random-bits call site costs compile time."""
    leaves = list(leaves)
    crcs = jnp.asarray([zlib.crc32(t.paths[j].encode("utf-8")) for j in leaves], jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, crcs)
    if models is not None:
        index = jnp.arange(models, dtype=jnp.uint32)
        keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(index))(keys)
    groups: dict[int, list[int]] = {}
    for g, j in enumerate(leaves):
        groups.setdefault(int(np.prod(np.shape(t.anchor[j]), dtype=np.int64)), []).append(g)
    out = {}
    for size, members in groups.items():
        fn = functools.partial(draw, shape=(size,))
        fn = jax.vmap(fn) if models is None else jax.vmap(jax.vmap(fn))
        # The barrier materialises the draws once, so that XLA does not fuse the random-bits
        # computation into every consumer of every slice (compile time).
        drawn = jax.lax.optimization_barrier(fn(keys[np.asarray(members)]))
        for row, g in enumerate(members):
            j = leaves[g]
            shape = np.shape(t.anchor[j])
            if models is None:
                out[j] = drawn[row].reshape(shape)
            else:
                out[j] = [drawn[row, i].reshape(shape) for i in range(models)]
    return out


def _uniform_draws(key, t: _Trees, leaves: Sequence[int], n: int) -> dict[int, list]:
    """DARE's u for model i of leaf j: uniform(fold_in(leaf_key(key, path_j), i), (size,))
    reshaped to the leaf's shape."""
    return _by_size(key, t, leaves, lambda k, shape: jax.random.uniform(k, shape), models=n)


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
    return t.build({j: t.base(j) + scales[j] * (t.leaf(0, j) - t.base(j)) for j in t.merged})


# ----------------------------------------------------------------------------- exact selection


def _kth_smallest(values: list[list], ranks: Sequence[int]):
    """Exact order statistics. values[i] lists the non-negative float leaves of model i (all
    models have the same leaves); returns the float32 array (n, len(ranks)) whose entry [i, r]
    is the ranks[r]-th smallest (0-based) of model i's entries.

    Bisection over the bit patterns (monotone for non-negative floats): 32 passes, each a fused
    count of entries ≤ a candidate per model; nothing is sorted or concatenated."""
    return _select(values, jnp.asarray(np.asarray(ranks, np.int64) + 1, jnp.uint32))


@jax.jit
def _select(values, targets):
    # Jitted with the ranks traced, so eager callers compile once per set of leaf shapes.
    n, m = len(values), targets.shape[0]
    bits = [
        [jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32) for x in leaves]
        for leaves in values
    ]

    def count(leaf, cand):  # cand (m,) → (m,) entries of `leaf` ≤ cand
        c = cand.reshape((m,) + (1,) * leaf.ndim)
        axes = tuple(range(1, leaf.ndim + 1))
        return jnp.sum(leaf[None] <= c, axis=axes, dtype=jnp.uint32)

    def body(step, found):  # found (n, m): the bits above the current one
        bit = jnp.left_shift(jnp.uint32(1), (31 - step).astype(jnp.uint32))
        cand = found | (bit - jnp.uint32(1))
        counts = jnp.stack([sum(count(x, cand[i]) for x in bits[i]) for i in range(n)])
        return jnp.where(counts < targets, found | bit, found)

    found = jax.lax.fori_loop(0, 32, body, jnp.zeros((n, m), jnp.uint32))
    return jax.lax.bitcast_convert_type(found, jnp.float32)


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


# ----------------------------------------------------------------------------- merges


def interpolate(trees, weights=None, *, base=None, exclude=None, lines=None):
    """θ = Σ_i w_i θ_i (uniform weights when None; n entries summing to 1).

    Integer and excluded leaves pass through from `base` if given, else from the first tree.
    With `lines` (needs `base`): θ = θ0 + s ⊙ Σ_i w_i τ_i."""
    trees = _check_trees(trees, "interpolation")
    n = len(trees)
    if not isinstance(weights, jax.core.Tracer):
        weights = _weights(n, weights)
    if lines is not None and lines is not False:
        if base is None:
            raise ValueError("interpolation with LiNeS needs base (θ0)")
        t = _Trees(base, trees, exclude)
        scales = _scales(t, 1, lines)
        return t.build(
            {j: t.base(j) + scales[j] * _interp_leaf(t.taus(j), weights) for j in t.merged}
        )
    t = _Trees(trees[0] if base is None else base, trees, exclude)
    return t.build({j: _interp_leaf([t.leaf(i, j) for i in range(n)], weights) for j in t.merged})


def slerp(tree_a, tree_b, t=0.5, *, base=None, exclude=None):
    """Per-tensor spherical interpolation of raw weights; t is the weight of tree_b.

    Unit copies use the Frobenius norm (a tensor with norm ≤ 1e-8 is left unnormalised); if
    |cos| > 0.9995 it falls back to (1 − t)·a + t·b."""
    tr = _Trees(tree_a if base is None else base, [tree_a, tree_b], exclude)
    results = {}
    for j in tr.merged:
        v0, v1 = tr.leaf(0, j), tr.leaf(1, j)
        n0, n1 = jnp.sqrt(jnp.sum(v0 * v0)), jnp.sqrt(jnp.sum(v1 * v1))
        u0 = jnp.where(n0 > SLERP_NORM_EPS, v0 / jnp.where(n0 > SLERP_NORM_EPS, n0, 1), v0)
        u1 = jnp.where(n1 > SLERP_NORM_EPS, v1 / jnp.where(n1 > SLERP_NORM_EPS, n1, 1), v1)
        c = jnp.sum(u0 * u1)
        lerp = (1 - t) * v0 + t * v1
        parallel = jnp.abs(c) > SLERP_DOT_THRESHOLD
        omega = jnp.arccos(jnp.clip(c, -1, 1))
        sin_omega = jnp.where(parallel, 1, jnp.sin(omega))
        spherical = (jnp.sin((1 - t) * omega) / sin_omega) * v0 + (
            jnp.sin(t * omega) / sin_omega
        ) * v1
        results[j] = jnp.where(parallel, lerp, spherical)
    return tr.build(results)


def task_arithmetic(base, trees, scale=1.0, *, exclude=None, lines=None):
    """θ = θ0 + λ·Σ_i τ_i."""
    t = _Trees(base, _check_trees(trees, "task_arithmetic"), exclude)
    scales = _scales(t, scale, lines)
    return t.build({j: t.base(j) + scales[j] * _sum(t.taus(j)) for j in t.merged})


def magmax(base, trees, scale=1.0, *, exclude=None):
    """Per entry the τ_i of largest magnitude (the first on ties); θ = θ0 + λ·τ_sel."""
    t = _Trees(base, _check_trees(trees, "magmax"), exclude)
    return t.build({j: t.base(j) + scale * _magmax_leaf(t.taus(j)) for j in t.merged})


def random_merge(base, trees, key, scale=1.0, *, exclude=None):
    """Per entry the τ_i of a uniformly random i (drawn from the leaf's key, see the module
    docstring); θ = θ0 + λ·τ_sel."""
    t = _Trees(base, _check_trees(trees, "random"), exclude)
    n = len(t.trees)
    choices = _by_size(key, t, t.merged, lambda k, shape: jax.random.randint(k, shape, 0, n))
    results = {}
    for j in t.merged:
        taus = t.taus(j)
        choice = choices[j]
        selected = taus[0]
        for i in range(1, n):
            selected = jnp.where(choice == i, taus[i], selected)
        results[j] = t.base(j) + scale * selected
    return t.build(results)


def model_stock(base, tree_a, tree_b, eps=1e-8, *, exclude=None):
    """Per tensor: c = ⟨τ1, τ2⟩/(‖τ1‖‖τ2‖ + ε) clipped to [−1, 1], r = 2c/(c + 1 + ε),
    θ = r·(θ1 + θ2)/2 + (1 − r)·θ0."""
    t = _Trees(base, [tree_a, tree_b], exclude)
    results = {}
    for j in t.merged:
        t1, t2 = t.taus(j)
        norms = jnp.sqrt(jnp.sum(t1 * t1)) * jnp.sqrt(jnp.sum(t2 * t2))
        c = jnp.clip(jnp.sum(t1 * t2) / (norms + eps), -1, 1)
        # max(·, 0) keeps XLA from folding 1 + ε (= 1 in float32) before adding c.
        r = 2 * c / (jnp.maximum(c + 1, 0) + eps)
        results[j] = r * (t.leaf(0, j) + t.leaf(1, j)) / 2 + (1 - r) * t.base(j)
    return t.build(results)


def tall_masks(base, trees, threshold=2, tall_lambda=0.4, scale=1.0, *, exclude=None):
    """TALL masks / consensus merging: m_i = [|τ_i| > λ_t·|Σ_j τ_j − τ_i|], keep entries with
    Σ_i m_i ≥ κ (`threshold`), θ = θ0 + λ·(Σ_i τ_i) ⊙ consensus. κ = 0 is task arithmetic
    (the reference default); κ = 2 is the method's intended setting."""
    t = _Trees(base, _check_trees(trees, "tall_masks"), exclude)
    return t.build(
        {j: t.base(j) + scale * _tall_leaf(t.taus(j), threshold, tall_lambda) for j in t.merged}
    )


def _groups(t: _Trees, trim: str) -> list[list[int]]:
    return [t.merged] if trim == "global" else [[j] for j in t.merged]


def _ties_family(
    kind,
    base,
    trees,
    key,
    scale,
    prune_fraction,
    top_prune_fraction,
    merge,
    trim,
    exclude,
    lines,
    *,
    stage="both",
    stats=None,
):
    """TIES / DARE-TIES / Breadcrumbs. stage="stats" returns only the statistics: per group
    (lo, hi, majority sign) — thresholds and elected majority — and DARE's draws; passing them
    back as `stats` computes the merge from them. `merge()` compiles the two stages as
    separate programs: XLA's fusion pass is superlinear when every output leaf depends on a
    reduction over all leaves, and splitting there cuts a ViT-B/16 TIES compile about 3×."""
    if merge not in MERGE_MODES:
        raise ValueError(f"merge={merge!r}; expected one of {MERGE_MODES}")
    trim = _check_trim(trim)
    p = _check_fraction("prune_fraction", prune_fraction)
    q = _check_fraction("top_prune_fraction", top_prune_fraction)
    t = _Trees(base, _check_trees(trees, kind), exclude)
    n = len(t.trees)
    scales = _scales(t, scale, lines)
    draws = None
    if kind == "dare_ties":
        # The apply stage reuses the stats stage's draws rather than compiling the random-bits
        # computation a second time.
        draws = stats["draws"] if stats is not None else _uniform_draws(key, t, t.merged, n)

    def trimmed(group, taus, lo, hi):
        if kind != "dare_ties":
            return {j: _trim(taus[j], lo, hi) for j in group}
        hats = {}
        for j in group:
            hats[j] = [
                jnp.where(
                    draws[j][i] >= lo[i] if lo is not None else True,
                    taus[j][i] / jnp.asarray(1 - p, taus[j][i].dtype),
                    0,
                ).astype(taus[j][i].dtype)
                for i in range(n)
            ]
        return hats

    groups = _groups(t, trim)
    if stats is None:
        stats = {"groups": [], "draws": draws}
        for group in groups:
            size = sum(int(np.prod(np.shape(t.anchor[j]), dtype=np.int64)) for j in group)
            k_low, k_high = _rank(p, size), _rank(q, size)
            if kind == "breadcrumbs" and k_low + k_high >= size:
                raise ValueError(
                    f"breadcrumbs: ⌊p·N⌋ + ⌊q·N⌋ = {k_low} + {k_high} ≥ N = {size} "
                    f"(prune_fraction={p}, top_prune_fraction={q}) removes every entry"
                )
            taus = {j: t.taus(j) for j in group}
            low = _lower_rank(kind, k_low)
            ranks = ([low] if low is not None else []) + (
                [size - 1 - k_high] if kind == "breadcrumbs" and k_high > 0 else []
            )
            lo = hi = None
            if ranks:
                if kind == "dare_ties":
                    values = [[draws[j][i] for j in group] for i in range(n)]
                else:
                    values = [[jnp.abs(taus[j][i]) for j in group] for i in range(n)]
                found = _kth_smallest(values, ranks)
                if low is not None:
                    lo = found[:, 0]
                if kind == "breadcrumbs" and k_high > 0:
                    hi = found[:, -1]
            hats = trimmed(group, taus, lo, hi)
            majority = jnp.sign(sum(_sign_total(hats[j]) for j in group))
            stats["groups"].append((lo, hi, majority))
        if stage == "stats":
            return stats
    results = {}
    for group, (lo, hi, majority) in zip(groups, stats["groups"], strict=True):
        hats = trimmed(group, {j: t.taus(j) for j in group}, lo, hi)
        for j in group:
            results[j] = t.base(j) + scales[j] * _disjoint(hats[j], majority, merge)
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


def _hashable(value):
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return value


def _unhashable(name, value):
    if name == "lines" and isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return dict(value)
    return value


TIES_FAMILY = ("ties", "dare_ties", "breadcrumbs")


def _ties_stage(name, base, trees, key, kwargs, stage, stats=None):
    """A TIES-family merge's statistics (stage="stats") or its result from them."""
    bound = inspect.signature(MERGES[name]).bind(
        base, trees, *([key] if name in NEEDS_KEY else []), **kwargs
    )
    bound.apply_defaults()
    a = bound.arguments
    return _ties_family(
        name,
        base,
        trees,
        key,
        a["scale"],
        a["prune_fraction"],
        a.get("top_prune_fraction", 0.0),
        a["merge"],
        a["trim"],
        a["exclude"],
        a["lines"],
        stage=stage,
        stats=stats,
    )


@functools.lru_cache(maxsize=64)
def _compiled(name: str, frozen: tuple):
    kwargs = {k: _unhashable(k, v) for k, v in frozen}
    if name not in TIES_FAMILY:
        return jax.jit(lambda base, trees, key: _call(name, base, trees, key, kwargs))
    stats_fn = jax.jit(lambda b, t, k: _ties_stage(name, b, t, k, kwargs, "stats"))
    apply_fn = jax.jit(lambda b, t, k, s: _ties_stage(name, b, t, k, kwargs, "apply", s))
    return _TwoStage(stats_fn, apply_fn)


class _TwoStage:
    """Two jitted programs called as one: statistics (thresholds, majority signs), then the
    merge from them. `lower(...)` returns an object whose `compile()` compiles both."""

    def __init__(self, stats_fn, apply_fn):
        self.stats_fn, self.apply_fn = stats_fn, apply_fn

    def __call__(self, base, trees, key):
        return self.apply_fn(base, trees, key, self.stats_fn(base, trees, key))

    def lower(self, base, trees, key):
        stats_shape = jax.eval_shape(self.stats_fn, base, trees, key)
        return _TwoStageLowered(
            self.stats_fn.lower(base, trees, key),
            self.apply_fn.lower(base, trees, key, stats_shape),
        )


class _TwoStageLowered:
    def __init__(self, stats, apply):
        self.stats, self.apply = stats, apply

    def compile(self):
        return _TwoStageCompiled(self.stats.compile(), self.apply.compile())


class _TwoStageCompiled:
    def __init__(self, stats, apply):
        self.stats, self.apply = stats, apply

    def __call__(self, base, trees, key):
        return self.apply(base, trees, key, self.stats(base, trees, key))

    def memory_analysis(self):
        """The larger of the two programs' temporaries; the apply program's output."""
        stats, apply = self.stats.memory_analysis(), self.apply.memory_analysis()
        return types.SimpleNamespace(
            temp_size_in_bytes=max(stats.temp_size_in_bytes, apply.temp_size_in_bytes),
            output_size_in_bytes=apply.output_size_in_bytes,
        )


def merge(name: str, base, trees, *, key=None, jit: bool = True, **kwargs):
    """Merge `trees` (a list) with anchor `base` = θ0 by the named method, e.g.
    `merge("ties", theta0, [theta1, theta2], prune_fraction=0.2)`. Keyword arguments are the
    function's (all static); `key` is required by dare_ties and random; `weighting` (§8.3) may
    replace `weights` for interpolation; `lines` applies to the task-vector merges only.
    With jit=True one compiled call per (name, configuration) is cached."""
    name = canonical_name(name)
    trees = _check_trees(trees, name, 2 if name in TWO_MODELS else None)
    if name in NEEDS_KEY and key is None:
        raise ValueError(f"{name} is randomised: pass key=")
    if kwargs.get("lines") not in (None, False) and name not in LINES_MERGES:
        raise ValueError(f"LiNeS applies to the task-vector merges {LINES_MERGES}, not {name!r}")
    if name == "interpolation" and kwargs.get("weights") is not None:
        kwargs["weights"] = [float(w) for w in np.asarray(kwargs["weights"]).reshape(-1)]
    if not jit:
        return _call(name, base, trees, key, kwargs)
    frozen = tuple(sorted((k, _hashable(v)) for k, v in kwargs.items()))
    return _compiled(name, frozen)(base, trees, key)


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
