"""A small fif_synth benchmark shared by the data tests (generated once per session)."""

import pytest

from fomo_jax.data import fif_synth

SMALL = dict(seed=3, image_size=24, train_per_class=6, test_per_class=3, pool_size=240,
             samples_per_shard=100, workers=1)  # fmt: skip


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fif_synth"))
    fif_synth.generate(root, **SMALL)
    return root
