"""The method interface: a continual method is a small object of hooks (spec §8).

A method decides, per task, which weights training starts from and which weights are
evaluated; how each parameter is trained (`labels`: frozen, full, or frozen with a LoRA-style
adapter); the loss of a step, built on the model family's loss; a per-step update of its own
state; and what happens at the end of a task. Its state is a pytree that the jitted step
carries and checkpoints save. A method names the model families it works with (`families`;
None: any, because it uses only the family's loss, groups and paths); an unsupported pair is
refused before any compute (`check_family`).

`Method` itself is full fine-tuning (`finetune`). Each module of this package defines a group
of methods and registers them with `@register`; a method's hyperparameters (with their defaults
in `defaults`) are the config block `config.methods.<name>`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import ml_collections

from fomo_jax import params as params_lib
from fomo_jax.families.base import Data, Family, LossFn, ModelConfig, Params, Tokenizer
from fomo_jax.train.step import StepInfo

MethodState = dict
LABELS = ("frozen", "full", "lora")


@dataclasses.dataclass(frozen=True)
class Context:
    """What the loop hands a method before training starts (`Method.setup`).

    `model_config` is θ0's architecture (before `Method.model_config`); `data` reads the run's
    data (a task's update pool alone, e.g. for Fisher passes; captions of the pretraining pool);
    `steps_per_task` is None while the budget compiles the step to measure it; `workdir` is
    where a method may keep files (task endpoints).
    """

    config: ml_collections.ConfigDict
    family: Family
    model_config: ModelConfig
    tokenizer: Tokenizer | None
    data: Data
    workdir: str
    steps_per_task: int | None = None


class NoData:
    """The data of a method set up without any to read: a job that trains on one pool (θ0),
    or a method set up only to compile its step (the budget). Pretraining captions are
    placeholders of the right count (only their shapes matter there)."""

    root, datasets = "", {}

    def update_batches(self, task, batch_size, num_batches):
        raise RuntimeError("this job has no update pools to read")

    def pretraining_texts(self, count: int) -> list[str]:
        return [""] * count


def label_rules(rules: Sequence, where: str) -> list[tuple[re.Pattern, str]]:
    """Ordered (regex, label) pairs; the first regex that `re.search`es a path decides."""
    out = []
    for rule in rules:
        if len(rule) != 2 or rule[1] not in LABELS:
            raise ValueError(f"{where}: rule {tuple(rule)!r} is not (regex, one of {LABELS})")
        try:
            out.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"{where}: rule regex {rule[0]!r} is invalid: {e}") from None
    return out


def first_label(rules, path: str, default: str = "frozen") -> str:
    for pattern, label in rules:
        if pattern.search(path):
            return label
    return default


class Method:
    """Full fine-tuning (`finetune`); every hook is the identity. Subclasses override."""

    name = "finetune"
    families: tuple[str, ...] | None = None  # None: any family
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
        self._rules = None  # config.trainable, when the run gives it

    # Methods computing the softmax CLIP loss themselves (replay, distillation) set this False.
    sigmoid_loss = True

    @classmethod
    def check_family(cls, family: Family) -> None:
        if cls.families is not None and family.name not in cls.families:
            raise ValueError(
                f"method {cls.name!r} works with the model families {list(cls.families)}, not "
                f"with config.family={family.name!r}"
            )
        if not cls.sigmoid_loss and getattr(family, "sigmoid", False):
            raise ValueError(
                f"method {cls.name!r} computes the softmax CLIP loss itself (its replay or "
                f"distillation terms), not config.loss={family.contrastive!r}; use "
                "config.loss='clip' or 'clip_chunked'"
            )

    def setup(self, ctx: Context) -> None:
        self.check_family(ctx.family)
        self.ctx = ctx
        rules = ctx.config.get("trainable")
        if rules:
            self._rules = label_rules(rules, "config.trainable")
            if "lora" in {label for _, label in self._rules} and not self.adapts:
                raise ValueError(
                    f"config.trainable labels parameters 'lora', which method {self.name!r} "
                    "does not give adapters; use lora, dora or vera"
                )
        model = ctx.family.abstract_model(self.model_config(ctx.model_config))
        self.graphdef, abstract = params_lib.split(model)
        if not any(self.trainable(p) for p in params_lib.flatten(abstract)):
            raise ValueError(f"method {self.name!r} trains no parameter of this "
                             f"{ctx.family.name} model")  # fmt: skip

    # ---- structure ---------------------------------------------------------------------------
    adapts = False  # whether the method puts adapters on parameters labelled "lora"

    def default_label(self, path: str) -> str:
        """The method's own label of the parameter at `path` (θ0's tree)."""
        return "full"

    def label(self, path: str) -> str:
        """How the parameter at `path` (of θ0's tree) trains: `config.trainable`'s first
        matching rule (unmatched: frozen) when the run gives rules, else the method's own."""
        if self._rules is not None:
            return first_label(self._rules, path)
        return self.default_label(path)

    def model_config(self, model_config):
        """The architecture trained (e.g. with adapters); default: θ0's."""
        return model_config

    def init_params(self, theta0: Params) -> Params:
        """The weights at the start of the stream (e.g. θ0 with fresh adapters)."""
        return theta0

    def trainable(self, path: str) -> bool:
        """Whether the parameter at `path` (e.g. "image/ln_post/scale") is differentiated and
        updated. Frozen parameters have no gradient and no optimizer state."""
        return self.label(path) == "full"

    def export_params(self, params: Params) -> tuple[ModelConfig, Params]:
        """(model config, params) of the plain model for export (e.g. adapters folded in)."""
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
    @property
    def state_in_step(self) -> bool:
        """Whether the train step reads or writes the method's state, which it can only do
        through `loss` and `step_update`. A method overriding neither (the merges: θ0, task
        endpoints, merged weights) keeps its state out of the compiled step, whose program is
        then plain fine-tuning's (`train.step.compile_step`)."""
        cls = type(self)
        return cls.loss is not Method.loss or cls.step_update is not Method.step_update

    def loss(self, params: Params, state: MethodState, batch, loss_fn: LossFn, key: jax.Array):
        """(loss, metrics, outputs) of one batch; default: the family's loss.

        `outputs` (any pytree) reaches `step_update`; metrics are scalars to log.
        """
        return loss_fn(params, batch, key)

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


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


register(Method)
