"""The released-layout reader (spec/fif.md §2.4-2.5) on the reference info JSONs, with stand-in
images, plus hand-made JSONs for the caption policy and bad data."""

from __future__ import annotations

import collections
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from fomo_jax.data import fif
from tests.conftest import SHARED

INFO = os.path.join(SHARED, "info")
CLASSNAMES = os.path.join(SHARED, "classnames")

# The reference info JSONs available to the tests: file -> (NAME, template from spec §2.3).
REAL = {
    "MONKEYS10_train_224.json": ("MONKEYS10", "A photo of a {}, a type of monkey."),
    "MONKEYS10_test_224.json": ("MONKEYS10", "A photo of a {}, a type of monkey."),
    "ISICMELANOMA_test_224.json": (
        "ISICMELANOMA",
        "A close-up photo of human skin with a mole exhibiting {}.",
    ),
    "MVTECAD_Adapt_test_224.json": ("MVTECAD_Adapt", "A close-up photo of a {}."),
    "FLICKR30K_test.json": ("FLICKR30K", "{}"),
}
MONKEY_TEMPLATE = REAL["MONKEYS10_test_224.json"][1]


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


PNG = _png()


def _need_shared():
    if not os.path.isdir(INFO):
        pytest.skip(f"reference data not found at {SHARED}")


def _read(filename: str) -> dict:
    with open(os.path.join(INFO, filename)) as f:
        return json.load(f)


def _write_images(root, name: str, keys) -> None:
    for key in keys:
        path = os.path.join(root, name, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(PNG)


def expected_captions(entry: dict, template: str) -> tuple[list[str], str]:
    """Spec §2.5 computed independently: default_caption, else synthetic_merged_caption, else
    the class primer; a string gives a one-element list; texts verbatim."""
    for field in ("default_caption", "synthetic_merged_caption"):
        value = entry.get(field)
        if isinstance(value, str):
            return [value], field
        if isinstance(value, list) and value:
            return list(value), field
    return [template.format(entry["classname"])], "primer"


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """`<root>/00_info/` with the reference info JSONs unchanged, and a stand-in image for every
    key of every one of them under `<root>/<NAME>/<key>`."""
    _need_shared()
    root = str(tmp_path_factory.mktemp("fif"))
    os.makedirs(os.path.join(root, "00_info"))
    for filename, (name, _) in REAL.items():
        shutil.copy(os.path.join(INFO, filename), os.path.join(root, "00_info", filename))
        _write_images(root, name, _read(filename))
    return root


def _small_root(tmp_path, filename: str, name: str, entries: dict, images=None) -> str:
    """A data root with one hand-made info JSON in `<root>/00_info/` and its images."""
    root = tmp_path / "root"
    (root / "00_info").mkdir(parents=True)
    text = entries if isinstance(entries, str) else json.dumps(entries)
    (root / "00_info" / filename).write_text(text)
    if not isinstance(entries, str):
        _write_images(str(root), name, entries if images is None else images)
    return str(root)


def _monkey_subset(n: int = 6) -> dict:
    """The first `n` records of MONKEYS10 test (real classnames and targets)."""
    return dict(list(_read("MONKEYS10_test_224.json").items())[:n])


# --- the reference JSONs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, split, filename",
    [
        ("MONKEYS10", "train", "MONKEYS10_train_224.json"),
        ("monkeys10", "test", "MONKEYS10_test_224.json"),
        ("ISICMELANOMA", "test", "ISICMELANOMA_test_224.json"),
        ("mvtecad_adapt", "test", "MVTECAD_Adapt_test_224.json"),
        ("FLICKR30K", "test", "FLICKR30K_test.json"),
    ],
)
def test_reference_json_read_record_by_record(released, dataset, split, filename):
    name, template = REAL[filename]
    raw = _read(filename)
    got = fif.load_split(released, dataset, split)  # default info_dir: <root>/00_info

    assert isinstance(got, fif.Split) and isinstance(got, list)
    assert got.info_path == os.path.join(released, "00_info", filename)
    assert got.split == split
    assert got.skipped == [] and got.fallbacks == 0
    assert len(got) == len(raw)
    assert [r.key for r in got] == list(raw)  # JSON order
    for r, (key, entry) in zip(got, raw.items(), strict=True):
        assert r.image_path == os.path.join(released, name, key)
        assert os.path.isfile(r.image_path)
        assert r.target == entry["target"] and type(r.target) is int
        assert r.classname == entry["classname"]
        assert (r.captions, r.caption_source) == expected_captions(entry, template)
        assert r.dataset == got.dataset
    np.testing.assert_array_equal(got.targets, [e["target"] for e in raw.values()])
    assert got.targets.dtype == np.int64


