"""Model families: what the one training loop asks a model for (`families.base.Family`).

`config.family` names one: a module of this package (`clip`), each defining `FAMILY`, so adding
a family is adding a module; or `package.module:NAME` for a family defined elsewhere (a user's
own model, the tests' MLP family).
"""

from __future__ import annotations

import importlib
import pkgutil

from fomo_jax.families.base import Family


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base")


def get(name: str) -> Family:
    """The family `name`: a module of this package, or `module:attribute`."""
    if ":" in name:
        module, _, attribute = name.partition(":")
        family = getattr(importlib.import_module(module), attribute, None)
        if not isinstance(family, Family):
            raise ValueError(f"config.family={name!r}: {module}.{attribute} is not a Family")
        return family
    if name not in names():
        raise ValueError(
            f"config.family={name!r} is not a model family; known: {names()} (or "
            "'package.module:NAME' for a Family defined elsewhere)"
        )
    return importlib.import_module(f"fomo_jax.families.{name}").FAMILY
