"""Contrastive losses of image-text pairs: CLIP's softmax (InfoNCE) and SigLIP's sigmoid.

`config.loss` picks one of `LOSSES` (the CLIP family, `families.clip`):
- "clip" (default): `clip_loss`, dense. Under `jax.jit` with the batch split across devices,
  XLA gathers the text embeddings and builds the global B x B logits on every device.
- "clip_chunked": `chunked_clip_loss`, the same loss and gradients without the B x B matrix:
  over the mesh's batch axes each device keeps its B/N images and the text shards travel
  around a ring (`jax.lax.ppermute`), each processed `chunk_size` columns at a time with an
  online logsumexp for both directions; per-device temporaries are O(B/N x chunk).
- "siglip": `siglip_loss`, SigLIP's pairwise sigmoid loss with the learnable bias
  (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"; big_vision's
  `trainers/proj/image_text/siglip.py`), dense.
- "siglip_chunked": `chunked_siglip_loss`, the same on the ring.

The chunked forms have hand-written gradients (`jax.custom_vjp`: a second trip around the
ring), so the backward pass needs no B x B matrix either, and the same metrics (i2t / t2i
accuracy: the argmax, lowest index on ties, tracked across chunks).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LOSSES = ("clip", "clip_chunked", "siglip", "siglip_chunked")
SIGMOID_LOSSES = ("siglip", "siglip_chunked")  # need the model's `logit_bias`
BATCH_AXES = ("data", "fsdp", "fsdp_transpose")  # `sharding.BATCH`: the batch axes
DEFAULT_CHUNK = 1024


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise ValueError(f"config.loss={name!r}; expected one of {LOSSES}")
    return name


def l2_normalize(x, eps=1e-12):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _accuracies(logits):
    labels = jnp.arange(logits.shape[0])
    return {
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    }


def clip_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE of CLIP (spec/fif.md §7.2).

    L = ½ [CE(S·e^s, I) + CE(Sᵀ·e^s, I)] with S_ij = <f̂_i, ĝ_j> over the whole batch and s the
    learnable log-scale (temperature τ = e^-s), each cross-entropy averaged over rows. Under
    `jax.jit` with a batch sharded across devices, S is the *global* B x B matrix: XLA gathers
    the text embeddings, so every row sees all B-1 negatives, as the benchmark requires.
    Computed in float32. Returns (loss, metrics).
    """
    image, text = l2_normalize(image_emb), l2_normalize(text_emb)
    logits = jnp.exp(logit_scale.astype(jnp.float32)) * image @ text.T
    labels = jnp.arange(logits.shape[0])
    log_p_i2t = jax.nn.log_softmax(logits, axis=1)
    log_p_t2i = jax.nn.log_softmax(logits, axis=0)
    loss_i2t = -jnp.mean(log_p_i2t[labels, labels])
    loss_t2i = -jnp.mean(log_p_t2i[labels, labels])
    return 0.5 * (loss_i2t + loss_t2i), _accuracies(logits)


def siglip_loss(image_emb, text_emb, logit_scale, logit_bias):
    """SigLIP's sigmoid loss: L = -1/B Σ_ij log σ(z_ij (e^s <f̂_i, ĝ_j> + b)), z_ij = 1 if i = j
    else -1, over the whole batch (normalised by the batch size B, as big_vision does).
    Computed in float32. Returns (loss, metrics)."""
    image, text = l2_normalize(image_emb), l2_normalize(text_emb)
    scale = jnp.exp(logit_scale.astype(jnp.float32))
    logits = scale * image @ text.T + logit_bias.astype(jnp.float32)
    signs = 2 * jnp.eye(logits.shape[0], dtype=jnp.float32) - 1
    loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
    return loss, _accuracies(logits)


# ------------------------------------------------------------------------------ chunked forms


def chunked_clip_loss(image_emb, text_emb, logit_scale, *, mesh=None, axes=BATCH_AXES,
                      chunk_size: int = DEFAULT_CHUNK):  # fmt: skip
    """`clip_loss` (value, gradients, metrics) without the B x B logits.

    `mesh`: the mesh whose `axes` split the batch (default: the context mesh of
    `jax.set_mesh`); without one (or with a single batch shard) the whole batch is one shard,
    still processed `chunk_size` texts at a time.
    """
    zero = jnp.zeros((), jnp.float32)
    return _chunked("clip", image_emb, text_emb, logit_scale, zero, mesh, axes, chunk_size)


def chunked_siglip_loss(image_emb, text_emb, logit_scale, logit_bias, *, mesh=None,
                        axes=BATCH_AXES, chunk_size: int = DEFAULT_CHUNK):  # fmt: skip
    """`siglip_loss` (value, gradients, metrics) without the B x B logits (see
    `chunked_clip_loss` for `mesh`, `axes`, `chunk_size`)."""
    return _chunked("siglip", image_emb, text_emb, logit_scale, logit_bias, mesh, axes,
                    chunk_size)  # fmt: skip


