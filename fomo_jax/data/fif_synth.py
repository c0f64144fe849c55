"""fif_synth: a small FoMo-in-Flux benchmark, generated procedurally in the released layout.

`generate(root)` writes, in seconds and with no download, everything the real benchmark has:
info JSONs and class lists (`00_info/`), image folders (`<NAME>/<split>/<class>/*.jpg`), a stream
file (`streams/random_sequence_1.json`), a pretraining pool of WebDataset tar shards
(`pretraining/`), and `datasets.json`, the registry of its datasets. It is read through the
same reader as real data (`fif.load_split(root, ..., datasets=load_datasets(root))`).

Design: continual-learning effects must be visible with a tiny CLIP on a CPU.
- The pretraining pool is the "web": single objects and pairs of objects, each one of 8
  colours x 5 shapes (disk, square, ring, cross, bars) on a noisy photo background, captioned
  with varied templates that name colour and shape.
- The evaluation-only sets ask zero-shot about those general concepts: object (40-way),
  shape (5-way), colour (8-way), objects in a shifted domain (small, on a white page), and
  image-caption retrieval on object pairs (3 captions per image). A model pretrained on the
  pool scores well above chance on them.
- The adaptation sets carry concepts the pool never names, each in its own visual domain:
  glyphs (new shapes), textures (full-frame patterns), letters (printed glyphs on paper) and
  counting (white dots on black). A pretrained model is near chance on them. Their images
  reuse the pool's colours but their captions never name a colour, so training on them
  (without enough replay) teaches the model to ignore colour: zero-shot skills measurably
  decay while the new concepts are learned. That is the trade-off the benchmark measures.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
import os
import time
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fomo_jax.data import registry, webdataset
from fomo_jax.data.synthetic import COLORS, SHAPES, shape_mask

VERSION = 2

GLYPHS = ("triangle", "star", "diamond", "hexagon", "crescent", "arrow", "heart", "pentagon")
TEXTURES = ("stripes", "checkerboard", "polka dots", "zigzag", "grid", "diagonal lines", "waves")
LETTERS = tuple("ABCDEFGHKM")
NUMBERS = ("one", "two", "three", "four", "five", "six")

POOL_SINGLE = (
    "a {c} {s}",
    "A photo of a {c} {s}.",
    "{c} {s}",
    "a {s} that is {c}",
    "A photo of a {s}.",
    "A photo of something {c}.",
)
POOL_PAIR = (
    "a {c} {s} and a {c2} {s2}",
    "A photo of a {c} {s} next to a {c2} {s2}.",
    "a {c2} {s2} and a {c} {s}",
)


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    key: str
    name: str
    role: str
    task: str
    classes: tuple[str, ...]
    template: str
    train_per_class: int  # 0: evaluation-only (no train split)
    test_per_class: int
    release_period: int | None = None


def specs(train_per_class: int = 80, test_per_class: int = 20) -> list[SynthSpec]:
    objects = tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
    adapt = dict(train_per_class=train_per_class, test_per_class=test_per_class)
    return [
        SynthSpec("synth_glyphs", "SYNTH_GLYPHS", "adaptation", "classification", GLYPHS,
                  "A photo of a {}.", release_period=0, **adapt),
        SynthSpec("synth_textures", "SYNTH_TEXTURES", "adaptation", "classification", TEXTURES,
                  "A photo of a {} texture.", release_period=1, **adapt),
        SynthSpec("synth_letters", "SYNTH_LETTERS", "adaptation", "classification", LETTERS,
                  "A photo of the letter {}.", release_period=2, **adapt),
        SynthSpec("synth_counting", "SYNTH_COUNTING", "adaptation", "classification", NUMBERS,
                  "A photo of {} dots.", release_period=3, **adapt),
        SynthSpec("synth_objects", "SYNTH_OBJECTS", "evaluation", "classification", objects,
                  "A photo of a {}.", 0, 10),
        SynthSpec("synth_shapes", "SYNTH_SHAPES", "evaluation", "classification", SHAPES,
                  "A photo of a {}.", 0, 40),
        SynthSpec("synth_colors", "SYNTH_COLORS", "evaluation", "classification",
                  tuple(COLORS), "A photo of something {}.", 0, 25),
        SynthSpec("synth_objects_page", "SYNTH_OBJECTS_PAGE", "evaluation", "classification",
                  objects, "A photo of a {}.", 0, 5),
        SynthSpec("synth_pairs", "SYNTH_PAIRS", "evaluation", "retrieval", ("pair",),
                  "{}", 0, 200),
    ]  # fmt: skip


def to_registry(spec_list: list[SynthSpec]) -> dict[str, registry.DatasetInfo]:
    return {
        s.key: registry.DatasetInfo(
            key=s.key,
            name=s.name,
            role=s.role,
            num_train=s.train_per_class * len(s.classes),
            num_test=s.test_per_class * len(s.classes),
            num_classes=0 if s.task == "retrieval" else len(s.classes),
            stream_classes=len(s.classes) if s.role == "adaptation" else None,
            resized=False,
            train_split="train" if s.train_per_class else None,
            test_split="test",
            task=s.task,
            release_period=s.release_period,
            template=s.template,
        )
        for s in spec_list
    }


# ---------------------------------------------------------------------------------- drawing


def _rng(seed: int, *parts) -> np.random.Generator:
    words = [seed] + [zlib.crc32(p.encode()) if isinstance(p, str) else p for p in parts]
    return np.random.default_rng(words)


def _photo_background(rng, size):
    background = rng.integers(60, 200, 3)
    return np.clip(background + rng.normal(0, 25, (size, size, 3)), 0, 255)


def _polygon(points, size):
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in points], fill=255)
    return np.asarray(canvas) > 127


def _glyph_mask(glyph: str, size: int, rng) -> np.ndarray:
    radius = rng.uniform(0.28, 0.4) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    turn = rng.uniform(-0.25, 0.25)

    def ring(n, r, phase=0.0):
        a = phase + turn + np.arange(n) * 2 * np.pi / n
        return np.stack([cx + r * np.sin(a), cy - r * np.cos(a)], 1)

    if glyph == "triangle":
        return _polygon(ring(3, radius), size)
    if glyph == "diamond":
        return _polygon(ring(4, radius), size)
    if glyph == "pentagon":
        return _polygon(ring(5, radius), size)
    if glyph == "hexagon":
        return _polygon(ring(6, radius), size)
    if glyph == "star":
        outer, inner = ring(5, radius), ring(5, radius * 0.4, np.pi / 5)
        return _polygon(np.stack([outer, inner], 1).reshape(-1, 2), size)
    if glyph == "arrow":
        body = [
            (-0.2, 1),
            (0.2, 1),
            (0.2, -0.1),
            (0.55, -0.1),
            (0, -1),
            (-0.55, -0.1),
            (-0.2, -0.1),
        ]
        c, s = np.cos(turn), np.sin(turn)
        pts = [(cx + radius * (x * c - y * s), cy + radius * (x * s + y * c)) for x, y in body]
        return _polygon(pts, size)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    if glyph == "crescent":
        outer = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        shift = 0.45 * radius
        bite = (yy - cy + shift * np.sin(turn)) ** 2 + (xx - cx - shift * np.cos(turn)) ** 2
        return outer & (bite > (0.85 * radius) ** 2)
    if glyph == "heart":
        r = radius * 0.52
        lobes = ((yy - cy + 0.3 * radius) ** 2 + (xx - cx + r * 0.9) ** 2 <= r**2) | (
            (yy - cy + 0.3 * radius) ** 2 + (xx - cx - r * 0.9) ** 2 <= r**2
        )
        tip = _polygon(
            [(cx - 1.85 * r, cy - 0.1 * radius), (cx + 1.85 * r, cy - 0.1 * radius),
             (cx, cy + radius)], size)  # fmt: skip
        return lobes | tip
    raise ValueError(f"unknown glyph {glyph!r}")


def _texture(name: str, size: int, rng) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    period = rng.uniform(5, 9)
    py, px = rng.uniform(0, period, 2)
    y, x = yy + py, xx + px
    if name == "stripes":
        on = np.sin(2 * np.pi * x / period) > 0
    elif name == "checkerboard":
        on = (np.floor(x / period * 1.5) + np.floor(y / period * 1.5)) % 2 == 0
    elif name == "polka dots":
        cell = period * 1.2
        on = (x % cell - cell / 2) ** 2 + (y % cell - cell / 2) ** 2 <= (cell * 0.28) ** 2
    elif name == "zigzag":
        on = np.sin(2 * np.pi * (y + np.abs((x % period) - period / 2) * 2) / period) > 0
    elif name == "grid":
        on = (x % period < 1.6) | (y % period < 1.6)
    elif name == "diagonal lines":
        on = np.sin(2 * np.pi * (x + y) / period) > 0.3
    elif name == "waves":
        on = np.sin(2 * np.pi * (y + 2.5 * np.sin(2 * np.pi * x / (2 * period))) / period) > 0
    else:
        raise ValueError(f"unknown texture {name!r}")
    colors = list(COLORS.values())
    a, b = rng.choice(len(colors), 2, replace=False)
    image = np.where(on[..., None], colors[a], colors[b]).astype(np.float32)
    return np.clip(image + rng.normal(0, 10, image.shape), 0, 255)


_FONTS: dict[int, ImageFont.FreeTypeFont] = {}


def _letter(letter: str, size: int, rng) -> np.ndarray:
    font_size = int(size * rng.uniform(0.6, 0.8))
    font = _FONTS.setdefault(font_size, ImageFont.load_default(size=font_size))
    canvas = Image.new("L", (size, size), 0)
    center = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
    ImageDraw.Draw(canvas).text(tuple(center), letter, fill=255, font=font, anchor="mm")
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
    ink = np.asarray(canvas, np.float32)[..., None] / 255
    paper = rng.uniform(215, 250) + rng.normal(0, 6, (size, size, 1))
    color = np.array(list(COLORS.values())[int(rng.integers(len(COLORS)))], np.float32)
    color = np.minimum(color, 180)  # readable on paper
    return np.clip(paper * (1 - ink) + color * ink, 0, 255)


def _dots(count: int, size: int, rng) -> np.ndarray:
    image = np.clip(rng.uniform(0, 40) + rng.normal(0, 8, (size, size, 3)), 0, 255)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    radius = size / 14
    centers: list[np.ndarray] = []
    while len(centers) < count:
        c = rng.uniform(radius + 1, size - radius - 1, 2)
        if all(np.sum((c - o) ** 2) > (2.6 * radius) ** 2 for o in centers):
            centers.append(c)
    for cy, cx in centers:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 240
    return image


def _objects(size: int, rng, concepts, page: bool = False) -> np.ndarray:
    """One object per concept ((colour, shape) pairs), side by side when there are two."""
    image = (
        np.clip(rng.uniform(225, 250) + rng.normal(0, 4, (size, size, 3)), 0, 255)
        if page
        else _photo_background(rng, size)
    )
    n = len(concepts)
    for i, (color, shape) in enumerate(concepts):
        scale = (0.12, 0.2) if page else ((0.2, 0.35) if n == 1 else (0.14, 0.2))
        radius = rng.uniform(*scale) * size
        lo, hi = i * size / n + radius, (i + 1) * size / n - radius
        cx = rng.uniform(lo, max(lo, hi))
        cy = rng.uniform(radius, size - radius)
        image[shape_mask(shape, size, cy, cx, radius)] = COLORS[color]
    return image


# ------------------------------------------------------------------------------- examples


def _draw(spec: SynthSpec, target: int, size: int, rng) -> tuple[np.ndarray, list, list]:
    """(image, synthetic captions, merged captions) of one example of a dataset."""
    name = spec.classes[target]
    if spec.key == "synth_glyphs":
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        image = _photo_background(rng, size)
        image[_glyph_mask(name, size, rng)] = COLORS[color]
        return image, [f"a {color} shape"], [f"A photo of a {name}.", f"a {name} on a background"]
    if spec.key == "synth_textures":
        merged = [spec.template.format(name), f"a {name} pattern"]
        return _texture(name, size, rng), ["a colourful pattern"], merged
    if spec.key == "synth_letters":
        merged = [spec.template.format(name), f"the letter {name} printed on paper"]
        return _letter(name, size, rng), ["a character on paper"], merged
    if spec.key == "synth_counting":
        merged = [spec.template.format(name), f"{name} dots on a dark background"]
        return _dots(NUMBERS.index(name) + 1, size, rng), ["bright dots"], merged
    colors, shapes = list(COLORS), list(SHAPES)
    if spec.key in ("synth_objects", "synth_objects_page"):
        concept = tuple(name.split(" "))
        image = _objects(size, rng, [concept], page=spec.key == "synth_objects_page")
    elif spec.key == "synth_shapes":
        color = colors[int(rng.integers(len(colors)))]
        image = _objects(size, rng, [(color, name)])
    elif spec.key == "synth_colors":
        shape = shapes[int(rng.integers(len(shapes)))]
        image = _objects(size, rng, [(name, shape)])
    else:
        raise ValueError(f"no drawing for {spec.key!r}")
    return image, [name], [spec.template.format(name)]


def _pair_example(size: int, rng) -> tuple[np.ndarray, list[str]]:
    colors, shapes = list(COLORS), list(SHAPES)
    (c, c2), (s, s2) = rng.choice(colors, 2, replace=False), rng.choice(shapes, 2)
    image = _objects(size, rng, [(c, s), (c2, s2)])
    return image, [t.format(c=c, s=s, c2=c2, s2=s2) for t in POOL_PAIR]


def pool_example(seed: int, index: int, size: int) -> tuple[np.ndarray, str]:
    """One pretraining pair: 70% single objects, 30% pairs, with a random caption template."""
    rng = _rng(seed, "pretraining", index)
    if rng.uniform() < 0.3:
        image, captions = _pair_example(size, rng)
        return image, captions[int(rng.integers(len(captions)))]
    c = list(COLORS)[int(rng.integers(len(COLORS)))]
    s = SHAPES[int(rng.integers(len(SHAPES)))]
    template = POOL_SINGLE[int(rng.integers(len(POOL_SINGLE)))]
    return _objects(size, rng, [(c, s)]), template.format(c=c, s=s)


def _jpeg(image: np.ndarray) -> bytes:
    """JPEG like most released images; 4:4:4 chroma keeps the colours of 40-px objects."""
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="JPEG", quality=90, subsampling=0)
    return buffer.getvalue()


def _write_split(root, spec: SynthSpec, split: str, per_class: int, seed: int, size) -> dict:
    """Write one split's images; returns its info JSON (image path -> record)."""
    records = {}
    for target, name in enumerate(spec.classes):
        folder = name.replace(" ", "_")
        os.makedirs(os.path.join(root, spec.name, split, folder), exist_ok=True)
        for i in range(per_class):
            rng = _rng(seed, spec.key, split, target, i)
            key = f"{split}/{folder}/{i:04d}.jpg"
            if spec.task == "retrieval":
                image, captions = _pair_example(size, rng)
                record = dict(
                    classname=None,
                    default_caption=captions,
                    primer_caption=None,
                    synthetic_caption=None,
                    synthetic_merged_caption=None,
                    target=0,
                )
            else:
                image, synthetic, merged = _draw(spec, target, size, rng)
                record = dict(
                    classname=name,
                    default_caption=None,
                    primer_caption=spec.template.format(name),
                    synthetic_caption=synthetic,
                    synthetic_merged_caption=merged,
                    target=target,
                )
            with open(os.path.join(root, spec.name, key), "wb") as f:
                f.write(_jpeg(image))
            records[key] = record
    return records


