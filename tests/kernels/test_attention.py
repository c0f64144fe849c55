"""The attention dispatcher's XLA path against a float64 numpy reference and jax.nn."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fomo_jax.kernels import attention
from tests.kernels.references import numpy_attention, visibility


def _qkv(rng, batch, tq, tk, heads, dim, kv_heads=None):
    kv_heads = kv_heads or heads
    q = rng.standard_normal((batch, tq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, tk, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, tk, kv_heads, dim)).astype(np.float32)
    return q, k, v


CASES = {
    "none": dict(),
    "causal": dict(causal=True),
    "kv_mask": dict(kv_mask=True),
    "prefix": dict(prefix_length=True),
    "segments": dict(segment_ids=True),
    "causal+kv_mask+segments": dict(causal=True, kv_mask=True, segment_ids=True),
    "prefix+kv_mask": dict(prefix_length=True, kv_mask=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("seq,dim", [(7, 32), (13, 64)])
def test_masks_match_float64_reference(case, seq, dim):
    rng = np.random.default_rng([zlib.crc32(case.encode()), seq])
    batch, heads = 3, 2
    q, k, v = _qkv(rng, batch, seq, seq, heads, dim)
    opts = CASES[case]
    kv_mask = rng.random((batch, seq)) > 0.3 if opts.get("kv_mask") else None
    if kv_mask is not None:
        kv_mask[0] = False  # batch row 0: no valid key at all
    prefix = rng.integers(0, seq + 1, batch) if opts.get("prefix_length") else None
    segments = (
        np.sort(rng.integers(0, 3, (batch, seq)), axis=1) if opts.get("segment_ids") else None
    )
    got = attention(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        causal=opts.get("causal", False),
        kv_mask=kv_mask,
        prefix_length=prefix,
        segment_ids=segments,
    )
    vis = visibility(batch, seq, seq, opts.get("causal", False), kv_mask, prefix, segments)
    want = numpy_attention(q, k, v, vis, dim**-0.5)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-5)


def test_gradients_match_float64_reference():
    """d(sum(out * w))/d(q, k, v) against central differences of the float64 reference."""
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, 1, 5, 5, 1, 4)
    w = rng.standard_normal(q.shape)
    kv_mask = np.array([[True, True, False, True, True]])
    vis = visibility(1, 5, 5, causal=True, kv_mask=kv_mask)

    def f(q, k, v):
        return jnp.sum(attention(q, k, v, causal=True, kv_mask=kv_mask) * w)

    grads = jax.grad(f, argnums=(0, 1, 2))(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
    eps = 1e-6
    for index, (x, g) in enumerate(zip((q, k, v), grads, strict=True)):
        x = x.astype(np.float64)
        numeric = np.zeros_like(x)
        for pos in np.ndindex(x.shape):
            plus, minus = x.copy(), x.copy()
            plus[pos] += eps
            minus[pos] -= eps
            args_p = [plus if i == index else a for i, a in enumerate((q, k, v))]
            args_m = [minus if i == index else a for i, a in enumerate((q, k, v))]
            numeric[pos] = (
                np.sum(numpy_attention(*args_p, vis, 0.5) * w)
                - np.sum(numpy_attention(*args_m, vis, 0.5) * w)
            ) / (2 * eps)
        np.testing.assert_allclose(np.asarray(g), numeric, atol=1e-4)


def test_matches_jax_nn_dot_product_attention():
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, 2, 197, 197, 4, 64)
    lengths = np.array([197, 150])
    kv_mask = np.arange(197)[None] < lengths[:, None]
    for causal in (False, True):
        got = attention(q, k, v, causal=causal, kv_mask=kv_mask)
        want = jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, key_value_seq_lengths=jnp.asarray(lengths)
        )
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_grouped_query_heads_and_scale():
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, 6, 9, 4, 8, kv_heads=2)  # decoding-style: 6 queries, 9 keys
    got = attention(q, k, v, causal=True, scale=0.3)
    want = numpy_attention(q, k, v, visibility(2, 6, 9, causal=True), 0.3)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_bfloat16_inputs():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng, 2, 11, 11, 2, 32)
    got = attention(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), causal=True)
    assert got.dtype == jnp.bfloat16
    want = numpy_attention(q, k, v, visibility(2, 11, 11, causal=True), 32**-0.5)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2)


def test_unknown_implementation_is_rejected():
    q = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="pallas"):  # the message lists the known ones
        attention(q, q, q, implementation="triton")
