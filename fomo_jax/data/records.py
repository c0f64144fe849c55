"""Record shards: any split turned once into a few ArrayRecord files, read back with grain.

The real benchmark is ≈1.8M small image files (spec/fif.md §12 item 22). Opening each of them
every epoch is slow on most file systems, so `convert` writes a split as pre-resized JPEGs in a
handful of ArrayRecord shards, and `RecordSource` reads them back by random access through
`grain.sources.ArrayRecordDataSource`.

Record schema (schema version 1): every ArrayRecord record is one msgpack map

    image      bytes      baseline JPEG, RGB; the shorter side resized to `image_size` (bicubic,
                          aspect kept, long side rounded), never upscaled; original size when
                          `image_size` is None
    captions   [str]      the candidate training texts, verbatim, in source order
    target     int        class id (-1 when the source has no labels)
    classname  str | nil  class name, when the source has one
    dataset    str        dataset key (registry key, "synthetic" or the tfds name)
    key        str        the entry's id in its source: info-JSON key, or the source index

JPEGs are written at quality 95 with 4:4:4 chroma (no subsampling). Pillow's default 4:2:0 halves
the colour resolution, which at 224 px smears small coloured details (thin strokes in diagrams,
signs, the synthetic shapes); keeping it costs 25-50% more bytes (measured: ≈39 KB instead of
≈28 KB for a noisy 298x224 photo), a fair price for a one-time conversion. EXIF orientation is
ignored, as in the reference, which decodes with a plain `Image.open(...).convert("RGB")`.

Folder layout:

    manifest.json                           written last; its presence means "complete"
    records-00000-of-00004.array_record     the shards, records in source order
    records-00000-of-00004.done.json        per-shard bookkeeping that makes a rerun resumable

`manifest.json` holds: schema_version, source (a JSON description; also part of the plan a rerun
must match), dataset, split, num_records, num_source_entries, num_shards, shards (file,
num_records, source-index range, sha256 of its records), image_size, quality, chroma_subsampling,
encoder, classnames (index = target; null when unknown), caption_fallbacks (entries whose text is
the primed class name, spec §2.5), skipped (dataset, key, reason and the index in the source
sequence, null for entries the source itself left out), content_sha256 (over the shard hashes) and
targets (one per record, so pools can group by class without reading the records).

A rerun of the same conversion keeps every shard whose bookkeeping and record count agree with
the plan and writes only the others. Shards are written under a temporary dot-name and renamed
into place, so an interrupted run leaves no partial shard behind.
"""

from __future__ import annotations

import argparse
import bisect
import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from typing import Any

import grain
import msgpack
import numpy as np
import PIL
from array_record.python import array_record_module
from PIL import Image

from fomo_jax.data import fif, registry, synthetic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_RECORDS_PER_SHARD = 1000  # ≈40 MB of 224 px JPEGs at quality 95
# grain reads one record at a time; larger groups make every random read decode a whole group.
_WRITER_OPTIONS = "group_size:1"
# Errors that mean "this image cannot be read", as opposed to a bug in an adapter.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class BadImageError(ValueError):
    """An entry whose image is missing or cannot be decoded."""


# ---------------------------------------------------------------------------------------------
# Sources


@dataclasses.dataclass(frozen=True)
class Example:
    """One source entry, ready to be encoded.

    `image` is a file path, encoded image bytes, a uint8 array (HW, HW1 or HW3) or a PIL image;
    `origin` names it in error messages (the file path, or where in the source it came from).
    """

    image: str | bytes | np.ndarray | Image.Image
    captions: list[str]
    target: int
    classname: str | None
    dataset: str
    key: str
    origin: str


@dataclasses.dataclass(frozen=True)
class Source:
    """A random-access sequence of source items and the adapter turning item i into an Example.

    `description` identifies the source (JSON): it goes into the manifest and into the plan a
    rerun must match before it reuses shards. `skipped` and `fallbacks` carry what was noticed
    before conversion (e.g. missing files left out by `fif.load_split`).
    """

    items: Sequence[Any]
    adapter: Callable[[int, Any], Example]
    description: dict
    dataset: str
    classnames: list[str] | None = None
    skipped: tuple[tuple[str, str], ...] = ()
    fallbacks: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def example(self, index: int) -> Example:
        return self.adapter(index, self.items[index])