def test_resized_keys_carry_their_folder(released):
    got = fif.load_split(released, "MONKEYS10", "train")
    assert len(got) == 1097
    for r in got:
        assert r.key.startswith("MONKEYS10_train_224/")
        assert r.image_path.startswith(os.path.join(released, "MONKEYS10", "MONKEYS10_train_224"))


def test_monkeys_test_captions_are_merged_lists(released):
    got = fif.load_split(released, "MONKEYS10", "test")
    assert len(got) == 272
    assert {r.caption_source for r in got} == {"synthetic_merged_caption"}
    first = got[0]
    assert first.key == "MONKEYS10_test_224/monkeys10/validation/validation/n0/n014.jpg"
    assert first.classname == "mantled howler" and first.target == 0
    assert first.captions == [
        "A photo of a mantled howler, a type of monkey, shows a black monkey eating fruit in a "
        "tree."
    ]


def test_isic_default_caption_string_becomes_one_element_list(released):
    raw = _read("ISICMELANOMA_test_224.json")
    got = fif.load_split(released, "isicmelanoma", "test")
    assert all(r.caption_source == "default_caption" for r in got)
    assert [r.captions for r in got] == [[e["default_caption"]] for e in raw.values()]
    assert got.dataset == "isicmelanoma"


def test_flickr30k_retrieval(released):
    raw = _read("FLICKR30K_test.json")
    got = fif.load_split(released, "flickr30k", "test")
    assert len(got) == 1000 and got.dataset == "flickr30k"
    for r, entry in zip(got, raw.values(), strict=True):
        assert r.classname is None and r.target == entry["target"]
        assert len(r.captions) == 5
        assert r.captions == entry["default_caption"]
        assert r.caption_source == "default_caption"
    # Spec §2.4 says every Flickr30k target is 0; the released JSON numbers the images 0..999
    # instead. The reader passes the JSON's value through.
    assert got.targets.tolist() == list(range(1000))
    assert got[0].captions[0] == "The man with pierced ears is wearing glasses and an orange hat."
    assert got[0].image_path == os.path.join(
        released, "FLICKR30K", "flickr30k-images/1007129816.jpg"
    )


def test_monkeys_validated_against_reference_class_list(released):
    names = json.load(open(os.path.join(CLASSNAMES, "MONKEYS10_classnames.json")))
    for split in ("train", "test"):
        got = fif.load_split(released, "MONKEYS10", split, classnames_dir=CLASSNAMES)
        assert all(names[r.target] == r.classname for r in got)
        assert set(got.targets.tolist()) == set(range(10))


def test_name_and_key_give_the_same_split(released):
    by_name = fif.load_split(released, "MONKEYS10", "test")
    by_key = fif.load_split(released, "monkeys10", "test")
    assert list(by_name) == list(by_key)
    assert by_name.dataset == by_key.dataset == "monkeys10"
    assert by_name.info_path.endswith("MONKEYS10_test_224.json")


def test_explicit_info_dir_and_default_info_dir(released, tmp_path):
    explicit = fif.load_split(released, "monkeys10", "test", INFO)
    assert explicit.info_path == os.path.join(INFO, "MONKEYS10_test_224.json")
    assert list(explicit) == list(fif.load_split(released, "monkeys10", "test"))
    assert fif.default_info_dir(released) == os.path.join(released, "00_info")
    # Without a 00_info folder the data root itself holds the JSONs.
    assert fif.default_info_dir(str(tmp_path)) == str(tmp_path)


