"""Merge functions (spec/fif.md §9) against independent float64 numpy implementations of their
formulas on small random trees: nested dicts with leaves of several shapes, a `logit_scale`
scalar and an integer leaf, or flat dicts with dotted keys."""

import math
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fomo_jax import merging as M
from fomo_jax.params import flatten
from tests import merging_reference as reference

KEY = jax.random.key(7)


# ----------------------------------------------------------------------------- trees


def make_tree(rng, grid=False, dtype=np.float32):
    """A nested tree; with grid=True every value is a multiple of 1/64 (exact in float32, so
    task vectors are exact and magnitudes tie often)."""

    def draw(*shape):
        x = rng.normal(size=shape)
        return (np.round(x * 64) / 64 if grid else x).astype(dtype)

    return {
        "image": {
            "patch_embed": draw(4, 3),
            "transformer": {
                "resblocks": {
                    0: {"attn": {"kernel": draw(4, 3)}, "ln_1": {"scale": draw(5)}},
                    1: {"attn": {"kernel": draw(4, 3)}, "ln_1": {"scale": draw(5)}},
                }
            },
        },
        "logit_scale": draw(),
        "step": np.int32(rng.integers(0, 100)),
    }


def make_trees(seed, n, grid=False, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = make_tree(rng, grid, dtype)
    models = []
    for _ in range(n):
        # θ_i = θ0 + τ_i with τ_i drawn separately (exact on the grid).
        tau = make_tree(rng, grid, dtype)
        models.append(
            jax.tree.map(
                lambda b, t: (b + t).astype(b.dtype)
                if jnp.issubdtype(b.dtype, jnp.floating)
                else t,
                base,
                tau,
            )
        )
    return base, models


def f64(tree):
    """{path: float64 array} of the floating leaves."""
    return {
        k: np.asarray(v, np.float64)
        for k, v in flatten(tree).items()
        if np.issubdtype(np.asarray(v).dtype, np.floating)
        or np.asarray(v).dtype == ml_dtypes.bfloat16
    }


def assert_tree_close(out, ref, rtol=1e-5, atol=1e-6):
    got = flatten(out)
    for path, value in ref.items():
        np.testing.assert_allclose(
            np.asarray(got[path], np.float64), value, rtol=rtol, atol=atol, err_msg=path
        )


# ----------------------------------------------------------------------------- numpy references


def np_tau(base, models):
    b = f64(base)
    return b, [{k: f64(m)[k] - b[k] for k in b} for m in models]


def kth_smallest(values, k):
    """The k-th smallest of `values` counted from 1, as `torch.kthvalue(values, k)` (which the
    reference TIES and DARE trims use); k = 0 (no trim) gives −∞, below every value."""
    return np.sort(np.ravel(values))[k - 1] if k >= 1 else -np.inf


def np_ties(base, models, p, mode="mean", trim="global", q=None, scale=1.0, dare_u=None):
    """TIES / breadcrumbs (q given) / DARE (uniform draws given) in float64."""
    b, taus = np_tau(base, models)
    groups = [list(b)] if trim == "global" else [[k] for k in b]
    out = {}
    for group in groups:
        hats = []
        for i, tau in enumerate(taus):
            if dare_u is not None:
                u = np.concatenate([dare_u[i][k].ravel() for k in group])
                thr = kth_smallest(u, math.floor(p * u.size))
                hats.append(
                    {k: np.where(dare_u[i][k] >= thr, tau[k] / np.float32(1 - p), 0) for k in group}
                )
                continue
            a = np.sort(np.concatenate([np.abs(tau[k]).ravel() for k in group]))
            if q is None:  # TIES: |τ| ≥ the ⌊pN⌋-th smallest, counted from 1
                lo = kth_smallest(a, math.floor(p * a.size))
                hi = np.inf
            else:  # Breadcrumbs: a_{⌊pN⌋} ≤ |τ| ≤ a_{N−1−⌊qN⌋}, counted from 0
                lo = a[math.floor(p * a.size)]
                hi = a[a.size - 1 - math.floor(q * a.size)]
            hats.append(
                {
                    k: np.where((np.abs(tau[k]) >= lo) & (np.abs(tau[k]) <= hi), tau[k], 0)
                    for k in group
                }
            )
        sigma = {k: np.sign(sum(h[k] for h in hats)) for k in group}
        majority = np.sign(sum(s.sum() for s in sigma.values()))
        for k in group:
            s = np.where(sigma[k] == 0, majority, sigma[k])
            agree = [np.sign(h[k]) == s for h in hats]
            picked = [np.where(a, h[k], 0) for a, h in zip(agree, hats, strict=True)]
            if mode == "sum":
                merged = sum(picked)
            elif mode == "mean":
                count = sum(
                    (a & (h[k] != 0)).astype(np.int64) for a, h in zip(agree, hats, strict=True)
                )
                merged = sum(picked) / np.maximum(count, 1)
            else:
                merged = s * np.max(np.abs(np.stack(picked)), axis=0)
            out[k] = b[k] + scale * merged
    return out


def np_slerp(a, bb, t):
    out = {}
    for k in a:
        v0, v1 = a[k], bb[k]
        u0 = v0 / np.linalg.norm(v0) if np.linalg.norm(v0) > 1e-8 else v0
        u1 = v1 / np.linalg.norm(v1) if np.linalg.norm(v1) > 1e-8 else v1
        c = np.sum(u0 * u1)
        if abs(c) > 0.9995:
            out[k] = (1 - t) * v0 + t * v1
        else:
            om = np.arccos(c)
            out[k] = np.sin((1 - t) * om) / np.sin(om) * v0 + np.sin(t * om) / np.sin(om) * v1
    return out


def leaf_key(key, path):
    return jax.random.fold_in(key, zlib.crc32(path.encode()))


# ----------------------------------------------------------------------------- exact selection


def test_kth_smallest_is_exact_with_duplicates_and_many_leaves():
    rng = np.random.default_rng(0)
    leaves = [np.abs(rng.normal(size=s)).astype(np.float32) for s in [(7, 3), (50,), (), (4, 4)]]
    leaves[1][:20] = leaves[0][0, 0]  # many ties
    leaves[3][:] = 0.0
    values = np.sort(np.concatenate([x.ravel() for x in leaves]))
    ranks = [0, 1, 17, 30, values.size - 1]
    got = jax.jit(lambda v: M._kth_smallest(v, ranks))([[jnp.asarray(x) for x in leaves]] * 2)
    np.testing.assert_array_equal(np.asarray(got), np.stack([values[ranks]] * 2))


def test_streamed_selection_is_exact():
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_t(2, size=5000)).astype(np.float32)
    x[:100] = x[100]
    ranks = [0, 99, 2500, 4999]
    sel = M._StreamedSelection(1, ranks)
    for stage in ("high", "low"):
        for chunk in np.array_split(x, 7):
            getattr(sel, f"add_{stage}")(0, chunk.view(np.uint32))
        if stage == "high":
            sel.settle_high()
    np.testing.assert_array_equal(sel.values()[0], np.sort(x)[ranks])


