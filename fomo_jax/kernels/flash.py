"""Flash attention in Pallas: forward and backward, for GPU (Triton) and TPU (Mosaic).

Forward (FlashAttention-2). The grid runs over (batch, query head, query tile). A program
holds one [block_q, D] tile of queries and walks over the key/value tiles its queries can see,
keeping the online-softmax state in float32: the running row maximum m, the running
denominator sum(exp(s - m)) and the unnormalised output acc = sum(exp(s - m) v). A new key
tile rescales the old state by exp(m_old - m_new) before adding its own terms, so the [T, T]
logits never exist. At the end out = acc / denominator, and the kernel also writes the
log-sum-exp lse = m + log(denominator) of every query row for the backward pass.

Backward. With p = exp(s - lse) recomputed per tile and delta = rowsum(dout * out) (plain
XLA), the gradients are dv = p^T dout, ds = p * (dout v^T - delta), dq = scale * ds k and
dk = scale * ds^T q. Two kernels compute them without atomics: one program per key tile
accumulates dk and dv over the query tiles that see it, one program per query tile
accumulates dq over its key tiles.

Masks are never dense. The wrapper turns (causal, prefix_length, kv_mask, segment_ids) into
small per-row arrays, from which each kernel builds its [block_q, block_k] tile mask:
  * `limit` [B, Tq]: query i sees keys j < limit[i]. Causal gives limit = i + 1 (in key
    positions), prefix-LM max(i + 1, prefix_length), so both are one comparison;
  * `q_code` [B, Tq] and `k_code` [B, Tk]: query i sees key j only if the codes are equal.
    Codes are the segment ids (0 without packing); padding keys (kv_mask False) get a code
    below every segment id, so no query sees them.
Sequence lengths are padded to tile multiples (197 ViT tokens -> 256 with 64-tiles); padded
keys are masked by position (or by code), padded queries are sliced off. From the same
arrays the wrapper builds, per query tile, the range [first, last] of key tiles holding any
visible key (and per key tile the range of query tiles), and the kernels loop over that
range only: causal skips the tiles above the diagonal, packed segments the other segments'
tiles, key padding the trailing padded tiles. A query row that sees no key at all outputs 0
and gets zero gradients (its lse is +inf, so every recomputed p is 0).

Platforms. One kernel body serves both; only the operand layout, the grid order and the
compiler parameters differ:
  * GPU (Triton): q/k/v stay [B, T, H, D] (heads squeezed out by the BlockSpec), the grid is
    (tile, batch, head) so neighbouring programs share keys in L2, head_dim is padded to a
    power of two, tiles are powers of two >= 16.
  * TPU (Mosaic): q/k/v are transposed to [B, H, T, D] so a block's minor dims are
    (tile, head_dim), the grid is (batch, head, tile), key tiles are 128 (Mosaic slices the
    key codes along lanes), the tile-range table lives in SMEM, and each program keeps the
    full keys/values of its head in VMEM (what `fits` checks).
On CPU either variant runs in interpret mode (`interpret=True`); the TPU one through
`pltpu.InterpretParams`, which also checks out-of-bounds reads.

Grouped-query attention (fewer key/value heads) is handled by the index maps; the dk/dv
kernel writes one gradient per query head and XLA sums each group.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

PLATFORMS = ("gpu", "tpu")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Default tiles: (block_q, block_k).
DEFAULT_BLOCKS = {"gpu": (64, 64), "tpu": (128, 128)}
# TPU: keys and values of one head sit whole in VMEM, double-buffered; stay well inside the
# smallest default scoped-VMEM limit (16 MiB).
TPU_KV_VMEM_BYTES = 8 * 2**20
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: a @ b.T


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about one call: shapes after padding, tiles, platform."""

    platform: str
    interpret: bool
    scale: float
    block_q: int
    block_k: int
    q_tiles: int
    k_tiles: int
    kv_len: int  # real keys; positions at or beyond are tile padding
    groups: int  # query heads per key/value head

    @property
    def padded_keys(self):
        return self.k_tiles * self.block_k > self.kv_len