def _fif_example(index: int, record: fif.Record) -> Example:
    return Example(
        image=record.image,
        captions=list(record.captions),
        target=record.target,
        classname=record.classname,
        dataset=record.dataset,
        key=record.key,
        origin=record.image_path,
    )


def from_fif_split(split: fif.Split, classnames: list[str] | None = None) -> Source:
    """A split of the released layout (`fif.load_split`); images are read from disk."""
    return Source(
        items=split,
        adapter=_fif_example,
        description={
            "kind": "fif",
            "dataset": split.dataset,
            "split": split.split,
            "info_path": os.path.abspath(split.info_path),
        },
        dataset=split.dataset,
        classnames=classnames,
        skipped=tuple(split.skipped),
        fallbacks=split.fallbacks,
    )


@dataclasses.dataclass(frozen=True)
class _SyntheticAdapter:
    names: tuple[str, ...]

    def __call__(self, index: int, example: dict) -> Example:
        label = int(example["label"])
        return Example(
            image=example["image"],
            captions=[example["text"]],
            target=label,
            classname=self.names[label],
            dataset="synthetic",
            key=str(index),
            origin=f"synthetic example {index}",
        )


def from_synthetic(pairs: synthetic.SyntheticPairs) -> Source:
    """Procedural pairs: captions = [text], classname = "colour shape", target = label."""
    names = tuple(f"{color} {shape}" for color, shape in pairs.concepts)
    return Source(
        items=pairs,
        adapter=_SyntheticAdapter(names),
        description={
            "kind": "synthetic",
            "split": "train",
            "num": len(pairs),
            "image_size": pairs.image_size,
            "seed": pairs.seed,
        },
        dataset="synthetic",
        classnames=list(names),
    )


def _as_text(value: Any) -> list[str]:
    """tfds Text features come back as bytes (str from mock_data); sequences as lists/arrays."""
    if isinstance(value, bytes):
        return [value.decode("utf-8")]
    if isinstance(value, str):
        return [value]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _as_text(value.item())
    return [text for item in value for text in _as_text(item)]


@dataclasses.dataclass(frozen=True)
class _TfdsAdapter:
    name: str
    split: str
    image_key: str
    label_key: str | None
    text_key: str | None
    template: str
    names: tuple[str, ...] | None

    def __call__(self, index: int, example: dict) -> Example:
        target, classname = -1, None
        if self.label_key is not None:
            target = int(example[self.label_key])
            classname = self.names[target] if self.names else None
        if self.text_key is not None:
            captions = _as_text(example[self.text_key])
        elif classname is not None:
            captions = [self.template.format(classname)]
        else:
            raise ValueError(f"tfds {self.name}: no text_key and no class names to prompt with")
        return Example(
            image=example[self.image_key],
            captions=captions,
            target=target,
            classname=classname,
            dataset=self.name,
            key=str(index),
            origin=f"tfds {self.name}[{self.split}] example {index}",
        )


def _import_tfds():
    """tensorflow_datasets, an optional dependency (≈200 MB with its own): only this source
    needs it, so it is imported here (≈0.5 s) and its absence names the extra to install."""
    try:
        import tensorflow_datasets
    except ImportError as e:
        raise ImportError(
            f"reading a tfds dataset needs tensorflow-datasets, which is not installed ({e}): "
            "pip install 'fomo_jax[tfds]'"
        ) from e
    return tensorflow_datasets


