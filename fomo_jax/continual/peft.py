"""Parameter-efficient continual methods: LoRA, DoRA and VeRA adapters (spec §8.1, §8.2).

The base weights never change; the adapters start at zero change before task 0, persist
across tasks and are never folded in during the stream ("continual LoRA"), so θ_k is base +
adapters after task k. The adapter leaves sit next to the base weights in the params tree
(`fomo_jax.models.adapters`), are checkpointed with them, and are folded in exactly only to
export a plain CLIP.
"""

from __future__ import annotations

from fomo_jax.continual.methods import Method, register
from fomo_jax.models import adapters


class _Adapters(Method):
    kind = ""
    defaults = {
        "rank": 4,  # the paper studies 4 and 64
        "targets": "reference",  # {q, k, v, c_proj}; "all_linear" or a regex over module paths
        "blocks": (),  # block indices adapted in both towers; empty: all
        "scale": 1.0,  # s in W + s·ΔW (the reference has no α/r factor)
        "seed": 0,  # the adapters' random values (A; VeRA's shared matrices)
        "tune_logit_scale": False,
    }

    def adapter(self) -> adapters.AdapterConfig:
        c = self.config
        return adapters.AdapterConfig(self.kind, c.rank, c.targets, tuple(c.blocks), c.scale,
                                      c.seed)  # fmt: skip

    def model_config(self, model_config):
        return model_config.replace(adapter=self.adapter())

    def init_params(self, theta0):
        return adapters.add_adapters(theta0, self.adapter())

    def trainable(self, path: str) -> bool:
        if path == "logit_scale":
            return bool(self.config.tune_logit_scale)
        return adapters.trainable(path)

    def export_params(self, params):
        folded = adapters.merge_adapters(params, config=self.adapter())
        return adapters.plain_config(self.model_config(self.ctx.model_config)), folded


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