class _Masks(NamedTuple):
    """Per-row mask operands (None when that mask kind is absent) and tile-range tables."""

    q_ranges: jax.Array  # [B * q_tiles * 2] int32: first, last + 1 key tile per query tile
    k_ranges: jax.Array  # [B * k_tiles * 2] int32: first, last + 1 query tile per key tile
    limit: jax.Array | None  # [B, Tq, 1] int32
    q_code: jax.Array | None  # [B, Tq, 1] int32
    k_code: jax.Array | None  # [B, 1, Tk] int32


def _next_power_of_2(n):
    return 1 << max(n - 1, 0).bit_length()


def _round_up(n, m):
    return -(-n // m) * m


def _tiles(platform, q_len, kv_len, block_q, block_k):
    """Tile sizes clamped to the (rounded-up) sequence lengths."""
    default_q, default_k = DEFAULT_BLOCKS[platform]
    block_q, block_k = block_q or default_q, block_k or default_k
    if platform == "gpu":  # Triton: power-of-two tensors, dots of at least 16
        for block in (block_q, block_k):
            if block < 16 or block & (block - 1):
                raise ValueError(f"GPU tiles must be powers of two >= 16, got {block}")
        return (
            min(block_q, _next_power_of_2(max(q_len, 16))),
            min(block_k, _next_power_of_2(max(kv_len, 16))),
        )
    if block_q % 8 or block_k % 8:
        raise ValueError(f"TPU tiles must be multiples of 8, got {block_q}, {block_k}")
    return min(block_q, _round_up(q_len, 8)), min(block_k, _round_up(kv_len, 8))


def fits(q_shape, k_shape, dtype, platform):
    """Whether the kernel supports these shapes on `platform` (else use another backend)."""
    _, _, heads, head_dim = q_shape
    kv_len, kv_heads = k_shape[1], k_shape[2]
    if platform not in PLATFORMS or jnp.dtype(dtype) not in DTYPES or heads % kv_heads:
        return False
    if platform == "gpu":
        return head_dim <= 256  # the [block, head_dim] float32 accumulators live in registers
    block_k = _tiles("tpu", 1, kv_len, None, None)[1]
    kv_bytes = 2 * 2 * _round_up(kv_len, block_k) * head_dim * jnp.dtype(dtype).itemsize
    return kv_bytes <= TPU_KV_VMEM_BYTES


# ----------------------------------------------------------------------------- masks (XLA)


def _tile_ranges(visible):
    """[B, n, m] tile visibility -> flat [B * n * 2] (first, last + 1) visible m-tile; 0, 0 if
    none. Invisible tiles between the first and the last are computed (masked), not skipped."""
    m = visible.shape[-1]
    first = jnp.argmax(visible, axis=-1)
    end = m - jnp.argmax(visible[..., ::-1], axis=-1)
    any_visible = visible.any(axis=-1)
    ranges = jnp.stack([jnp.where(any_visible, first, 0), jnp.where(any_visible, end, 0)], -1)
    return ranges.astype(jnp.int32).reshape(-1)


def _mask_operands(batch, q_len, cfg, *, causal, kv_mask, prefix_length, segment_ids):
    """The kernels' mask operands; see the module docstring."""
    bq, bk, nq, nk, kv_len = cfg.block_q, cfg.block_k, cfg.q_tiles, cfg.k_tiles, cfg.kv_len
    q_pad, k_pad = nq * bq, nk * bk
    visible = jnp.ones((batch, nq, nk), bool)
    k_tile_start = jnp.arange(nk) * bk

    limit = None
    if causal or prefix_length is not None:
        q_pos = jnp.arange(q_pad) + (kv_len - q_len)  # queries are the last q_len positions
        limit = jnp.broadcast_to(q_pos + 1, (batch, q_pad))
        if prefix_length is not None:
            prefix = jnp.asarray(prefix_length, jnp.int32).reshape(-1, 1)
            limit = jnp.maximum(limit, prefix)
        limit = jnp.where(jnp.arange(q_pad) < q_len, limit, 0).astype(jnp.int32)
        tile_limit = limit.reshape(batch, nq, bq).max(-1)
        visible &= k_tile_start < tile_limit[:, :, None]
        limit = limit[:, :, None]

    q_code = k_code = None
    if kv_mask is not None or segment_ids is not None:
        valid = jnp.ones((batch, kv_len), bool)
        if kv_mask is not None:
            valid = jnp.broadcast_to(jnp.asarray(kv_mask, bool), (batch, kv_len))
        valid = jnp.pad(valid, ((0, 0), (0, k_pad - kv_len)))
        if segment_ids is None:
            segments = jnp.zeros((batch, kv_len), jnp.int32)
            q_code = jnp.zeros((batch, q_pad), jnp.int32)
        else:
            segments = jnp.broadcast_to(jnp.asarray(segment_ids, jnp.int32), (batch, kv_len))
            # Padded query rows copy the last real row: no extra tiles, results sliced off.
            q_code = segments[:, kv_len - q_len :]
            q_code = jnp.pad(q_code, ((0, 0), (0, q_pad - q_len)), "edge")
        never = jnp.min(segments) - 1  # below every query's code
        k_code = jnp.pad(segments, ((0, 0), (0, k_pad - kv_len)), constant_values=never)
        k_code = jnp.where(valid, k_code, never)
        # A tile pair can hold an equal-code pair only if the code intervals overlap.
        q_tiles = q_code.reshape(batch, nq, bq)
        k_tiles = k_code.reshape(batch, nk, bk)
        k_valid = valid.reshape(batch, nk, bk)
        k_min = jnp.where(k_valid, k_tiles, jnp.iinfo(jnp.int32).max).min(-1)
        k_max = jnp.where(k_valid, k_tiles, jnp.iinfo(jnp.int32).min).max(-1)
        visible &= (q_tiles.min(-1)[:, :, None] <= k_max[:, None, :]) & (
            k_min[:, None, :] <= q_tiles.max(-1)[:, :, None]
        )
        q_code, k_code = q_code[:, :, None], k_code[:, None, :]

    return _Masks(
        q_ranges=_tile_ranges(visible),
        k_ranges=_tile_ranges(visible.transpose(0, 2, 1)),
        limit=limit,
        q_code=q_code,
        k_code=k_code,
    )


# ----------------------------------------------------------------------------- kernel bodies


def _program_ids(cfg):
    """(batch, head, tile) of this program; the grid order differs per platform."""
    if cfg.platform == "gpu":
        return pl.program_id(1), pl.program_id(2), pl.program_id(0)
    return pl.program_id(0), pl.program_id(1), pl.program_id(2)


def _range(ranges_ref, b, tile, tiles):
    index = 2 * (b * tiles + tile)
    return ranges_ref[index], ranges_ref[index + 1]


def _tile_mask(cfg, k_start, limit, q_code, k_code):
    """[block_q, block_k] visibility of one tile from the per-row operands, or None."""
    k_pos = k_start + lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.block_k), 1)
    mask = None
    if limit is not None:
        mask = k_pos < limit
    if q_code is not None:
        same = q_code == k_code  # padding keys carry a code no query has
        mask = same if mask is None else mask & same
    elif cfg.padded_keys:
        real = k_pos < cfg.kv_len
        mask = real if mask is None else mask & real
    return mask


