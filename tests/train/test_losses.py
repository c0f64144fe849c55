"""CLIP loss against a float64 numpy formula."""

import jax
import jax.numpy as jnp
import numpy as np

from fomo_jax.train.losses import clip_loss


def numpy_clip_loss(image, text, logit_scale):
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = np.exp(logit_scale) * image @ text.T

    def ce(rows):  # mean over rows of -log softmax at the diagonal
        rows = rows - rows.max(axis=1, keepdims=True)
        log_p = rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))
        return -np.mean(np.diag(log_p))

    return 0.5 * (ce(logits) + ce(logits.T))


def test_matches_float64_formula():
    rng = np.random.default_rng(0)
    for batch, dim, scale in ((8, 16, np.log(1 / 0.07)), (33, 5, np.log(100.0)), (2, 3, 0.0)):
        image, text = rng.standard_normal((2, batch, dim))
        loss, metrics = clip_loss(
            jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32), jnp.float32(scale)
        )
        np.testing.assert_allclose(float(loss), numpy_clip_loss(image, text, scale), rtol=2e-6)


def test_asymmetric_directions_both_count():
    """Image->text and text->image differ on a non-symmetric similarity; both halves count."""
    rng = np.random.default_rng(1)
    image, text = rng.standard_normal((2, 6, 4))
    loss, _ = clip_loss(image, text, jnp.float32(2.0))
    swapped, _ = clip_loss(text, image, jnp.float32(2.0))
    np.testing.assert_allclose(float(loss), float(swapped), rtol=1e-6)  # symmetric by definition
    one_way = 0.5 * numpy_clip_loss(image, text, 2.0)
    assert abs(float(loss) - one_way) > 0.1


def test_gradient_wrt_logit_scale():
    rng = np.random.default_rng(2)
    image, text = rng.standard_normal((2, 7, 5))
    grad = jax.grad(lambda s: clip_loss(image, text, s)[0])(jnp.float32(1.5))
    eps = 1e-5
    numeric = (
        numpy_clip_loss(image, text, 1.5 + eps) - numpy_clip_loss(image, text, 1.5 - eps)
    ) / (2 * eps)
    np.testing.assert_allclose(float(grad), numeric, rtol=1e-3)


def test_perfect_alignment_metrics():
    emb = np.eye(4, dtype=np.float32)
    loss, metrics = clip_loss(emb, emb, jnp.float32(np.log(100.0)))
    assert float(metrics["i2t_accuracy"]) == 1.0 and float(metrics["t2i_accuracy"]) == 1.0
    np.testing.assert_allclose(float(loss), numpy_clip_loss(emb, emb, np.log(100.0)), atol=1e-7)
