"""The Pallas flash-attention kernel (interpret mode on CPU) against float64 references.

Every mask kind and their combinations, forward and gradients, odd lengths that are not tile
multiples, head_dim 32/64/128, grouped-query heads, bfloat16, rows that see no key, the tile
skipping, and the dispatcher. The GPU (Triton) variant runs in the generic Pallas interpreter,
the TPU (Mosaic) variant in the TPU interpreter, which is slower and so gets fewer cases. The
lowering tests compile the kernels' jaxprs to Triton and Mosaic IR without a device, which
catches operations the real backends do not support.
"""

import importlib
import unittest.mock
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fomo_jax import kernels
from fomo_jax.kernels import flash, flash_attention
from tests.kernels.references import dense_attention_grads, numpy_attention, visibility

# The package's `attention` is the function; the dispatcher module holds the choice rule.
dispatcher = importlib.import_module("fomo_jax.kernels.attention")

CASES = {  # each mask kind alone, and the combinations the other tests use
    "none": dict(),
    "causal": dict(causal=True),
    "kv_mask": dict(kv_mask=True),
    "prefix": dict(prefix_length=True),
    "segments": dict(segment_ids=True),
    "prefix+causal+segments": dict(prefix_length=True, causal=True, segment_ids=True),
    "causal+kv_mask+segments": dict(causal=True, kv_mask=True, segment_ids=True),
    "prefix+kv_mask": dict(prefix_length=True, kv_mask=True),
    "causal+kv_mask": dict(causal=True, kv_mask=True),
}
MASK_TEST_CASES = ["none", "causal", "kv_mask", "prefix", "segments", "prefix+causal+segments"]


def make_inputs(case, batch, tq, tk, heads, dim, kv_heads=None, seed=0):
    """Random q, k, v, cotangent and the masks `CASES[case]` asks for."""
    rng = np.random.default_rng([zlib.crc32(case.encode()), tq, tk, dim, seed])
    kv_heads = kv_heads or heads
    q = rng.standard_normal((batch, tq, heads, dim)).astype(np.float32)
    k = rng.standard_normal((batch, tk, kv_heads, dim)).astype(np.float32)
    v = rng.standard_normal((batch, tk, kv_heads, dim)).astype(np.float32)
    cotangent = rng.standard_normal(q.shape)
    opts = CASES[case]
    masks = dict(causal=opts.get("causal", False))
    if opts.get("kv_mask"):
        masks["kv_mask"] = rng.random((batch, tk)) > 0.3
        masks["kv_mask"][0] = False  # batch row 0: no valid key at all
    if opts.get("prefix_length"):
        masks["prefix_length"] = rng.integers(0, tk + 1, batch)
    if opts.get("segment_ids"):
        masks["segment_ids"] = np.sort(rng.integers(0, 3, (batch, tk)), axis=1)
    return (q, k, v), cotangent, masks


def reference_visibility(batch, tq, tk, masks):
    return visibility(
        batch,
        tq,
        tk,
        masks["causal"],
        masks.get("kv_mask"),
        masks.get("prefix_length"),
        masks.get("segment_ids"),
    )


def kernel_value_and_grads(qkv, cotangent, masks, dtype=jnp.float32, **kwargs):
    def f(q, k, v):
        return flash_attention(q, k, v, **masks, **kwargs)

    out, vjp = jax.vjp(f, *(jnp.asarray(x, dtype) for x in qkv))
    grads = vjp(jnp.asarray(cotangent, out.dtype))
    return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def check_against_reference(qkv, cotangent, masks, *, scale=None, atol=2e-5, **kwargs):
    q, k, v = qkv
    batch, tq, _, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    out, grads = kernel_value_and_grads(qkv, cotangent, masks, scale=scale, **kwargs)
    vis = reference_visibility(batch, tq, k.shape[1], masks)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, vis, scale), atol=atol, rtol=atol)
    want = dense_attention_grads(q, k, v, vis, scale, cotangent)
    for name, got, expected in zip("qkv", grads, want, strict=True):
        np.testing.assert_allclose(got, expected, atol=atol, rtol=atol, err_msg=f"d{name}")
    return out, vis


@pytest.mark.parametrize("case", MASK_TEST_CASES)
def test_masks_forward_and_gradients(case):
    """19 tokens in tiles of 16: a full and a ragged tile on both sides."""
    qkv, cotangent, masks = make_inputs(case, 2, 19, 19, 2, 32)
    check_against_reference(qkv, cotangent, masks, block_q=16, block_k=16)


