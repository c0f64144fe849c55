"""The one attention entry point of fomo_jax.

Every tower (ViT, text transformer, VLM decoder) calls `attention`. Masks are given as
structure (causal flag, key padding, prefix length, segment ids), never as a dense [T, T]
matrix, so that fused kernels can build them per tile. The XLA path below is the numerical
reference for every other backend.

Backends:
  * "xla": `reference_attention`, dense [T, T] logits; every mask, every platform.
  * "pallas": the fused flash-attention kernel (`flash.py`): every mask, no [T, T]
    matrix; Triton on GPU, Mosaic on TPU, the Pallas interpreter on CPU (slow; for tests).
  * "cudnn": cuDNN's fused attention through `jax.nn.dot_product_attention`; GPU only,
    float16/bfloat16, causal and key-padding masks only (padding as per-row lengths, so the
    valid keys must be a prefix of each row).

`implementation=None` picks, per shape, by this rule (the choice is logged once per shape):
  1. "pallas" on GPU/TPU for long key sequences (>= `PALLAS_MIN_KV_LEN`) where the kernel
     fits: there XLA's [T, T] logits cost memory quadratically and the fused kernel saves the
     traffic. On one device, or on several when the call knows the mesh (below); without a
     mesh a pallas_call has no SPMD partitioning rule, so under a sharded jit XLA would gather
     its operands and run it whole on every device;
  2. else "cudnn" on GPU where it supports the call (half-precision inputs, head_dim a
     multiple of 8 up to 128, no prefix/segment masks, and no kv_mask, whose prefix shape
     cannot be checked at trace time);
  3. else "xla" (always on CPU, where the kernel would only run interpreted).
The threshold is a first guess, not a measurement: `benchmarks/attention.py` times all three
backends at the CLIP and long-sequence shapes, and its GPU table is what should move it.

Several devices. The mesh is the `mesh` argument, else the one set by `jax.set_mesh` (read at
trace time with `jax.sharding.get_abstract_mesh()`; nothing changes without one). With a mesh
of more than one device the Pallas kernel runs per shard inside `jax.shard_map`: the batch
split over the mesh's batch axes, the heads (query and key/value) over `model`, each
axis only where it divides (else that dimension is whole on every shard of the axis, which
then computes it redundantly). Attention is independent across batch rows and heads, so the
per-shard kernel computes exactly the global result. Inside a shard_map (axes already
manual) the kernel runs as on one device. (The batch axes are `sharding.BATCH`: data, fsdp
and fsdp_transpose.) cuDNN needs no shard_map: `jax.nn.dot_product_attention` carries its
own partitioning rule (not run here: no GPU).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fomo_jax.kernels import flash
from fomo_jax.sharding import BATCH, divisible_axes

IMPLEMENTATIONS = (None, "xla", "cudnn", "pallas")
PALLAS_MIN_KV_LEN = 1024
_logged_choices: set = set()


def _visibility(q_len, kv_len, *, causal, kv_mask, prefix_length, segment_ids):
    """Boolean [batch or 1, 1, q_len, kv_len] mask (True = may attend), or None.

    Masks combine by AND. `prefix_length` alone means a bidirectional prefix followed by a
    causal suffix (prefix-LM); with `causal=True` as well the prefix still sees itself.
    Query i is aligned with key i (self-attention); for q_len != kv_len the queries are the
    last q_len positions, as in decoding.
    """
    if not (causal or prefix_length is not None or kv_mask is not None or segment_ids is not None):
        return None
    q_pos = jnp.arange(q_len)[:, None] + (kv_len - q_len)
    k_pos = jnp.arange(kv_len)[None, :]
    mask = jnp.ones((1, 1, q_len, kv_len), bool)
    if causal or prefix_length is not None:
        visible = (k_pos <= q_pos)[None, None]
        if prefix_length is not None:
            prefix = jnp.asarray(prefix_length)[:, None, None, None]
            visible = visible | (k_pos[None, None] < prefix)
        mask = mask & visible
    if kv_mask is not None:
        mask = mask & jnp.asarray(kv_mask, bool)[:, None, None, :]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        mask = mask & (seg[:, None, -q_len:, None] == seg[:, None, None, :])
    return mask


def reference_attention(
    q, k, v, *, causal=False, kv_mask=None, prefix_length=None, segment_ids=None, scale=None
):
    """Softmax attention in plain XLA; [batch, seq, heads, head_dim] layout.

    Logits and softmax are computed in float32 whatever the input dtype; a query row that
    sees no key outputs zeros (not NaN). Keys/values may have fewer heads than queries
    (grouped-query attention) as long as the count divides.
    """
    _, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    if heads != kv_heads:
        if heads % kv_heads:
            raise ValueError(f"query heads {heads} not a multiple of key/value heads {kv_heads}")
        k = jnp.repeat(k, heads // kv_heads, axis=2)
        v = jnp.repeat(v, heads // kv_heads, axis=2)
    scale = head_dim**-0.5 if scale is None else scale
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = _visibility(
        q_len,
        kv_len,
        causal=causal,
        kv_mask=kv_mask,
        prefix_length=prefix_length,
        segment_ids=segment_ids,
    )
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
        row_visible = jnp.any(mask, axis=-1, keepdims=True)
        logits = jnp.where(row_visible, logits, 0.0)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:
        weights = jnp.where(row_visible, weights, 0.0)
    out = jnp.einsum(
        "bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.astype(q.dtype)


def _cudnn_attention(q, k, v, *, causal, kv_mask, prefix_length, segment_ids, scale):
    if prefix_length is not None or segment_ids is not None:
        raise ValueError(
            "implementation='cudnn' supports only causal and kv_mask masks; "
            "use 'xla' or 'pallas' for prefix_length / segment_ids"
        )
    if causal and q.shape[1] != k.shape[1]:
        # jax.nn aligns the causal mask top-left; ours aligns the last query with the last key.
        raise ValueError("implementation='cudnn' needs causal queries and keys of equal length")
    kv_lengths = None
    if kv_mask is not None:
        # cuDNN takes lengths, so the valid keys must be a prefix of each row.
        kv_lengths = jnp.sum(kv_mask, axis=-1).astype(jnp.int32)
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=scale,
        is_causal=causal,
        key_value_seq_lengths=kv_lengths,
        implementation="cudnn",
    )


def _choose(q, k, *, causal, kv_mask, prefix_length, segment_ids, mesh=None):
    """The backend `implementation=None` runs (rule in the module docstring)."""
    platform = jax.default_backend()
    if (
        platform in flash.PLATFORMS
        and (jax.device_count() == 1 or mesh is not None)
        and k.shape[1] >= PALLAS_MIN_KV_LEN
        and flash.fits(q.shape, k.shape, q.dtype, platform)
    ):
        return "pallas"
    head_dim = q.shape[-1]
    if (
        platform == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and kv_mask is None
        and prefix_length is None
        and segment_ids is None
        and not (causal and q.shape[1] != k.shape[1])
    ):
        return "cudnn"
    return "xla"


def _mesh(mesh):
    """The mesh to split the Pallas kernel over: `mesh`, else the context's (`jax.set_mesh`);
    None where there is none, or it has one device, or the call is already inside a shard_map
    (some axes manual: the caller has split the work)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def _sharded_flash(q, k, v, masks, *, scale, mesh):
    """`flash.flash_attention` per shard: batch over the batch axes, heads over model."""
    rows = divisible_axes(q.shape[0], BATCH, mesh)
    heads = divisible_axes(q.shape[2], ("model",), mesh)
    if heads != divisible_axes(k.shape[2], ("model",), mesh):
        heads = None  # query and key/value heads must split alike (grouped-query)
    causal, masks = masks["causal"], {n: m for n, m in masks.items() if n != "causal"}
    names = sorted(n for n, m in masks.items() if m is not None)
    heads_spec = P(rows, None, heads, None)
    mask_specs = [P(rows) if n == "prefix_length" else P(rows, None) for n in names]

    def per_shard(q, k, v, *mask_values):
        given = dict(zip(names, mask_values, strict=True))
        return flash.flash_attention(q, k, v, causal=causal, scale=scale, **given)

    # check_vma=False: pallas_call's out_shape would need per-axis varying annotations.
    run = jax.shard_map(per_shard, mesh=mesh, in_specs=(heads_spec,) * 3 + tuple(mask_specs),
                        out_specs=heads_spec, check_vma=False)  # fmt: skip
    return run(q, k, v, *(jnp.asarray(masks[n]) for n in names))