def _chunked(kind, image_emb, text_emb, logit_scale, logit_bias, mesh, axes, chunk_size):
    image, text = l2_normalize(image_emb), l2_normalize(text_emb)
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"image {image.shape} and text {text.shape} embeddings must both be "
                         "[batch, dim]")  # fmt: skip
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in axes if not mesh.empty and a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in axes)
    batch = image.shape[0]
    if batch % shards:
        raise ValueError(f"batch {batch} does not split into {shards} shards over mesh axes "
                         f"{axes}")  # fmt: skip
    local = batch // shards
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    chunk = max(c for c in range(1, min(chunk_size, local) + 1) if local % c == 0)
    loss_fn = _loss_fn(kind, mesh if shards > 1 else None, axes, shards, chunk, batch)
    loss, i2t, t2i = loss_fn(image, text, logit_scale.astype(jnp.float32),
                             jnp.asarray(logit_bias, jnp.float32))  # fmt: skip
    return loss, {"i2t_accuracy": i2t, "t2i_accuracy": t2i}


@functools.lru_cache(maxsize=64)
def _loss_fn(kind, mesh, axes, shards, chunk, batch):
    """(image, text, log_scale, bias) -> (loss, i2t accuracy, t2i accuracy) of normalized
    embeddings, with its custom VJP; shard_map'ed over `axes` when `mesh` is given."""
    fwd = functools.partial(_forward_local, kind=kind, axes=axes, shards=shards, chunk=chunk,
                            batch=batch)  # fmt: skip
    bwd = functools.partial(_backward_local, kind=kind, axes=axes, shards=shards, chunk=chunk,
                            batch=batch)  # fmt: skip
    if mesh is not None:
        rows = P(axes)
        fwd = jax.shard_map(fwd, mesh=mesh, in_specs=(rows, rows, P(), P()),
                            out_specs=((P(), P(), P()), (rows, rows)), check_vma=False)  # fmt: skip
        bwd = jax.shard_map(bwd, mesh=mesh, in_specs=(rows, rows, P(), P(), rows, rows, P()),
                            out_specs=(rows, rows, P(), P()), check_vma=False)  # fmt: skip

    @jax.custom_vjp
    def loss_fn(x, y, log_scale, bias):
        return fwd(x, y, log_scale, bias)[0]

    def loss_fwd(x, y, log_scale, bias):
        out, (row_lse, col_lse) = fwd(x, y, log_scale, bias)
        return out, (x, y, log_scale, bias, row_lse, col_lse)

    def loss_bwd(residuals, cotangents):
        return bwd(*residuals, cotangents[0])  # the accuracies have no gradient

    loss_fn.defvjp(loss_fwd, loss_bwd)
    return loss_fn


def _ring(body, carry, travel, axes, shards):
    """`shards` steps of carry, travel = body(source, carry, travel), where `source` is the
    shard `travel` came from; after each step `travel` moves one device along the ring (after
    the last one it is back on its own device)."""
    me = jax.lax.axis_index(axes) if shards > 1 else 0
    perm = [(i, (i + 1) % shards) for i in range(shards)]

    def step(i, state):
        carry, travel = body((me - i) % shards, *state)
        if shards > 1:
            travel = jax.lax.ppermute(travel, axes, perm)
        return carry, travel

    return jax.lax.fori_loop(0, shards, step, (carry, travel))


def _chunks(x, chunk):
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _better(value, index, best, best_index):
    """Where (value, index) beats the running (best, best_index) of an argmax (ties: lower
    index, as `jnp.argmax`)."""
    return (value > best) | ((value == best) & (index < best_index))


def _psum(x, axes, shards):
    return jax.lax.psum(x, axes) if shards > 1 else x