def from_tfds(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    image_key: str = "image",
    label_key: str | None = "label",
    text_key: str | None = None,
    template: str = "A photo of a {}.",
) -> Source:
    """A prepared tfds dataset read through `tfds.data_source` (array_record; no TensorFlow).

    Class names come from the label's ClassLabel feature; the text is `template.format(name)`
    unless `text_key` names a Text feature (decoded from UTF-8 bytes).
    """
    tfds = _import_tfds()
    data = tfds.data_source(name, split=split, data_dir=data_dir)
    features = data.dataset_info.features
    for key in (image_key, label_key, text_key):
        if key is not None and key not in features:
            raise KeyError(f"tfds {name}: no feature {key!r}; it has {sorted(features.keys())}")
    names = None
    if label_key is not None and isinstance(features[label_key], tfds.features.ClassLabel):
        names = tuple(features[label_key].names)
    if text_key is None and names is None:
        raise ValueError(f"tfds {name}: give text_key, or a ClassLabel label_key for the prompts")
    adapter = _TfdsAdapter(name, split, image_key, label_key, text_key, template, names)
    return Source(
        items=data,
        adapter=adapter,
        description={
            "kind": "tfds",
            "name": name,
            "full_name": data.dataset_info.full_name,
            "split": split,
            "data_dir": os.path.abspath(data_dir) if data_dir else None,
            "image_key": image_key,
            "label_key": label_key,
            "text_key": text_key,
            "template": None if text_key else template,
        },
        dataset=name,
        classnames=list(names) if names else None,
    )


# ---------------------------------------------------------------------------------------------
# Images and records


def resized_size(width: int, height: int, image_size: int | None) -> tuple[int, int]:
    """(width, height) with the shorter side at `image_size`; unchanged if already that small."""
    short = min(width, height)
    if image_size is None or short <= image_size:
        return width, height
    if width <= height:
        return image_size, max(image_size, round(height * image_size / width))
    return max(image_size, round(width * image_size / height)), image_size


def _open_image(image: str | bytes | np.ndarray | Image.Image) -> Image.Image:
    """A fully decoded RGB PIL image (decoding errors surface here, not later)."""
    if isinstance(image, np.ndarray):
        array = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
        return Image.fromarray(np.asarray(array, np.uint8)).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        opened.load()
        return opened.convert("RGB")


def encode_image(image: Image.Image, image_size: int | None, quality: int) -> bytes:
    """Resize (bicubic, antialiased, shorter side) and encode as a 4:4:4 JPEG."""
    size = resized_size(*image.size, image_size)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality, subsampling=0)
    return out.getvalue()


