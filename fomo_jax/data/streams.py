"""Class streams (spec/fif.md §3): parse, validate, chunk into tasks, and generate orders.

A stream is the ordered list of (dataset, class) pairs the model sees; it alone defines "what is
learned when". In memory an entry is a `(dataset_key, classname)` tuple. On disk a stream is the
reference's JSON list of "<DATASET>+++<classname>" strings, which `load_stream`/`save_stream`
read and write byte-compatibly.

The order generators are pure functions of their inputs (and a seed, through
`np.random.default_rng`), and each returns a permutation of its input, so a generated order can
be saved and fed back to `load_stream` without changing the set of pairs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from fomo_jax.data import registry

SEPARATOR = "+++"
Entry = tuple[str, str]  # (dataset key, classname)
Registry = Mapping[str, registry.DatasetInfo] | None


class _Resolver:
    """Resolves dataset spellings and class indices once per dataset, so validating the 18,381
    entries of a full stream costs dictionary look-ups rather than file reads or list scans."""

    def __init__(self, datasets: Registry, classnames_dir: str | None):
        self.datasets = datasets
        self.classnames_dir = classnames_dir
        self._infos: dict[str, registry.DatasetInfo] = {}
        self._classes: dict[str, tuple[dict[str, int], int]] = {}

    def info(self, spelling: str) -> registry.DatasetInfo:
        """The dataset of a key or folder spelling; KeyError when it is not registered."""
        if spelling not in self._infos:
            self._infos[spelling] = registry.get(spelling, self.datasets)
        return self._infos[spelling]

    def _load(self, info: registry.DatasetInfo) -> tuple[dict[str, int], int]:
        if info.key not in self._classes:
            names = registry.classnames(info, self.classnames_dir)
            index: dict[str, int] = {}
            for i, name in enumerate(names):
                index.setdefault(name, i)
            self._classes[info.key] = (index, len(names))
        return self._classes[info.key]

    def class_index(self, info: registry.DatasetInfo) -> dict[str, int]:
        """classname -> target (the first index, should a list repeat a name)."""
        return self._load(info)[0]

    def num_classes(self, info: registry.DatasetInfo) -> int:
        """Length of the dataset's class list (its label space, used for global offsets)."""
        return self._load(info)[1]


def load_stream(
    path: str, classnames_dir: str | None = None, *, datasets: Registry = None
) -> list[Entry]:
    """Read and validate a stream file; returns (dataset key, classname) pairs in file order.

    Every entry is split at its first "+++": no dataset spelling contains "+++", while a class
    name could (none of the reference class lists does), so the classname keeps any later ones.
    Dataset spellings are normalised to registry keys; with `classnames_dir`, each classname must
    also occur verbatim in `<classnames_dir>/<NAME>_classnames.json`. Errors name the file and
    the offending entry with its index.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"stream file not found: {path}")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, list):
        raise ValueError(
            f"{path}: expected a JSON list of '<DATASET>+++<classname>' strings, "
            f"got {type(raw).__name__}"
        )
    if not raw:
        raise ValueError(f"{path}: the stream is empty")
    resolver = _Resolver(datasets, classnames_dir)
    entries: list[Entry] = []
    seen: dict[Entry, int] = {}
    for i, item in enumerate(raw):
        where = f"{path}: entry {i} {item!r}"
        if not isinstance(item, str):
            raise ValueError(f"{where}: expected a '<DATASET>+++<classname>' string")
        spelling, sep, classname = item.partition(SEPARATOR)
        if not sep or not spelling or not classname:
            raise ValueError(f"{where}: expected '<DATASET>{SEPARATOR}<classname>'")
        try:
            info = resolver.info(spelling)
        except KeyError:
            raise ValueError(f"{where}: unknown dataset {spelling!r}") from None
        if classnames_dir is not None:
            _check_class(resolver, info, classname, where)
        entry = (info.key, classname)
        if entry in seen:
            raise ValueError(f"{where}: duplicate of entry {seen[entry]}")
        seen[entry] = i
        entries.append(entry)
    return entries


def _check_class(resolver: _Resolver, info: registry.DatasetInfo, classname: str, where: str):
    """Raise unless `classname` is in the dataset's class list; returns its target."""
    try:
        index = resolver.class_index(info)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from None
    if classname not in index:
        path = registry.classnames_path(info, resolver.classnames_dir)
        raise ValueError(f"{where}: class {classname!r} is not in the class list {path}")
    return index[classname]


