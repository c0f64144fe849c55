"""The LR-free AdamW against optax.adamw (peer) and a float64 numpy AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fomo_jax.train import optimizer


def _params(rng):
    return {
        "w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
        "ln": {"scale": jnp.ones(3), "bias": jnp.zeros(3)},
        "logit_scale": jnp.float32(2.0),
    }


def _run(tx, params, grads_seq, lrs):
    state = tx.init(params)
    for grads, lr in zip(grads_seq, lrs, strict=True):
        updates, state = tx.update(grads, state, params)
        params = jax.tree_util.tree_map(lambda p, u, lr=lr: p - lr * u, params, updates)
    return params


def test_equals_optax_adamw_with_global_clip():
    rng = np.random.default_rng(0)
    params = _params(rng)
    grads_seq = [
        jax.tree_util.tree_map(
            lambda p: jnp.asarray(3 * rng.standard_normal(p.shape), jnp.float32), params
        )
        for _ in range(5)
    ]
    lr = 1e-2
    ours = _run(optimizer.adamw(weight_decay=0.2, clip_norm=1.0), params, grads_seq, [lr] * 5)
    peer_tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.2),
    )
    peer = params
    state = peer_tx.init(peer)
    for grads in grads_seq:
        updates, state = peer_tx.update(grads, state, peer)
        peer = optax.apply_updates(peer, updates)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ours, peer
    )


def numpy_adamw(params, grads_seq, lrs, b1=0.9, b2=0.999, eps=1e-8, wd=0.2, clip=1.0, mask=None):
    """AdamW (decoupled decay, bias-corrected moments) after one global-norm clip, in float64."""
    keys = sorted(params)
    p = {k: np.asarray(params[k], np.float64) for k in keys}
    m = {k: np.zeros_like(p[k]) for k in keys}
    v = {k: np.zeros_like(p[k]) for k in keys}
    for t, (grads, lr) in enumerate(zip(grads_seq, lrs, strict=True), start=1):
        g = {k: np.asarray(grads[k], np.float64) for k in keys}
        norm = np.sqrt(sum(np.sum(x**2) for x in g.values()))
        g = {k: x * min(1.0, clip / norm) for k, x in g.items()}
        for k in keys:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            update = (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
            decay = wd if mask is None or mask[k] else 0.0
            p[k] = p[k] - lr * (update + decay * p[k])
    return p


@pytest.mark.parametrize("convention", ["all", "openclip"])
def test_matches_float64_formula_with_changing_lr(convention):
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(2), jnp.float32),
        "s": jnp.float32(1.0),
    }
    grads_seq = [
        {k: jnp.asarray(rng.standard_normal(np.shape(p)), jnp.float32) for k, p in params.items()}
        for _ in range(4)
    ]
    lrs = [1e-3, 5e-3, 2e-3, 1e-4]  # a schedule, given from the host
    ours = _run(optimizer.adamw(decay_convention=convention), params, grads_seq, lrs)
    mask = None if convention == "all" else {"w": True, "b": False, "s": False}
    want = numpy_adamw(params, grads_seq, lrs, mask=mask)
    for key in params:
        np.testing.assert_allclose(np.asarray(ours[key]), want[key], rtol=1e-5, atol=1e-7)


def test_decay_mask_conventions():
    params = _params(np.random.default_rng(2))
    assert all(jax.tree_util.tree_leaves(optimizer.decay_mask(params, "all")))
    openclip = optimizer.decay_mask(params, "openclip")
    assert openclip["w"] and not openclip["ln"]["scale"] and not openclip["logit_scale"]
    with pytest.raises(ValueError, match="nope"):
        optimizer.decay_mask(params, "nope")
