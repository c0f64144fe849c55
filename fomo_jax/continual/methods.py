"""Continual-learning methods as small objects with hooks (spec §8.1).

A method decides, per task, which weights training starts from and which weights are evaluated,
may add a loss term, transform gradients, update its own state every step, and act at the end of
a task. Its state is a pytree that the jitted step carries and checkpoints save. Adding a
method is adding a subclass here (or in its own module) and registering it in `METHODS`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fomo_jax import params as params_lib

Params = Any
MethodState = Any


class Method:
    """Plain fine-tuning; every hook is the identity. Subclasses override what they need."""

    name = "finetune"

    def __init__(self, config=None):
        self.config = config

    # ---- task level (host) -----------------------------------------------------------------
    def init_state(self, theta0: Params) -> MethodState:
        """The method's state before task 0 (a pytree; {} when it keeps none)."""
        return {}

    def train_params(self, task: int, params: Params, state: MethodState) -> Params:
        """The weights training of `task` starts from (default: the current weights)."""
        return params

    def trainable(self, path: str) -> bool:
        """Whether the parameter at `path` (e.g. "image/ln_post/scale") is trained."""
        return True

    def optimizer(self, tx: optax.GradientTransformation, params: Params):
        """`tx` on the trainable parameters; frozen ones get a zero update (no weight decay)."""
        labels = jax.tree_util.tree_map_with_path(
            lambda path, _: "train" if self.trainable(params_lib.key_path_str(path)) else "freeze",
            params,
        )
        if all(label == "train" for label in jax.tree_util.tree_leaves(labels)):
            return tx
        return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)

    def end_of_task(self, task: int, params: Params, state: MethodState):
        """Bookkeeping after training a task; returns (params, state)."""
        return params, state

    def eval_params(self, task: int, params: Params, state: MethodState) -> Params:
        """The weights reported after `task` (default: the trained weights)."""
        return params

    # ---- step level (inside jit) -----------------------------------------------------------
    def extra_loss(self, params: Params, state: MethodState, batch) -> jnp.ndarray:
        """A loss term added to the contrastive loss (regularizers, distillation)."""
        return jnp.zeros((), jnp.float32)

    def transform_grads(self, grads: Params, state: MethodState, params: Params) -> Params:
        """A gradient transform before the optimizer (e.g. projections, Fisher weighting)."""
        return grads

    def replay_batch(self, task: int, step: int, state: MethodState):
        """An extra batch for this step (host side), passed to the step as `batch["replay"]`;
        None for none. It must have the same structure at every step of a run."""
        return None

    def step_update(self, state: MethodState, params: Params) -> MethodState:
        """A per-step state update after the optimizer step (e.g. an online EMA)."""
        return state


METHODS: dict[str, type[Method]] = {"finetune": Method}


def get(name: str, config=None) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](config)