def _forward_local(x, y, log_scale, bias, *, kind, axes, shards, chunk, batch):
    """One device's part: its images x against every text shard y visiting on the ring.

    Rows (images) keep a running max, argmax and Σ exp(l - max) (CLIP) locally; the same
    for the columns (texts) travels with the text shard; SigLIP sums softplus(l) over every
    pair (all negatives) and corrects the diagonal. Returns ((loss, i2t, t2i), (row logsumexp,
    column logsumexp)).
    """
    local = x.shape[0]
    me = jax.lax.axis_index(axes) if shards > 1 else 0
    scale = jnp.exp(log_scale)
    big = jnp.iinfo(jnp.int32).max
    offsets = jnp.arange(local // chunk, dtype=jnp.int32) * chunk

    def block(source, carry, travel):
        def one_chunk(carry, inputs):
            row_max, row_arg, row_sum, total = carry
            yc, col_max, col_arg, col_sum, offset = inputs
            logits = scale * x @ yc.T + bias  # [local, chunk]
            # images: argmax and online logsumexp over the texts
            m, a = jnp.max(logits, axis=1), jnp.argmax(logits, axis=1) + source * local + offset
            row_arg = jnp.where(_better(m, a, row_max, row_arg), a, row_arg)
            new_max = jnp.maximum(row_max, m)
            if kind == "clip":
                row_sum = row_sum * jnp.exp(row_max - new_max) + jnp.sum(
                    jnp.exp(logits - new_max[:, None]), axis=1
                )
            row_max = new_max
            # texts: the same over this device's images
            m, a = jnp.max(logits, axis=0), jnp.argmax(logits, axis=0) + me * local
            col_arg = jnp.where(_better(m, a, col_max, col_arg), a, col_arg)
            new_max = jnp.maximum(col_max, m)
            if kind == "clip":
                col_sum = col_sum * jnp.exp(col_max - new_max) + jnp.sum(
                    jnp.exp(logits - new_max[None, :]), axis=0
                )
            else:
                total = total + jnp.sum(jax.nn.softplus(logits))
            return (row_max, row_arg, row_sum, total), (yc, new_max, col_arg, col_sum)

        y_chunks, *col = (_chunks(t, chunk) for t in travel)
        carry, travel = jax.lax.scan(one_chunk, carry, (y_chunks, *col, offsets))
        return carry, tuple(t.reshape(-1, *t.shape[2:]) for t in travel)

    neg = jnp.full((local,), -jnp.inf, jnp.float32)
    arg, zeros = jnp.full((local,), big, jnp.int32), jnp.zeros((local,), jnp.float32)
    carry = (neg, arg, zeros, jnp.zeros((), jnp.float32))
    (row_max, row_arg, row_sum, total), (_, col_max, col_arg, col_sum) = _ring(
        block, carry, (y, neg, arg, zeros), axes, shards
    )
    diag = scale * jnp.sum(x * y, axis=1) + bias  # the positive pairs' logits
    own = me * local + jnp.arange(local, dtype=jnp.int32)
    if kind == "clip":
        row_lse, col_lse = row_max + jnp.log(row_sum), col_max + jnp.log(col_sum)
        part = (jnp.sum(row_lse) + jnp.sum(col_lse) - 2 * jnp.sum(diag)) / (2 * batch)
    else:
        row_lse = col_lse = zeros  # unused by SigLIP's gradient
        part = (total - jnp.sum(diag)) / batch  # softplus(-d) - softplus(d) = -d
    i2t, t2i = jnp.sum(row_arg == own), jnp.sum(col_arg == own)
    loss, i2t, t2i = (_psum(v, axes, shards) for v in (part, i2t, t2i))
    return (loss, i2t.astype(jnp.float32) / batch, t2i.astype(jnp.float32) / batch), (
        row_lse, col_lse)  # fmt: skip


def _backward_local(x, y, log_scale, bias, row_lse, col_lse, g, *, kind, axes, shards, chunk,
                    batch):  # fmt: skip
    """Gradients of the loss on one device: a second trip of the text shards (with their
    column logsumexp and their gradient being summed) around the ring.

    dL/dl_ij = (e^{l_ij - R_i} + e^{l_ij - C_j}) / 2B (CLIP) or σ(l_ij) / B (SigLIP), minus
    1/B on the diagonal in both; l = e^s <x, y> + b.
    """
    scale = jnp.exp(log_scale)

    def block(source, carry, travel):
        def one_chunk(carry, inputs):
            dx, d_scale, d_bias = carry
            yc, cc, dyc = inputs
            logits = scale * x @ yc.T + bias
            if kind == "clip":
                grad = (jnp.exp(logits - row_lse[:, None]) + jnp.exp(logits - cc[None, :])) * (
                    g / (2 * batch)
                )
            else:
                grad = jax.nn.sigmoid(logits) * (g / batch)
            dx = dx + scale * grad @ yc
            dyc = dyc + scale * grad.T @ x
            d_scale = d_scale + jnp.sum(grad * (logits - bias))
            return (dx, d_scale, d_bias + jnp.sum(grad)), (yc, cc, dyc)

        chunks = tuple(_chunks(t, chunk) for t in travel)
        carry, travel = jax.lax.scan(one_chunk, carry, chunks)
        return carry, tuple(t.reshape(-1, *t.shape[2:]) for t in travel)

    zero = jnp.zeros((), jnp.float32)
    (dx, d_scale, d_bias), (_, _, dy) = _ring(
        block, (jnp.zeros_like(x), zero, zero), (y, col_lse, jnp.zeros_like(y)), axes, shards
    )
    # the positive pairs: -1/B on the diagonal
    diag = scale * jnp.sum(x * y, axis=1)
    dx = dx - (g / batch) * scale * y
    dy = dy - (g / batch) * scale * x
    d_scale = d_scale - (g / batch) * jnp.sum(diag)
    d_bias = d_bias - (g / batch) * x.shape[0]
    d_scale, d_bias = _psum(d_scale, axes, shards), _psum(d_bias, axes, shards)
    return dx, dy, d_scale, d_bias