def test_records_read_as_dicts(released):
    r = fif.load_split(released, "monkeys10", "test")[3]
    assert r["captions"] is r.captions
    assert (r["target"], r["classname"], r["key"]) == (r.target, r.classname, r.key)
    assert r["image_path"] == r.image_path and r["caption_source"] == r.caption_source


# --- caption policy on hand-made records -------------------------------------------------------


def _policy_entries() -> dict:
    """MONKEYS10 records (real classnames/targets) with every caption shape of spec §2.5."""
    base = list(_monkey_subset(8).items())
    variants = [
        # default list wins over merged; kept verbatim with its spaces, in order
        {
            "default_caption": ["  first with spaces ", "second\t"],
            "synthetic_merged_caption": ["m"],
        },
        # default string (leading/trailing space kept)
        {"default_caption": " lead and trail ", "synthetic_merged_caption": ["m"]},
        # no default, merged string
        {"default_caption": None, "synthetic_merged_caption": "merged string "},
        # no default, merged list of 2 identical
        {"default_caption": None, "synthetic_merged_caption": ["same", "same"]},
        # nothing: primer fallback
        {"default_caption": None, "synthetic_merged_caption": None},
        # caption fields absent altogether: primer fallback
        {"__drop__": True},
        # a normal real record in between
        {},
        # default string beats a merged string
        {"default_caption": "default", "synthetic_merged_caption": "merged"},
    ]
    entries = {}
    for (key, entry), change in zip(base, variants, strict=True):
        entry = dict(entry)
        if change.pop("__drop__", False):
            for field in ("default_caption", "synthetic_merged_caption", "synthetic_caption"):
                entry.pop(field)
        entry.update(change)
        entries[key] = entry
    return entries


def test_caption_policy_per_record_verbatim(tmp_path):
    _need_shared()
    entries = _policy_entries()
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", entries)
    got = fif.load_split(root, "MONKEYS10", "test", classnames_dir=CLASSNAMES)
    assert [r.key for r in got] == list(entries)
    for r, entry in zip(got, entries.values(), strict=True):
        assert (r.captions, r.caption_source) == expected_captions(entry, MONKEY_TEMPLATE)
    assert got[0].captions == ["  first with spaces ", "second\t"]
    assert got[1].captions == [" lead and trail "]
    assert got[2].captions == ["merged string "]
    assert got[3].captions == ["same", "same"]
    assert got[7].captions == ["default"]
    # The [FIX]: the fallback is per record, built from that record's own class name.
    assert got.fallbacks == 2
    for i in (4, 5):
        assert got[i].caption_source == "primer"
        assert got[i].captions == [f"A photo of a {got[i].classname}, a type of monkey."]
        assert got[i].image_path.endswith(list(entries)[i])
    assert got[6].caption_source == "synthetic_merged_caption"


def test_fallback_only_where_caption_missing_keeps_alignment(tmp_path):
    """Every other record loses its captions: the rest keep their own, nothing shifts."""
    _need_shared()
    raw = _read("MONKEYS10_train_224.json")
    entries = {}
    for i, (key, entry) in enumerate(list(raw.items())[:40]):
        if i % 2:
            entry = dict(entry, default_caption=None, synthetic_merged_caption=None)
        entries[key] = entry
    root = _small_root(tmp_path, "MONKEYS10_train_224.json", "MONKEYS10", entries)
    got = fif.load_split(root, "monkeys10", "train")
    assert got.fallbacks == 20
    for i, (r, (key, entry)) in enumerate(zip(got, entries.items(), strict=True)):
        assert r.key == key
        if i % 2:
            assert r.captions == [MONKEY_TEMPLATE.format(entry["classname"])]
        else:
            assert r.captions == raw[key]["synthetic_merged_caption"]


