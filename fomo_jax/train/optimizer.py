"""AdamW with decoupled weight decay and one global-norm clip (spec/fif.md §7.3): the one place
that builds the optimizer of every job (`build`).

The transformation is learning-rate free: it returns the AdamW *direction*
u = m̂/(√v̂+ε) + λ·θ and the train step applies θ ← θ − lr·u with lr an input computed on the
host. Changing the schedule therefore never recompiles the step.
"""

from __future__ import annotations

import jax
import optax


def decay_mask(params, convention: str):
    """Which leaves get weight decay.

    "all" (FoMo-in-Flux reference): every trainable parameter, LayerNorm, biases and
    logit_scale included. "openclip": only matrices and embeddings (ndim >= 2).
    """
    if convention == "all":
        return jax.tree_util.tree_map(lambda _: True, params)
    if convention == "openclip":
        return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)
    raise ValueError(f"weight-decay convention {convention!r}; expected 'all' or 'openclip'")


def adamw(
    *,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    weight_decay=0.2,
    clip_norm: float | None = 1.0,
    decay_convention="all",
) -> optax.GradientTransformation:
    """clip_by_global_norm -> scale_by_adam -> add_decayed_weights (no learning rate)."""
    parts = []
    if clip_norm is not None:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=eps))
    if weight_decay:
        parts.append(
            optax.add_decayed_weights(weight_decay, mask=lambda p: decay_mask(p, decay_convention))
        )
    return optax.chain(*parts)


def build(config) -> optax.GradientTransformation:
    """The AdamW of a config's `optimizer` block (keys b1, b2, eps, weight_decay, clip_norm,
    decay_convention)."""
    return adamw(b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
                 clip_norm=config.clip_norm, decay_convention=config.decay_convention)  # fmt: skip


def trainable_count(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
