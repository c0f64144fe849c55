"""Independent float64 attention references for the kernel tests."""

import jax
import jax.numpy as jnp
import numpy as np


def visibility(batch, tq, tk, causal=False, kv_mask=None, prefix=None, segments=None):
    """The mask semantics written out element by element: [batch, tq, tk] bool."""
    vis = np.ones((batch, tq, tk), bool)
    for b in range(batch):
        for i in range(tq):
            qpos = i + tk - tq
            for j in range(tk):
                ok = True
                if causal or prefix is not None:
                    ok &= j <= qpos or (prefix is not None and j < prefix[b])
                if kv_mask is not None:
                    ok &= bool(kv_mask[b, j])
                if segments is not None:
                    ok &= segments[b, qpos] == segments[b, j]
                vis[b, i, j] = ok
    return vis


def numpy_attention(q, k, v, visible, scale):
    """float64 reference; `visible[b, i, j]` says whether query i may see key j."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for h in range(q.shape[2]):
            kh = h * k.shape[2] // q.shape[2]  # grouped-query: query head h uses kv head kh
            for i in range(q.shape[1]):
                keys = np.flatnonzero(visible[b, i])
                if keys.size == 0:
                    continue  # a query that sees nothing outputs zeros
                logits = scale * k[b, keys, kh] @ q[b, i, h]
                p = np.exp(logits - logits.max())
                out[b, i, h] = (p / p.sum()) @ v[b, keys, kh]
    return out


def dense_attention_grads(q, k, v, visible, scale, cotangent):
    """float64 d(sum(out * cotangent))/d(q, k, v) of a dense masked softmax attention."""

    def loss(q, k, v):
        group = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        vis = jnp.asarray(visible)[:, None]  # [b, 1, q, k]
        logits = jnp.where(vis, jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale, -jnp.inf)
        row_max = jnp.max(jnp.where(vis, logits, 0.0), axis=-1, keepdims=True)
        weights = jnp.exp(logits - jax.lax.stop_gradient(row_max))
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-300)
        return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", weights, v) * cotangent)

    with jax.enable_x64(True):
        args = [jnp.asarray(np.asarray(x, np.float64)) for x in (q, k, v)]
        return [np.asarray(g) for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*args)]