@pytest.mark.parametrize(
    "tq,tk,heads,kv_heads,dim,block_q,block_k",
    [
        (1, 1, 1, 1, 32, 16, 16),  # a single token
        (45, 45, 1, 1, 64, 16, 32),  # unequal tiles, 3 query tiles x 2 key tiles
        # grouped-query heads, decoding-style (queries are the last 33 of 70 positions)
        (33, 70, 4, 2, 128, 32, 16),
    ],
)
def test_shapes_and_combined_masks(tq, tk, heads, kv_heads, dim, block_q, block_k):
    qkv, cotangent, masks = make_inputs("causal+kv_mask+segments", 1, tq, tk, heads, dim, kv_heads)
    masks["kv_mask"][0] = np.arange(tk) < max(tk - 1, 1)  # batch 1: drop the last key if > 1
    check_against_reference(qkv, cotangent, masks, block_q=block_q, block_k=block_k)


def test_explicit_scale_and_wrong_scale_or_mask_would_fail():
    """The comparison is sharp enough to see a wrong scale or a dropped mask."""
    qkv, cotangent, masks = make_inputs("prefix+kv_mask", 2, 23, 23, 1, 32)
    masks["kv_mask"][0] = True
    q, k, v = qkv
    out, vis = check_against_reference(qkv, cotangent, masks, scale=0.3, block_q=16, block_k=16)
    default_scale = numpy_attention(q, k, v, vis, 32**-0.5)
    assert np.abs(out - default_scale).max() > 1e-2
    no_kv_mask = reference_visibility(2, 23, 23, dict(masks, kv_mask=None))
    assert np.abs(out - numpy_attention(q, k, v, no_kv_mask, 0.3)).max() > 1e-2
    no_prefix = reference_visibility(2, 23, 23, dict(masks, prefix_length=None))
    assert np.abs(out - numpy_attention(q, k, v, no_prefix, 0.3)).max() > 1e-2


def test_rows_that_see_nothing_output_zero_with_zero_gradients():
    """Batch row 0 has no valid key; with 30 queries over 20 keys the first 10 queries precede
    every key under the causal mask."""
    qkv, cotangent, masks = make_inputs("causal+kv_mask", 2, 30, 20, 2, 32)
    out, grads = kernel_value_and_grads(qkv, cotangent, masks, block_q=16, block_k=16)
    assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
    blind = ~reference_visibility(2, 30, 20, masks).any(-1)  # [batch, query]
    assert blind[0].all() and blind[1, :10].all()
    np.testing.assert_array_equal(out[blind], 0.0)
    np.testing.assert_array_equal(grads[0][blind], 0.0)  # dq
    np.testing.assert_array_equal(grads[1][0], 0.0)  # dk, dv of the row nobody sees
    np.testing.assert_array_equal(grads[2][0], 0.0)


def test_bfloat16_inputs():
    qkv, cotangent, masks = make_inputs("causal+kv_mask+segments", 2, 29, 29, 2, 64)
    masks["kv_mask"][0] = True
    q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64) for x in qkv)
    out, grads = kernel_value_and_grads(
        (q, k, v), cotangent, masks, dtype=jnp.bfloat16, block_q=16, block_k=16
    )
    assert flash_attention(*(jnp.asarray(x, jnp.bfloat16) for x in qkv)).dtype == jnp.bfloat16
    vis = reference_visibility(2, 29, 29, masks)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, vis, 64**-0.5), atol=2e-2)
    want = dense_attention_grads(q, k, v, vis, 64**-0.5, cotangent)
    for got, expected in zip(grads, want, strict=True):
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got / scale, expected / scale, atol=3e-2)


