"""Record shards: conversion from every source, reading back, resume and bad data."""

import dataclasses
import io
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from fomo_jax import runtime
from fomo_jax.data import fif, records, registry, synthetic
from tests.conftest import SHARED

MONKEYS_INFO = os.path.join(SHARED, "info", "MONKEYS10_train_224.json")
CLASSNAMES_DIR = os.path.join(SHARED, "classnames")


def smooth_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A random-coloured smooth image (JPEG keeps it close, unlike noise)."""
    coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def folder_bytes(path) -> dict[str, bytes]:
    return {name: open(os.path.join(path, name), "rb").read() for name in os.listdir(path)}


# ---------------------------------------------------------------------------------------------
# (1) FiF layout built from a real reference info JSON


@pytest.fixture
def fif_root(tmp_path):
    """<root>/00_info/MONKEYS10_train_224.json (first 30 keys) and stand-in images."""
    if not os.path.exists(MONKEYS_INFO):
        pytest.skip(f"reference data not found: {MONKEYS_INFO}")
    with open(MONKEYS_INFO) as f:
        entries = dict(list(json.load(f).items())[:30])
    root = tmp_path / "fif"
    (root / "00_info").mkdir(parents=True)
    (root / "00_info" / "MONKEYS10_train_224.json").write_text(json.dumps(entries))
    rng = np.random.default_rng(0)
    sizes = [(60, 40), (40, 60), (24, 20), (100, 37), (32, 50)]  # some below image_size=32
    for i, key in enumerate(entries):
        path = root / "MONKEYS10" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        smooth_image(rng, *sizes[i % len(sizes)]).save(path, "JPEG", quality=95)
    return str(root)


def test_fif_split_round_trip(fif_root, tmp_path):
    split = fif.load_split(fif_root, "monkeys10", "train", classnames_dir=CLASSNAMES_DIR)
    names = registry.classnames("monkeys10", CLASSNAMES_DIR)
    out = str(tmp_path / "out")
    result = records.convert(
        records.from_fif_split(split, names), out, records_per_shard=8, image_size=32
    )
    assert result.written == [0, 1, 2, 3] and result.kept == []

    source = records.RecordSource(out)
    manifest = source.manifest
    assert len(source) == len(split) == 30
    assert [s["num_records"] for s in manifest["shards"]] == [8, 8, 8, 6]
    assert manifest["split"] == "train" and source.dataset == "monkeys10"
    assert manifest["skipped"] == [] and manifest["caption_fallbacks"] == split.fallbacks
    assert source.classnames == names
    np.testing.assert_array_equal(source.targets, split.targets)
    assert source.targets.dtype == np.int64

    for i in [29, 0, 17, 8, 3, 4, 2]:  # random access, across shards
        record, entry = source[i], split[i]
        assert record["captions"] == entry.captions and record["key"] == entry.key
        assert record["target"] == entry.target and record["classname"] == entry.classname
        pixels = records.decode_image(record["image"])
        with Image.open(entry.image_path) as original:
            width, height = original.size
            size = records.resized_size(width, height, 32)
            expected = np.asarray(original.convert("RGB").resize(size, Image.Resampling.BICUBIC))
        assert min(pixels.shape[:2]) == min(32, width, height)  # shorter side, never upscaled
        assert pixels.shape[1] / pixels.shape[0] == pytest.approx(width / height, rel=0.05)
        assert mean_abs_error(pixels, expected) < 3.0
    source.verify()


# ---------------------------------------------------------------------------------------------
# (2) synthetic


def test_synthetic_round_trip(tmp_path):
    pairs = synthetic.SyntheticPairs(20, 48, seed=1)
    records.convert(records.from_synthetic(pairs), str(tmp_path), num_shards=3, image_size=None)
    source = records.RecordSource(str(tmp_path))
    assert [s["num_records"] for s in source.manifest["shards"]] == [7, 7, 6]
    assert source.classnames[0] == "red disk" and source.manifest["image_size"] is None
    for i in range(20):
        record, example = source[i], pairs[i]
        color, shape = pairs.concepts[example["label"]]
        assert record["captions"] == [example["text"]] and record["key"] == str(i)
        assert record["target"] == example["label"] == source.targets[i]
        assert record["classname"] == f"{color} {shape}" and record["dataset"] == "synthetic"
        assert mean_abs_error(records.decode_image(record["image"]), example["image"]) < 6.0


# ---------------------------------------------------------------------------------------------
# (3) tfds, without TensorFlow


def test_tfds_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        data = tfds.data_source("mnist", split="train")
        labels = [int(data[i]["label"]) for i in range(6)]
        originals = [data[i]["image"][..., 0] for i in range(6)]
        records.convert(records.from_tfds("mnist", "train"), str(tmp_path), image_size=32)
    source = records.RecordSource(str(tmp_path))
    assert source.classnames == [str(d) for d in range(10)] and source.dataset == "mnist"
    assert source.targets.tolist() == labels
    for i in range(6):
        record = source[i]
        assert record["captions"] == [f"A photo of a {labels[i]}."]
        pixels = records.decode_image(record["image"])  # grey 28x28 -> RGB, not upscaled
        assert pixels.shape == (28, 28, 3)
        assert mean_abs_error(pixels[..., 1], originals[i]) < 12.0  # random noise: JPEG's worst


class RecordsTestCaptioned(tfds.core.GeneratorBasedBuilder):
    """A local array_record dataset: real tfds encoding, where Text comes back as bytes."""

    # tfds resolves the code path of a class in a package through `importlib_resources`, a
    # backport that is not installed; a single-component module name makes it skip that.
    __module__ = "records_test_builder"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "caption": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=["cat", "dog"]),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(5):
            png = io.BytesIO()
            Image.new("RGB", (40 + i, 30), (40 * i, 90, 200)).save(png, "PNG")
            yield i, {"image": png.getvalue(), "caption": f"pet number {i} ✓", "label": i % 2}


def test_tfds_text_feature(tmp_path):
    data_dir = str(tmp_path / "tfds")
    RecordsTestCaptioned(data_dir=data_dir, file_format="array_record").download_and_prepare()
    name = RecordsTestCaptioned.name
    source_in = records.from_tfds(name, "train", data_dir, text_key="caption")
    records.convert(source_in, str(tmp_path / "out"), image_size=None)
    source = records.RecordSource(str(tmp_path / "out"))
    assert source.classnames == ["cat", "dog"] and len(source) == 5
    seen = set()
    for i in range(5):
        record = source[i]
        (caption,) = record["captions"]
        number = int(re.fullmatch(r"pet number (\d) ✓", caption).group(1))  # decoded UTF-8
        seen.add(number)
        assert record["target"] == number % 2 and record["classname"] == ["cat", "dog"][number % 2]
        assert records.decode_image(record["image"]).shape == (30, 40 + number, 3)
    assert seen == set(range(5))


# ---------------------------------------------------------------------------------------------
# (4) resume


def test_resume_rewrites_only_missing_shards(tmp_path):
    source = records.from_synthetic(synthetic.SyntheticPairs(24, 40, seed=0))
    kwargs = dict(records_per_shard=6, image_size=32, num_workers=2)
    a, fresh = str(tmp_path / "a"), str(tmp_path / "fresh")
    records.convert(source, a, **kwargs)
    records.convert(source, fresh, **kwargs)
    assert folder_bytes(a) == folder_bytes(fresh)  # deterministic

    gone = records.shard_name(2, 4)
    before = {name: os.stat(os.path.join(a, name)).st_mtime_ns for name in os.listdir(a)}
    os.remove(os.path.join(a, gone))
    result = records.convert(source, a, **kwargs)
    assert result.written == [2] and result.kept == [0, 1, 3]
    for name, mtime in before.items():
        if name not in (gone, records.MANIFEST, gone.replace(".array_record", ".done.json")):
            assert os.stat(os.path.join(a, name)).st_mtime_ns == mtime, name
    assert folder_bytes(a) == folder_bytes(fresh)

    with pytest.raises(ValueError, match="different conversion"):
        records.convert(source, a, **{**kwargs, "quality": 80})


def test_interrupted_run_leaves_no_partial_shard(tmp_path):
    source = records.from_synthetic(synthetic.SyntheticPairs(24, 40, seed=0))
    kwargs = dict(records_per_shard=6, image_size=32, num_workers=2)

    def failing(index, item):
        if index == 9:  # in the middle of shard 1
            raise RuntimeError("interrupted")
        return source.adapter(index, item)

    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="interrupted"):
        records.convert(dataclasses.replace(source, adapter=failing), out, **kwargs)
    assert sorted(os.listdir(out)) == [records.shard_name(0, 4), "records-00000-of-00004.done.json"]
    with pytest.raises(FileNotFoundError, match="manifest"):
        records.RecordSource(out)

    result = records.convert(source, out, **kwargs)
    assert result.written == [1, 2, 3] and result.kept == [0]
    records.convert(source, str(tmp_path / "fresh"), **kwargs)
    assert folder_bytes(out) == folder_bytes(tmp_path / "fresh")


# ---------------------------------------------------------------------------------------------
# (5) bad data


@pytest.fixture
def toy_files(tmp_path):
    """Five image files; #2 holds garbage bytes, #4 is missing."""
    rng = np.random.default_rng(1)
    paths = [str(tmp_path / "img" / f"{i}.png") for i in range(5)]
    os.makedirs(tmp_path / "img")
    for path in paths[:4]:
        smooth_image(rng, 30, 20).save(path)
    with open(paths[2], "wb") as f:
        f.write(b"definitely not an image" * 10)
    return paths


