"""The mixed training batches of a task and the evaluation batches (grain)."""

import os

import numpy as np
import pytest
from PIL import Image

from fomo_jax.data import fif, fif_synth, mixture, pipeline, streams, webdataset
from fomo_jax.tokenizer import ByteTokenizer

SIZES = {"update": 5, "buffer": 4, "pretraining": 3}


@pytest.fixture(scope="module")
def world(synth_root):
    datasets = fif_synth.load_datasets(synth_root)
    info_dir = os.path.join(synth_root, "00_info")
    sources = {
        key: pipeline.SplitSource(fif.load_split(synth_root, key, "train", datasets=datasets))
        for key, info in datasets.items()
        if info.role == "adaptation"
    }
    catalogue = mixture.Catalogue(sources)
    entries = streams.load_stream(
        os.path.join(synth_root, "streams", "random_sequence_1.json"), info_dir, datasets=datasets
    )
    targets = streams.parse_targets(entries, info_dir, datasets=datasets)
    tasks = streams.chunk([(t.dataset, t.target) for t in targets], 3)
    pool = webdataset.WebDatasetSource(os.path.join(synth_root, "pretraining"))
    return dict(catalogue=catalogue, tasks=tasks, pool=pool)


def make(world, task=1, seed=0, steps=4, offset=0, num_threads=2, sizes=SIZES, rows=None,
         whole_batches=False):  # fmt: skip
    update, buffer = mixture.task_pools(world["catalogue"], world["tasks"], task)
    return pipeline.TaskBatches(
        catalogue=world["catalogue"],
        update_ids=update,
        buffer_ids=buffer,
        pretraining=world["pool"],
        batch_sizes=sizes,
        steps=steps,
        seed=seed,
        task=task,
        pretraining_offset=offset,
        tokenizer=ByteTokenizer(48),
        image_size=16,
        num_threads=num_threads,
        rows=rows,
        whole_batches=whole_batches,
    )


def test_a_process_share_is_its_rows_of_the_global_batch(world):
    """What each process of a multi-host run loads: exactly its rows of every global batch
    (same augmentation and captions), also when it starts mid-task."""
    full = list(make(world, steps=3).dataset())
    size = len(full[0]["token_ids"])
    halves = [np.arange(0, size // 2), np.arange(size // 2, size)]
    for rows in halves:
        for start in (0, 1):
            share = list(make(world, steps=3, rows=rows).dataset(start_step=start))
            assert len(share) == 3 - start
            for whole, part in zip(full[start:], share, strict=True):
                np.testing.assert_array_equal(part["images"], whole["images"][rows])
                np.testing.assert_array_equal(part["token_ids"], whole["token_ids"][rows])


def test_batch_layout_and_pool_membership(world):
    batches = make(world)
    out = list(batches.dataset())
    assert len(out) == 4
    for batch in out:
        assert batch["images"].shape == (12, 16, 16, 3) and batch["images"].dtype == np.uint8
        assert batch["token_ids"].shape == (12, 48)
        # Update, then buffer, then pretraining samples (spec §4.2 batch assembly).
        assert batch["pool"].tolist() == [0] * 5 + [1] * 4 + [2] * 3
    current = set(world["tasks"][1])
    earlier = set(world["tasks"][0])
    for position in range(4 * 12):
        pool, sample = batches.locate(position)
        if pool == "pretraining":
            assert 0 <= sample < len(world["pool"])
            continue
        example = world["catalogue"][sample]
        entry = (example["dataset"], example["target"])
        assert entry in (current if pool == "update" else earlier)


def test_texts_are_candidate_captions_of_the_loaded_sample(world):
    batches = make(world, num_threads=0)
    tokenizer = ByteTokenizer(48)
    batch = next(iter(batches.dataset()))
    for slot in range(12):
        pool, sample = batches.locate(slot)
        source = world["pool"] if pool == "pretraining" else world["catalogue"]
        candidates = pipeline.example_texts(source[sample])
        assert any(np.array_equal(batch["token_ids"][slot], tokenizer([c])[0]) for c in candidates)


def test_deterministic_and_seed_dependent(world):
    a = list(make(world, seed=0).dataset())
    b = list(make(world, seed=0, num_threads=0).dataset())  # thread count changes nothing
    c = list(make(world, seed=1).dataset())
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["token_ids"], y["token_ids"])
    assert not all(np.array_equal(x["images"], z["images"]) for x, z in zip(a, c, strict=True))


def test_resume_mid_task_gives_the_uninterrupted_batches(world):
    full = list(make(world, steps=5).dataset())
    resumed = list(make(world, steps=5).dataset(start_step=3))
    assert len(resumed) == 2
    for x, y in zip(full[3:], resumed, strict=True):
        np.testing.assert_array_equal(x["images"], y["images"])
        np.testing.assert_array_equal(x["token_ids"], y["token_ids"])
    # The grain iterator state works too (what an orbax checkpoint would store).
    iterator = iter(make(world, steps=5).dataset())
    next(iterator), next(iterator)
    state = iterator.get_state()
    fresh = iter(make(world, steps=5).dataset())
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["images"], full[2]["images"])


