"""Process-level JAX settings shared by run.py, benchmarks and tests."""

from __future__ import annotations

import logging
import os

import jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE_DIR = os.path.join(REPO_ROOT, ".jax_cache")


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persist compiled executables across processes (git-ignored `.jax_cache` by default).

    On CPU a tiny CLIP step compiles in seconds; with the cache warm a second process loads
    it in well under one. `FOMO_JAX_CACHE_DIR` overrides the location.
    """
    directory = directory or os.environ.get("FOMO_JAX_CACHE_DIR", DEFAULT_CACHE_DIR)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def _not_orbax_info(record) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_checkpoint_logs() -> None:
    """orbax logs every stage of every save at INFO through absl; keep its warnings only."""
    logging.getLogger("absl").addFilter(_not_orbax_info)
