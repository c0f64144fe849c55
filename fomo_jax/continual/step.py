"""The continual train step: the CLIP step plus the method's loss term and per-step update.

`ContinualState` carries the method's state next to params and optimizer state, so one jitted
function (compiled once for the whole stream; the learning rate is an input) covers every task.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax

from fomo_jax import sharding
from fomo_jax.train.step import apply_gradients, jit_step, make_loss_fn


@flax.struct.dataclass
class ContinualState:
    step: jax.Array
    params: Any
    opt_state: Any
    method_state: Any


def step_fn(state: ContinualState, batch, learning_rate, *, loss_fn, tx, method):
    def total_loss(params):
        loss, metrics = loss_fn(params, batch)
        extra = method.extra_loss(params, state.method_state, batch)
        return loss + extra, dict(metrics, contrastive_loss=loss, extra_loss=extra)

    (loss, metrics), grads = jax.value_and_grad(total_loss, has_aux=True)(state.params)
    grads = method.transform_grads(grads, state.method_state, state.params)
    params, opt_state, step_metrics = apply_gradients(
        state.params, state.opt_state, grads, loss, learning_rate, tx
    )
    method_state = method.step_update(state.method_state, params)
    new = ContinualState(state.step + 1, params, opt_state, method_state)
    return new, dict(metrics, **step_metrics)


def shardings_of(state: ContinualState, mesh, rules=sharding.CLIP_RULES) -> ContinualState:
    tree = functools.partial(sharding.tree_shardings, mesh=mesh, rules=rules)
    return ContinualState(
        step=sharding.replicated(mesh),
        params=tree(state.params),
        opt_state=tree(state.opt_state),
        method_state=tree(state.method_state),
    )


def compile_step(graphdef, tx, method, mesh, state_sharding: ContinualState):
    fn = functools.partial(step_fn, loss_fn=make_loss_fn(graphdef), tx=tx, method=method)
    return jit_step(fn, mesh, state_sharding)
