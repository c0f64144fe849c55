"""Image decoding and the benchmark's train/test transforms (spec/fif.md §2.6).

The reference uses torchvision on PIL images; torchvision is not available here, so the crop
parameters are re-derived with torchvision's exact algorithm (drawing from a numpy Generator
instead of torch's global RNG) and the resampling is done by PIL, which is what torchvision
calls for PIL inputs anyway. Output is uint8 HWC; `normalize` turns a batch into float32.
"""

from __future__ import annotations

import io
import math
import os
import threading

import numpy as np
from PIL import Image, ImageFile

from fomo_jax.data.synthetic import CLIP_MEAN, CLIP_STD, normalize

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "decode_rgb",
    "normalize",
    "random_resized_crop_params",
    "test_transform",
    "train_transform",
]

TRAIN_SCALE = (0.9, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)

# Serialises the (rare) decodes that need PIL's process-global truncation flag; see decode_rgb.
_TRUNCATED_LOCK = threading.Lock()


def _load_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.convert("RGB")


class UndecodableImage(ValueError):
    """Image data that PIL cannot decode (a missing file is an OSError, not this)."""


def decode_rgb(data: bytes | str | os.PathLike, *, name: str | None = None) -> Image.Image:
    """Decode an image from bytes or a path as RGB, tolerating truncated files.

    PIL only tolerates truncation through the process-global `ImageFile.LOAD_TRUNCATED_IMAGES`.
    Rather than setting it at import (which would change every other PIL user in the process),
    a decode is first tried strictly; only if that fails is it retried with the flag raised,
    under a module lock, and the previous value restored in `finally`. The lock makes our own
    concurrent retries safe (one thread cannot reset the flag while another still needs it);
    other threads decoding at that instant may also see the flag raised, which only makes them
    more tolerant for a few milliseconds and only while a truncated file is being decoded.

    `name` labels byte inputs in error messages (e.g. "laion/000123"); paths name themselves.
    Raises `UndecodableImage` (a ValueError, chained to PIL's error) when the data cannot be
    decoded at all.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        label = f"<bytes> {name}" if name else "<bytes>"
        payload = bytes(data)
    else:
        label = os.fspath(data) if name is None else f"{os.fspath(data)} ({name})"
        with open(data, "rb") as f:
            payload = f.read()
    try:
        return _load_rgb(payload)
    except Exception as strict_error:  # PIL raises OSError, SyntaxError, ValueError, ...
        with _TRUNCATED_LOCK:
            previous = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = True
            try:
                return _load_rgb(payload)
            except Exception:  # still undecodable: report the strict error below
                pass
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
        raise UndecodableImage(f"cannot decode image {label}: {strict_error}") from strict_error


def random_resized_crop_params(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h) by torchvision's RandomResizedCrop.get_params algorithm.

    Up to 10 draws of (area fraction, log-aspect); the first crop that fits is placed uniformly.
    If none fits (very elongated images), the largest centred crop with the aspect clamped to
    `ratio` is used. Python's round (half to even) is kept, as in torchvision.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def train_transform(
    image: Image.Image,
    rng: np.random.Generator,
    size: int = 224,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
) -> np.ndarray:
    """RandomResizedCrop(size, scale, ratio, bicubic) -> uint8 [size, size, 3].

    The crop box is resampled in one PIL call (`resize(..., box=...)`), antialiased like
    torchvision's crop-then-resize. The filter may read a few source pixels just outside the
    box, where torchvision's crop would clamp at the crop edge, so border pixels can differ by a
    little; the spec asks for the exact crop parameters, not bit-exact pixels.
    """
    left, top, w, h = random_resized_crop_params(rng, image.width, image.height, scale, ratio)
    box = (left, top, left + w, top + h)
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC, box=box))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(int): shorter side -> size, longer side int(size * long / short)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, crop: int) -> Image.Image:
    """torchvision CenterCrop(crop), including its zero padding of too-small images.

    torchvision pads a too-small side by (crop - side) // 2 before and the rest after, then
    crops at offset 0 on that side; other sides are cropped at round((side - crop) / 2).
    PIL's crop fills everything outside the image with zeros, so both cases are one crop box.
    """
    w, h = image.size

    def offset(side: int) -> int:
        return -((crop - side) // 2) if crop > side else int(round((side - crop) / 2.0))

    left, top = offset(w), offset(h)
    return image.crop((left, top, left + crop, top + crop))


def test_transform(image: Image.Image, size: int = 224, crop: int | None = None) -> np.ndarray:
    """Resize(size, bicubic) then CenterCrop(crop or size) -> uint8 [crop, crop, 3]."""
    crop = size if crop is None else crop
    return np.asarray(center_crop(resize_shorter_side(image, size), crop))


test_transform.__test__ = False  # a transform, not a pytest test, when imported into tests
