"""The continual train step: the method's loss, the optimizer on the trained parameters, and
the method's per-step state update, as one jitted function.

`ContinualState` carries the method's state next to params and optimizer state, so one jitted
function (compiled once for the whole stream; the learning rate is an input) covers every task.
Only the parameters the method trains are differentiated and have optimizer state: frozen
ones enter the loss as constants, so their gradients are never computed.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax

from fomo_jax import params as params_lib
from fomo_jax import sharding
from fomo_jax.continual.methods import StepInfo
from fomo_jax.train.step import apply_gradients, batch_pixels, jit_step


@flax.struct.dataclass
class ContinualState:
    step: jax.Array
    params: Any
    opt_state: Any  # over the trained parameters only
    method_state: Any
    key: jax.Array  # the run's step key (folded with the step count)


def make_forward(graphdef):
    """forward(params, batch) -> (image_emb, text_emb, logit_scale); either input optional."""

    def forward(params, batch):
        model = params_lib.merge(graphdef, params)
        pixels = batch_pixels(batch) if ("images" in batch or "pixels" in batch) else None
        image, text, _ = model(pixels, batch.get("token_ids"))
        return image, text, model.logit_scale[...]

    return forward


def trained(params, method):
    """The trained part of `params` (what the optimizer state is built on)."""
    return params_lib.partition(params, method.trainable)[0]


def step_fn(state: ContinualState, batch, learning_rate, *, forward, tx, method):
    train, frozen = params_lib.partition(state.params, method.trainable)
    key = jax.random.fold_in(state.key, state.step)

    def total_loss(train):
        params = params_lib.combine(train, frozen)
        loss, metrics, outputs = method.loss(params, state.method_state, batch, forward, key)
        return loss, (metrics, outputs)

    (loss, (metrics, outputs)), grads = jax.value_and_grad(total_loss, has_aux=True)(train)
    train, opt_state, step_metrics = apply_gradients(
        train, state.opt_state, grads, loss, learning_rate, tx
    )
    params = params_lib.combine(train, frozen)
    info = StepInfo(state.step, batch, grads, step_metrics["learning_rate"], outputs, key)
    method_state, method_metrics = method.step_update(state.method_state, params, info)
    new = ContinualState(state.step + 1, params, opt_state, method_state, state.key)
    metrics = dict(metrics, **method_metrics, **step_metrics, logit_scale=params["logit_scale"])
    return new, metrics


def shardings_of(state: ContinualState, mesh, rules=sharding.CLIP_RULES) -> ContinualState:
    tree = functools.partial(sharding.tree_shardings, mesh=mesh, rules=rules)
    return ContinualState(
        step=sharding.replicated(mesh),
        params=tree(state.params),
        opt_state=tree(state.opt_state),
        method_state=tree(state.method_state),
        key=sharding.replicated(mesh),
    )


def compile_step(graphdef, tx, method, mesh, state_sharding: ContinualState):
    fn = functools.partial(step_fn, forward=make_forward(graphdef), tx=tx, method=method)
    return jit_step(fn, mesh, state_sharding)