def decode_image(jpeg: bytes) -> np.ndarray:
    """A record's image as uint8 [H, W, 3] (for tests and simple pipelines)."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return np.asarray(image.convert("RGB"))


def pack_record(example: Example, jpeg: bytes) -> bytes:
    """The msgpack bytes of one record (schema in the module docstring)."""
    captions = example.captions
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{example.origin}: captions must be a non-empty list of str")
    return msgpack.packb(
        {
            "image": jpeg,
            "captions": list(captions),
            "target": int(example.target),
            "classname": example.classname,
            "dataset": example.dataset,
            "key": example.key,
        },
        use_bin_type=True,
    )


def unpack_record(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False)


@dataclasses.dataclass(frozen=True)
class _Encoded:
    index: int
    record: bytes | None  # None: left out (skip_bad)
    target: int
    skipped: dict | None


def _encode_entry(
    source: Source, index: int, image_size: int | None, quality: int, skip_bad: bool
) -> _Encoded:
    """Load, decode, resize and encode entry `index` (runs in a worker thread)."""
    example = source.example(index)
    try:
        jpeg = encode_image(_open_image(example.image), image_size, quality)
    except _IMAGE_ERRORS as e:
        reason = f"{type(e).__name__}: {e}"
        if not skip_bad:
            raise BadImageError(
                f"cannot read image {example.origin} of entry "
                f"(dataset={example.dataset!r}, key={example.key!r}): {reason}"
            ) from e
        skipped = {"index": index, "dataset": example.dataset, "key": example.key}
        return _Encoded(index, None, int(example.target), {**skipped, "reason": reason})
    return _Encoded(index, pack_record(example, jpeg), int(example.target), None)


def _ordered_map(fn: Callable[[int], Any], indices: Sequence[int], workers: int) -> Iterator:
    """fn over indices in a thread pool, results in input order, at most a window ahead.

    Threads, not processes: Pillow releases the GIL while decoding, resizing and encoding, so
    on 2 cores two threads convert files ≈1.7x faster than one (processes: ≈1.9x) without
    pickling the source or paying a worker start-up.
    """
    if workers <= 1:
        yield from map(fn, indices)
        return
    pending: collections.deque[futures.Future] = collections.deque()
    remaining = collections.deque(indices)
    with futures.ThreadPoolExecutor(workers) as pool:
        try:
            while remaining or pending:
                while remaining and len(pending) < 4 * workers:
                    pending.append(pool.submit(fn, remaining.popleft()))
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


# ---------------------------------------------------------------------------------------------
# Writer


def shard_name(index: int, num_shards: int) -> str:
    return f"records-{index:05d}-of-{num_shards:05d}.array_record"


def _done_path(out_dir: str, shard_file: str) -> str:
    return os.path.join(out_dir, shard_file.removesuffix(".array_record") + ".done.json")


def shard_ranges(
    num_examples: int, records_per_shard: int | None = None, num_shards: int | None = None
) -> list[tuple[int, int]]:
    """Source-index ranges [start, stop) of the shards.

    `records_per_shard` (default when neither is given) fills shards in order, the last one
    shorter; `num_shards` splits as evenly as possible (sizes differ by at most one).
    """
    if records_per_shard is not None and num_shards is not None:
        raise ValueError("give records_per_shard or num_shards, not both")
    if num_shards is None:
        per = DEFAULT_RECORDS_PER_SHARD if records_per_shard is None else records_per_shard
        if per < 1:
            raise ValueError(f"records_per_shard must be positive, got {per}")
        return [(start, min(start + per, num_examples)) for start in range(0, num_examples, per)]
    if not 1 <= num_shards <= num_examples:
        raise ValueError(f"need 1 <= num_shards <= {num_examples} examples, got {num_shards}")
    base, extra = divmod(num_examples, num_shards)
    bounds = np.cumsum([0] + [base + (i < extra) for i in range(num_shards)])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _write_json(path: str, value: dict, compact_key: str | None = None) -> None:
    """JSON via a temp file and a rename; `compact_key`'s list goes on one line."""
    if compact_key is None:
        text = json.dumps(value, indent=2)
    else:
        placeholder = "@@" + compact_key + "@@"
        text = json.dumps({**value, compact_key: placeholder}, indent=2)
        text = text.replace(json.dumps(placeholder), json.dumps(value[compact_key]))
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def count_records(path: str) -> int:
    """Records in an ArrayRecord file; an error naming the file if it is missing or corrupt.

    (The reader itself reports 0 records for a missing or garbage file; only `ok()` tells.)
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"record shard missing: {path}")
    reader = array_record_module.ArrayRecordReader(path)
    if not reader.ok():
        with contextlib.suppress(RuntimeError):  # close() re-raises the failure, unnamed
            reader.close()
        raise ValueError(f"record shard is not a readable ArrayRecord file: {path}")
    try:
        return reader.num_records()
    finally:
        reader.close()


def _completed_shard(out_dir: str, file: str, plan: str, span, skip_bad: bool) -> dict | None:
    """The bookkeeping of a shard a rerun may keep, or None if it must be (re)written."""
    done = _read_json(_done_path(out_dir, file))
    if done is None or done.get("plan") != plan or done.get("range") != list(span):
        return None
    skipped, num_records = done.get("skipped", []), done.get("num_records")
    if skipped and not skip_bad:
        return None  # rewrite it, which raises on the bad entry
    if (
        num_records != span[1] - span[0] - len(skipped)
        or len(done.get("targets", ())) != num_records
    ):
        return None
    try:
        if count_records(os.path.join(out_dir, file)) != done["num_records"]:
            return None
    except (OSError, ValueError):
        return None
    return done


def _check_foreign(out_dir: str, plan: str) -> None:
    """Refuse to mix with the shards of a different conversion in the same folder."""
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".done.json") and not name.startswith("."):
            done = _read_json(os.path.join(out_dir, name))
            if done is not None and done.get("plan") != plan:
                raise ValueError(
                    f"{out_dir} holds shards of a different conversion ({name}: other source, "
                    "sharding, image_size or quality); use an empty folder or delete them"
                )


def _write_shard(
    out_dir: str, file: str, plan: str, span, results: Iterator[_Encoded], on_record
) -> dict:
    """Stream one shard's records into a temp file, rename it into place, then its bookkeeping."""
    final = os.path.join(out_dir, file)
    tmp = os.path.join(out_dir, f".{file}.tmp")
    writer = array_record_module.ArrayRecordWriter(tmp, _WRITER_OPTIONS)
    digest, targets, skipped = hashlib.sha256(), [], []
    try:
        if not writer.ok():
            raise OSError(f"cannot write {tmp}")
        for expected, result in zip(range(*span), results, strict=False):
            assert result.index == expected, (result.index, expected)
            if result.record is None:
                skipped.append(result.skipped)
            else:
                writer.write(result.record)
                digest.update(len(result.record).to_bytes(8, "little") + result.record)
                targets.append(result.target)
            on_record()
        if len(targets) + len(skipped) != span[1] - span[0]:
            raise RuntimeError(f"{file}: the source ended early")
        if not writer.ok():
            raise OSError(f"writing {tmp} failed")
        writer.close()
        os.replace(tmp, final)
    except BaseException:
        if writer.is_open():
            with contextlib.suppress(RuntimeError):
                writer.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    done = {
        "plan": plan,
        "range": list(span),
        "num_records": len(targets),
        "sha256": digest.hexdigest(),
        "skipped": skipped,
        "targets": targets,
    }
    _write_json(_done_path(out_dir, file), done, compact_key="targets")
    return done


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What `convert` did: the manifest, and which shards it wrote or kept from a former run."""

    path: str
    manifest: dict
    written: list[int]
    kept: list[int]


def convert(
    source: Source,
    out_dir: str,
    *,
    records_per_shard: int | None = None,
    num_shards: int | None = None,
    image_size: int | None = 224,
    quality: int = 95,
    num_workers: int | None = None,
    skip_bad: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Conversion:
    """Write `source` as JPEG record shards plus `manifest.json` into `out_dir` (resumable).

    Records keep source order. A missing or undecodable image raises `BadImageError` naming the
    file and the entry, unless `skip_bad`, which leaves it out and lists it in the manifest.
    `progress(done, total)` is called after every entry this run processes.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    if image_size is not None and image_size < 1:
        raise ValueError(f"image_size must be positive or None, got {image_size}")
    if len(source) == 0:
        raise ValueError(f"nothing to convert: {source.description} has no entries")
    spans = shard_ranges(len(source), records_per_shard, num_shards)
    files = [shard_name(i, len(spans)) for i in range(len(spans))]
    plan_fields = {
        "schema_version": SCHEMA_VERSION,
        "source": source.description,
        "num_examples": len(source),
        "ranges": spans,
        "image_size": image_size,
        "quality": quality,
    }
    plan = hashlib.sha256(json.dumps(plan_fields, sort_keys=True).encode()).hexdigest()

    os.makedirs(out_dir, exist_ok=True)
    _check_foreign(out_dir, plan)
    for name in os.listdir(out_dir):  # temp files of a killed run
        if name.startswith(".records-") and name.endswith(".tmp"):
            os.remove(os.path.join(out_dir, name))
    dones = {}
    for i, (file, span) in enumerate(zip(files, spans, strict=True)):
        if (done := _completed_shard(out_dir, file, plan, span, skip_bad)) is not None:
            dones[i] = done
    todo = [i for i in range(len(spans)) if i not in dones]
    if todo:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, MANIFEST))  # no manifest while incomplete

    total, processed = sum(spans[i][1] - spans[i][0] for i in todo), 0

    def on_record():
        nonlocal processed
        processed += 1
        if progress is not None:
            progress(processed, total)

    def work(index):
        return _encode_entry(source, index, image_size, quality, skip_bad)

    indices = [index for i in todo for index in range(*spans[i])]
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    with contextlib.closing(_ordered_map(work, indices, workers)) as results:
        for i in todo:
            dones[i] = _write_shard(out_dir, files[i], plan, spans[i], results, on_record)

    manifest = _manifest(source, plan_fields, files, [dones[i] for i in range(len(spans))])
    _write_json(os.path.join(out_dir, MANIFEST), manifest, compact_key="targets")
    return Conversion(out_dir, manifest, written=todo, kept=sorted(set(dones) - set(todo)))


