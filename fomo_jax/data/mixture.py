"""The three data pools of a task and how one global batch is split between them (spec §4).

- update: every training image of the classes in the current task's chunk;
- buffer: every training image of the classes of all earlier chunks (unbounded, uniform);
- pretraining: the replay pool, one stream that continues across tasks.

Within a pool, samples are drawn from seeded epoch-wise permutations laid end to end (spec
§4.1 allows this in place of the reference's "virtual length" permutation), so the sample at
any position of any pool is a pure function of (seed, task, pool, position).
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

POOLS = ("pretraining", "update", "buffer")  # the spec's key order for the batch arithmetic
BATCH_ORDER = ("update", "buffer", "pretraining")  # the order of samples within a batch


def derive_seed(seed: int, *purpose: int | str) -> int:
    """A 63-bit seed for one random stream, folded from the experiment seed (spec §7.6 [FIX]).

    Strings are hashed with crc32 (Python's `hash` is salted per process).
    """
    words = [int(seed)] + [
        zlib.crc32(p.encode()) if isinstance(p, str) else int(p) for p in purpose
    ]
    if any(w < 0 for w in words):
        raise ValueError(f"seeds and purposes must be non-negative, got {words}")
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def pool_batch_sizes(batch_size: int, ratios: Mapping[str, float], task: int) -> dict[str, int]:
    """Per-pool batch sizes of spec §4.2 (steps 1-4, with the [FIX] for the remainder).

    >>> pool_batch_sizes(512, {"pretraining": .33, "update": .34, "buffer": .33}, task=1)
    {'pretraining': 169, 'update': 175, 'buffer': 168}
    """
    unknown = set(ratios) - set(POOLS)
    if unknown:
        raise ValueError(f"unknown pool(s) {sorted(unknown)} in mixture; pools are {POOLS}")
    r = {k: float(ratios.get(k, 0.0)) for k in POOLS}
    if any(v < 0 for v in r.values()) or not math.isclose(sum(r.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"mixture ratios must be non-negative and sum to 1, got {r}")
    if batch_size < 1 or task < 0:
        raise ValueError(f"need batch_size >= 1 and task >= 0, got {batch_size}, {task}")
    n = {k: math.floor(batch_size * r[k]) for k in POOLS}
    remainder = batch_size - sum(n.values())
    # [FIX] the remainder goes only to pools whose ratio is non-zero (same key order).
    for k in [k for k in POOLS if r[k] > 0][:remainder]:
        n[k] += 1
    if task == 0 and n["update"] != batch_size:
        share = 2 if n["pretraining"] > 0 else 1
        n["update"] += n["buffer"] // share + n["buffer"] % share
        if share == 2:
            n["pretraining"] += n["buffer"] // share
        n["buffer"] = 0
    return n


class PoolSampler:
    """Positions 0, 1, 2, ... of a pool -> sample ids, from seeded permutations per epoch.

    Every sample appears once per epoch of `len(ids)` positions; a new permutation is drawn
    for every epoch. Stateless: any position can be read at any time (exact resume).
    """

    def __init__(self, ids: Sequence[int] | np.ndarray, seed: int):
        self.ids = np.asarray(ids, np.int64)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.ids)

    @functools.lru_cache(maxsize=4)  # noqa: B019 (a sampler lives as long as its task)
    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))

    def __getitem__(self, position: int) -> int:
        if not len(self.ids):
            raise IndexError("sampling from an empty pool")
        epoch, offset = divmod(int(position), len(self.ids))
        return int(self.ids[self._permutation(epoch)[offset]])


class Catalogue:
    """The training splits of the stream's datasets, addressed by one global sample id.

    `sources` maps a dataset key to a random-access source with `.targets` (one class id per
    sample). A global id is `offset[dataset] + index`.
    """

    def __init__(self, sources: Mapping[str, object]):
        self.sources = dict(sources)
        self.keys = list(self.sources)
        sizes = [len(self.sources[k]) for k in self.keys]
        self._ends = np.cumsum(sizes, dtype=np.int64)
        self.offsets = {
            k: int(end - size) for k, end, size in zip(self.keys, self._ends, sizes, strict=True)
        }
        self._by_class = {
            k: _group_by_target(np.asarray(self.sources[k].targets)) for k in self.keys
        }

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def locate(self, global_id: int) -> tuple[str, int]:
        d = int(np.searchsorted(self._ends, global_id, side="right"))
        key = self.keys[d]
        return key, int(global_id - self.offsets[key])

    def __getitem__(self, global_id: int):
        key, index = self.locate(global_id)
        return self.sources[key][index]

    def ids_of(self, entries: Sequence[tuple[str, int]]) -> np.ndarray:
        """Global ids of every sample of the given (dataset, target) pairs, in entry order."""
        parts = []
        for dataset, target in entries:
            if dataset not in self._by_class:
                raise KeyError(f"dataset {dataset!r} of the stream has no training source")
            parts.append(self._by_class[dataset].get(int(target), np.zeros(0, np.int64)))
            parts[-1] = parts[-1] + self.offsets[dataset]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _group_by_target(targets: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(targets, kind="stable")
    values, starts = np.unique(targets[order], return_index=True)
    ends = list(starts[1:]) + [len(order)]
    return {
        int(v): order[s:e].astype(np.int64) for v, s, e in zip(values, starts, ends, strict=True)
    }


def task_pools(catalogue: Catalogue, tasks: Sequence[Sequence[tuple[str, int]]], task: int):
    """Sample ids of the update pool (chunk `task`) and the buffer pool (chunks before it)."""
    update = catalogue.ids_of(tasks[task])
    buffer = catalogue.ids_of([e for chunk in tasks[:task] for e in chunk])
    return update, buffer


def pretraining_offset(batch_sizes: Sequence[Mapping[str, int]], steps: Sequence[int]) -> int:
    """Position of the pretraining stream at the start of a task: what earlier tasks used."""
    return sum(b["pretraining"] * s for b, s in zip(batch_sizes, steps, strict=True))