def test_kth_smallest_resolves_both_halves_and_extremes():
    """Radix selection: values sharing their high 16 bits (only the low pass tells them
    apart), zeros, subnormals, huge values and inf, ranks at the ends and inside a run."""
    rng = np.random.default_rng(3)
    close = (np.float32(1) + rng.integers(0, 40, size=300).astype(np.float32) * 2**-23).astype(
        np.float32
    )
    odd = np.array([0, 0, 1e-45, 3e-39, 1e30, np.inf, 2.0, 0.5], np.float32)
    leaves = [close[:100].reshape(10, 10), odd, close[100:], np.float32(1.0)]
    values = np.sort(np.concatenate([np.ravel(x) for x in leaves]))
    ranks = [0, 1, 2, 3, 50, 150, 151, values.size - 2, values.size - 1]
    for trees in ([[jnp.asarray(x) for x in leaves]], [[jnp.asarray(x) for x in leaves[::-1]]]):
        got = np.asarray(M._kth_smallest(trees, ranks))[0]
        np.testing.assert_array_equal(got, values[ranks])


# ----------------------------------------------------------------------------- interpolation


def test_interpolation_matches_numpy_and_validates_weights():
    base, models = make_trees(0, 3)
    w = [0.2, 0.5, 0.3]
    ref = {k: sum(wi * f64(m)[k] for wi, m in zip(w, models, strict=True)) for k in f64(base)}
    assert_tree_close(M.interpolate(models, w), ref)
    uniform = {k: sum(f64(m)[k] for m in models) / 3 for k in f64(base)}
    assert_tree_close(M.interpolate(models), uniform)
    with pytest.raises(ValueError, match="sum to 1"):
        M.interpolate(models, [0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="3 models"):
        M.interpolate(models, [0.5, 0.5])


def test_interpolation_one_zero_returns_first_exactly():
    _, (a, b) = make_trees(1, 2)
    out = M.interpolate([a, b], [1.0, 0.0])
    for path, leaf in flatten(a).items():
        np.testing.assert_array_equal(np.asarray(flatten(out)[path]), leaf)


def test_interpolation_weights_every_weighting():
    n = 6
    i = np.arange(1, n + 1, dtype=np.float64)
    expected = {
        None: np.ones(n),
        "null": np.ones(n),
        "linear": i,
        "sqrt": np.sqrt(i),
        "quadratic": i**2,
        "cubic": i**3,
        "fifth": i**5,
        "tenth": i**10,
        "exp": 2 ** (i - 1),
        "log": np.log(i + 1),
    }
    for name, raw in expected.items():
        w = np.asarray(M.interpolation_weights(n, name))
        np.testing.assert_allclose(w, raw / raw.sum(), rtol=1e-12, err_msg=str(name))
        assert abs(w.sum() - 1) < 1e-12
        if name is not None:
            rev = np.asarray(M.interpolation_weights(n, f"reverse_{name}"))
            np.testing.assert_allclose(rev, (raw / raw.sum())[::-1], rtol=1e-12)
    assert M.interpolation_weights(1, "tenth") == [1.0]
    with pytest.raises(ValueError, match="weighting"):
        M.interpolation_weights(3, "cubed")


# ----------------------------------------------------------------------------- slerp


def test_slerp_matches_numpy_including_both_rules():
    _, (a, b) = make_trees(2, 2)
    # Nearly parallel leaf → lerp; tiny-norm leaf → left unnormalised.
    a["image"]["patch_embed"] = np.ones((4, 3), np.float32)
    b["image"]["patch_embed"] = np.float32(3) * np.ones((4, 3), np.float32)
    b["image"]["patch_embed"][0, 0] += np.float32(1e-3)
    a["image"]["transformer"]["resblocks"][0]["ln_1"]["scale"] = np.full(5, 1e-10, np.float32)
    for t in (0.5, 0.25):
        ref = np_slerp(f64(a), f64(b), t)
        assert_tree_close(M.slerp(a, b, t), ref)
    # The tiny-norm leaf: c = ⟨v0, û1⟩ ≈ 0, so Ω ≈ π/2 and θ ≈ sin(Ω/2)/1 · v1 (not a lerp).
    path = "image/transformer/resblocks/0/ln_1/scale"
    got = np.asarray(flatten(M.slerp(a, b))[path], np.float64)
    np.testing.assert_allclose(got, np.sin(np.pi / 4) * f64(b)[path], rtol=1e-5, atol=1e-9)
    lerp = 0.5 * f64(a)["image/patch_embed"] + 0.5 * f64(b)["image/patch_embed"]
    np.testing.assert_allclose(flatten(M.slerp(a, b))["image/patch_embed"], lerp, rtol=1e-6)


# ----------------------------------------------------------------------------- task vectors


def test_task_arithmetic_magmax_model_stock_tall_masks():
    base, models = make_trees(3, 3)
    b, taus = np_tau(base, models)
    ref = {k: b[k] + 0.3 * sum(t[k] for t in taus) for k in b}
    assert_tree_close(M.task_arithmetic(base, models, 0.3), ref)

    stack = {k: np.stack([t[k] for t in taus]) for k in b}
    ref = {
        k: b[k] + 0.5 * np.take_along_axis(s, np.argmax(np.abs(s), 0)[None], 0)[0]
        for k, s in stack.items()
    }
    assert_tree_close(M.magmax(base, models, 0.5), ref)

    # A scalar's task vectors are (anti)parallel, c = ±1; with c = −1 the formula's
    # r = 2c/(c + 1 + ε) is −2/ε, so give logit_scale same-sign task vectors here.
    models[1]["logit_scale"] = (base["logit_scale"] + 2 * taus[0]["logit_scale"]).astype(np.float32)
    b, taus = np_tau(base, models)
    t1, t2 = taus[0], taus[1]
    ref = {}
    for k in b:
        c = np.clip(
            np.sum(t1[k] * t2[k]) / (np.linalg.norm(t1[k]) * np.linalg.norm(t2[k]) + 1e-8), -1, 1
        )
        r = 2 * c / (c + 1 + 1e-8)
        ref[k] = r * (f64(models[0])[k] + f64(models[1])[k]) / 2 + (1 - r) * b[k]
    assert_tree_close(M.model_stock(base, models[0], models[1]), ref, rtol=1e-4, atol=1e-5)

    # TALL masks: κ = 0 is task arithmetic (two programs: equal to rounding, not bit for bit;
    # a masked entry would be off by a whole task vector), κ = 2 against numpy.
    zero = M.tall_masks(base, models, threshold=0, scale=0.7)
    plain = M.task_arithmetic(base, models, 0.7)
    assert_tree_close(zero, f64(plain), rtol=1e-6, atol=1e-7)
    ref = {}
    for k in b:
        total = sum(t[k] for t in taus)
        votes = sum((np.abs(t[k]) > 0.4 * np.abs(total - t[k])).astype(int) for t in taus)
        ref[k] = b[k] + total * (votes >= 2)
    got = M.tall_masks(base, models, threshold=2)
    assert_tree_close(got, ref)
    assert any(np.any(v == b[k]) for k, v in f64(got).items())  # some entries are masked


@pytest.mark.parametrize("mode", M.MERGE_MODES)
@pytest.mark.parametrize("trim", ["global", "per_leaf"])
@pytest.mark.parametrize("p", [0.0, 0.2, 0.7])
def test_ties_matches_numpy(mode, trim, p):
    base, models = make_trees(4, 3, grid=True)
    out = M.ties(base, models, scale=0.8, prune_fraction=p, merge=mode, trim=trim)
    assert_tree_close(out, np_ties(base, models, p, mode, trim, scale=0.8))


def _distinct_magnitudes(n_models=2):
    """θ0 = 0 and task vectors whose magnitudes are a permutation of 1 … 10 (in a 6-entry and
    a 4-entry leaf), with random signs: every order statistic is a distinct, exact value."""
    rng = np.random.default_rng(21)
    base = {"a": np.zeros(6, np.float32), "b": np.zeros((2, 2), np.float32)}
    models = []
    for _ in range(n_models):
        tau = rng.permutation(np.arange(1, 11)) * rng.choice([-1, 1], size=10)
        models.append(
            {"a": tau[:6].astype(np.float32), "b": tau[6:].reshape(2, 2).astype(np.float32)}
        )
    return base, models


@pytest.mark.parametrize("p, smallest_kept", [(0.0, 1), (0.05, 1), (0.1, 1), (0.3, 3), (0.75, 7)])
def test_ties_trim_keeps_the_kth_smallest(tmp_path, p, smallest_kept):
    """k = ⌊10p⌋; TIES keeps |τ| ≥ the k-th smallest magnitude (1-based, torch.kthvalue), i.e.
    |τ| ≥ k (k = 0 keeps all), in the jitted, two-stage and streamed merges."""
    assert smallest_kept == max(math.floor(p * 10), 1)
    base, (model,) = _distinct_magnitudes(1)
    tau = np.concatenate([model["a"], model["b"].ravel()]).astype(np.float64)
    want = np.where(np.abs(tau) >= smallest_kept, tau, 0)  # one model: the merge is its trimmed τ
    dirs = [str(tmp_path / "m0")]
    M.save_npy(model, dirs[0])
    for out in [
        M.ties(base, [model], prune_fraction=p, merge="sum"),
        M.merge("ties", base, [model], prune_fraction=p, merge="sum"),
        M.streamed("ties", base, M.npy_reader(dirs), 1, prune_fraction=p, chunk_size=3),
    ]:
        got = np.concatenate([np.asarray(out["a"]), np.asarray(out["b"]).ravel()])
        np.testing.assert_array_equal(got, want)
    # Breadcrumbs keeps a_{⌊pN⌋} ≤ |τ| ≤ a_{N−1−⌊qN⌋} (0-based): |τ| in [⌊10p⌋ + 1, 9].
    out = M.breadcrumbs(base, [model], prune_fraction=p, top_prune_fraction=0.1)
    got = np.concatenate([np.asarray(out["a"]), np.asarray(out["b"]).ravel()])
    low = math.floor(p * 10) + 1
    np.testing.assert_array_equal(got, np.where((np.abs(tau) >= low) & (np.abs(tau) <= 9), tau, 0))


def test_ties_boundary_entries_against_numpy_with_two_models(tmp_path):
    base, models = _distinct_magnitudes(2)
    dirs = [str(tmp_path / f"m{i}") for i in range(2)]
    for d, m in zip(dirs, models, strict=True):
        M.save_npy(m, d)
    for trim in ("global", "per_leaf"):
        want = np_ties(base, models, 0.3, "mean", trim)
        assert_tree_close(M.ties(base, models, prune_fraction=0.3, trim=trim), want)
        streamed = M.streamed(
            "ties", base, M.npy_reader(dirs), 2, prune_fraction=0.3, trim=trim, chunk_size=4
        )
        assert_tree_close(streamed, want)


def test_ties_global_and_per_leaf_trim_differ():
    base, models = make_trees(5, 2, grid=True)
    for m in models:  # one leaf with tiny task vectors: a global trim removes all of it
        path = m["image"]["transformer"]["resblocks"][1]["attn"]
        path["kernel"] = (
            base["image"]["transformer"]["resblocks"][1]["attn"]["kernel"]
            + np.float32(1 / 1024) * np.sign(np.random.default_rng(0).normal(size=(4, 3)))
        ).astype(np.float32)
    glob = M.ties(base, models, prune_fraction=0.5, trim="global")
    per = M.ties(base, models, prune_fraction=0.5, trim="per_leaf")
    assert_tree_close(glob, np_ties(base, models, 0.5, trim="global"))
    assert_tree_close(per, np_ties(base, models, 0.5, trim="per_leaf"))
    key = "image/transformer/resblocks/1/attn/kernel"
    b = f64(base)[key]
    assert np.all(f64(glob)[key] == b)  # everything trimmed globally
    assert np.any(f64(per)[key] != b)  # kept per leaf


def test_ties_with_p0_and_one_model_returns_it():
    base, (model,) = make_trees(6, 1)
    out = M.ties(base, [model], prune_fraction=0.0)
    assert_tree_close(out, f64(model), rtol=1e-6, atol=1e-6)
    assert int(out["step"]) == int(base["step"])


def test_dare_ties_matches_numpy_with_the_documented_keys():
    base, models = make_trees(7, 2, grid=True)
    b = f64(base)
    u = [
        {
            k: np.asarray(
                jax.random.uniform(jax.random.fold_in(leaf_key(KEY, k), i), (b[k].size,)),
                np.float64,
            ).reshape(b[k].shape)
            for k in b
        }
        for i in range(2)
    ]
    for trim in ("global", "per_leaf"):
        out = M.dare_ties(base, models, KEY, prune_fraction=0.6, trim=trim)
        assert_tree_close(out, np_ties(base, models, 0.6, trim=trim, dare_u=u))


def test_dare_rescales_kept_entries_and_drops_about_p():
    rng = np.random.default_rng(8)
    base = {"w": rng.normal(size=(60, 50)).astype(np.float32)}
    model = {"w": (base["w"] + rng.normal(size=(60, 50))).astype(np.float32)}
    p = 0.3
    out = np.asarray(M.dare_ties(base, [model], KEY, prune_fraction=p)["w"], np.float64)
    tau = model["w"].astype(np.float64) - base["w"]
    dropped = out == base["w"]
    # k = ⌊pN⌋ = 900: the draws below the 900th smallest are dropped, the 900th is kept.
    assert dropped.sum() == math.floor(p * dropped.size) - 1
    np.testing.assert_allclose(
        (out - base["w"])[~dropped], tau[~dropped] / (1 - p), rtol=1e-5, atol=1e-6
    )


def test_breadcrumbs_matches_numpy_and_rejects_empty_band():
    base, models = make_trees(9, 3, grid=True)
    for trim in ("global", "per_leaf"):
        for p, q in [(0.2, 0.1), (0.7, 0.01), (0.0, 0.3)]:
            out = M.breadcrumbs(base, models, p, q, scale=1.0, trim=trim)
            assert_tree_close(out, np_ties(base, models, p, trim=trim, q=q))
    with pytest.raises(ValueError, match="removes every entry"):
        M.breadcrumbs(base, models, prune_fraction=0.7, top_prune_fraction=0.4)


def test_random_merge_picks_one_task_vector_per_entry_uniformly():
    rng = np.random.default_rng(10)
    base = {"w": rng.normal(size=(60, 50)).astype(np.float32), "logit_scale": np.float32(1)}
    models = [
        jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), base)
        for _ in range(3)
    ]
    out = M.random_merge(base, models, KEY)
    taus = np.stack([m["w"].astype(np.float64) - base["w"] for m in models])
    got = np.asarray(out["w"], np.float64) - base["w"]
    which = np.argmin(np.abs(taus - got[None]), axis=0)
    np.testing.assert_allclose(np.take_along_axis(taus, which[None], 0)[0], got, atol=1e-5)
    draws = jax.random.randint(leaf_key(KEY, "w"), (3000,), 0, 3).reshape(60, 50)
    np.testing.assert_array_equal(which, draws)
    assert np.all(np.abs(np.bincount(which.ravel(), minlength=3) / which.size - 1 / 3) < 0.03)
    other = M.random_merge(base, models, jax.random.key(8))
    assert not np.array_equal(np.asarray(other["w"]), np.asarray(out["w"]))