def test_tiles_without_visible_keys_are_never_read():
    """NaN values in tiles that no query of a tile can see must not reach the output
    (a masked-but-visited tile would give 0 * NaN = NaN)."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 64, 1, 32)).astype(np.float32) for _ in range(3))
    v[:, 48:] = np.nan  # key tile 3 of 4
    out = np.asarray(flash_attention(q, k, v, causal=True, block_q=16, block_k=16))
    assert np.isfinite(out[:, :48]).all()  # query tiles 0-2 lie below key tile 3
    assert np.isnan(out[:, 48:]).all()  # query tile 3 sees it: the poison is real

    segments = np.repeat(np.arange(4), 16)[None]  # packed: one segment per tile
    v = rng.standard_normal((1, 64, 1, 32)).astype(np.float32)
    v[:, 16:32] = np.nan
    out = np.asarray(flash_attention(q, k, v, segment_ids=segments, block_q=16, block_k=16))
    assert np.isfinite(np.delete(out, np.s_[16:32], axis=1)).all()


def test_tile_ranges():
    """Per query tile, the key tiles the kernel loops over (and per key tile the query tiles)."""
    cfg = flash._Config(
        platform="gpu",
        interpret=True,
        scale=1.0,
        block_q=16,
        block_k=16,
        q_tiles=4,
        k_tiles=4,
        kv_len=64,
        groups=1,
    )
    masks = flash._mask_operands(
        1, 64, cfg, causal=True, kv_mask=None, prefix_length=None, segment_ids=None
    )
    np.testing.assert_array_equal(masks.q_ranges.reshape(4, 2), [[0, 1], [0, 2], [0, 3], [0, 4]])
    np.testing.assert_array_equal(masks.k_ranges.reshape(4, 2), [[0, 4], [1, 4], [2, 4], [3, 4]])
    kv_mask = np.arange(64)[None] < 20  # keys 20.. are padding: tiles 2 and 3 hold none
    masks = flash._mask_operands(
        1, 64, cfg, causal=False, kv_mask=kv_mask, prefix_length=[40], segment_ids=None
    )
    np.testing.assert_array_equal(masks.q_ranges.reshape(4, 2), [[0, 2]] * 4)
    np.testing.assert_array_equal(masks.k_ranges.reshape(4, 2), [[0, 4], [0, 4], [0, 0], [0, 0]])


def test_tpu_kernel_in_tpu_interpreter():
    """The [B, H, T, D] layout, SMEM tile table and grouped-query sums of the TPU variant."""
    qkv, cotangent, masks = make_inputs("causal+kv_mask+segments", 2, 21, 21, 2, 32, kv_heads=1)
    masks["prefix_length"] = np.array([3, 12])
    check_against_reference(qkv, cotangent, masks, block_q=16, block_k=16, platform="tpu")


def test_dispatcher():
    qkv, _, masks = make_inputs("prefix+kv_mask", 2, 13, 13, 2, 32)
    q, k, v = qkv
    got = kernels.attention(q, k, v, **masks, implementation="pallas")
    want = numpy_attention(q, k, v, reference_visibility(2, 13, 13, masks), 32**-0.5)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
    choose = dispatcher._choose
    no_masks = dict(causal=True, kv_mask=None, prefix_length=None, segment_ids=None)
    long_q = jnp.zeros((1, 4096, 8, 64), jnp.bfloat16)
    assert choose(long_q, long_q, **no_masks) == "xla"  # CPU: never the interpreter
    with unittest.mock.patch.object(jax, "default_backend", return_value="gpu"):
        assert choose(long_q, long_q, **no_masks) == "pallas"
        assert choose(long_q[:, :197], long_q[:, :197], **no_masks) == "cudnn"
        assert choose(long_q[:, :197].astype(jnp.float32), long_q[:, :197], **no_masks) == "xla"
        prefix = dict(no_masks, prefix_length=jnp.zeros(1, jnp.int32))
        assert choose(long_q[:, :197], long_q[:, :197], **prefix) == "xla"
        with unittest.mock.patch.object(jax, "device_count", return_value=8):
            assert choose(long_q, long_q, **no_masks) == "cudnn"  # no SPMD rule for pallas


def lower_gradients(platform, q, k, masks):
    """StableHLO of d(sum(causal flash attention))/d(q, k, v) for `platform`'s compiler."""

    def grads(q, k, v, masks):
        def loss(q, k, v):
            out = flash_attention(q, k, v, causal=True, **masks, platform=platform, interpret=False)
            return jnp.sum(out.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    lowering_platform = {"gpu": "cuda", "tpu": "tpu"}[platform]
    lowered = jax.jit(grads).trace(q, k, k, masks).lower(lowering_platforms=(lowering_platform,))
    return lowered.as_text()


@pytest.mark.parametrize("dtype,dim,kv_heads", [(jnp.bfloat16, 64, 4), (jnp.float32, 80, 2)])
def test_triton_lowering(dtype, dim, kv_heads):
    """Forward and both backward kernels lower to Triton IR (the GPU compiles that IR)."""
    q = jax.ShapeDtypeStruct((2, 197, 4, dim), dtype)
    k = jax.ShapeDtypeStruct((2, 197, kv_heads, dim), dtype)
    masks = dict(
        kv_mask=jax.ShapeDtypeStruct((2, 197), bool),
        prefix_length=jax.ShapeDtypeStruct((2,), jnp.int32),
        segment_ids=jax.ShapeDtypeStruct((2, 197), jnp.int32),
    )
    assert lower_gradients("gpu", q, k, masks).count("__gpu$xla.gpu.triton") == 3


def test_mosaic_lowering():
    """The TPU kernels lower to Mosaic IR. Mosaic reads the chip's tiling from the device kind,
    which a CPU does not have, so a TPU v5e is pretended."""
    from jax._src.pallas.mosaic import tpu_info

    q = jax.ShapeDtypeStruct((2, 300, 4, 64), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 300, 2, 64), jnp.bfloat16)
    masks = dict(
        kv_mask=jax.ShapeDtypeStruct((2, 300), bool),
        segment_ids=jax.ShapeDtypeStruct((2, 300), jnp.int32),
    )
    with (
        unittest.mock.patch.object(tpu_info, "get_device_kind", return_value="TPU v5 lite"),
        unittest.mock.patch.object(tpu_info, "get_num_device_cores", return_value=1),
    ):
        assert lower_gradients("tpu", q, k, masks).count("tpu_custom_call") == 3