def _manifest(source: Source, plan: dict, files: list[str], dones: list[dict]) -> dict:
    upstream = [
        {"index": None, "dataset": source.dataset, "key": key, "reason": reason}
        for key, reason in source.skipped
    ]
    content = hashlib.sha256("".join(d["sha256"] for d in dones).encode()).hexdigest()
    return {
        "format": "fomo_jax.records",
        "schema_version": SCHEMA_VERSION,
        "source": source.description,
        "dataset": source.dataset,
        "split": source.description.get("split"),
        "num_records": sum(d["num_records"] for d in dones),
        "num_source_entries": plan["num_examples"],
        "num_shards": len(files),
        "shards": [
            {"file": f, "num_records": d["num_records"], "range": d["range"], "sha256": d["sha256"]}
            for f, d in zip(files, dones, strict=True)
        ],
        "image_size": plan["image_size"],
        "quality": plan["quality"],
        "chroma_subsampling": "4:4:4",
        "encoder": f"Pillow {PIL.__version__}",
        "classnames": source.classnames,
        "caption_fallbacks": source.fallbacks,
        "skipped": upstream + [s for d in dones for s in d["skipped"]],
        "content_sha256": content,
        "targets": [t for d in dones for t in d["targets"]],
    }


# ---------------------------------------------------------------------------------------------
# Reader