# ----------------------------------------------------------------------------- LiNeS


def test_lines_depth_scaling_two_towers_flat_and_nested():
    rng = np.random.default_rng(11)
    flat = {f"visual.transformer.resblocks.{i}.attn.in_proj_weight": 0 for i in range(4)}
    flat |= {f"transformer.resblocks.{i}.mlp.c_fc.weight": 0 for i in range(2)}
    flat |= {"visual.proj": 0, "logit_scale": 0, "token_embedding.weight": 0}
    flat = {k: rng.normal(size=(3,)).astype(np.float32) for k in flat}
    nested = {
        "image": {
            "transformer": {"resblocks": {i: {"w": np.ones(3, np.float32)} for i in range(5)}}
        },
        "text": {"resblocks": [{"w": np.ones(3, np.float32)} for _ in range(2)]},
        "single": {"resblocks": {0: {"w": np.ones(3, np.float32)}}},
        "other": {"resblocks10": np.ones(3, np.float32)},
    }
    alpha, beta = 0.3, 0.6
    expected_flat = {
        **{f"visual.transformer.resblocks.{i}.attn.in_proj_weight": i / 3 for i in range(4)},
        **{f"transformer.resblocks.{i}.mlp.c_fc.weight": i / 1 for i in range(2)},
    }
    expected_nested = {
        **{f"image/transformer/resblocks/{i}/w": i / 4 for i in range(5)},
        **{f"text/resblocks/{i}/w": i / 1 for i in range(2)},
    }
    for shape, g in [("linear", lambda x: x), ("quadratic", lambda x: x * x), ("sqrt", np.sqrt)]:
        for tree, expected in [(flat, expected_flat), (nested, expected_nested)]:
            base = jax.tree.map(np.zeros_like, tree)
            out = flatten(M.lines(base, tree, alpha, beta, shape))
            for path, leaf in flatten(tree).items():
                s = alpha + beta * g(expected[path]) if path in expected else alpha
                np.testing.assert_allclose(out[path], s * leaf, rtol=1e-6, err_msg=path)
    assert sorted(M.lines(flat, flat)) == sorted(flat)  # flat dotted keys stay as they are


