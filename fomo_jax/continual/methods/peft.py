"""Parameter-efficient continual methods: LoRA, DoRA and VeRA adapters (spec §8.1, §8.2).

The base weights never change; the adapters start at zero change before task 0, persist
across tasks and are never folded in during the stream ("continual LoRA"), so θ_k is base +
adapters after task k. The adapter leaves sit next to the base weights in the params tree
(`fomo_jax.models.adapters`), are checkpointed with them, and are folded in exactly only to
export a plain model.

Where the adapters go: the family's named set of linears (`targets`, e.g. CLIP's "reference"
{q, k, v, c_proj} of every block) or a regex over module paths, limited to `blocks`; or, when
the run gives `config.trainable` rules, the linears whose kernel is labelled "lora" (parameters
labelled "full" then train as well, e.g. a fresh connector).
"""

from __future__ import annotations

import re

from fomo_jax.continual.methods.base import Method, register
from fomo_jax.models import adapters


class _Adapters(Method):
    kind = ""
    defaults = {
        "rank": 4,  # the paper studies 4 and 64
        "targets": "reference",  # a family's named set ("reference", "all_linear") or a regex
        "blocks": (),  # block indices adapted in every stack; empty: all
        "scale": 1.0,  # s in W + s·ΔW (the reference has no α/r factor)
        "seed": 0,  # the adapters' random values (A; VeRA's shared matrices)
        "tune_logit_scale": False,
    }

    adapts = True

    def targets(self) -> str:
        """The regex of the adapted module paths."""
        family, c = self.ctx.family, self.config
        if self._rules is None:
            return family.adapter_targets.get(c.targets, c.targets)
        kernels = [f"{m}/kernel" for m in family.linear_paths(self.ctx.model_config)]
        chosen = [k.removesuffix("/kernel") for k in kernels if self.label(k) == "lora"]
        if not chosen:
            raise ValueError("config.trainable labels no adaptable linear kernel 'lora' "
                             f"(they look like {kernels[0]!r})")  # fmt: skip
        return "|".join(re.escape(m) for m in chosen)

    def adapter(self) -> adapters.AdapterConfig:
        c = self.config
        return adapters.AdapterConfig(self.kind, c.rank, self.targets(), tuple(c.blocks), c.scale,
                                      c.seed)  # fmt: skip

    def model_config(self, model_config):
        return self.ctx.family.with_adapter(model_config, self.adapter())

    def init_params(self, theta0):
        return adapters.add_adapters(theta0, self.adapter())

    def default_label(self, path: str) -> str:
        if path == "logit_scale":
            return "full" if self.config.tune_logit_scale else "frozen"
        return "frozen"

    def trainable(self, path: str) -> bool:
        if adapters.is_adapter(path):  # adapter leaves train, VeRA's shared matrices do not
            return adapters.trainable(path)
        return self.label(path) == "full"

    def export_params(self, params):
        folded = adapters.merge_adapters(params, config=self.adapter())
        plain = self.ctx.family.with_adapter(self.ctx.model_config, None)
        return plain, folded


@register
class LoRA(_Adapters):
    """W + s·B·A with A Kaiming-uniform and B = 0."""

    name, kind = "lora", "lora"


@register
class DoRA(_Adapters):
    """m ⊙ (W + s·B·A) / ‖W + s·B·A‖ per output unit, the norm a constant for backprop."""

    name, kind = "dora", "dora"


@register
class VeRA(_Adapters):
    """W + s·diag(b)·B_r·diag(d)·A_r with frozen random A_r, B_r shared across layers."""

    name, kind = "vera", "vera"
