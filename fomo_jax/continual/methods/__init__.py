"""Continual-learning methods (spec §8): the interface in `base`, one module per group of
methods (`selective`, `merge`, `peft`, `regularized`, `replay`), each registering its methods
on import. Every module of this package is imported here, so there is no list to keep in sync.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections

from fomo_jax.continual.methods.base import (  # noqa: F401 (the interface)
    LABELS,
    METHODS,
    Context,
    Method,
    NoData,
    StepInfo,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def get(name: str, config=None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](config)


def default_configs() -> ml_collections.ConfigDict:
    """`config.methods`: every method's hyperparameters at their defaults."""
    return ml_collections.ConfigDict(
        {name: cls.default_config() for name, cls in sorted(METHODS.items())}
    )
