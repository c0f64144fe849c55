"""Procedural image-text pairs for the default job."""

import numpy as np
import pytest

from fomo_jax.data import synthetic


def test_examples_are_a_function_of_seed_and_index():
    a, b = synthetic.SyntheticPairs(50, 32, seed=3), synthetic.SyntheticPairs(50, 32, seed=3)
    for i in (0, 17, 49):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        assert a[i]["text"] == b[i]["text"]
    c = synthetic.SyntheticPairs(50, 32, seed=4)
    assert any(not np.array_equal(a[i]["image"], c[i]["image"]) for i in range(5))


def test_caption_names_the_drawn_concept():
    source = synthetic.SyntheticPairs(40, 32, seed=0)
    for i in range(40):
        example = source[i]
        color, shape = source.concepts[example["label"]]
        assert color in example["text"] and shape in example["text"]
        painted = np.all(example["image"] == synthetic.COLORS[color], axis=-1)
        assert painted.sum() > 10  # the shape is really there in its colour


def test_normalization():
    white = synthetic.normalize(np.full((1, 1, 1, 3), 255, np.uint8))[0, 0, 0]
    np.testing.assert_allclose(white, (1 - synthetic.CLIP_MEAN) / synthetic.CLIP_STD, rtol=1e-6)


def test_index_out_of_range():
    with pytest.raises(IndexError, match="10"):
        synthetic.SyntheticPairs(10, 32)[10]
