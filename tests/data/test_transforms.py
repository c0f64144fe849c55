"""Image decoding and the train/test transforms (spec/fif.md §2.6), checked against plain PIL."""

import io
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, ImageFile

from fomo_jax.data import synthetic, transforms

BICUBIC, NEAREST, BILINEAR = (
    Image.Resampling.BICUBIC,
    Image.Resampling.NEAREST,
    Image.Resampling.BILINEAR,
)


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def encoded(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# ------------------------------------------------------------------------------ crop parameters


def test_crop_parameter_statistics():
    rng = np.random.default_rng(0)
    width, height = 256, 256
    draws = np.array(
        [transforms.random_resized_crop_params(rng, width, height) for _ in range(3000)]
    )
    left, top, w, h = draws.T
    area = w * h / (width * height)
    assert area.min() >= 0.9 - 0.01 and area.max() <= 1.0
    assert area.min() < 0.905 and area.max() > 0.99  # the whole scale range is used
    assert (w / h).min() >= 0.75 - 0.01 and (w / h).max() <= 4 / 3 + 0.01
    assert (left >= 0).all() and (top >= 0).all()
    assert (left + w <= width).all() and (top + h <= height).all()
    for pos, room in ((left, width - w), (top, height - h)):
        frac = pos[room > 0] / room[room > 0]
        assert frac.min() == 0.0 and frac.max() == 1.0  # both ends reachable (inclusive)
        assert abs(frac.mean() - 0.5) < 0.03


class ScriptedRng:
    """Returns given draws in order and records the ranges asked for."""

    def __init__(self, uniforms, integers):
        self.uniforms, self.integers_out, self.calls = list(uniforms), list(integers), []

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.uniforms.pop(0)

    def integers(self, low, high):
        self.calls.append(("integers", low, high))
        return self.integers_out.pop(0)


def test_crop_parameters_follow_torchvision_formula_and_draw_order():
    # On a 100x80 image the first draw (area 1.0, aspect 1.33) gives w = 103 > 100 and is
    # rejected; the second (area 0.9423, aspect 1.19) gives 95x80 (94.71 and 79.59 rounded).
    rng = ScriptedRng([1.0, math.log(1.33), 0.9423, math.log(1.19)], [3, 1])
    left, top, w, h = transforms.random_resized_crop_params(rng, 100, 80)
    assert (w, h) == (95, 80)
    # top is drawn before left, each with an exclusive upper bound of room + 1
    assert rng.calls[4:] == [("integers", 0, 80 - 80 + 1), ("integers", 0, 100 - 95 + 1)]
    assert (left, top) == (1, 3)
    assert rng.calls[0] == ("uniform", 0.9, 1.0)
    assert rng.calls[1] == pytest.approx(("uniform", math.log(3 / 4), math.log(4 / 3)))


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [(400, 20, (186, 0, 27, 20)), (20, 400, (0, 186, 20, 27))],
)
def test_crop_fallback_is_a_clamped_center_crop(width, height, expected):
    # No 90% crop with aspect in [3/4, 4/3] fits a 20:1 image, so all 10 attempts fail.
    rng = np.random.default_rng(1)
    assert transforms.random_resized_crop_params(rng, width, height) == expected


# ------------------------------------------------------------------------------ transforms


@pytest.mark.parametrize(
    ("width", "height", "resized", "box"),
    [
        (37, 53, (24, 34), (0, 5, 24, 29)),  # int(24 * 53 / 37) = 34
        (53, 37, (34, 24), (5, 0, 29, 24)),
        (37, 51, (24, 33), (0, 4, 24, 28)),  # round(4.5) = 4 (half to even)
        (37, 54, (24, 35), (0, 6, 24, 30)),  # round(5.5) = 6
        (24, 24, (24, 24), (0, 0, 24, 24)),  # already the right size
    ],
)
def test_test_transform_matches_pil_reference(width, height, resized, box):
    image = noise_image(width, height, seed=width * height)
    expected = np.asarray(image.resize(resized, BICUBIC).crop(box))
    out = transforms.test_transform(image, size=24)
    assert out.dtype == np.uint8 and out.shape == (24, 24, 3)
    np.testing.assert_array_equal(out, expected)
    if resized != (width, height):  # really bicubic: other filters give other pixels
        for other in (NEAREST, BILINEAR):
            assert not np.array_equal(out, np.asarray(image.resize(resized, other).crop(box)))