def _write_pool_shard(path: str, seed: int, first: int, count: int, size: int) -> None:
    samples = []
    for i in range(first, first + count):
        image, text = pool_example(seed, i, size)
        samples.append({"__key__": f"{i:08d}", "jpg": _jpeg(image), "txt": text})
    webdataset.write_shard(path, samples)


def _run(job):
    kind, args = job
    return (_write_split if kind == "split" else _write_pool_shard)(*args)


def generate(
    root: str,
    *,
    seed: int = 0,
    image_size: int = 40,
    train_per_class: int = 80,
    test_per_class: int = 20,
    pool_size: int = 20_000,
    samples_per_shard: int = 2_500,
    workers: int | None = None,
) -> dict:
    """Write the benchmark under `root` (deterministic in its arguments). Returns its manifest.

    Reuses an existing benchmark generated with the same arguments (see `manifest.json`).
    `workers` processes draw images in parallel (default: one per core); the output does not
    depend on it.
    """
    params = dict(
        version=VERSION,
        seed=seed,
        image_size=image_size,
        train_per_class=train_per_class,
        test_per_class=test_per_class,
        pool_size=pool_size,
        samples_per_shard=samples_per_shard,
    )
    manifest_path = os.path.join(root, "manifest.json")
    if os.path.exists(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("params") == params:
            return manifest
        os.remove(manifest_path)  # regenerating: a half-written benchmark has no manifest
    start = time.perf_counter()
    info_dir = os.path.join(root, "00_info")
    pool_dir = os.path.join(root, "pretraining")
    os.makedirs(info_dir, exist_ok=True)
    os.makedirs(pool_dir, exist_ok=True)
    for stale in os.listdir(pool_dir):
        os.remove(os.path.join(pool_dir, stale))

    spec_list = specs(train_per_class, test_per_class)
    jobs, split_names = [], []
    for spec in spec_list:
        for split, per_class in (("train", spec.train_per_class), ("test", spec.test_per_class)):
            if per_class:
                jobs.append(("split", (root, spec, split, per_class, seed, image_size)))
                split_names.append(f"{spec.name}_{split}.json")
    shard_names = []
    for k, first in enumerate(range(0, pool_size, samples_per_shard)):
        shard_names.append(f"shard-{k:06d}.tar")
        count = min(samples_per_shard, pool_size - first)
        path = os.path.join(pool_dir, shard_names[-1])
        jobs.append(("shard", (path, seed, first, count, image_size)))

    workers = workers or os.cpu_count() or 1
    if workers > 1:
        context = multiprocessing.get_context("spawn")  # the parent may hold JAX threads
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            outputs = list(pool.map(_run, jobs))
    else:
        outputs = [_run(job) for job in jobs]
    for name, records in zip(split_names, outputs, strict=False):
        with open(os.path.join(info_dir, name), "w") as f:
            json.dump(records, f, indent=1)
    for spec in spec_list:
        if spec.task == "classification":
            with open(os.path.join(info_dir, f"{spec.name}_classnames.json"), "w") as f:
                json.dump(list(spec.classes), f, indent=1)
    datasets = to_registry(spec_list)
    registry.save_datasets(datasets, os.path.join(root, "datasets.json"))

    entries = [f"{s.name}+++{c}" for s in spec_list if s.role == "adaptation" for c in s.classes]
    order = _rng(seed, "stream").permutation(len(entries))
    os.makedirs(os.path.join(root, "streams"), exist_ok=True)
    with open(os.path.join(root, "streams", "random_sequence_1.json"), "w") as f:
        json.dump([entries[i] for i in order], f, indent=1)

    manifest = dict(
        params=params,
        datasets=sorted(datasets),
        shards=shard_names,
        stream="streams/random_sequence_1.json",
        seconds=round(time.perf_counter() - start, 2),
    )
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load_datasets(root: str) -> dict[str, registry.DatasetInfo]:
    """The registry of a generated benchmark (pass it as `datasets=` to readers)."""
    return registry.load_datasets(os.path.join(root, "datasets.json"))