def test_lines_as_option_of_task_vector_merges():
    base, models = make_trees(12, 2)
    cfg = {"alpha": 0.4, "beta": 0.5, "shape": "sqrt"}
    lined = M.lines(base, M.ties(base, models, prune_fraction=0.3, scale=1), **cfg)
    direct = M.ties(base, models, prune_fraction=0.3, lines=cfg)
    assert_tree_close(direct, f64(lined), rtol=1e-5, atol=1e-6)
    w = [0.25, 0.75]
    b, taus = np_tau(base, models)
    scales = dict(
        zip(flatten(base), M.lines_scales(list(flatten(base)), 0.4, 0.5, "sqrt"), strict=True)
    )
    ref = {k: b[k] + scales[k] * (w[0] * taus[0][k] + w[1] * taus[1][k]) for k in b}
    assert_tree_close(M.interpolate(models, w, base=base, lines=cfg), ref)
    with pytest.raises(ValueError, match="replaces the scale"):
        M.task_arithmetic(base, models, 0.5, lines=True)
    with pytest.raises(ValueError, match="LiNeS"):
        M.merge("magmax", base, models, lines=True)


# ----------------------------------------------------------------------------- semantics


def test_bfloat16_leaves_accumulate_in_float32():
    base, models = make_trees(13, 12, dtype=ml_dtypes.bfloat16)
    b, taus = np_tau(base, models)
    ref = {k: b[k] + sum(t[k] for t in taus) for k in b}
    interp = {k: sum(f64(m)[k] for m in models) / 12 for k in b}
    for out, expected in [
        (M.task_arithmetic(base, models), ref),
        (M.interpolate(models), interp),
    ]:
        got = flatten(out)
        for k, v in expected.items():
            assert got[k].dtype == jnp.bfloat16
            want = v.astype(ml_dtypes.bfloat16).astype(np.float64)
            have = np.asarray(got[k]).astype(np.float64)
            ulp = np.abs(want) * 2.0**-7 + 1e-30
            assert np.all(np.abs(have - want) <= ulp), k  # at most one bf16 ulp (double rounding)
            assert np.mean(have == want) >= 0.9, k


