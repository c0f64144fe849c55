"""WebDataset shards: writing, indexed random access, skipping, manifest, pickling, threads."""

import io
import os
import pickle
import tarfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from fomo_jax.data import webdataset
from fomo_jax.data.webdataset import WebDatasetSource, write_shards


def png_bytes(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (6, 5, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def make_samples(n: int, start: int = 0) -> list[dict]:
    return [
        {"__key__": f"{i:06d}", "png": png_bytes(i), "txt": f"caption {i} – ünïcode"}
        for i in range(start, start + n)
    ]


def expected_items(samples: list[dict], shard_size: int, prefix: str = "shard") -> list[dict]:
    return [
        {
            "image": s["png"],
            "text": s["txt"],
            "key": s["__key__"],
            "shard": f"{prefix}-{i // shard_size:06d}.tar",
        }
        for i, s in enumerate(samples)
    ]


def test_round_trip_across_shards(tmp_path):
    samples = make_samples(25)
    paths = write_shards(samples, tmp_path, samples_per_shard=10)
    assert [os.path.basename(p) for p in paths] == [f"shard-00000{i}.tar" for i in range(3)]
    assert not list(tmp_path.glob("*.tmp"))
    source = WebDatasetSource(tmp_path)
    assert len(source) == 25 and source.samples_per_shard == [10, 10, 5]
    assert [source[i] for i in range(25)] == expected_items(samples, 10)
    # shard boundaries: the last of one shard and the first of the next
    assert source[9]["shard"] == "shard-000000.tar" and source[10]["shard"] == "shard-000001.tar"
    with pytest.raises(IndexError):
        source[25]


def test_random_access_order_does_not_matter(tmp_path):
    samples = make_samples(30)
    write_shards(samples, tmp_path, samples_per_shard=7)
    source, expected = WebDatasetSource(tmp_path), expected_items(samples, 7)
    order = np.random.default_rng(0).permutation(30)
    for i in np.concatenate([order, order[::-1]]):
        assert source[i] == expected[i]


def test_shards_are_byte_reproducible(tmp_path):
    a = write_shards(make_samples(5), tmp_path / "a", samples_per_shard=2)
    b = write_shards(make_samples(5), tmp_path / "b", samples_per_shard=2)
    for x, y in zip(a, b, strict=True):
        assert open(x, "rb").read() == open(y, "rb").read()


def test_incomplete_samples_are_skipped_and_counted(tmp_path):
    samples = make_samples(6)
    del samples[1]["txt"]
    del samples[3]["png"]
    samples[4] = {"__key__": samples[4]["__key__"], "json": "{}"}
    samples[5]["jpg"] = b"a jpg after the png"  # png comes first in the search order
    write_shards(samples, tmp_path, samples_per_shard=4)
    source = WebDatasetSource(tmp_path)
    assert [source[i]["key"] for i in range(len(source))] == ["000000", "000002", "000005"]
    assert source[2]["image"] == samples[5]["png"]
    assert [(shard, key) for shard, key, _ in source.skipped] == [
        ("shard-000000.tar", "000001"),
        ("shard-000000.tar", "000003"),
        ("shard-000001.tar", "000004"),
    ]
    reasons = [reason for _, _, reason in source.skipped]
    assert "no txt" in reasons[0] and "no image" in reasons[1] and "and no txt" in reasons[2]
    manifest = source.manifest()
    assert manifest["skipped"] == 3 and manifest["total"] == 3
    assert manifest["samples_per_shard"] == [2, 1]


def test_image_extension_priority_and_nested_keys(tmp_path):
    path = str(tmp_path / "custom.tar")
    members = [("a/x.y/001.webp", b"W"), ("a/x.y/001.JPG", b"J"), ("a/x.y/001.txt", b"t")]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    item = WebDatasetSource([path])[0]
    assert item == {"image": b"J", "text": "t", "key": "a/x.y/001", "shard": "custom.tar"}


def test_directory_and_list_inputs_agree(tmp_path):
    paths = write_shards(make_samples(12), tmp_path, samples_per_shard=5)
    (tmp_path / "notes.md").write_text("not a shard")
    from_dir, from_list = WebDatasetSource(str(tmp_path)), WebDatasetSource(paths)
    assert from_dir.shard_names == from_list.shard_names
    assert [from_dir[i] for i in range(12)] == [from_list[i] for i in range(12)]
    reversed_list = WebDatasetSource(paths[::-1])  # a list keeps its order
    assert reversed_list.shard_names[0] == "shard-000002.tar"


def test_manifest_hash_is_stable_and_tracks_content(tmp_path):
    samples = make_samples(8)
    write_shards(samples, tmp_path, samples_per_shard=3)
    first, second = WebDatasetSource(tmp_path), WebDatasetSource(tmp_path, index_cache=False)
    assert first.manifest() == second.manifest()
    manifest = first.manifest(full_hash=True)
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert manifest["total"] == 8 and manifest["samples_per_shard"] == [3, 3, 2]
    assert manifest["bytes_hash"] == second.manifest(full_hash=True)["bytes_hash"]

    samples[4]["txt"] = samples[4]["txt"] + "!"  # a longer caption: the size changes
    write_shards(samples, tmp_path, samples_per_shard=3)
    longer = WebDatasetSource(tmp_path)  # the sidecar index is stale and must be rebuilt
    assert longer[4]["text"].endswith("!")
    assert longer.manifest()["content_hash"] != manifest["content_hash"]

    before = longer.manifest(full_hash=True)
    samples[4]["txt"] = samples[4]["txt"][:-1] + "?"  # same size: only the bytes hash sees it
    write_shards(samples, tmp_path, samples_per_shard=3)
    after = WebDatasetSource(tmp_path).manifest(full_hash=True)
    assert after["content_hash"] == before["content_hash"]
    assert after["bytes_hash"] != before["bytes_hash"]


def test_sidecar_index_is_used_when_it_matches(tmp_path, monkeypatch):
    write_shards(make_samples(4), tmp_path, samples_per_shard=4)
    WebDatasetSource(tmp_path)
    assert (tmp_path / "shard-000000.tar.idx.json").exists()
    monkeypatch.setattr(webdataset, "scan_shard", lambda path: pytest.fail("rescanned"))
    assert len(WebDatasetSource(tmp_path)) == 4


def test_pickle_round_trip_after_reads(tmp_path):
    samples = make_samples(9)
    write_shards(samples, tmp_path, samples_per_shard=4)
    source = WebDatasetSource(tmp_path)
    source[0], source[8]  # open some handles first
    clone = pickle.loads(pickle.dumps(source))
    assert [clone[i] for i in range(9)] == expected_items(samples, 4)
    assert clone.manifest() == source.manifest()


def test_concurrent_reads_from_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(webdataset, "MAX_OPEN_FILES_PER_THREAD", 2)  # exercise eviction too
    samples = make_samples(60)
    write_shards(samples, tmp_path, samples_per_shard=7)
    source, expected = WebDatasetSource(tmp_path), expected_items(samples, 7)
    order = np.random.default_rng(1).integers(0, 60, 2000)
    with ThreadPoolExecutor(8) as pool:
        items = list(pool.map(source.__getitem__, order))
    assert all(item == expected[i] for i, item in zip(order, items, strict=True))


def test_invalid_shards_raise_naming_the_file(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ValueError, match="bad.tar"):
        WebDatasetSource([str(bad)])
    good = write_shards(make_samples(3), tmp_path / "t", samples_per_shard=3)[0]
    cut = tmp_path / "cut.tar"
    for size in (1500, 2048, 5000):  # inside a header, at a member boundary, inside data
        cut.write_bytes(open(good, "rb").read()[:size])
        with pytest.raises(ValueError, match="cut.tar"):
            WebDatasetSource([str(cut)], index_cache=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.tar shards in .*empty"):
        WebDatasetSource(tmp_path / "empty")


def test_bad_keys_are_rejected_when_writing(tmp_path):
    with pytest.raises(ValueError, match="key"):
        write_shards([{"__key__": "a.b", "txt": "x"}], tmp_path)
    with pytest.raises(TypeError):
        write_shards([{"__key__": "a", "txt": 3}], tmp_path)
    assert not list(tmp_path.glob("*"))  # no shard, no leftover .tmp