def test_test_transform_pads_small_images_with_zeros_like_torchvision():
    image = noise_image(37, 53, seed=5)
    resized = np.asarray(image.resize((24, 34), BICUBIC))
    expected = np.zeros((30, 30, 3), np.uint8)
    expected[:, 3:27] = resized[2:32]  # pad left (30 - 24) // 2 = 3; top round((34 - 30) / 2)
    np.testing.assert_array_equal(transforms.test_transform(image, size=24, crop=30), expected)


def test_train_transform_resamples_the_drawn_box_bicubically():
    image = noise_image(53, 37, seed=2)
    out = transforms.train_transform(image, np.random.default_rng(7), size=24)
    left, top, w, h = transforms.random_resized_crop_params(np.random.default_rng(7), 53, 37)
    box = (left, top, left + w, top + h)
    assert out.dtype == np.uint8 and out.shape == (24, 24, 3)
    np.testing.assert_array_equal(out, np.asarray(image.resize((24, 24), BICUBIC, box=box)))
    assert not np.array_equal(out, np.asarray(image.resize((24, 24), NEAREST, box=box)))
    # torchvision crops first; the box resize differs at most near the crop border
    cropped = np.asarray(image.crop(box).resize((24, 24), BICUBIC)).astype(int)
    diff = np.abs(out.astype(int) - cropped)
    assert diff[3:-3, 3:-3].max() <= 2 and diff.mean() < 4


def test_train_transform_is_deterministic_given_the_seed():
    image = noise_image(64, 48, seed=3)
    run = lambda seed: transforms.train_transform(image, np.random.default_rng(seed), size=32)
    np.testing.assert_array_equal(run(11), run(11))
    assert not np.array_equal(run(11), run(12))


def test_normalize_is_the_clip_normalization():
    assert transforms.normalize is synthetic.normalize
    batch = np.full((2, 4, 4, 3), 255, np.uint8)
    out = transforms.normalize(batch)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], (1 - transforms.CLIP_MEAN) / transforms.CLIP_STD)


# ------------------------------------------------------------------------------ decoding


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_bytes_and_paths(tmp_path, fmt):
    image = noise_image(20, 12, seed=4)
    data = encoded(image, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    for source in (data, str(path), path):
        out = transforms.decode_rgb(source)
        assert out.mode == "RGB" and out.size == (20, 12)
        if fmt == "PNG":
            np.testing.assert_array_equal(np.asarray(out), np.asarray(image))


def test_truncated_jpeg_decodes_without_changing_the_global_flag():
    data = encoded(noise_image(64, 64, seed=5), "JPEG", quality=90)
    cut = data[: len(data) * 6 // 10]
    with pytest.raises(OSError), Image.open(io.BytesIO(cut)) as strict:
        strict.load()  # really truncated for a strict PIL
    out = transforms.decode_rgb(cut)
    assert out.mode == "RGB" and out.size == (64, 64)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_concurrent_decodes_of_truncated_and_whole_images():
    whole = encoded(noise_image(48, 48, seed=6), "JPEG")
    cut = whole[: len(whole) // 2]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(transforms.decode_rgb, [whole, cut] * 40))
    assert all(o.size == (48, 48) for o in outs)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_undecodable_input_raises_value_error_naming_it(tmp_path):
    with pytest.raises(ValueError, match="laion/000123") as info:
        transforms.decode_rgb(b"not an image at all", name="laion/000123")
    assert "<bytes>" in str(info.value) and info.value.__cause__ is not None
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 garbage")
    with pytest.raises(ValueError, match="broken.jpg"):
        transforms.decode_rgb(path)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_become_rgb(mode):
    base = noise_image(10, 8, seed=7, mode="L" if mode == "L" else "RGBA")
    image = base.convert("RGB").convert("P") if mode == "P" else base
    out = transforms.decode_rgb(encoded(image, "PNG"))
    assert out.mode == "RGB" and out.size == (10, 8)
    if mode == "L":
        gray = np.asarray(base)
        assert all(np.array_equal(np.asarray(out)[..., c], gray) for c in range(3))
    if mode == "RGBA":
        np.testing.assert_array_equal(np.asarray(out), np.asarray(base)[..., :3])