def save_stream(entries: Sequence[Entry], path: str, *, datasets: Registry = None) -> None:
    """Write entries in the reference format (folder NAME spelling, 4-space indented JSON), so
    a generated order can be shared with, or read back by, either implementation."""
    lines = [f"{registry.get(d, datasets).name}{SEPARATOR}{c}" for d, c in entries]
    with open(path, "w") as f:
        json.dump(lines, f, indent=4)


def chunk(entries: Sequence, num_tasks: int) -> list[list]:
    """Split a stream into `num_tasks` consecutive chunks (spec §3.3): with c = N // T and
    r = N % T, tasks 0..r-1 get c + 1 entries and the rest c."""
    n = len(entries)
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    if n < num_tasks:
        raise ValueError(f"a stream of {n} entries cannot fill {num_tasks} tasks")
    size, extra = divmod(n, num_tasks)
    chunks, start = [], 0
    for task in range(num_tasks):
        stop = start + size + (1 if task < extra else 0)
        chunks.append(list(entries[start:stop]))
        start = stop
    return chunks


def stream_datasets(entries: Sequence[Entry]) -> list[str]:
    """The datasets of a stream in order of first appearance (the experiment's dataset list)."""
    return list(dict.fromkeys(d for d, _ in entries))


def dataset_incremental_tasks(entries: Sequence[Entry]) -> list[list[Entry]]:
    """Dataset-incremental chunking (spec §3.3): a new task whenever the dataset changes."""
    tasks: list[list[Entry]] = []
    for entry in entries:
        if not tasks or tasks[-1][-1][0] != entry[0]:
            tasks.append([])
        tasks[-1].append(entry)
    return tasks


@dataclasses.dataclass(frozen=True)
class EntryTargets:
    """The label fields of one stream entry (spec §3.2). Contrastive training needs only
    `dataset` and `target`; the rest serve classification-style heads."""

    dataset: str
    classname: str
    target: int  # index in the dataset's class list
    local_target: int  # rank among the dataset's classes present in the stream
    global_target: int  # target + class-list sizes of the datasets that appear earlier
    global_local_target: int  # local_target + stream class counts of earlier datasets


def parse_targets(
    entries: Sequence[Entry], classnames_dir: str, *, datasets: Registry = None
) -> list[EntryTargets]:
    """Compute the label fields of spec §3.2 for every entry, in stream order.

    Offsets accumulate over datasets in order of first appearance in this stream, so the same
    class gets different global targets in differently ordered streams (as in the reference).
    """
    resolver = _Resolver(datasets, classnames_dir)
    keys, targets = [], []
    for i, (spelling, classname) in enumerate(entries):
        where = f"stream entry {i} {(spelling, classname)!r}"
        try:
            info = resolver.info(spelling)
        except KeyError:
            raise ValueError(f"{where}: unknown dataset {spelling!r}") from None
        keys.append(info.key)
        targets.append(_check_class(resolver, info, classname, where))
    present: dict[str, list[int]] = {}
    for key, target in zip(keys, targets, strict=True):
        present.setdefault(key, []).append(target)
    local_rank = {key: {t: r for r, t in enumerate(sorted(set(ts)))} for key, ts in present.items()}
    offset, local_offset = {}, {}
    total = local_total = 0
    for key in present:  # dicts keep insertion order = first appearance
        offset[key], local_offset[key] = total, local_total
        total += resolver.num_classes(resolver.info(key))
        local_total += len(local_rank[key])
    result = []
    for (_, classname), key, target in zip(entries, keys, targets, strict=True):
        local = local_rank[key][target]
        result.append(
            EntryTargets(
                dataset=key,
                classname=classname,
                target=target,
                local_target=local,
                global_target=offset[key] + target,
                global_local_target=local_offset[key] + local,
            )
        )
    return result


# ---------------------------------------------------------------------------------------------
# Order generators. Each returns a new list that is a permutation of its input.


def reverse(entries: Sequence[Entry]) -> list[Entry]:
    """The exact reverse of a stream (the reference's `*_reverse_1` streams)."""
    return list(entries)[::-1]


def random_order(entries: Sequence[Entry], seed: int) -> list[Entry]:
    """A uniform random permutation (the `random_sequence_k` family)."""
    perm = np.random.default_rng(seed).permutation(len(entries))
    return [entries[i] for i in perm]