def attention(
    q,
    k,
    v,
    *,
    causal=False,
    kv_mask=None,
    prefix_length=None,
    segment_ids=None,
    scale=None,
    implementation=None,
    mesh=None,
):
    """Multi-head attention, [batch, seq, heads, head_dim] in and out.

    Args:
      q, k, v: queries [B, Tq, H, D], keys and values [B, Tk, Hkv, D].
      causal: query i sees keys j <= i.
      kv_mask: [B, Tk] bool, True for valid (non-padding) keys.
      prefix_length: [B] int; keys before it are visible to every query (prefix-LM).
      segment_ids: [B, T] int; tokens attend only within their segment (packing).
      scale: logit scale, default 1/sqrt(D) (a Python float for "pallas").
      implementation: None (choose per shape), "xla", "pallas" (interpreted on CPU) or
        "cudnn" (GPU only); see the module docstring.
      mesh: the device mesh the inputs are sharded over (default: `jax.set_mesh`'s, if any);
        with it "pallas" runs per shard on several devices (module docstring).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"attention implementation={implementation!r}; expected one of {IMPLEMENTATIONS}"
        )
    masks = dict(
        causal=causal, kv_mask=kv_mask, prefix_length=prefix_length, segment_ids=segment_ids
    )
    mesh = _mesh(mesh)
    chosen = implementation or _choose(q, k, **masks, mesh=mesh)
    key = (chosen, q.shape, k.shape, str(q.dtype), None if mesh is None else mesh.shape_tuple)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logging.info("attention: %s for q%s k%s %s (mesh %s)", *key)
    if chosen == "pallas" and mesh is not None:
        return _sharded_flash(q, k, v, masks, scale=scale, mesh=mesh)
    if chosen == "pallas":
        return flash.flash_attention(q, k, v, **masks, scale=scale)
    if chosen == "cudnn":
        return _cudnn_attention(q, k, v, **masks, scale=scale)
    return reference_attention(q, k, v, **masks, scale=scale)