def test_retrieval_fallback_uses_fscoco_template(tmp_path):
    entries = {
        "raw/a.jpg": {"classname": "cat", "target": 3, "default_caption": None},
        "raw/b.jpg": {"classname": "dog", "target": 4, "default_caption": "A sketch of a dog."},
    }
    root = _small_root(tmp_path, "FSCOCO_train.json", "FSCOCO", entries)
    got = fif.load_split(root, "FSCOCO", "train")
    assert got[0].captions == ["A sketch of a cat"] and got[0].caption_source == "primer"
    assert got[1].captions == ["A sketch of a dog."]
    assert got.fallbacks == 1 and got.targets.tolist() == [3, 4]


def test_split_mapping_uses_file_split_names(tmp_path):
    entries = {"images/1.jpg": {"classname": "stop", "target": 0, "default_caption": None}}
    root = _small_root(tmp_path, "MTSD_val.json", "MTSD", entries)
    got = fif.load_split(root, "mtsd", "test")
    assert got.info_path == os.path.join(root, "00_info", "MTSD_val.json")
    assert got[0].image_path == os.path.join(root, "MTSD", "images/1.jpg")
    assert got[0].captions == ['A centered photo of a "stop" traffic sign.']
    with pytest.raises(FileNotFoundError, match="MTSD_train.json"):
        fif.load_split(root, "mtsd", "train")


# --- missing images ----------------------------------------------------------------------------


def test_missing_image_names_path_and_key(tmp_path):
    _need_shared()
    entries = _monkey_subset()
    keys = list(entries)
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", entries, keys[:3])
    with pytest.raises(FileNotFoundError) as e:
        fif.load_split(root, "MONKEYS10", "test")
    assert os.path.join(root, "MONKEYS10", keys[3]) in str(e.value)
    assert repr(keys[3]) in str(e.value) or keys[3] in str(e.value)


def test_skip_missing_leaves_records_out_and_lists_them(tmp_path):
    _need_shared()
    entries = _monkey_subset(8)
    keys = list(entries)
    present = [k for i, k in enumerate(keys) if i not in (1, 4)]
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", entries, present)
    got = fif.load_split(root, "MONKEYS10", "test", skip_missing=True)
    assert [r.key for r in got] == present
    assert [k for k, _ in got.skipped] == [keys[1], keys[4]]
    assert all(isinstance(reason, str) and reason for _, reason in got.skipped)
    assert len(got.targets) == 6
    # Without the image check every record is kept.
    assert len(fif.load_split(root, "MONKEYS10", "test", check_images=False)) == 8


def test_fallbacks_count_only_kept_records(tmp_path):
    _need_shared()
    entries = _monkey_subset(4)
    keys = list(entries)
    for k in keys[:2]:
        entries[k] = dict(entries[k], default_caption=None, synthetic_merged_caption=None)
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", entries, keys[1:])
    got = fif.load_split(root, "MONKEYS10", "test", skip_missing=True)
    assert [k for k, _ in got.skipped] == [keys[0]]
    assert sum(r.caption_source == "primer" for r in got) == 1
    assert got.fallbacks == 1


# --- bad data ----------------------------------------------------------------------------------


def test_missing_info_json_names_expected_path(tmp_path):
    (tmp_path / "00_info").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        fif.load_split(str(tmp_path), "monkeys10", "train")
    assert os.path.join(str(tmp_path), "00_info", "MONKEYS10_train_224.json") in str(e.value)


def test_test_only_dataset_has_no_train_split(tmp_path):
    with pytest.raises(ValueError, match="imagenet"):
        fif.load_split(str(tmp_path), "IMAGENET", "train")


@pytest.mark.parametrize("text", ['{"a.jpg": {"target": 0,', "not json", "[1, 2]", '"x"'])
def test_malformed_info_json_names_file(tmp_path, text):
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", text)
    with pytest.raises(ValueError) as e:
        fif.load_split(root, "monkeys10", "test", check_images=False)
    assert os.path.join(root, "00_info", "MONKEYS10_test_224.json") in str(e.value)


