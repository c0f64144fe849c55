"""Shared test setup: the persistent compilation cache, absl flags, shared tiny models."""

import os

import pytest
from absl import flags

from fomo_jax import runtime

# Compiled steps persist across test processes and runs (`runtime.default_cache_dir()`).
runtime.enable_compilation_cache()
# grain reads absl flags; pytest never parses them.
flags.FLAGS.mark_as_parsed()

SHARED = os.path.join(runtime.REPO_ROOT, "..", "shared", "fif_reference_data")


@pytest.fixture(scope="session")
def tiny_model():
    """One tiny CLIP for every test that only needs *a* model (do not mutate it)."""
    from fomo_jax import models

    return models.create_model("tiny", seed=0)