class RecordSource:
    """Random access to a converted folder: `source[i]` is the record dict (image = JPEG bytes).

    Every shard is checked on opening (present, readable, record count as in the manifest).
    Pickles small: the wrapped ArrayRecordDataSource drops its open readers when pickled and
    reopens them lazily, so grain can ship this to worker processes.
    """

    def __init__(self, path: str):
        self.path = path
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise FileNotFoundError(f"no {MANIFEST} (incomplete or not a record folder): {path}")
        manifest = _read_json(manifest_path)
        if manifest is None or manifest.get("format") != "fomo_jax.records":
            raise ValueError(f"not a fomo_jax record manifest: {manifest_path}")
        if manifest["schema_version"] != SCHEMA_VERSION:
            raise ValueError(f"{manifest_path}: schema version {manifest['schema_version']}")
        self.manifest = manifest
        self.files = [os.path.join(path, shard["file"]) for shard in manifest["shards"]]
        counts = [shard["num_records"] for shard in manifest["shards"]]
        for file, count in zip(self.files, counts, strict=True):
            if (found := count_records(file)) != count:
                raise ValueError(f"{file}: {found} records, the manifest says {count}")
        self._ends = list(np.cumsum(counts))
        # "file[0:n]" tells the data source the count, so it does not reopen every shard.
        spans = [f"{f}[0:{n}]" for f, n in zip(self.files, counts, strict=True) if n]
        self._source = grain.sources.ArrayRecordDataSource(spans) if spans else None
        self.targets = np.asarray(manifest["targets"], np.int64)
        if len(self.targets) != len(self):
            raise ValueError(
                f"{manifest_path}: {len(self.targets)} targets for {len(self)} records"
            )

    @property
    def classnames(self) -> list[str] | None:
        return self.manifest["classnames"]

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    def __len__(self) -> int:
        return self.manifest["num_records"]

    def _shard_of(self, index: int) -> str:
        return self.files[bisect.bisect_right(self._ends, index)]

    def __getitem__(self, index) -> dict:
        index = index.__index__()
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        try:
            return unpack_record(self._source[index])
        except Exception as e:
            raise OSError(f"{self._shard_of(index)}: cannot read record {index}: {e}") from e

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [self[i] for i in indices]

    def verify(self) -> None:
        """Read every record and check each shard's content hash against the manifest."""
        for file, shard in zip(self.files, self.manifest["shards"], strict=True):
            reader = array_record_module.ArrayRecordReader(file)
            try:
                digest = hashlib.sha256()
                for record in reader.read_all():
                    digest.update(len(record).to_bytes(8, "little") + record)
            except Exception as e:
                raise OSError(f"{file}: unreadable record ({e})") from e
            finally:
                reader.close()
            if digest.hexdigest() != shard["sha256"]:
                raise ValueError(f"{file}: content hash differs from the manifest")

    def __repr__(self) -> str:
        return f"RecordSource({self.path!r}, {len(self)} records, dataset={self.dataset!r})"


# ---------------------------------------------------------------------------------------------
# Command line (argparse: absl flags defined here would register on every import of this module)