def test_structure_ints_and_exclude_rules():
    rng = np.random.default_rng(14)
    flat = {
        "visual.ln_pre.weight": rng.normal(size=(5,)).astype(np.float32),
        "visual.conv1.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "logit_scale": np.float32(4.6),
        "counter": np.int32(5),
    }
    models = [
        {
            k: (v + 1).astype(v.dtype) if v.dtype != np.int32 else np.int32(9)
            for k, v in flat.items()
        }
        for _ in range(2)
    ]
    rules = [r"ln_pre", r"^logit_scale$"]
    for name in M.MERGES:
        out = M.merge(name, flat, models, key=KEY, exclude=rules, jit=False)
        assert sorted(out) == sorted(flat), name  # (pytree dicts come back key-sorted)
        assert out["counter"] == 5 and out["counter"].dtype == np.int32, name
        np.testing.assert_array_equal(out["visual.ln_pre.weight"], flat["visual.ln_pre.weight"])
        assert float(out["logit_scale"]) == np.float32(4.6)
        assert not np.array_equal(out["visual.conv1.weight"], flat["visual.conv1.weight"]), name
    # logit_scale merges when not excluded; without a base, pass-through is from the first tree.
    out = M.interpolate(models, exclude=["conv1"])
    assert float(out["logit_scale"]) == np.float32(5.6) and int(out["counter"]) == 9
    np.testing.assert_array_equal(out["visual.conv1.weight"], models[0]["visual.conv1.weight"])


