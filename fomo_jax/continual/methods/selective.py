"""Parameter-selective methods (spec §8.2): a tower locked, or only LayerNorms or biases
trained. The frozen parameters are never differentiated and have no optimizer state."""

from __future__ import annotations

import re

from fomo_jax.continual.methods.base import Method, register


class Selective(Method):
    """Train the parameters an ordered list of (regex, trainable) rules selects.

    The first rule whose regex matches the path (`re.search`) decides; a path no rule matches
    is frozen. `logit_scale` follows `tune_logit_scale` unless a rule names it.
    `config.methods.<name>.rules` replaces the method's own rules.
    """

    rules: tuple[tuple[str, bool], ...] = ()
    defaults = {"tune_logit_scale": False, "rules": None}

    def __init__(self, config=None):
        super().__init__(config)
        rules = [(r"^logit_scale$", bool(self.config.tune_logit_scale))]
        rules += list(self.config.rules or self.rules)
        self._own = [(re.compile(pattern), bool(train)) for pattern, train in rules]

    def default_label(self, path: str) -> str:
        for pattern, train in self._own:
            if pattern.search(path):
                return "full" if train else "frozen"
        return "frozen"


class _LockedGroup(Selective):
    """One parameter group of the family frozen (`locked`), the others trained."""

    locked = ""

    def setup(self, ctx):
        if self.locked not in ctx.family.groups:
            raise ValueError(f"method {self.name!r} locks the group {self.locked!r}, which the "
                             f"{ctx.family.name} family does not have "
                             f"(groups: {list(ctx.family.groups)})")  # fmt: skip
        super().setup(ctx)

    def default_label(self, path: str) -> str:
        if self.config.rules or path == "logit_scale":
            return super().default_label(path)
        return "frozen" if self.ctx.family.group_of(path) == self.locked else "full"


@register
class LockedImage(_LockedGroup):
    """Image tower frozen (no gradients through its weights); the rest and the scale train."""

    name, locked = "locked_image", "image"
    defaults = {"tune_logit_scale": True, "rules": None}


@register
class LockedText(_LockedGroup):
    """Text tower and `logit_scale` frozen; the rest trains."""

    name, locked = "locked_text", "text"


@register
class LNFit(Selective):
    """Only LayerNorm gains and biases (`ln_1`, `ln_2`, `ln_pre`, `ln_post`, `ln_final`)."""

    name = "lnfit"
    rules = ((r"(^|/)ln_[^/]+/(scale|bias)$", True),)


@register
class BitFit(Selective):
    """Only biases: attention and MLP projections and LayerNorms (anything named `bias`)."""

    name = "bitfit"
    rules = ((r"(^|/)bias$", True),)
