"""What a model family supplies to the one training loop (`fomo_jax.train.loop`).

A family is one object that the runner, the methods, the budget, the merges and the evaluator
ask for everything model-specific: the model and its initialisation, the loss of a batch, the
batch keys the step takes and an abstract batch to compile the step for profiling, the sharding
rules, the parameter groups (per-group merges, locking, learning-rate multipliers), the depth
of a parameter path (LiNeS, adapters' `blocks=`), the linear layers adapters may target, the
evaluator and the metric keys it reports, and export. `config.family` picks one by name
(`fomo_jax.families.get`); the CLIP family (`families.clip`) is the default.

A subclass sets the class attributes and implements the methods that raise here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import jax
import ml_collections
from flax import nnx

from fomo_jax import merging, sharding

Params = dict
Batch = dict[str, jax.Array]
# (params, batch, key) -> (loss, metrics, outputs): the family's training loss of one batch.
LossFn = Callable[[Params, Batch, jax.Array], tuple]


class ModelConfig(Protocol):
    """A family's architecture: a frozen dataclass with `replace`."""

    def replace(self, **changes) -> ModelConfig: ...


class Tokenizer(Protocol):
    vocab_size: int

    def __call__(self, texts: list[str]): ...


class Evaluator(Protocol):
    """A run's evaluator: built once, called at zero-shot, after tasks and at the end."""

    def evaluate(self, graphdef: nnx.GraphDef, params: Params, *, subset: bool) -> dict:
        """The family's `metric_keys` (floats) plus `per_dataset` (JSON-able)."""
        ...

    def subset_manifest(self) -> dict:
        """What the subset evaluations use (recorded in results.json)."""
        ...


class Data(Protocol):
    """The data a family's evaluator and a method may read (the runner's `runner.Data`)."""

    root: str
    datasets: dict

    def update_batches(self, task: int, batch_size: int, num_batches: int) -> Iterator[dict]: ...

    def pretraining_texts(self, count: int) -> list[str]: ...


class Family:
    name = ""
    # The evaluator's headline metrics, in the order tables show them.
    metric_keys: tuple[str, ...] = ()
    # Parameter groups (every parameter path belongs to exactly one, `group_of`).
    groups: tuple[str, ...] = ()
    # The keys of a training batch the step takes (the pipeline may add bookkeeping keys).
    batch_keys: tuple[str, ...] = ()
    # Sharding rules of the parameters (`fomo_jax.sharding`).
    rules: sharding.Rules = ()
    # Named sets of adaptable linears: preset name -> regex fully matching module paths.
    adapter_targets: dict[str, str] = {}

    def configured(self, config: ml_collections.ConfigDict) -> Family:
        """The family as `config` sets it up (the CLIP family reads `config.loss`). Default:
        itself; a `config.loss` other than "clip" is an error (a loss of another family)."""
        if config.get("loss", "clip") != "clip":
            raise ValueError(f"config.loss={config.loss!r} is a CLIP family loss; the "
                             f"{self.name} family has its own")  # fmt: skip
        return self

    # ---- model ---------------------------------------------------------------------------------
    def model_config(self, config: ml_collections.ConfigDict) -> ModelConfig:
        """The architecture a run's config asks for (θ0's checkpoint's when one is given)."""
        raise NotImplementedError

    def tokenizer(self, config: ml_collections.ConfigDict, model_config: ModelConfig) -> Tokenizer:
        raise NotImplementedError

    def abstract_model(self, model_config: ModelConfig) -> nnx.Module:
        """The model's structure without weights."""
        raise NotImplementedError

    def init_model(self, model_config: ModelConfig, seed: int) -> nnx.Module:
        """A randomly initialised model (θ0 made from scratch)."""
        raise NotImplementedError

    def load_params(self, path: str, model_config: ModelConfig) -> Params:
        """Host params of a checkpoint (θ0 given as `config.theta0.checkpoint`)."""
        raise NotImplementedError

    def graphdef(self, model_config: ModelConfig) -> nnx.GraphDef:
        from fomo_jax import params as params_lib

        return params_lib.split(self.abstract_model(model_config))[0]

    def with_adapter(self, model_config: ModelConfig, adapter) -> ModelConfig:
        """The architecture with `adapter` (a `models.adapters.AdapterConfig`, or None)."""
        return model_config.replace(adapter=adapter)

    # ---- training ------------------------------------------------------------------------------
    def loss(self, graphdef: nnx.GraphDef) -> LossFn:
        raise NotImplementedError

    def step_metrics(self, params: Params) -> dict:
        """Scalars logged with every step besides the loss's metrics."""
        return {}

    def image_size(self, model_config: ModelConfig) -> int:
        """The side of the training and test images the data pipeline makes."""
        raise NotImplementedError

    def abstract_batch(self, model_config: ModelConfig, batch_size: int) -> dict:
        """A training batch as `jax.ShapeDtypeStruct`s (compiling the step for its budget)."""
        raise NotImplementedError

    # ---- parameter paths -----------------------------------------------------------------------
    def group_of(self, path: str) -> str:
        raise NotImplementedError

    def depth(self, path: str) -> tuple[str, int] | None:
        """(stack, block index) of a parameter inside a transformer block, else None; the
        stack is the path before `resblocks` (LiNeS counts depth per stack). Default: the
        `resblocks/{i}` convention of every transformer here (CLIP towers, the LM)."""
        return merging.block_index(path)

    def linear_paths(self, model_config: ModelConfig) -> list[str]:
        """Module paths of the linears adapters may target."""
        raise NotImplementedError

    # ---- evaluation and export -----------------------------------------------------------------
    def evaluator(self, config: ml_collections.ConfigDict, data: Data, model_config: ModelConfig,
                  tokenizer: Tokenizer, *, mesh=None,
                  cache_dir: str | None = None) -> Evaluator:  # fmt: skip
        """The run's evaluator. `mesh`: the run's mesh, over which evaluation batches are split
        (each process feeding its rows); `cache_dir`: a folder on storage every process sees,
        for decoded test data kept out of host memory."""
        raise NotImplementedError

    def export(self, params: Params, model_config: ModelConfig, directory: str,
               tokenizer: Tokenizer) -> None:  # fmt: skip
        """Write a trained model (plain architecture, no adapters) for other tools."""
        raise NotImplementedError