def test_pretraining_stream_continues_across_tasks(world):
    first = make(world, task=1, steps=3)
    used = 3 * SIZES["pretraining"]
    second = make(world, task=2, steps=3, offset=used)
    one_stream = make(world, task=1, steps=6)
    order = [one_stream.locate(p)[1] for p in range(72) if one_stream.locate(p)[0] == "pretraining"]
    got = [b.locate(p)[1] for b in (first, second) for p in range(36)
           if b.locate(p)[0] == "pretraining"]  # fmt: skip
    assert got == order


def test_task_zero_has_no_buffer(world):
    sizes = mixture.pool_batch_sizes(12, {"pretraining": 0.33, "update": 0.34, "buffer": 0.33}, 0)
    batch = next(iter(make(world, task=0, sizes=sizes).dataset()))
    assert 1 not in batch["pool"].tolist() and len(batch["pool"]) == 12
    with pytest.raises(ValueError, match="buffer pool is empty"):
        make(world, task=0)  # a buffer share at task 0 is a configuration error


def test_corrupt_image_names_the_file(tmp_path, world):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")

    class Broken:
        targets = np.zeros(2, np.int64)

        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"image": str(bad), "captions": ["x"], "target": 0, "dataset": "d", "key": "k"}

    batches = pipeline.TaskBatches(
        catalogue=mixture.Catalogue({"d": Broken()}),
        update_ids=np.arange(2),
        buffer_ids=np.zeros(0, np.int64),
        pretraining=None,
        batch_sizes={"update": 2, "buffer": 0, "pretraining": 0},
        steps=1,
        seed=0,
        task=0,
        tokenizer=ByteTokenizer(8),
        image_size=8,
        num_threads=0,
    )
    with pytest.raises(Exception, match="broken.jpg"):
        next(iter(batches.dataset()))


class _Captioned:
    """Six training samples, each with its own caption; sample 0's image is corrupted."""

    def __init__(self, good, bad):
        self.paths = [str(bad)] + [str(good)] * 5
        self.targets = np.zeros(6, np.int64)

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return {"image": self.paths[i], "captions": [f"sample {i}"], "target": 0,
                "dataset": "d", "key": str(i)}  # fmt: skip


def _bad_image_batches(tmp_path, synth_root, policy, num_threads=0):
    good = os.path.join(synth_root, "SYNTH_SHAPES", "test")
    good = os.path.join(good, sorted(os.listdir(good))[0])
    good = os.path.join(good, sorted(os.listdir(good))[0])
    bad = tmp_path / "corrupted.jpg"
    with open(good, "rb") as f:
        bad.write_bytes(f.read()[:200] + bytes(300))  # a JPEG header, then zeros
    return pipeline.TaskBatches(
        catalogue=mixture.Catalogue({"d": _Captioned(good, bad)}),
        update_ids=np.arange(6),
        buffer_ids=np.zeros(0, np.int64),
        pretraining=None,
        batch_sizes={"update": 4, "buffer": 0, "pretraining": 0},
        steps=6,
        seed=0,
        task=0,
        tokenizer=ByteTokenizer(12),
        image_size=8,
        num_threads=num_threads,
        bad_images=policy,
    )


