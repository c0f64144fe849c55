"""Stream parsing, chunking and order generators (spec/fif.md §3), checked against the
reference stream files where they are available and against hand computations otherwise."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import os

import numpy as np
import pytest

from fomo_jax.data import registry, streams
from tests.conftest import SHARED

STREAMS = os.path.join(SHARED, "streams")
CLASSNAMES = os.path.join(SHARED, "classnames")

# Spec §3.4: the dataset order of time_incremental_dschunked_{1..5}, in folder spelling.
TIME_INCREMENTAL_ORDER = (
    "FLOWERS102 CIFAR100 SUN397 CUB200 FGVCAircraft BIRDSNAP DTD ZAPPOS50k MITSTATES PLANTVILLAGE "
    "AI2DIAGRAMS OPENIMAGES CLEVR DSPRITES FRU92 PLACES365 VEG200 PATTERNNET SHAPES3D "
    "DOMAINNET_CLIPART DOMAINNET_INFOGRAPH DOMAINNET_PAINTING DOMAINNET_SKETCH MVTECAD_Adapt "
    "MVTECAD_Eval OBJECTNET CLRS ISICMELANOMA MTSD COUNTRY211 DF20MINI iNATURALIST2021 RESISC45 "
    "ARTBENCH10 DOLLARSTREET SNAKECLEF FSCOCO OBSC_ANIMALS OBSC_THINGS QUILT SynthCLIP106"
).split()


def _blocks(entries):
    """The sequence of dataset runs of a stream."""
    return [d for d, _ in itertools.groupby(d for d, _ in entries)]


def _write(tmp_path, content, name="stream.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


# --- reference stream files -----------------------------------------------------------------


@pytest.fixture(scope="module")
def reference():
    if not os.path.isdir(STREAMS):
        pytest.skip(f"reference data not found at {SHARED}")
    names = ("random_sequence_1", "random_sequence_1_fast", "time_incremental_dschunked_1")
    loaded = {n: streams.load_stream(f"{STREAMS}/{n}.json", CLASSNAMES) for n in names}
    loaded["debug_seq_small"] = streams.load_stream(f"{STREAMS}/debug_seq_small.json", CLASSNAMES)
    return loaded


def test_reference_streams_parse(reference):
    rs, fast = reference["random_sequence_1"], reference["random_sequence_1_fast"]
    ti, small = reference["time_incremental_dschunked_1"], reference["debug_seq_small"]
    assert (len(rs), len(fast), len(ti), len(small)) == (18381, 1000, 18381, 40)
    assert fast == rs[:1000]
    assert set(rs) == set(ti)
    assert rs[0] == ("places365", "church outdoor")
    # debug_seq_small is an order-preserving subsequence of random_sequence_1 (not only
    # MIT-States/Zappos50k as spec §3.4 says: it also holds ArtBench, Birdsnap and SUN397).
    positions = {e: i for i, e in enumerate(rs)}
    assert [positions[e] for e in small] == sorted(positions[e] for e in small)
    assert collections.Counter(d for d, _ in small) == {
        "mitstates": 17,
        "zappos50k": 10,
        "artbench10": 6,
        "birdsnap": 4,
        "sun397": 3,
    }


def test_reference_per_dataset_counts_match_spec_table(reference):
    counts = collections.Counter(d for d, _ in reference["random_sequence_1"])
    expected = {k: d.stream_classes for k, d in registry.DATASETS.items() if d.stream_classes}
    assert counts == expected
    assert counts["openimages"] == 579 and counts["quilt"] == 156 and len(counts) == 41


def test_no_reference_classname_contains_separator():
    """Why splitting at the first "+++" is safe: no class name contains one."""
    if not os.path.isdir(CLASSNAMES):
        pytest.skip(f"reference data not found at {SHARED}")
    for name in os.listdir(CLASSNAMES):
        with open(os.path.join(CLASSNAMES, name)) as f:
            assert not [c for c in json.load(f) if streams.SEPARATOR in c], name


def test_reference_chunking_920_then_919(reference):
    rs = reference["random_sequence_1"]
    chunks = streams.chunk(rs, 20)
    assert [len(c) for c in chunks] == [920] + [919] * 19
    assert list(itertools.chain.from_iterable(chunks)) == rs


def test_reference_time_incremental_block_order(reference):
    rs, ti = reference["random_sequence_1"], reference["time_incremental_dschunked_1"]
    ours = streams.time_incremental_order(rs, seed=1, mode="dschunked")
    expected = [registry.get(name).key for name in TIME_INCREMENTAL_ORDER]
    assert _blocks(ti) == expected
    assert _blocks(ours) == expected
    assert sorted(ours) == sorted(rs)
    tasks = streams.dataset_incremental_tasks(ti)
    assert len(tasks) == 41 and [t[0][0] for t in tasks] == expected
    assert list(itertools.chain.from_iterable(tasks)) == ti


def test_reference_targets(reference):
    rs = reference["random_sequence_1"]
    fields = streams.parse_targets(rs, CLASSNAMES)
    first = fields[0]
    places = registry.classnames("places365", CLASSNAMES)
    assert first.dataset == "places365" and first.target == places.index("church outdoor")
    assert first.global_target == first.target  # places365 appears first: offset 0
    # Unique pairs -> unique global targets, and stream-local targets are dense 0..M-1.
    assert len({f.global_target for f in fields}) == len(rs)
    assert sorted(f.global_local_target for f in fields) == list(range(len(rs)))
    openimages = sorted(f.local_target for f in fields if f.dataset == "openimages")
    assert openimages == list(range(579))


def test_reference_save_round_trip_is_byte_identical(reference, tmp_path):
    out = str(tmp_path / "copy.json")
    streams.save_stream(reference["random_sequence_1"], out)
    with open(f"{STREAMS}/random_sequence_1.json") as a, open(out) as b:
        assert a.read() == b.read()


# --- parsing and errors on small hand-made files ------------------------------------------


@pytest.fixture
def classnames_dir(tmp_path):
    folder = tmp_path / "classnames"
    folder.mkdir()
    (folder / "MITSTATES_classnames.json").write_text(json.dumps(["large bush", "old car"]))
    (folder / "EuroSAT_classnames.json").write_text(json.dumps(["Forest", "River"]))
    return str(folder)


@pytest.mark.parametrize("spelling", ["EUROSAT", "EuroSAT", "eurosat", "EuRoSaT"])
def test_dataset_spellings_normalise_to_key(tmp_path, classnames_dir, spelling):
    path = _write(tmp_path, [f"{spelling}+++River", "MITSTATES+++old car"])
    assert streams.load_stream(path, classnames_dir) == [
        ("eurosat", "River"),
        ("mitstates", "old car"),
    ]


def test_split_at_first_separator(tmp_path):
    path = _write(tmp_path, ["MITSTATES+++a+++b"])
    assert streams.load_stream(path) == [("mitstates", "a+++b")]


@pytest.mark.parametrize(
    "content, entry, message",
    [
        (["MITSTATES+++old car", "NOPE+++x"], "entry 1 'NOPE+++x'", "unknown dataset"),
        (["MITSTATES+++new car"], "entry 0 'MITSTATES+++new car'", "not in the class list"),
        (["EuroSAT+++River", "EUROSAT+++River"], "entry 1 'EUROSAT+++River'", "duplicate of"),
        (["MITSTATES+++old car", "MITSTATES old car"], "entry 1", "<DATASET>\\+\\+\\+"),
        (["MITSTATES+++"], "entry 0", "<DATASET>\\+\\+\\+"),
        (["MITSTATES+++old car", 7], "entry 1 7", "string"),
    ],
)
def test_bad_entries_name_file_and_entry(tmp_path, classnames_dir, content, entry, message):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match=message) as err:
        streams.load_stream(path, classnames_dir)
    assert path in str(err.value) and entry in str(err.value)


@pytest.mark.parametrize("content", ['{"MITSTATES": "old car"}', '"MITSTATES+++old car"', "[1,"])
def test_bad_files_name_the_file(tmp_path, content):
    path = _write(tmp_path, content)
    with pytest.raises(ValueError, match="list|JSON") as err:
        streams.load_stream(path)
    assert path in str(err.value)


def test_missing_files(tmp_path, classnames_dir):
    with pytest.raises(FileNotFoundError, match="absent.json"):
        streams.load_stream(str(tmp_path / "absent.json"))
    path = _write(tmp_path, ["MITSTATES+++old car", "CIFAR100+++apple"])
    with pytest.raises(FileNotFoundError, match="CIFAR100_classnames.json") as err:
        streams.load_stream(path, classnames_dir)
    assert path in str(err.value) and "entry 1" in str(err.value)
    assert streams.load_stream(path) == [("mitstates", "old car"), ("cifar100", "apple")]


def _toy_registry():
    base = registry.DATASETS["cifar100"]
    toy = lambda key, period, n: dataclasses.replace(
        base, key=key, name=key.upper(), aliases=(), num_classes=n, release_period=period
    )
    return {"toya": toy("toya", 1, 4), "toyb": toy("toyb", 0, 3), "toyc": toy("toyc", None, 2)}


def test_custom_registry_and_hand_computed_targets(tmp_path):
    folder = tmp_path / "cn"
    folder.mkdir()
    (folder / "TOYA_classnames.json").write_text(json.dumps(["a0", "a1", "a2", "a3"]))
    (folder / "TOYB_classnames.json").write_text(json.dumps(["b0", "b1", "b2"]))
    toys = _toy_registry()
    path = _write(tmp_path, ["TOYB+++b2", "toya+++a3", "TOYA+++a1", "toyb+++b0"])
    entries = streams.load_stream(path, str(folder), datasets=toys)
    assert entries == [("toyb", "b2"), ("toya", "a3"), ("toya", "a1"), ("toyb", "b0")]
    with pytest.raises(ValueError, match="unknown dataset 'MITSTATES'"):
        streams.load_stream(_write(tmp_path, ["MITSTATES+++x"]), datasets=toys)
    # First appearance: toyb (3 classes, 2 in the stream: b0, b2), then toya (4; a1, a3).
    # global offsets: toyb 0, toya 3; stream-local offsets: toyb 0, toya 2.
    expected = [  # (target, local_target, global_target, global_local_target)
        (2, 1, 2, 1),
        (3, 1, 6, 3),
        (1, 0, 4, 2),
        (0, 0, 0, 0),
    ]
    fields = streams.parse_targets(entries, str(folder), datasets=toys)
    got = [(f.target, f.local_target, f.global_target, f.global_local_target) for f in fields]
    assert got == expected
    assert [(f.dataset, f.classname) for f in fields] == entries
    with pytest.raises(ValueError, match="entry 1.*'a9'"):
        streams.parse_targets([("toya", "a0"), ("toya", "a9")], str(folder), datasets=toys)


def test_save_load_round_trip_uses_folder_spelling(tmp_path):
    entries = [("eurosat", "River"), ("inaturalist2021", "x+++y"), ("snake_clef", "cobra")]
    path = str(tmp_path / "out.json")
    streams.save_stream(entries, path)
    with open(path) as f:
        assert json.load(f) == ["EuroSAT+++River", "iNATURALIST2021+++x+++y", "SNAKECLEF+++cobra"]
    assert streams.load_stream(path) == entries


# --- chunking and grouping -----------------------------------------------------------------


@pytest.mark.parametrize(
    "n, tasks, sizes",
    [(10, 3, [4, 3, 3]), (9, 4, [3, 2, 2, 2]), (7, 7, [1] * 7), (5, 1, [5]), (11, 4, [3, 3, 3, 2])],
)
def test_chunk_sizes(n, tasks, sizes):
    chunks = streams.chunk(list(range(n)), tasks)
    assert [len(c) for c in chunks] == sizes
    assert list(itertools.chain.from_iterable(chunks)) == list(range(n))


@pytest.mark.parametrize("n, tasks", [(3, 4), (5, 0), (0, 1)])
def test_chunk_rejects(n, tasks):
    with pytest.raises(ValueError):
        streams.chunk(list(range(n)), tasks)


def test_stream_datasets_and_dataset_incremental_tasks():
    entries = [("b", "1"), ("b", "2"), ("a", "1"), ("b", "3"), ("c", "1")]
    assert streams.stream_datasets(entries) == ["b", "a", "c"]
    tasks = streams.dataset_incremental_tasks(entries)
    assert tasks == [[("b", "1"), ("b", "2")], [("a", "1")], [("b", "3")], [("c", "1")]]
    assert streams.dataset_incremental_tasks([]) == []


# --- order generators ------------------------------------------------------------------------

SMALL = [
    (d, f"{d}-{i}")
    for i in range(5)
    for d in ("quilt", "flowers102", "birdsnap", "dtd", "cifar100", "zappos50k")
]


def _all_generators():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(SMALL), 8))
    counts = {e: int(rng.integers(0, 4)) for e in SMALL}
    return {
        "reverse": lambda s: streams.reverse(s),
        "random": lambda s: streams.random_order(s, seed=3),
        "dataset_incremental": lambda s: streams.dataset_incremental_order(s),
        "dschunked": lambda s: streams.time_incremental_order(s, seed=3),
        "mixed": lambda s: streams.time_incremental_order(s, seed=3, mode="mixed"),
        "frequency": lambda s: streams.frequency_order(s, counts),
        "frequency_desc": lambda s: streams.frequency_order(s, counts, descending=True),
        "similarity": lambda s: streams.similarity_order(s, embeddings, start=4),
    }


@pytest.mark.parametrize("name", list(_all_generators()))
def test_generators_return_a_new_permutation(name):
    stream = list(SMALL)
    out = _all_generators()[name](stream)
    assert stream == SMALL  # input untouched
    assert out is not stream and sorted(out) == sorted(SMALL) and len(set(out)) == len(SMALL)
    assert out == _all_generators()[name](list(SMALL))  # a pure function of inputs and seed


def test_random_order_depends_on_seed():
    assert streams.random_order(SMALL, 1) == streams.random_order(SMALL, 1)
    assert streams.random_order(SMALL, 1) != streams.random_order(SMALL, 2)
    assert streams.reverse(streams.reverse(SMALL)) == SMALL


def test_dataset_incremental_order():
    entries = [("b", "1"), ("a", "1"), ("b", "2"), ("c", "1"), ("a", "2")]
    assert streams.dataset_incremental_order(entries) == [
        ("b", "1"),
        ("b", "2"),
        ("a", "1"),
        ("a", "2"),
        ("c", "1"),
    ]
    got = streams.dataset_incremental_order(entries, ["c", "z", "a", "b"])
    assert got == [("c", "1"), ("a", "1"), ("a", "2"), ("b", "1"), ("b", "2")]
    with pytest.raises(ValueError, match="lacks"):
        streams.dataset_incremental_order(entries, ["a", "b"])


def test_time_incremental_small():
    # Periods: flowers102 0, cifar100 1, birdsnap = dtd = zappos50k 5, quilt 14.
    dschunked = streams.time_incremental_order(SMALL, seed=0)
    assert _blocks(dschunked) == ["flowers102", "cifar100", "birdsnap", "dtd", "zappos50k", "quilt"]
    other_seed = streams.time_incremental_order(SMALL, seed=1)
    assert _blocks(other_seed) == _blocks(dschunked) and other_seed != dschunked
    mixed = streams.time_incremental_order(SMALL, seed=0, mode="mixed")
    period5 = {"birdsnap", "dtd", "zappos50k"}
    assert [d for d, _ in mixed[:10]] == ["flowers102"] * 5 + ["cifar100"] * 5
    assert {d for d, _ in mixed[10:25]} == period5 and len(_blocks(mixed[10:25])) > 3
    assert {d for d, _ in mixed[25:]} == {"quilt"}
    # Overrides: quilt first; an evaluation-only dataset needs an explicit period.
    moved = streams.time_incremental_order(SMALL, seed=0, periods={"quilt": -1})
    assert _blocks(moved)[0] == "quilt"
    with_eval = SMALL + [("eurosat", "River")]
    with pytest.raises(ValueError, match="'eurosat' has no release period"):
        streams.time_incremental_order(with_eval, seed=0)
    assert _blocks(streams.time_incremental_order(with_eval, 0, periods={"eurosat": 99}))[-1] == (
        "eurosat"
    )
    with pytest.raises(ValueError, match="mode"):
        streams.time_incremental_order(SMALL, seed=0, mode="rsagg")


def test_time_incremental_custom_registry_ties_follow_registry_order():
    toys = _toy_registry()  # toya period 1, toyb period 0, toyc none
    entries = [("toya", "a"), ("toyb", "b"), ("toya", "c")]
    got = streams.time_incremental_order(entries, seed=0, datasets=toys)
    assert _blocks(got) == ["toyb", "toya"]
    tied = streams.time_incremental_order(entries, 0, periods={"toyb": 1}, datasets=toys)
    assert _blocks(tied) == ["toya", "toyb"]  # same period: registry order (toya before toyb)
    with pytest.raises(ValueError, match="toyc"):
        streams.time_incremental_order(entries + [("toyc", "x")], seed=0, datasets=toys)


def test_frequency_order_hand_computed():
    entries = [("a", "x"), ("a", "y"), ("b", "x"), ("b", "z")]
    counts = {("a", "x"): 5, "y": 1, "x": 3, "z": 3}  # (a, x): the pair wins over "x"
    assert streams.frequency_order(entries, counts) == [
        ("a", "y"),
        ("b", "x"),
        ("b", "z"),
        ("a", "x"),
    ]
    assert streams.frequency_order(entries, counts, descending=True) == [
        ("a", "x"),
        ("b", "x"),
        ("b", "z"),
        ("a", "y"),
    ]
    with pytest.raises(KeyError, match="entry 1.*'y'"):
        streams.frequency_order(entries, {"x": 1, "z": 2})


def test_similarity_order_hand_computed():
    entries = [("d", str(i)) for i in range(5)]
    emb = np.array([[1, 0], [0, 1], [1, 1], [1, 0.1], [-1, 0]])
    # From e0: cos to e3 .995 > e2 .707; from e3: e2 .774; from e2: e1 .707 > e4 -.707.
    expected = [0, 3, 2, 1, 4]
    assert streams.similarity_order(entries, emb) == [entries[i] for i in expected]
    # From e4 = (-1, 0): e1 (cos 0) is the least dissimilar; then e2, e3, e0.
    got = streams.similarity_order(entries, emb * [[3], [0.5], [2], [1], [7]], start=4)
    assert got == [entries[i] for i in [4, 1, 2, 3, 0]]  # cosine: row scale does not matter
    ties = np.array([[1, 0], [0, 1], [0, 1], [1, 0]])  # from e3 (= e0): e1 and e2 tie at 0
    assert streams.similarity_order(entries[:4], ties) == [entries[i] for i in [0, 3, 1, 2]]
    with pytest.raises(ValueError, match="shape"):
        streams.similarity_order(entries, emb[:4])
