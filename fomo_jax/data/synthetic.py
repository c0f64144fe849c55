"""Procedural image-text pairs: a learnable contrastive task that needs no download.

Each concept is a (colour, shape) pair; an example draws that shape in that colour at a
random position and size on a noisy background, captioned with a random template naming
both. Examples are a pure function of (seed, index), so the source supports grain's random
access, shuffling and exact resume.
"""

from __future__ import annotations

import numpy as np

from fomo_jax.models.clip import CLIP_MEAN, CLIP_STD

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("disk", "square", "ring", "cross", "bars")
TEMPLATES = ("{color} {shape}", "a {color} {shape}", "the {shape}, {color}")


def shape_mask(shape: str, size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """Boolean mask of `shape` centred at (cy, cx) with the given radius, size x size."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius * 0.8) & (np.abs(dx) <= radius * 0.8)
    if shape == "ring":
        dist = np.sqrt(dy**2 + dx**2)
        return (dist <= radius) & (dist >= radius * 0.6)
    if shape == "cross":
        arm = radius * 0.3
        inside = (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
        return inside & ((np.abs(dy) <= arm) | (np.abs(dx) <= arm))
    if shape == "bars":
        return (np.abs(dy) <= radius) & (np.abs(dx) <= radius) & ((xx // 3) % 2 == 0)
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """`shape_mask` at a random centre and radius."""
    radius = rng.uniform(0.2, 0.35) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    return shape_mask(shape, size, cy, cx, radius)


class SyntheticPairs:
    """A random-access source of {"image": uint8 [S, S, 3], "text": str, "label": int}."""

    def __init__(self, num_examples: int, image_size: int, seed: int = 0):
        self.num_examples = num_examples
        self.image_size = image_size
        self.seed = seed
        self.concepts = [(c, s) for c in COLORS for s in SHAPES]

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"index {index} out of range for {self.num_examples} examples")
        rng = np.random.default_rng((self.seed, index))
        label = int(rng.integers(len(self.concepts)))
        color, shape = self.concepts[label]
        background = rng.integers(60, 200, 3)
        noise = rng.normal(0, 25, (self.image_size, self.image_size, 3))
        image = np.clip(background + noise, 0, 255)
        image[_shape_mask(shape, self.image_size, rng)] = COLORS[color]
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        return {
            "image": image.astype(np.uint8),
            "text": template.format(color=color, shape=shape),
            "label": label,
        }


def normalize(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 normalized with the CLIP statistics."""
    return (images_uint8.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD
