"""Pools and the batch mixture (spec §4)."""

import numpy as np
import pytest

from fomo_jax.data import mixture

DEFAULT = {"pretraining": 0.33, "update": 0.34, "buffer": 0.33}


@pytest.mark.parametrize(
    "ratios, task0, later",
    [  # spec §4.2 table: (p, u, b)
        (DEFAULT, (253, 259, 0), (169, 175, 168)),
        ({"pretraining": 0, "update": 1, "buffer": 0}, (0, 512, 0), (0, 512, 0)),
        ({"pretraining": 0.33, "update": 0.67, "buffer": 0}, (169, 343, 0), (169, 343, 0)),
        ({"pretraining": 0.5, "update": 0.5, "buffer": 0}, (256, 256, 0), (256, 256, 0)),
    ],
)
def test_spec_table(ratios, task0, later):
    for task, expected in ((0, task0), (1, later), (7, later)):
        sizes = mixture.pool_batch_sizes(512, ratios, task)
        assert (sizes["pretraining"], sizes["update"], sizes["buffer"]) == expected


def test_remainder_never_goes_to_a_zero_ratio_pool():
    # The reference gives the remainder to "pretraining" here (spec §4.2 [FIX]).
    ratios = {"pretraining": 0.0, "update": 0.67, "buffer": 0.33}
    assert mixture.pool_batch_sizes(512, ratios, 1) == {
        "pretraining": 0,
        "update": 344,
        "buffer": 168,
    }
    assert mixture.pool_batch_sizes(512, ratios, 0) == {
        "pretraining": 0,
        "update": 512,
        "buffer": 0,
    }


def test_sizes_sum_to_the_batch_for_random_mixtures():
    rng = np.random.default_rng(0)
    for _ in range(200):
        raw = rng.uniform(size=3) * (rng.uniform(size=3) > 0.3)
        if raw.sum() == 0:
            continue
        ratios = dict(zip(mixture.POOLS, raw / raw.sum(), strict=True))
        batch, task = int(rng.integers(1, 1000)), int(rng.integers(0, 3))
        sizes = mixture.pool_batch_sizes(batch, ratios, task)
        assert sum(sizes.values()) == batch
        for pool in mixture.POOLS:
            # At task 0 the empty buffer's share moves to update (and pretraining) by rule.
            if ratios[pool] == 0 and not (task == 0 and pool == "update"):
                assert sizes[pool] == 0
        if task == 0:
            assert sizes["buffer"] == 0


@pytest.mark.parametrize(
    "ratios, match",
    [
        ({"pretraining": 0.5, "update": 0.6}, "sum to 1"),
        ({"update": 1.2, "buffer": -0.2}, "non-negative"),
        ({"update": 0.5, "replay": 0.5}, "replay"),
    ],
)
def test_bad_mixtures(ratios, match):
    with pytest.raises(ValueError, match=match):
        mixture.pool_batch_sizes(64, ratios, 1)


def test_derived_seeds_are_stable_and_independent():
    a = mixture.derive_seed(0, 3, "update")
    assert a == mixture.derive_seed(0, 3, "update")
    others = {
        mixture.derive_seed(1, 3, "update"),
        mixture.derive_seed(0, 4, "update"),
        mixture.derive_seed(0, 3, "buffer"),
    }
    assert a not in others and len(others) == 3
    assert 0 <= a < 2**63


def test_pool_sampler_covers_every_sample_once_per_epoch():
    ids = np.arange(100, 137)
    sampler = mixture.PoolSampler(ids, seed=5)
    epochs = [[sampler[e * 37 + i] for i in range(37)] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == list(ids)
    assert epochs[0] != epochs[1]  # a fresh permutation per epoch
    again = mixture.PoolSampler(ids, seed=5)
    assert [again[i] for i in range(80, 111)] == [sampler[i] for i in range(80, 111)]
    with pytest.raises(IndexError):
        mixture.PoolSampler([], seed=0)[0]


class _Targets:
    def __init__(self, targets):
        self.targets = np.asarray(targets)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return {"target": int(self.targets[i]), "index": i}


def test_catalogue_and_task_pools():
    a, b = _Targets([0, 1, 0, 2, 1]), _Targets([1, 1, 0])
    catalogue = mixture.Catalogue({"a": a, "b": b})
    assert len(catalogue) == 8
    assert catalogue.locate(6) == ("b", 1) and catalogue[6] == {"target": 1, "index": 1}
    assert sorted(catalogue.ids_of([("a", 0)])) == [0, 2]
    assert sorted(catalogue.ids_of([("b", 1), ("a", 2)])) == [3, 5, 6]
    tasks = [[("a", 0), ("b", 0)], [("a", 1)], [("b", 1), ("a", 2)]]
    update, buffer = mixture.task_pools(catalogue, tasks, 2)
    assert sorted(update) == [3, 5, 6]
    assert sorted(buffer) == [0, 1, 2, 4, 7]  # every sample of chunks 0 and 1
    update0, buffer0 = mixture.task_pools(catalogue, tasks, 0)
    assert sorted(update0) == [0, 2, 7] and len(buffer0) == 0
    with pytest.raises(KeyError, match="'c'"):
        catalogue.ids_of([("c", 0)])


def test_pretraining_offset_counts_what_earlier_tasks_used():
    sizes = [mixture.pool_batch_sizes(512, DEFAULT, k) for k in range(3)]
    assert mixture.pretraining_offset(sizes[:2], [1420, 1420]) == 253 * 1420 + 169 * 1420