class _Progress:
    """Prints records done, rate and ETA to stderr at most every `every` seconds."""

    def __init__(self, every: float = 2.0):
        self.start = self.last = time.monotonic()
        self.every = every

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate else 0.0
        print(
            f"records {done}/{total} ({100 * done / total:.0f}%)  {rate:.1f} records/s  "
            f"ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
            file=sys.stderr,
            flush=True,
        )


def _image_size(text: str) -> int | None:
    return None if text.lower() in ("none", "0", "original") else int(text)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fomo_jax.data.records",
        description="Convert a split into JPEG ArrayRecord shards plus manifest.json.",
    )
    p.add_argument("--source", required=True, choices=("fif", "synthetic", "tfds"))
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--split", default="train", help="fif: train/test; tfds: any split spec")
    fif_args = p.add_argument_group("fif")
    fif_args.add_argument("--data_root")
    fif_args.add_argument("--dataset", help="registry key or folder name, e.g. monkeys10")
    fif_args.add_argument("--info_dir", help="default <data_root>/00_info")
    fif_args.add_argument("--classnames_dir", help="default info_dir")
    syn = p.add_argument_group("synthetic")
    syn.add_argument("--num", type=int, default=1000)
    syn.add_argument("--image_size_src", type=int, default=256)
    syn.add_argument("--seed", type=int, default=0)
    tf = p.add_argument_group("tfds")
    tf.add_argument("--name")
    tf.add_argument("--data_dir")
    tf.add_argument("--image_key", default="image")
    tf.add_argument("--label_key", default="label")
    tf.add_argument("--text_key")
    tf.add_argument("--template", default="A photo of a {}.")
    out = p.add_argument_group("output")
    out.add_argument("--image_size", type=_image_size, default=224, help="shorter side; none")
    out.add_argument("--quality", type=int, default=95)
    out.add_argument("--records_per_shard", type=int)
    out.add_argument("--num_shards", type=int)
    out.add_argument("--skip_bad", action="store_true", help="leave out unreadable images")
    out.add_argument("--workers", type=int, help="threads (default: CPU count)")
    return p


def _source_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Source:
    if args.source == "synthetic":
        return from_synthetic(synthetic.SyntheticPairs(args.num, args.image_size_src, args.seed))
    if args.source == "tfds":
        if not args.name:
            parser.error("--source tfds needs --name")
        return from_tfds(
            args.name,
            args.split,
            args.data_dir,
            image_key=args.image_key,
            label_key=args.label_key or None,
            text_key=args.text_key,
            template=args.template,
        )
    if not (args.data_root and args.dataset):
        parser.error("--source fif needs --data_root and --dataset")
    split = fif.load_split(
        args.data_root,
        args.dataset,
        args.split,
        args.info_dir,
        classnames_dir=args.classnames_dir,
        skip_missing=args.skip_bad,
    )
    names_dir = args.classnames_dir or args.info_dir or fif.default_info_dir(args.data_root)
    info = registry.get(args.dataset)
    names = None
    if not info.is_retrieval and os.path.exists(registry.classnames_path(info, names_dir)):
        names = registry.classnames(info, names_dir)
    return from_fif_split(split, names)


def main(argv: Sequence[str] | None = None) -> Conversion:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain and array_record read absl flags
        flags.FLAGS.mark_as_parsed()
    parser = _parser()
    args = parser.parse_args(argv)
    source = _source_from_args(args, parser)
    start = time.monotonic()
    result = convert(
        source,
        args.out,
        records_per_shard=args.records_per_shard,
        num_shards=args.num_shards,
        image_size=args.image_size,
        quality=args.quality,
        num_workers=args.workers,
        skip_bad=args.skip_bad,
        progress=_Progress(),
    )
    seconds = time.monotonic() - start
    m = result.manifest
    processed = sum(m["shards"][i]["range"][1] - m["shards"][i]["range"][0] for i in result.written)
    print(
        f"done: {m['num_records']} records in {m['num_shards']} shards at {args.out} "
        f"({len(result.written)} written, {len(result.kept)} kept); skipped {len(m['skipped'])}; "
        f"caption fallbacks {m['caption_fallbacks']}; {seconds:.1f} s, "
        f"{processed / max(seconds, 1e-9):.1f} records/s; sha256 {m['content_sha256'][:16]}"
    )
    return result


if __name__ == "__main__":
    main()