def toy_source(paths) -> records.Source:
    def adapter(index, path):
        return records.Example(path, [f"caption {index}"], index, None, "toy", f"k{index}", path)

    return records.Source(paths, adapter, {"kind": "toy", "split": "train"}, "toy")


def test_bad_image_stops_with_file_and_key(toy_files, tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(records.BadImageError) as error:
        records.convert(toy_source(toy_files), out, num_workers=2)
    assert toy_files[2] in str(error.value) and "'k2'" in str(error.value)
    assert "'toy'" in str(error.value)
    assert not os.path.exists(os.path.join(out, records.MANIFEST))

    with pytest.raises(records.BadImageError, match=re.escape(toy_files[4]) + ".*'k1'"):
        records.convert(toy_source(toy_files[3:]), str(tmp_path / "b"))


def test_skip_bad_lists_what_it_left_out(toy_files, tmp_path):
    out = str(tmp_path / "out")
    records.convert(toy_source(toy_files), out, records_per_shard=2, skip_bad=True)
    source = records.RecordSource(out)
    assert len(source) == 3 and source.targets.tolist() == [0, 1, 3]
    assert [source[i]["key"] for i in range(3)] == ["k0", "k1", "k3"]
    skipped = source.manifest["skipped"]
    assert [(s["key"], s["index"]) for s in skipped] == [("k2", 2), ("k4", 4)]
    assert "UnidentifiedImageError" in skipped[0]["reason"]
    assert "FileNotFoundError" in skipped[1]["reason"]
    # A strict rerun does not quietly accept the shards that have holes.
    with pytest.raises(records.BadImageError, match="'k2'"):
        records.convert(toy_source(toy_files), out, records_per_shard=2)


# ---------------------------------------------------------------------------------------------
# (6) the command


def test_command_end_to_end(tmp_path):
    out = str(tmp_path / "out")
    command = [sys.executable, "-m", "fomo_jax.data.records", "--source", "synthetic"]
    command += ["--num", "12", "--image_size_src", "40", "--image_size", "32", "--out", out]
    command += ["--records_per_shard", "5", "--workers", "2"]
    done = subprocess.run(command, cwd=runtime.REPO_ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "done: 12 records in 3 shards" in done.stdout
    assert re.search(r"records 12/12 .* records/s .*ETA", done.stderr)
    source = records.RecordSource(out)
    assert len(source) == 12 and source.manifest["image_size"] == 32
    assert records.decode_image(source[11]["image"]).shape == (32, 32, 3)


# ---------------------------------------------------------------------------------------------
# (7) reader: pickling and damaged folders


@pytest.fixture
def converted(tmp_path):
    out = str(tmp_path / "out")
    source = records.from_synthetic(synthetic.SyntheticPairs(10, 24, seed=2))
    records.convert(source, out, records_per_shard=4, image_size=None)
    return out


def test_record_source_pickles(converted):
    source = records.RecordSource(converted)
    first = [source[i] for i in range(10)]  # readers are open now
    blob = pickle.dumps(source)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    assert len(clone) == 10 and clone.dataset == "synthetic"
    assert [clone[i] for i in (9, 0, 5)] == [first[9], first[0], first[5]]
    np.testing.assert_array_equal(clone.targets, source.targets)
    assert clone.__getitems__([1, 2]) == first[1:3]
    with pytest.raises(IndexError):
        clone[10]


def test_damaged_folders_name_the_path(converted, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        records.RecordSource(str(tmp_path / "nowhere"))
    shard = os.path.join(converted, records.shard_name(1, 3))
    intact = open(shard, "rb").read()
    with open(shard, "r+b") as f:  # damaged records: found on reading them, or by verify()
        f.write(b"garbage" * 20)
    source = records.RecordSource(converted)
    assert source[0]["key"] == "0"
    with pytest.raises(OSError, match=re.escape(shard)):
        source[4]
    with pytest.raises(OSError, match=re.escape(shard)):
        source.verify()
    with open(shard, "wb") as f:  # a damaged footer: found on opening
        f.write(intact[: len(intact) // 2])
    with pytest.raises(ValueError, match=re.escape(shard)):
        records.RecordSource(converted)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=re.escape(shard)):
        records.RecordSource(converted)


def test_shard_plan_and_sizes():
    assert records.shard_ranges(10, records_per_shard=4) == [(0, 4), (4, 8), (8, 10)]
    assert records.shard_ranges(10, num_shards=3) == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError):
        records.shard_ranges(3, num_shards=4)
    assert records.resized_size(600, 400, 224) == (336, 224)
    assert records.resized_size(400, 602, 224) == (224, 337)
    assert records.resized_size(100, 80, 224) == (100, 80)  # no upscaling
    assert records.resized_size(640, 480, None) == (640, 480)