def test_undecodable_images_stop_or_are_replaced_deterministically(tmp_path, synth_root):
    with pytest.raises(ValueError, match=r"update pool, the d train split: .*corrupted\.jpg"):
        list(_bad_image_batches(tmp_path, synth_root, "error").dataset())
    batches = _bad_image_batches(tmp_path, synth_root, "skip")
    out = list(batches.dataset())
    tokens = ByteTokenizer(12)
    drawn = [batches.locate(j)[1] for j in range(6 * 4)]
    # Every draw of sample 0 (4 in 4 epochs of 6) is replaced by another sample of the pool
    # (and counted, with any replacement that is sample 0 again).
    assert drawn.count(0) == 4
    assert sum(int(b["skipped"]) for b in out) >= 4
    texts = np.concatenate([b["token_ids"] for b in out])
    for j, sample in enumerate(drawn):
        if sample:  # a good draw keeps its own caption
            np.testing.assert_array_equal(texts[j], tokens([f"sample {sample}"])[0])
        else:
            assert any(np.array_equal(texts[j], tokens([f"sample {i}"])[0]) for i in range(1, 6))
    # The replacements are a function of the position: threads and resuming change nothing.
    again = list(_bad_image_batches(tmp_path, synth_root, "skip", num_threads=2).dataset(3))
    for a, b in zip(out[3:], again, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_eval_images_pad_the_last_batch(synth_root):
    datasets = fif_synth.load_datasets(synth_root)
    split = fif.load_split(synth_root, "synth_shapes", "test", datasets=datasets)
    batches = list(pipeline.EvalImages(pipeline.SplitSource(split), 16, 64))
    assert [b["images"].shape for b in batches] == [(64, 16, 16, 3)] * -(-len(split) // 64)
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == len(split) and not valid[len(split) :].any()
    targets = np.concatenate([b["target"] for b in batches])[valid]
    np.testing.assert_array_equal(targets, split.targets)


def test_decoded_once_gives_the_same_batches(world, tmp_path, synth_root):
    """`data.decode_once`: the sources' images decoded up front give bit-identical batches
    (also resumed mid-task), keep the sources' attributes, and an image that does not decode
    stays encoded, so drawing it stops or is replaced exactly as without the cache."""
    decoded = dict(
        world,
        catalogue=mixture.Catalogue(
            {k: pipeline.DecodedSource(s) for k, s in world["catalogue"].sources.items()}
        ),
        pool=pipeline.DecodedSource(world["pool"]),
    )
    assert isinstance(decoded["pool"][0]["image"], Image.Image)
    assert decoded["pool"].manifest() == world["pool"].manifest()
    for key, source in decoded["catalogue"].sources.items():
        np.testing.assert_array_equal(source.targets, world["catalogue"].sources[key].targets)
    for start in (0, 2):  # whole batches (the config's choice with decode_once), any threads
        plain = list(make(world, steps=4).dataset(start))
        for threads, whole in ((0, True), (2, True), (0, False)):
            cached = make(decoded, steps=4, num_threads=threads, whole_batches=whole)
            cached = list(cached.dataset(start))
            assert len(plain) == len(cached) == 4 - start
            for a, b in zip(plain, cached, strict=True):
                assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    rows = np.arange(3, 9)  # a process's share of each batch, built whole
    full = list(make(world, steps=4).dataset(1))
    share = list(make(decoded, steps=4, rows=rows, whole_batches=True).dataset(1))
    for whole, part in zip(full, share, strict=True):
        np.testing.assert_array_equal(part["images"], whole["images"][rows])
        np.testing.assert_array_equal(part["token_ids"], whole["token_ids"][rows])

    plain = _bad_image_batches(tmp_path, synth_root, "skip")
    source = pipeline.DecodedSource(plain.catalogue.sources["d"])
    assert isinstance(source[0]["image"], str)  # the corrupted file, left as it was
    assert all(isinstance(source[i]["image"], Image.Image) for i in range(1, 6))
    cached = _bad_image_batches(tmp_path, synth_root, "skip")
    cached.catalogue = mixture.Catalogue({"d": source})
    for a, b in zip(plain.dataset(), cached.dataset(), strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    cached.bad_images = "error"
    with pytest.raises(ValueError, match=r"corrupted\.jpg"):
        list(cached.dataset())