def test_jittable_and_merge_dispatch():
    # A two-leaf tree keeps the compile times of the fourteen jitted programs small.
    rng = np.random.default_rng(15)
    base = {"w": rng.normal(size=(4, 3)).astype(np.float32), "logit_scale": np.float32(2)}
    models = [jax.tree.map(lambda x: (x + rng.normal(size=x.shape)).astype(np.float32), base)]
    models.append(jax.tree.map(lambda x, t: x + 2 * (t - x), base, models[0]))  # parallel τ
    models[1]["w"] = (base["w"] + rng.normal(size=(4, 3))).astype(np.float32)
    jitted = jax.jit(M.ties, static_argnames=("prune_fraction", "merge", "trim"))
    eager = M.ties(base, models, prune_fraction=0.4, merge="max")
    traced = jitted(base, models, prune_fraction=0.4, merge="max")
    assert_tree_close(traced, f64(eager), rtol=1e-6, atol=1e-7)
    for fn in (M.interpolate, lambda t: M.slerp(*t), lambda t: M.model_stock(base, *t)):
        assert_tree_close(jax.jit(fn)(models), f64(fn(models)), rtol=1e-5, atol=1e-6)
    for fn in (M.task_arithmetic, M.magmax, M.tall_masks, M.breadcrumbs):
        assert_tree_close(jax.jit(fn)(base, models), f64(fn(base, models)), rtol=1e-6, atol=1e-7)
    for fn in (M.dare_ties, M.random_merge):
        assert_tree_close(jax.jit(fn)(base, models, KEY), f64(fn(base, models, KEY)), 1e-6, 1e-7)
    # merge() runs the TIES family leaf by leaf (histograms, majority sign, then the merge).
    for name, fn in [("ties", M.ties), ("breadcrumbs", M.breadcrumbs)]:
        want = f64(fn(base, models, prune_fraction=0.3, trim="per_leaf"))
        assert_tree_close(M.merge(name, base, models, prune_fraction=0.3, trim="per_leaf"), want)
    want = f64(M.dare_ties(base, models, KEY, prune_fraction=0.5, merge="sum"))
    assert_tree_close(
        M.merge("dare_ties", base, models, key=KEY, prune_fraction=0.5, merge="sum"), want
    )
    assert_tree_close(
        M.merge("interpolation", base, models, weighting="linear"),
        f64(M.interpolate(models, [1 / 3, 2 / 3])),
        1e-6,
        1e-7,
    )
    with pytest.raises(ValueError, match="exactly 2"):
        M.merge("slerp", base, models + models[:1])
    with pytest.raises(ValueError, match="key="):
        M.merge("dare_ties", base, models)
    with pytest.raises(ValueError, match="unknown merge"):
        M.merge("average", base, models)
    with pytest.raises(ValueError, match="structure"):
        M.task_arithmetic(base, [models[0], {"x": np.zeros(2)}])
    wrong = {**models[0], "w": np.zeros((3, 4), np.float32)}  # a transposed leaf
    with pytest.raises(ValueError, match=r"tree 1: leaf w has shape \(3, 4\), .* \(4, 3\)"):
        M.merge("ties", base, [models[0], wrong])