def _logits(cfg, q, k, mask):
    s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32) * cfg.scale
    return s if mask is None else jnp.where(mask, s, -jnp.inf)


def _forward_kernel(
    q_ranges_ref, q_ref, k_ref, v_ref, limit_ref, q_code_ref, k_code_ref, o_ref, lse_ref, *, cfg
):
    b, _, i = _program_ids(cfg)
    first, end = _range(q_ranges_ref, b, i, cfg.q_tiles)
    q = q_ref[...]
    limit = None if limit_ref is None else limit_ref[...]
    q_code = None if q_code_ref is None else q_code_ref[...]

    def step(j, carry):
        m, denom, acc = carry
        start = pl.multiple_of(j * cfg.block_k, cfg.block_k)
        keys = pl.ds(start, cfg.block_k)
        k_code = None if k_code_ref is None else k_code_ref[:, keys]
        s = _logits(cfg, q, k_ref[keys, :], _tile_mask(cfg, start, limit, q_code, k_code))
        m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen no key yet
        p = jnp.exp(s - shift)
        rescale = jnp.exp(m - shift)
        v = v_ref[keys, :]
        acc = rescale * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, rescale * denom + p.sum(axis=1, keepdims=True), acc

    rows = (cfg.block_q, 1)
    m, denom, acc = lax.fori_loop(
        first,
        end,
        step,
        (
            jnp.full(rows, -jnp.inf, jnp.float32),
            jnp.zeros(rows, jnp.float32),
            jnp.zeros(q.shape, jnp.float32),
        ),
    )
    blind = denom == 0  # no visible key (a NaN input still gives NaN)
    denom = jnp.where(blind, 1.0, denom)
    o_ref[...] = jnp.where(blind, 0.0, acc / denom).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(blind, jnp.inf, m + jnp.log(denom))


