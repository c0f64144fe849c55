"""`fomo-jax prepare`: splits to record shards and back, `fif.load_split` reading them, and a
continual run over prepared shards against the same run over the image files."""

import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fomo_jax.data import fif, fif_synth, prepare, records, registry


def _command(*args, cwd=None, timeout=600):
    """`fomo-jax ARGS` in a fresh process (the installed command's module)."""
    return subprocess.run(
        [sys.executable, "-m", "fomo_jax.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def _pixels(image: str | bytes) -> np.ndarray:
    """Decoded RGB with PIL directly (not through fomo_jax)."""
    with Image.open(io.BytesIO(image) if isinstance(image, bytes) else image) as opened:
        return np.asarray(opened.convert("RGB"), np.float32)


@pytest.fixture
def synth_copy(synth_root, tmp_path):
    """A private copy of the session's fif_synth root (tests here write into it)."""
    root = str(tmp_path / "synth")
    shutil.copytree(synth_root, root)
    return root


def test_prepare_command_round_trip(synth_root, tmp_path):
    """Every split a run reads, through the command into a new data root and back through
    `fif.load_split`: the same records (keys, targets, class names, captions) in the same
    order, and images within JPEG error of the source files."""
    out = str(tmp_path / "prepared")
    result = _command("prepare", f"--data_root={synth_root}", f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    datasets = fif_synth.load_datasets(synth_root)
    pairs = prepare.benchmark_splits(datasets)
    assert len(pairs) == 4 * 2 + 5  # 4 adaptation sets (train, test), 5 evaluation-only sets
    assert f"prepared {len(pairs)} splits" in result.stdout
    # The new root holds no image folders: whatever reads it reads the shards.
    expected = ["00_info", "00_records", "datasets.json", "manifest.json", "pretraining", "streams"]
    assert sorted(os.listdir(out)) == expected
    errors = []
    for key, split in pairs:
        source = fif.load_split(synth_root, key, split, datasets=datasets)
        got = fif.load_split(out, key, split, datasets=datasets)
        assert type(source) is fif.Split and isinstance(got, fif.ShardSplit), (key, split)
        assert got.records_dir == fif.records_dir(out, datasets[key], split)
        assert len(got) == len(source) > 0
        np.testing.assert_array_equal(got.targets, source.targets)
        for want, have in zip(source, got, strict=True):
            assert (have.key, have.target, have.classname) == (
                want.key,
                want.target,
                want.classname,
            )
            assert have.captions == want.captions and have.caption_source == want.caption_source
            assert isinstance(have.image_bytes, bytes) and want.image_bytes is None
            expected, decoded = _pixels(want.image), _pixels(have.image)
            assert decoded.shape == expected.shape  # 24 px images: never resized
            errors.append(np.abs(decoded - expected).mean())
    # Re-encoding at quality 95, 4:4:4: about 1 grey level on average (noisy 24 px images).
    assert np.mean(errors) < 2.0 and np.max(errors) < 4.0, (np.mean(errors), np.max(errors))
    manifest = records.RecordSource(fif.records_dir(out, datasets["synth_glyphs"], "train"))
    assert manifest.manifest["image_size"] == 224 and manifest.manifest["quality"] == 95


def test_in_place_shards_are_read_and_a_rerun_keeps_them(synth_copy):
    datasets = fif_synth.load_datasets(synth_copy)
    done = prepare.prepare_benchmark(synth_copy, datasets=["synth_glyphs"])
    assert [(p.dataset, p.split, p.written, p.kept) for p in done] == [
        ("synth_glyphs", "train", 1, 0),
        ("synth_glyphs", "test", 1, 0),
    ]
    shards = fif.load_split(synth_copy, "synth_glyphs", "train", datasets=datasets)
    assert isinstance(shards, fif.ShardSplit)
    # Pickled (grain worker processes) as records without images, read again on access.
    data = pickle.dumps(shards)
    assert len(data) < sum(len(r.image_bytes) for r in shards)
    copy = pickle.loads(data)
    assert isinstance(copy, fif.ShardSplit) and copy.skipped == shards.skipped
    assert [(r.key, r.image_bytes) for r in copy] == [(r.key, r.image_bytes) for r in shards]
    files = fif.load_split(
        synth_copy, "synth_glyphs", "train", datasets=datasets, use_records=False
    )
    assert type(files) is fif.Split and os.path.isfile(files[0].image_path)
    # Datasets without shards still read their image files.
    assert type(fif.load_split(synth_copy, "synth_shapes", "test", datasets=datasets)) is fif.Split
    again = prepare.prepare_benchmark(synth_copy, datasets=["SYNTH_GLYPHS"])
    assert [(p.written, p.kept) for p in again] == [(0, 1), (0, 1)]


def test_shards_that_no_longer_match_the_info_json_are_refused(synth_copy):
    datasets = fif_synth.load_datasets(synth_copy)
    prepare.prepare_benchmark(synth_copy, datasets=["synth_letters"])
    info_path = os.path.join(synth_copy, "00_info", "SYNTH_LETTERS_test.json")
    with open(info_path) as f:
        entries = json.load(f)
    keys = list(entries)
    same_class = [k for k in keys if entries[k]["target"] == entries[keys[0]]["target"]]
    # Two images of one class swapped: same length, same targets, other images.
    order = list(keys)
    i, j = keys.index(same_class[0]), keys.index(same_class[1])
    order[i], order[j] = order[j], order[i]
    with open(info_path, "w") as f:
        json.dump({k: entries[k] for k in order}, f)
    split = fif.load_split(synth_copy, "synth_letters", "test", datasets=datasets)
    with pytest.raises(ValueError, match=r"holds .*run fomo-jax prepare again"):
        split[i]
    assert split[len(split) - 1].key == order[-1]  # an unmoved record still reads
    # An entry removed from the info JSON: the split and its shards disagree in length.
    with open(info_path, "w") as f:
        json.dump({k: entries[k] for k in keys[1:]}, f)
    with pytest.raises(ValueError, match="do not match .*run fomo-jax prepare again"):
        fif.load_split(synth_copy, "synth_letters", "test", datasets=datasets)


def test_undecodable_images_stop_or_are_left_out_and_listed(synth_copy):
    datasets = fif_synth.load_datasets(synth_copy)
    files = fif.load_split(synth_copy, "synth_counting", "test", datasets=datasets)
    broken = files[2]
    with open(broken.image_path, "wb") as f:
        f.write(b"not an image")
    with pytest.raises(records.BadImageError, match=broken.key):
        prepare.prepare_benchmark(synth_copy, datasets=["synth_counting"])
    shutil.rmtree(os.path.join(synth_copy, fif.RECORDS_SUBDIR))
    prepare.prepare_benchmark(synth_copy, datasets=["synth_counting"], skip_bad=True)
    with pytest.raises(FileNotFoundError, match="left out of the prepared shards"):
        fif.load_split(synth_copy, "synth_counting", "test", datasets=datasets)
    got = fif.load_split(synth_copy, "synth_counting", "test", datasets=datasets, skip_missing=True)
    assert isinstance(got, fif.ShardSplit) and len(got) == len(files) - 1
    assert got.skipped == [(broken.key, "missing image")]
    assert [r.key for r in got] == [r.key for r in files if r.key != broken.key]


def test_image_folder_command(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "pets"
    arrays = {}
    for name in ("dog/1.png", "cat/0.png", "cat/sub/2.png", "dog/0.jpg"):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((30, 20), Image.Resampling.BICUBIC)
        image.save(path, quality=95)
        arrays[name] = _pixels(str(path))
    (folder / "cat" / "0.txt").write_text("a grey cat\n\nasleep\n")
    (folder / "notes.txt").write_text("not a class")
    out = str(tmp_path / "shards")
    result = _command("prepare", f"--image_folder={folder}", f"--out={out}", "--image_size=0")
    assert result.returncode == 0, result.stderr[-3000:]
    source = records.RecordSource(out)
    assert source.classnames == ["cat", "dog"]
    rows = [source[i] for i in range(len(source))]
    assert [r["key"] for r in rows] == ["cat/0.png", "cat/sub/2.png", "dog/0.jpg", "dog/1.png"]
    assert [r["target"] for r in rows] == [0, 0, 1, 1] and list(source.targets) == [0, 0, 1, 1]
    captions = [["a grey cat", "asleep"], ["A photo of a cat."]] + [["A photo of a dog."]] * 2
    assert [r["captions"] for r in rows] == captions
    for row in rows:
        assert np.abs(_pixels(row["image"]) - arrays[row["key"]]).mean() < 3.0


def test_prepare_needs_one_source(tmp_path):
    result = _command("prepare", f"--out={tmp_path}")
    assert result.returncode != 0 and "exactly one of --data_root" in result.stderr
    result = _command("prepare", f"--image_folder={tmp_path}")
    assert result.returncode != 0 and "need --out" in result.stderr
    result = _command("prepare", "--help")
    assert result.returncode == 0 and "usage: fomo-jax prepare" in result.stdout
    for flag in ("--data_root", "--out", "--datasets", "--tfds", "--image_folder", "--skip_bad"):
        assert f"  {flag}:" in result.stdout, flag


# ---------------------------------------------------------------------------------------------
# A continual run over prepared shards


def _chance_zero_shot_retention(root: str) -> float:
    """A_ZS of a model guessing at random: 100/classes per classification set, R@5 = 500/N
    images (one caption per image ranked among N) for retrieval, averaged."""
    datasets = fif_synth.load_datasets(root)
    chances = []
    for key, info in datasets.items():
        if info.role != "evaluation":
            continue
        if info.is_retrieval:
            images = len(fif.load_split(root, key, "test", datasets=datasets))
            chances.append(100 * min(1.0, 5 / images))
        else:
            chances.append(100 / len(registry.classnames(info, fif.default_info_dir(root))))
    return float(np.mean(chances))


def test_run_over_prepared_shards_matches_the_run_over_image_files(tmp_path):
    """The smoke run on fif_synth, once over the image files and once over a prepared data root
    that holds no image at all, from the same θ0: the shards hold re-encoded JPEGs, so the
    scores may differ a little, within 1 point of A_KA / A_ZS (measured: 0.3 at most).

    θ0 is pretrained long enough to be well above chance zero-shot, so a shard read back in the
    wrong order or with the wrong labels would show as a collapse towards chance."""
    common = [
        "--config=fif_synth:smoke",
        "--config.theta0.steps=150",
        "--config.theta0.batch_size=32",
        f"--config.theta0.cache_dir={tmp_path / 'theta0'}",  # one θ0 for both runs
    ]
    files = _command("run", *common, "--config.data.root=files", "--workdir=W1", cwd=tmp_path)
    assert files.returncode == 0, files.stderr[-4000:]
    prepared = _command("prepare", "--data_root=files", "--out=shards", cwd=tmp_path)
    assert prepared.returncode == 0, prepared.stderr[-4000:]
    assert not [n for n in os.listdir(tmp_path / "shards") if n.startswith("SYNTH_")]
    shards = _command("run", *common, "--config.data.root=shards", "--workdir=W2", cwd=tmp_path)
    assert shards.returncode == 0, shards.stderr[-4000:]

    def results(workdir):
        with open(tmp_path / workdir / "results.json") as f:
            return json.load(f)

    a, b = results("W1"), results("W2")
    chance = _chance_zero_shot_retention(str(tmp_path / "files"))
    assert a["trajectory"][0]["zero_shot_retention"] > 2 * chance, chance
    for metric in ("knowledge_accumulation", "zero_shot_retention"):
        points_a = [p[metric] for p in a["trajectory"]] + [a["final"][metric]]
        points_b = [p[metric] for p in b["trajectory"]] + [b["final"][metric]]
        np.testing.assert_allclose(points_b, points_a, atol=1.0, err_msg=metric)


def test_tfds_command(tmp_path):
    """`--tfds`: a TFDS dataset through `tfds.data_source` (mocked: 5 MNIST examples)."""
    import tensorflow_datasets as tfds

    from fomo_jax import cli

    out = str(tmp_path / "mnist")
    with tfds.testing.mock_data(num_examples=5), pytest.raises(SystemExit) as stop:
        cli.main(["fomo-jax", "prepare", "--tfds=mnist", f"--out={out}", "--image_size=0"])
    assert stop.value.code in (0, None)
    source = records.RecordSource(out)
    assert len(source) == 5 and source.classnames == [str(d) for d in range(10)]
    for i in range(5):
        row = source[i]
        assert row["captions"] == [f"A photo of a {source.classnames[row['target']]}."]
        assert _pixels(row["image"]).shape == (28, 28, 3)