# ----------------------------------------------------------------------------- leaf by leaf


EQUAL_CASES = [
    ("interpolation", {"weights": [0.5, 0.25, 0.25]}),
    ("interpolation", {"weighting": "exp", "lines": True}),
    ("task_arithmetic", {"scale": 0.3}),
    ("magmax", {"scale": 0.7}),
    ("tall_masks", {"threshold": 2}),
    ("random", {}),
    ("slerp", {"t": 0.3}),
    ("model_stock", {}),
    ("ties", {"prune_fraction": 0.6, "merge": "mean"}),
    ("ties", {"prune_fraction": 0.3, "merge": "max", "trim": "per_leaf"}),
    ("ties", {"prune_fraction": 0.5, "merge": "sum", "lines": True}),
    ("dare_ties", {"prune_fraction": 0.6}),
    ("dare_ties", {"prune_fraction": 0.3, "trim": "per_leaf", "merge": "sum"}),
    ("breadcrumbs", {"prune_fraction": 0.4, "top_prune_fraction": 0.1}),
]


@pytest.mark.parametrize("name, kwargs", EQUAL_CASES)
def test_leaf_by_leaf_merges_equal_the_whole_tree_merges(name, kwargs):
    """Every merge, run leaf by leaf (merge(), and the function called eagerly), is bit for
    bit the whole-tree merge it replaced (tests/merging_reference.py, one compiled program)."""
    base, models = make_trees(17, 2 if name in M.TWO_MODELS else 3, grid=True)
    base["image"]["patch_embed"] = base["image"]["patch_embed"].astype(ml_dtypes.bfloat16)
    for m in models:
        m["image"]["patch_embed"] = m["image"]["patch_embed"].astype(ml_dtypes.bfloat16)
    kwargs = {**kwargs, "exclude": [r"resblocks/0/ln_1"]}
    want = flatten(reference.merge(name, base, models, key=KEY, **kwargs))
    outs = [M.merge(name, base, models, key=KEY, **kwargs)]
    if name not in ("interpolation", "slerp", "model_stock"):  # the functions' own signatures
        args = (base, models, KEY) if name in M.NEEDS_KEY else (base, models)
        outs.append(M.MERGES[name](*args, **kwargs))
    for out in outs:
        got = flatten(out)
        assert sorted(got) == sorted(want)
        for path, leaf in want.items():
            assert np.asarray(got[path]).dtype == np.asarray(leaf).dtype, path
            np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=path)


SHARDED_8 = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, numpy as np
from fomo_jax import merging as M, runtime, sharding
from fomo_jax.params import flatten, unflatten
runtime.enable_compilation_cache()
mesh = sharding.make_mesh(data=2, fsdp=2, model=2)
shapes = {  # CLIP_RULES: (fsdp, model), (model, fsdp), (model,), (fsdp, None), replicated
    "image/transformer/resblocks/0/attn/q_proj/kernel": (8, 16),
    "image/transformer/resblocks/0/attn/out_proj/kernel": (16, 8),
    "image/transformer/resblocks/0/mlp/c_fc/bias": (32,),
    "text/token_embedding/embedding": (12, 8),
    "logit_scale": (),
}
rng = np.random.default_rng(0)
host = [unflatten({k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()})
        for _ in range(3)]
texts, compiled = [], {}
plain = M._jitted
def recording(fn, static, out_sharding):  # keeps the compiled text of every leaf program
    jitted = plain(fn, static, out_sharding)
    def call(*args):
        where = jax.tree.map(lambda a: (np.shape(a), getattr(a, "sharding", type(a))), args)
        sig = (fn, static, out_sharding, str(where))
        if sig not in compiled:
            compiled[sig] = jitted.lower(*args).compile()
            texts.append(compiled[sig].as_text())
        return compiled[sig](*args)
    return call