def _dkv_kernel(
    k_ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    limit_ref,
    q_code_ref,
    k_code_ref,
    dk_ref,
    dv_ref,
    *,
    cfg,
):
    b, _, j = _program_ids(cfg)
    first, end = _range(k_ranges_ref, b, j, cfg.k_tiles)
    k, v = k_ref[...], v_ref[...]
    k_code = None if k_code_ref is None else k_code_ref[...]

    def step(i, carry):
        dk, dv = carry
        rows = pl.ds(pl.multiple_of(i * cfg.block_q, cfg.block_q), cfg.block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        limit = None if limit_ref is None else limit_ref[rows, :]
        q_code = None if q_code_ref is None else q_code_ref[rows, :]
        s = _logits(cfg, q, k, _tile_mask(cfg, j * cfg.block_k, limit, q_code, k_code))
        p = jnp.exp(s - lse_ref[rows, :])
        dv += jnp.dot(p.T.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_ref[rows, :])
        dk += jnp.dot(ds.T.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(first, end, step, (zeros, zeros))
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(
    q_ranges_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    limit_ref,
    q_code_ref,
    k_code_ref,
    dq_ref,
    *,
    cfg,
):
    b, _, i = _program_ids(cfg)
    first, end = _range(q_ranges_ref, b, i, cfg.q_tiles)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    limit = None if limit_ref is None else limit_ref[...]
    q_code = None if q_code_ref is None else q_code_ref[...]

    def step(j, dq):
        start = pl.multiple_of(j * cfg.block_k, cfg.block_k)
        keys = pl.ds(start, cfg.block_k)
        k = k_ref[keys, :]
        k_code = None if k_code_ref is None else k_code_ref[:, keys]
        s = _logits(cfg, q, k, _tile_mask(cfg, start, limit, q_code, k_code))
        p = jnp.exp(s - lse)
        dp = lax.dot_general(do, v_ref[keys, :], _NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = lax.fori_loop(first, end, step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- pallas_call


def _spec(cfg, block_shape, index_map):
    """BlockSpec whose index_map takes (batch, head, tile) whatever the platform's grid order."""
    if cfg.platform == "gpu":
        return pl.BlockSpec(block_shape, lambda t, b, h: index_map(b, h, t))
    return pl.BlockSpec(block_shape, index_map)


def _heads_spec(cfg, rows, head_dim, index_map):
    """q/k/v-like operand, [B, T, H, D] on GPU and [B, H, T, D] on TPU; index_map gives
    (batch, head, row block)."""
    if cfg.platform == "gpu":

        def block_index(b, h, t):
            batch, head, row = index_map(b, h, t)
            return batch, row, head, 0

        return _spec(cfg, (None, rows, None, head_dim), block_index)
    return _spec(cfg, (None, None, rows, head_dim), lambda b, h, t: (*index_map(b, h, t), 0))


def _table_spec(cfg, table):
    if cfg.platform == "tpu":
        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return _spec(cfg, table.shape, lambda b, h, t: (0,))


def _pallas(cfg, kernel, name, *, tiles, heads, batch, head_dim, in_specs, out_specs, out_shape):
    if cfg.platform == "gpu":
        grid = (tiles, batch, heads)
        params = pltriton.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)
        interpret = cfg.interpret
    else:
        grid = (batch, heads, tiles)
        params = pltpu.CompilerParams(dimension_semantics=("parallel",) * 3)
        interpret = pltpu.InterpretParams() if cfg.interpret else False
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=params,
        interpret=interpret,
        name=name,
    )


def _mask_specs(cfg, masks, *, key_tile):
    """Specs of (limit, q_code, k_code): the program's query tile against all keys, or with
    `key_tile` all queries against the program's key tile."""
    if key_tile:
        rows = _spec(cfg, (None, cfg.q_tiles * cfg.block_q, 1), lambda b, h, t: (b, 0, 0))
        cols = _spec(cfg, (None, 1, cfg.block_k), lambda b, h, t: (b, 0, t))
    else:
        rows = _spec(cfg, (None, cfg.block_q, 1), lambda b, h, t: (b, t, 0))
        cols = _spec(cfg, (None, 1, cfg.k_tiles * cfg.block_k), lambda b, h, t: (b, 0, 0))
    return (
        None if masks.limit is None else rows,
        None if masks.q_code is None else rows,
        None if masks.k_code is None else cols,
    )


def _shapes(cfg, q, k):
    if cfg.platform == "gpu":
        (batch, _, heads, head_dim), (_, _, kv_heads, _) = q.shape, k.shape
    else:
        (batch, heads, _, head_dim), (_, kv_heads, _, _) = q.shape, k.shape
    return batch, heads, kv_heads, head_dim


def _forward(q, k, v, masks, cfg):
    batch, heads, _, head_dim = _shapes(cfg, q, k)
    bq, q_pad, k_pad = cfg.block_q, cfg.q_tiles * cfg.block_q, cfg.k_tiles * cfg.block_k
    group = cfg.groups
    out, lse = _pallas(
        cfg,
        _forward_kernel,
        "flash_attention_forward",
        tiles=cfg.q_tiles,
        heads=heads,
        batch=batch,
        head_dim=head_dim,
        in_specs=[
            _table_spec(cfg, masks.q_ranges),
            _heads_spec(cfg, bq, head_dim, lambda b, h, t: (b, h, t)),
            _heads_spec(cfg, k_pad, head_dim, lambda b, h, t: (b, h // group, 0)),
            _heads_spec(cfg, k_pad, head_dim, lambda b, h, t: (b, h // group, 0)),
            *_mask_specs(cfg, masks, key_tile=False),
        ],
        out_specs=[
            _heads_spec(cfg, bq, head_dim, lambda b, h, t: (b, h, t)),
            _spec(cfg, (None, None, bq, 1), lambda b, h, t: (b, h, t, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, q_pad, 1), jnp.float32),
        ],
    )(masks.q_ranges, q, k, v, masks.limit, masks.q_code, masks.k_code)
    return out, lse


def _backward(cfg, residuals, do):
    q, k, v, masks, out, lse = residuals
    batch, heads, kv_heads, head_dim = _shapes(cfg, q, k)
    bq, bk, group = cfg.block_q, cfg.block_k, cfg.groups
    q_pad, k_pad = cfg.q_tiles * bq, cfg.k_tiles * bk
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
    delta = (delta.transpose(0, 2, 1) if cfg.platform == "gpu" else delta)[..., None]
    row_stats = (lse, delta)  # [B, H, Tq, 1] float32

    # dk, dv per query head; summed over each group below (in float32 if there is a sum).
    per_head = (batch, heads, k_pad, head_dim)
    if cfg.platform == "gpu":
        per_head = (batch, k_pad, heads, head_dim)
    dkv_dtype = k.dtype if group == 1 else jnp.float32
    dk, dv = _pallas(
        cfg,
        _dkv_kernel,
        "flash_attention_dkv",
        tiles=cfg.k_tiles,
        heads=heads,
        batch=batch,
        head_dim=head_dim,
        in_specs=[
            _table_spec(cfg, masks.k_ranges),
            _heads_spec(cfg, q_pad, head_dim, lambda b, h, t: (b, h, 0)),
            _heads_spec(cfg, bk, head_dim, lambda b, h, t: (b, h // group, t)),
            _heads_spec(cfg, bk, head_dim, lambda b, h, t: (b, h // group, t)),
            _heads_spec(cfg, q_pad, head_dim, lambda b, h, t: (b, h, 0)),
            *[_spec(cfg, (None, None, q_pad, 1), lambda b, h, t: (b, h, 0, 0))] * 2,
            *_mask_specs(cfg, masks, key_tile=True),
        ],
        out_specs=[_heads_spec(cfg, bk, head_dim, lambda b, h, t: (b, h, t))] * 2,
        out_shape=[jax.ShapeDtypeStruct(per_head, dkv_dtype)] * 2,
    )(masks.k_ranges, q, k, v, do, *row_stats, masks.limit, masks.q_code, masks.k_code)

    dq = _pallas(
        cfg,
        _dq_kernel,
        "flash_attention_dq",
        tiles=cfg.q_tiles,
        heads=heads,
        batch=batch,
        head_dim=head_dim,
        in_specs=[
            _table_spec(cfg, masks.q_ranges),
            _heads_spec(cfg, bq, head_dim, lambda b, h, t: (b, h, t)),
            _heads_spec(cfg, k_pad, head_dim, lambda b, h, t: (b, h // group, 0)),
            _heads_spec(cfg, k_pad, head_dim, lambda b, h, t: (b, h // group, 0)),
            _heads_spec(cfg, bq, head_dim, lambda b, h, t: (b, h, t)),
            *[_spec(cfg, (None, None, bq, 1), lambda b, h, t: (b, h, t, 0))] * 2,
            *_mask_specs(cfg, masks, key_tile=False),
        ],
        out_specs=_heads_spec(cfg, bq, head_dim, lambda b, h, t: (b, h, t)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(masks.q_ranges, q, k, v, do, *row_stats, masks.limit, masks.q_code, masks.k_code)

    if group > 1:  # sum the query heads of each key/value head
        head_axis = 2 if cfg.platform == "gpu" else 1
        grouped = per_head[:head_axis] + (kv_heads, group) + per_head[head_axis + 1 :]
        dk, dv = (x.reshape(grouped).sum(head_axis + 1).astype(k.dtype) for x in (dk, dv))
    return dq, dk, dv, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, masks, cfg):
    return _forward(q, k, v, masks, cfg)[0]


def _flash_forward(q, k, v, masks, cfg):
    out, lse = _forward(q, k, v, masks, cfg)
    return out, (q, k, v, masks, out, lse)


_flash.defvjp(_flash_forward, _backward)


@functools.partial(
    jax.jit, static_argnames=("causal", "scale", "block_q", "block_k", "platform", "interpret")
)
def flash_attention(
    q,
    k,
    v,
    *,
    causal=False,
    kv_mask=None,
    prefix_length=None,
    segment_ids=None,
    scale=None,
    block_q=None,
    block_k=None,
    platform=None,
    interpret=None,
):
    """Fused attention, [batch, seq, heads, head_dim] in and out, differentiable.

    Same arguments and mask semantics as `fomo_jax.kernels.attention` (which see), plus:
      block_q, block_k: tile sizes (default `DEFAULT_BLOCKS`, clamped to the lengths).
      platform: "gpu" (Triton) or "tpu" (Mosaic) kernel; default: the default backend's,
        and the GPU kernel on CPU.
      interpret: run the kernel in the Pallas interpreter; default: on CPU only.
    Float32 accumulation for any input dtype; the output has q's dtype.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    backend = jax.default_backend()
    platform = platform or ("tpu" if backend == "tpu" else "gpu")
    if platform not in PLATFORMS:
        raise ValueError(f"platform={platform!r}; expected one of {PLATFORMS}")
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} not a multiple of key/value heads {kv_heads}")
    if segment_ids is not None and q_len > kv_len:
        raise ValueError(f"segment_ids need q_len <= kv_len, got {q_len} > {kv_len}")
    block_q, block_k = _tiles(platform, q_len, kv_len, block_q, block_k)
    cfg = _Config(
        platform=platform,
        interpret=backend == "cpu" if interpret is None else interpret,
        scale=float(head_dim**-0.5 if scale is None else scale),
        block_q=block_q,
        block_k=block_k,
        q_tiles=-(-q_len // block_q),
        k_tiles=-(-kv_len // block_k),
        kv_len=kv_len,
        groups=heads // kv_heads,
    )
    masks = _mask_operands(
        batch,
        q_len,
        cfg,
        causal=causal,
        kv_mask=kv_mask,
        prefix_length=prefix_length,
        segment_ids=segment_ids,
    )
    # Pad sequences to whole tiles (and head_dim to a power of two for Triton).
    dim = max(16, _next_power_of_2(head_dim)) if platform == "gpu" else head_dim

    def pad(x, tiles, block):
        x = jnp.pad(x, ((0, 0), (0, tiles * block - x.shape[1]), (0, 0), (0, dim - head_dim)))
        return x if platform == "gpu" else x.transpose(0, 2, 1, 3)

    out = _flash(
        pad(q, cfg.q_tiles, block_q),
        pad(k, cfg.k_tiles, block_k),
        pad(v, cfg.k_tiles, block_k),
        masks,
        cfg,
    )
    if platform == "tpu":
        out = out.transpose(0, 2, 1, 3)
    return out[:, :q_len, :, :head_dim]
