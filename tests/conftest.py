"""Shared test setup: the persistent compilation cache, absl flags, shared tiny models."""

import os

# The suite compiles hundreds of small programs, most run a few times: XLA's CPU backend at
# LLVM optimisation level 0 compiles them about a third faster (the VLM method tests with an
# empty compilation cache: 232 -> 151 s). Set before JAX starts its backend; processes the
# tests start inherit it (those that set XLA_FLAGS themselves compile as usual). Results are
# compared with tolerances, or bitwise only between runs made with the same flags.
os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    ]  # fmt: skip
).strip()

import pytest  # noqa: E402
from absl import flags  # noqa: E402

from fomo_jax import runtime  # noqa: E402

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
