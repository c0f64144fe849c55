"""Contrastive losses."""

import jax
import jax.numpy as jnp


def l2_normalize(x, eps=1e-12):
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


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
    metrics = {
        "i2t_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == labels),
        "t2i_accuracy": jnp.mean(jnp.argmax(logits, axis=0) == labels),
    }
    return 0.5 * (loss_i2t + loss_t2i), metrics
