"""CLIP module: named variants, input checks, activations, parameter layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.models.clip import ACTIVATIONS, abstract_clip


def _count(cfg):
    _, params = params_lib.split(abstract_clip(cfg))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize(
    "name,count",
    [
        # OpenCLIP's published parameter counts (open_clip model profile table).
        ("ViT-B-32", 151_277_313),
        ("ViT-B-16", 149_620_737),
        ("ViT-L-14", 427_616_513),
        ("ViT-H-14", 986_109_441),
    ],
)
def test_variant_parameter_counts_match_openclip(name, count):
    assert _count(models.get_config(name)) == count


def test_quickgelu_suffix_and_unknown_names():
    assert models.get_config("ViT-B-16-quickgelu").activation == "quick_gelu"
    assert models.get_config("ViT-B-16").activation == "gelu"
    with pytest.raises(ValueError, match="ViT-Q-99"):
        models.get_config("ViT-Q-99")


def test_activation_formulas():
    x = np.linspace(-4, 4, 41)
    np.testing.assert_allclose(
        ACTIVATIONS["gelu"](x), 0.5 * x * (1 + erf(x / np.sqrt(2))), atol=1e-6
    )
    np.testing.assert_allclose(
        ACTIVATIONS["quick_gelu"](x), x / (1 + np.exp(-1.702 * x)), atol=1e-6
    )
    tanh = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    np.testing.assert_allclose(ACTIVATIONS["gelu_tanh"](x), tanh, atol=1e-6)


def test_config_validation():
    cfg = models.get_config("tiny")
    with pytest.raises(ValueError, match="heads"):
        cfg.replace(vision=cfg.vision.__class__(32, 8, 64, 2, 3, 128))
    with pytest.raises(ValueError, match="patch_size"):
        cfg.replace(vision=cfg.vision.__class__(30, 8, 64, 2, 2, 128))
    with pytest.raises(ValueError, match="swish"):
        cfg.replace(activation="swish")


def test_input_shapes_are_checked(tiny_model):
    with pytest.raises(ValueError, match=r"\[batch, 32, 32, 3\]"):
        tiny_model.encode_image(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="context 16"):
        tiny_model.encode_text(np.zeros((1, 17), np.int32))


def test_text_pools_at_eot_and_ignores_padding(tiny_model):
    """Causal attention + EOT pooling: tokens after the EOT cannot change the embedding."""
    ids = np.array([[257, 10, 20, 258, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]], np.int32)
    other = ids.copy()
    other[0, 4:] = np.arange(1, 13)  # garbage after the EOT
    a, b = tiny_model.encode_text(ids), tiny_model.encode_text(other)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    shorter = ids.copy()
    shorter[0, 2:4] = [258, 0]  # EOT earlier: a different pooled token
    assert np.abs(np.asarray(tiny_model.encode_text(shorter)) - np.asarray(a)).max() > 1e-3


def test_encode_text_trims_padding_exactly(tiny_model):
    rng = np.random.default_rng(0)
    ids = np.zeros((4, 16), np.int32)
    ids[:, 0] = 257
    for row, eot in enumerate([2, 5, 3, 4]):  # the batch needs 6 tokens -> bucket of 8
        ids[row, 1:eot] = rng.integers(1, 257, eot - 1)
        ids[row, eot] = 258
    full = np.asarray(tiny_model.text(ids)[0])
    np.testing.assert_allclose(np.asarray(tiny_model.encode_text(ids)), full, atol=1e-5)
    ids[0, 12], ids[0, 13] = 7, 258  # one long caption: no trimming possible
    full = np.asarray(tiny_model.text(ids)[0])
    np.testing.assert_allclose(np.asarray(tiny_model.encode_text(ids)), full, atol=1e-5)


def test_call_returns_embeddings_and_intermediates(tiny_model):
    pixels = jnp.zeros((2, 32, 32, 3))
    ids = jnp.array([[257, 5, 258] + [0] * 13] * 2, jnp.int32)
    image, text, out = tiny_model(pixels, ids)
    assert image.shape == text.shape == (2, 32)
    assert out["image"]["tokens"].shape == (2, 17, 64)
    assert out["text"]["pre_logits"].shape == (2, 64)
    image_only, none, _ = tiny_model(pixels)
    assert none is None and np.allclose(image_only, image)


def test_params_round_trip_through_paths(tiny_model):
    graphdef, params = params_lib.split(tiny_model)
    flat = params_lib.flatten(params)
    assert "image/transformer/resblocks/1/attn/q_proj/kernel" in flat
    rebuilt = params_lib.unflatten(flat)
    model = params_lib.merge(graphdef, rebuilt)
    ids = jnp.array([[257, 5, 258] + [0] * 13], jnp.int32)
    np.testing.assert_array_equal(model.encode_text(ids), tiny_model.encode_text(ids))
