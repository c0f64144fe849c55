"""Process-level JAX settings shared by the command line, benchmarks and tests."""

from __future__ import annotations

import logging
import os

import jax

# The source checkout's root, for tests and benchmarks that run its files (run.py, the
# notebook). After a non-editable install this is site-packages: nothing writes here.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_cache_dir() -> str:
    """Where compiled executables persist: `$FOMO_JAX_CACHE_DIR`, else
    `$XDG_CACHE_HOME/fomo_jax/jax_cache`, else `~/.cache/fomo_jax/jax_cache`.

    The user's cache directory, never the package's folder: an installed package lives in
    site-packages, which may be read-only or shared between users and environments.
    """
    explicit = os.environ.get("FOMO_JAX_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG spec says use the default
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fomo_jax", "jax_cache")


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persist compiled executables across processes, in `directory` or `default_cache_dir()`.

    On CPU a tiny CLIP step compiles in seconds; with the cache warm a second process loads
    it in well under one.
    """
    directory = directory or default_cache_dir()
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def _not_orbax_info(record) -> bool:
    return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def quiet_checkpoint_logs() -> None:
    """orbax logs every stage of every save at INFO through absl; keep its warnings only."""
    logging.getLogger("absl").addFilter(_not_orbax_info)
