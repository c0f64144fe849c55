"""fif_synth: the generated benchmark is in the released layout and has the intended design."""

import filecmp
import json
import os

import numpy as np

from fomo_jax.data import fif, fif_synth, registry, streams, transforms, webdataset
from tests.data.conftest import SMALL


def test_every_split_reads_through_the_real_reader(synth_root):
    datasets = fif_synth.load_datasets(synth_root)
    roles = [d.role for d in datasets.values()]
    assert roles.count("adaptation") >= 3 and roles.count("evaluation") >= 3
    assert sum(d.is_retrieval for d in datasets.values()) == 1
    for info in datasets.values():
        splits = ["test"] + (["train"] if info.train_split else [])
        for split in splits:
            records = fif.load_split(synth_root, info.name, split, datasets=datasets)
            assert len(records) == (info.num_train if split == "train" else info.num_test)
            if info.is_retrieval:
                assert all(len(r.captions) == 3 and r.target == 0 for r in records)
                continue
            if info.role == "adaptation":
                key = f"{split}_per_class"
                assert len(records) == SMALL[key] * info.num_classes
            names = registry.classnames(info, os.path.join(synth_root, "00_info"))
            per_class = len(records) // len(names)
            assert np.bincount(records.targets).tolist() == [per_class] * len(names)
            assert records.fallbacks == 0
            image = transforms.decode_rgb(records[0].image_path)
            assert image.size == (SMALL["image_size"],) * 2


def test_stream_holds_every_adaptation_class_once(synth_root):
    datasets = fif_synth.load_datasets(synth_root)
    entries = streams.load_stream(
        os.path.join(synth_root, "streams", "random_sequence_1.json"),
        os.path.join(synth_root, "00_info"),
        datasets=datasets,
    )
    expected = {
        (k, c)
        for k, d in datasets.items()
        if d.role == "adaptation"
        for c in registry.classnames(d, os.path.join(synth_root, "00_info"))
    }
    assert set(entries) == expected and len(entries) == len(expected)
    assert len(streams.stream_datasets(entries[:6])) > 1  # shuffled, not dataset blocks


def test_pool_is_webdataset_with_captions(synth_root):
    pool = webdataset.WebDatasetSource(os.path.join(synth_root, "pretraining"))
    assert len(pool) == SMALL["pool_size"] and not pool.skipped
    assert len(pool.manifest()["shards"]) == 3
    sample = pool[17]
    assert transforms.decode_rgb(sample["image"]).size == (SMALL["image_size"],) * 2
    assert any(color in sample["text"] for color in fif_synth.COLORS)


def test_design_new_concepts_are_absent_from_the_pool_and_general_ones_present(synth_root):
    pool = webdataset.WebDatasetSource(os.path.join(synth_root, "pretraining"))
    pool_text = " ".join(pool[i]["text"] for i in range(len(pool))).lower()
    datasets = fif_synth.load_datasets(synth_root)
    info_dir = os.path.join(synth_root, "00_info")
    for key, info in datasets.items():
        if info.role == "adaptation" and key != "synth_letters":  # single letters occur anywhere
            for name in registry.classnames(info, info_dir):
                assert name.lower() not in pool_text, (key, name)
        elif info.role == "evaluation" and not info.is_retrieval:
            for name in registry.classnames(info, info_dir):
                assert name in pool_text, (key, name)
    # Adaptation captions never name a colour: training on them teaches colour invariance.
    for key, info in datasets.items():
        if info.role == "adaptation":
            for record in fif.load_split(synth_root, key, "train", datasets=datasets):
                words = set(" ".join(record.captions).lower().replace(".", "").split())
                assert not words & set(fif_synth.COLORS), record.captions


def test_generation_is_deterministic_and_reused(tmp_path, synth_root):
    other = str(tmp_path / "again")
    fif_synth.generate(other, **dict(SMALL, workers=2))  # process pool: same bytes
    for rel in ("00_info/SYNTH_GLYPHS_train.json", "SYNTH_TEXTURES/test/grid/0001.jpg",
                "pretraining/shard-000001.tar", "streams/random_sequence_1.json"):  # fmt: skip
        assert filecmp.cmp(os.path.join(synth_root, rel), os.path.join(other, rel), shallow=False)
    with open(os.path.join(other, "manifest.json")) as f:
        first = json.load(f)
    assert fif_synth.generate(other, **SMALL) == first  # same parameters: nothing rewritten
    changed = fif_synth.generate(other, **dict(SMALL, seed=4))
    assert changed["params"]["seed"] == 4
    assert not filecmp.cmp(
        os.path.join(synth_root, "pretraining/shard-000001.tar"),
        os.path.join(other, "pretraining/shard-000001.tar"),
        shallow=False,
    )