@pytest.mark.parametrize(
    "change",
    [
        {"target": "0"},
        {"target": 0.0},
        {"target": True},
        {"target": None},
        {"classname": 7},
        {"default_caption": 5},
        {"default_caption": ["ok", 3]},
        {"default_caption": {"text": "x"}},
        {"default_caption": None, "synthetic_merged_caption": 1.5},
        {"default_caption": None, "synthetic_merged_caption": [None]},
    ],
    ids=repr,
)
def test_bad_record_names_file_and_key(tmp_path, change):
    _need_shared()
    entries = _monkey_subset(4)
    bad_key = list(entries)[2]
    entries[bad_key] = dict(entries[bad_key], **change)
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", entries)
    with pytest.raises(ValueError) as e:
        fif.load_split(root, "monkeys10", "test")
    assert os.path.join(root, "00_info", "MONKEYS10_test_224.json") in str(e.value)
    assert bad_key in str(e.value)


def test_record_not_an_object_names_file_and_key(tmp_path):
    entries = {"a.jpg": ["not", "a", "record"]}
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", entries)
    with pytest.raises(ValueError) as e:
        fif.load_split(root, "monkeys10", "test")
    assert "MONKEYS10_test_224.json" in str(e.value) and "a.jpg" in str(e.value)


def test_retrieval_record_without_any_text_is_an_error(tmp_path):
    entries = {"img/1.jpg": {"classname": None, "target": 0, "default_caption": None}}
    root = _small_root(tmp_path, "FLICKR30K_test.json", "FLICKR30K", entries)
    with pytest.raises(ValueError) as e:
        fif.load_split(root, "flickr30k", "test")
    assert "FLICKR30K_test.json" in str(e.value) and "img/1.jpg" in str(e.value)


@pytest.mark.parametrize(
    "change",
    [{"target": 5}, {"classname": "squirrel"}, {"target": 10}, {"target": -1}],
    ids=repr,
)
def test_target_classname_must_agree_with_class_list(tmp_path, change):
    _need_shared()
    entries = _monkey_subset(4)
    bad_key = list(entries)[1]
    assert entries[bad_key]["target"] != 5
    entries[bad_key] = dict(entries[bad_key], **change)
    root = _small_root(tmp_path, "MONKEYS10_test_224.json", "MONKEYS10", entries)
    with pytest.raises(ValueError) as e:
        fif.load_split(root, "monkeys10", "test", classnames_dir=CLASSNAMES)
    assert bad_key in str(e.value)
    # The class list is also picked up from the info folder itself (classnames_dir default).
    shutil.copy(
        os.path.join(CLASSNAMES, "MONKEYS10_classnames.json"), os.path.join(root, "00_info")
    )
    with pytest.raises(ValueError, match="disagree"):
        fif.load_split(root, "monkeys10", "test")


# --- choose_caption ----------------------------------------------------------------------------


def test_choose_caption_test_time_gives_the_first():
    assert fif.choose_caption(["a", "b", "c"], None) == "a"
    assert fif.choose_caption(["only"], None) == "only"


def test_choose_caption_training_draws_uniformly():
    rng = np.random.default_rng(0)
    captions = ["a", "b", "c", "d", "e"]
    counts = collections.Counter(fif.choose_caption(captions, rng) for _ in range(5000))
    assert set(counts) == set(captions)
    for c in captions:  # 1000 expected each; sd ~ 28
        assert 850 < counts[c] < 1150, counts
    # A length-1 list always gives its element; duplicates are fine.
    assert {fif.choose_caption(["x"], rng) for _ in range(50)} == {"x"}
    assert {fif.choose_caption(["y", "y"], rng) for _ in range(50)} == {"y"}


def test_choose_caption_reproducible_for_a_seed():
    captions = [str(i) for i in range(10)]

    def draws(seed):
        rng = np.random.default_rng(seed)
        return [fif.choose_caption(captions, rng) for _ in range(20)]

    assert draws(3) == draws(3)
    assert len(set(draws(3))) > 1
