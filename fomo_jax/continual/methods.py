"""Continual-learning methods as small objects with hooks (spec §8).

A method decides, per task, which weights training starts from and which weights are
evaluated; which parameters are trained (the others are never differentiated); the loss of a
step; a per-step update of its own state; and what happens at the end of a task. Its state is
a pytree that the jitted step carries and checkpoints save.

Methods live in this module (full fine-tuning and the parameter-selective methods) and in
`merge_methods`, `peft`, `regularized` and `replay`; each registers itself with `@register`,
and a method's hyperparameters (with their defaults in `defaults`) are the config block
`config.methods.<name>`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import ml_collections

from fomo_jax.train.losses import clip_loss

Params = Any
MethodState = Any


@dataclasses.dataclass
class Context:
    """What the runner hands a method before the stream starts (`Method.setup`).

    `forward(params, batch) -> (image_emb, text_emb, logit_scale)` is the model's forward
    pass (either input may be absent from `batch`); `update_batches(task, batch_size, n)`
    yields n batches of a task's update pool alone (for Fisher passes and the like); `data` is
    the runner's `Data` (datasets, catalogue, pretraining pool, tasks). `model_config` is θ0's
    architecture (before `Method.model_config`).
    """

    config: Any
    workdir: str
    model_config: Any
    graphdef: Any
    tokenizer: Any
    forward: Any
    steps_per_task: int
    data: Any = None
    update_batches: Any = None


@dataclasses.dataclass
class StepInfo:
    """Inputs of `Method.step_update` besides the state and the updated weights."""

    step: jax.Array  # global step counter (before this step)
    batch: dict
    grads: Params  # gradients of the trained parameters (before clipping)
    learning_rate: jax.Array
    outputs: dict  # the `outputs` returned by `Method.loss`
    key: jax.Array


class Method:
    """Full fine-tuning (`finetune`); every hook is the identity. Subclasses override."""

    name = "finetune"
    # Hyperparameters and their defaults; a callable value is called for a fresh default
    # (e.g. a ConfigDict of placeholders, which must not be shared between configs).
    defaults: dict = {}

    @classmethod
    def default_config(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(
            {k: v() if callable(v) else v for k, v in cls.defaults.items()}
        )

    def __init__(self, config=None):
        self.config = self.default_config()
        if config is not None:
            if isinstance(config, ml_collections.ConfigDict):
                config = config.to_dict()  # placeholders become their values
            _override(self.config, config, f"config.methods.{self.name}")
        self.ctx: Context | None = None

    def setup(self, ctx: Context) -> None:
        self.ctx = ctx

    # ---- structure ---------------------------------------------------------------------------
    def model_config(self, model_config):
        """The architecture trained (e.g. with adapters); default: θ0's."""
        return model_config

    def init_params(self, theta0: Params) -> Params:
        """The weights at the start of the stream (e.g. θ0 with fresh adapters)."""
        return theta0

    def trainable(self, path: str) -> bool:
        """Whether the parameter at `path` (e.g. "image/ln_post/scale") is trained. Frozen
        parameters are not differentiated and have no optimizer state."""
        return True

    def export_params(self, params: Params) -> tuple[Any, Params]:
        """(model config, params) of a plain CLIP for export (e.g. adapters folded in)."""
        return self.model_config(self.ctx.model_config), params

    # ---- task level (host) -------------------------------------------------------------------
    def init_state(self, params: Params) -> MethodState:
        """The method's state before task 0 (a pytree; {} when it keeps none)."""
        return {}

    def train_params(self, task: int, params: Params, state: MethodState) -> Params:
        """The weights training of `task` starts from (default: the current weights)."""
        return params

    def end_of_task(self, task: int, params: Params, state: MethodState):
        """Bookkeeping after training a task; returns (params, state)."""
        return params, state

    def eval_params(self, task: int, params: Params, state: MethodState) -> Params:
        """The weights reported after `task` (default: the trained weights)."""
        return params

    # ---- step level (inside jit) -------------------------------------------------------------
    def loss(self, params: Params, state: MethodState, batch, forward, key):
        """(loss, metrics, outputs) of one batch; default: the CLIP loss of the whole batch.

        `outputs` (any pytree) reaches `step_update`; metrics are scalars to log.
        """
        image, text, logit_scale = forward(params, batch)
        loss, metrics = clip_loss(image, text, logit_scale)
        return loss, metrics, {}

    def step_update(self, state: MethodState, params: Params, info: StepInfo):
        """(state, metrics) after the optimizer step (e.g. an online EMA)."""
        return state, {}

    def extra_step_flops(self, model_config) -> float:
        """FLOPs spent outside the jitted step, charged per step in the budget (spec §5.2; e.g.
        EWC's Fisher pass). Default: none."""
        return 0.0


def _override(config: ml_collections.ConfigDict, values: dict, where: str) -> None:
    unknown = set(values) - set(config)
    if unknown:
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}; known: {sorted(config)}")
    for key, value in values.items():
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _override(config[key], value, f"{where}.{key}")
        else:
            config[key] = value


class Selective(Method):
    """Train the parameters an ordered list of (regex, trainable) rules selects (spec §8.2).

    The first rule whose regex matches the path (`re.search`) decides; a path no rule matches
    is frozen. `logit_scale` follows `tune_logit_scale` unless a rule names it.
    """

    rules: tuple[tuple[str, bool], ...] = ()
    defaults = {"tune_logit_scale": False, "rules": None}

    def __init__(self, config=None):
        super().__init__(config)
        rules = self.config.rules or self.rules
        rules = [(r"^logit_scale$", bool(self.config.tune_logit_scale))] + list(rules)
        self._rules = [(re.compile(pattern), bool(train)) for pattern, train in rules]

    def trainable(self, path: str) -> bool:
        for pattern, train in self._rules:
            if pattern.search(path):
                return train
        return False


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


register(Method)


@register
class LockedImage(Selective):
    """Image tower frozen (no gradients through its weights); text tower and scale train."""

    name = "locked_image"
    rules = ((r"^image/", False), (r".", True))
    defaults = {"tune_logit_scale": True, "rules": None}


@register
class LockedText(Selective):
    """Text tower and `logit_scale` frozen; the image tower trains."""

    name = "locked_text"
    rules = ((r"^text/", False), (r"^image/", True))


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


@register
class OnlineEMA(Method):
    """θ_ema ← d·θ_ema + (1 − d)·θ after every step; evaluated and trained from (spec §8.5)."""

    name = "ema_online"
    defaults = {"decay": 0.999}

    def init_state(self, params):
        return {"ema": params}

    def step_update(self, state, params, info):
        d = self.config.decay
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
        return {"ema": ema}, {}

    def end_of_task(self, task, params, state):
        return state["ema"], state

    def eval_params(self, task, params, state):
        return state["ema"]


def _load_all() -> None:
    # The other method families register on import.
    from fomo_jax.continual import merge_methods, peft, regularized, replay  # noqa: F401


def get(name: str, config=None) -> Method:
    _load_all()
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](config)


def default_configs() -> ml_collections.ConfigDict:
    """`config.methods`: every method's hyperparameters at their defaults."""
    _load_all()
    return ml_collections.ConfigDict(
        {name: cls.default_config() for name, cls in sorted(METHODS.items())}
    )