key = jax.random.key(0)
for name, kw in [("ties", {"prune_fraction": 0.5}), ("dare_ties", {"prune_fraction": 0.5}),
                 ("breadcrumbs", {"prune_fraction": 0.3, "top_prune_fraction": 0.1}),
                 ("ties", {"prune_fraction": 0.3, "trim": "per_leaf", "merge": "max"}),
                 ("task_arithmetic", {"lines": True}), ("interpolation", {}),
                 ("magmax", {}), ("tall_masks", {}), ("random", {}),
                 ("model_stock", {}), ("slerp", {})]:
    ref = flatten(M.merge(name, host[0], host[1:], key=key, **kw))
    base, trees = sharding.shard(host[0], mesh), [sharding.shard(h, mesh) for h in host[1:]]
    M._jitted = recording
    out = flatten(M.merge(name, base, trees, key=key, **kw))
    M._jitted = plain
    for k, sharded in flatten(base).items():
        assert out[k].sharding == sharded.sharding, (name, k, out[k].sharding, sharded.sharding)
        if name in ("model_stock", "slerp"):  # per-tensor sums, reduced shard by shard
            np.testing.assert_allclose(np.asarray(out[k]), ref[k], rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(np.asarray(out[k]), ref[k], err_msg=f"{name} {k}")
    moved = [ln for t in texts for ln in t.splitlines() if "all-gather" in ln or "all-to-all" in ln]
    assert texts and not moved, (name, moved[:2])
    texts.clear()
# Models placed otherwise (replicated) than θ0: the result takes θ0's shardings.
replicated = [jax.device_put(h, sharding.replicated(mesh)) for h in host[1:]]
out = flatten(M.merge("ties", sharding.shard(host[0], mesh), replicated, prune_fraction=0.5))
for k, want in flatten(sharding.tree_shardings(host[0], mesh)).items():
    assert out[k].sharding == want, (k, out[k].sharding, want)
print("ok")
"""


def test_sharded_merges_on_eight_devices():
    """On a 2×2×2 (data, fsdp, model) mesh of fake CPU devices, leaves sharded by CLIP_RULES:
    every merge equals the single-device merge (bit for bit but for the per-tensor sums of
    model_stock and slerp), its leaves keep the inputs' shardings, and no leaf program
    gathers a leaf (no all-gather or all-to-all: the thresholds' histograms are all-reduced)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_8],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


# ----------------------------------------------------------------------------- streamed


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("interpolation", {"weights": [0.5, 0.25, 0.25]}),
        ("interpolation", {"weighting": "exp", "lines": True}),
        ("task_arithmetic", {"scale": 0.3}),
        ("magmax", {}),
        ("tall_masks", {"threshold": 2}),
        ("ties", {"prune_fraction": 0.6, "merge": "mean"}),
        ("ties", {"prune_fraction": 0.3, "merge": "max", "trim": "per_leaf"}),
        ("ties", {"prune_fraction": 0.5, "merge": "sum", "lines": True}),
        ("breadcrumbs", {"prune_fraction": 0.4, "top_prune_fraction": 0.1}),
    ],
)
def test_streamed_equals_in_memory(tmp_path, name, kwargs):
    base, models = make_trees(16, 3, grid=name == "ties")
    base["image"]["patch_embed"] = base["image"]["patch_embed"].astype(ml_dtypes.bfloat16)
    for m in models:
        m["image"]["patch_embed"] = m["image"]["patch_embed"].astype(ml_dtypes.bfloat16)
    dirs = [str(tmp_path / f"m{i}") for i in range(3)]
    for d, m in zip(dirs, models, strict=True):
        M.save_npy(m, d)
    read = M.npy_reader(dirs)
    exclude = [r"ln_1"]
    got = M.streamed(name, base, read, 3, exclude=exclude, chunk_size=7, **kwargs)
    want = M.merge(name, base, models, exclude=exclude, **kwargs)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, leaf in flatten(want).items():
        other = flatten(got)[path]
        assert other.dtype == leaf.dtype, path
        np.testing.assert_allclose(
            np.asarray(other, np.float64), np.asarray(leaf, np.float64), rtol=1e-6, atol=1e-7
        )
    if name == "interpolation" and "lines" not in kwargs:
        shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), base)
        got = M.streamed(name, shapes, read, 3, chunk_size=5, **kwargs)
        assert_tree_close(got, f64(M.interpolate(models, **kwargs)), 1e-6, 1e-7)


SHARDED_WORKER = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from fomo_jax import merging as M
mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
specs = {"a": P("data", "model"), "b": P(None, "model"), "logit_scale": P()}
rng = np.random.default_rng(0)
shapes = {"a": (8, 6), "b": (3, 4), "logit_scale": ()}
def tree():
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
host = [tree() for _ in range(3)]
put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in t.items()}
key = jax.random.key(0)
for name, kw in [("ties", {"prune_fraction": 0.5}), ("dare_ties", {"prune_fraction": 0.5}),
                 ("breadcrumbs", {"prune_fraction": 0.3, "top_prune_fraction": 0.1}),
                 ("magmax", {}), ("model_stock", {}), ("slerp", {})]:
    out = M.merge(name, put(host[0]), [put(host[1]), put(host[2])], key=key, **kw)
    ref = M.merge(name, host[0], host[1:], key=key, **kw)
    for k in shapes:
        assert out[k].sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), len(shapes[k])), (
            name, k, out[k].sharding)
        np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ref[k]), rtol=1e-6, atol=1e-6)
print("ok")
"""


def test_sharded_inputs_keep_their_sharding():
    """On a 2×2 mesh of fake CPU devices the merged leaves keep the inputs' shardings and
    equal the unsharded merge (the global thresholds are sharded reductions)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_WORKER],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