def dataset_incremental_order(
    entries: Sequence[Entry], dataset_order: Sequence[str] | None = None
) -> list[Entry]:
    """Each dataset as one contiguous block, keeping the within-dataset order.

    Blocks follow `dataset_order` (keys as in the entries; extra datasets are ignored so a
    global order can be passed) or, by default, first appearance.
    """
    present = stream_datasets(entries)
    if dataset_order is None:
        dataset_order = present
    if len(set(dataset_order)) != len(dataset_order):
        raise ValueError(f"dataset_order repeats a dataset: {list(dataset_order)}")
    wanted = set(dataset_order)
    missing = [d for d in present if d not in wanted]
    if missing:
        raise ValueError(f"dataset_order lacks stream datasets {missing}")
    blocks = _by_dataset(entries)
    return [e for d in dataset_order for e in blocks.get(d, [])]


def _by_dataset(entries: Sequence[Entry]) -> dict[str, list[Entry]]:
    blocks: dict[str, list[Entry]] = {}
    for entry in entries:
        blocks.setdefault(entry[0], []).append(entry)
    return blocks


def time_incremental_order(
    entries: Sequence[Entry],
    seed: int,
    *,
    periods: Mapping[str, object] | None = None,
    mode: str = "dschunked",
    datasets: Registry = None,
) -> list[Entry]:
    """Datasets in release-period order (the `time_incremental_*` streams, spec §3.4).

    A dataset's period is `periods[key]` if given, else its registry `release_period`; datasets
    with neither (e.g. evaluation-only ones) are an error. Datasets of one period are ordered
    by their position in the registry (the built-in registry is alphabetical by key with FSCOCO
    last, which reproduces the reference files), then by first appearance for datasets the
    registry lacks.

    mode "dschunked": each dataset one contiguous block, its classes shuffled.
    mode "mixed": the classes of all datasets of a period shuffled together (reference `rsagg`).
    One `default_rng(seed)` shuffles the blocks in that order.
    """
    if mode not in ("dschunked", "mixed"):
        raise ValueError(f"mode must be 'dschunked' or 'mixed', got {mode!r}")
    periods = dict(periods or {})
    position = {key: i for i, key in enumerate(datasets or registry.DATASETS)}
    blocks = _by_dataset(entries)
    sort_keys = {}
    for appearance, key in enumerate(blocks):
        if key in periods:
            period = periods[key]
        else:
            try:
                period = registry.get(key, datasets).release_period
            except KeyError:
                period = None
        if period is None:
            raise ValueError(
                f"dataset {key!r} has no release period; pass periods={{{key!r}: ...}}"
            )
        sort_keys[key] = (period, position.get(key, len(position)), appearance)
    order = sorted(blocks, key=sort_keys.__getitem__)
    group_of = (lambda key: sort_keys[key][0]) if mode == "mixed" else (lambda key: key)
    groups = [
        [e for key in members for e in blocks[key]]
        for _, members in itertools.groupby(order, key=group_of)
    ]
    rng = np.random.default_rng(seed)
    return [group[i] for group in groups for i in rng.permutation(len(group))]


def frequency_order(
    entries: Sequence[Entry],
    counts: Mapping,
    *,
    descending: bool = False,
) -> list[Entry]:
    """Order by concept count, rare first unless `descending` (the `frequency_sequence` family).

    `counts` is keyed by (dataset, classname) or by classname alone; the pair wins when both
    are present. Ties keep the input order in either direction.
    """
    values = []
    for i, entry in enumerate(entries):
        if entry in counts:
            values.append(counts[entry])
        elif entry[1] in counts:
            values.append(counts[entry[1]])
        else:
            raise KeyError(f"no count for stream entry {i} {entry!r}")
    order = sorted(range(len(entries)), key=values.__getitem__, reverse=descending)
    return [entries[i] for i in order]


def similarity_order(entries: Sequence[Entry], embeddings, start: int = 0) -> list[Entry]:
    """Greedy nearest-neighbour walk by cosine similarity (the `similarity_sequence` family).

    Starts at entry `start`; each step moves to the most similar unvisited entry, the lowest
    index on ties. `embeddings` is [N, D], row i describing entry i. O(N^2 D) time, O(N D)
    memory: one similarity row per step, never the N x N matrix.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    n = len(entries)
    if emb.ndim != 2 or emb.shape[0] != n:
        raise ValueError(f"embeddings must have shape [{n}, D], got {emb.shape}")
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"embedding of entry {int(np.argmin(norms[:, 0]))} is zero")
    emb = emb / norms
    visited = np.zeros(n, dtype=bool)
    path = [start]
    visited[start] = True
    for _ in range(n - 1):
        sims = emb @ emb[path[-1]]
        sims[visited] = -np.inf
        nxt = int(np.argmax(sims))  # argmax returns the first maximum: lowest index on ties
        visited[nxt] = True
        path.append(nxt)
    return [entries[i] for i in path]
