"""The one train step: a pure `jax.jit` function of explicit state, for every job and family.

`TrainState` carries the step counter, the parameters, the optimizer state (over the trained
parameters only), the continual method's state and the run's step key. The step takes
(state, batch, learning_rate) and returns (new state, metrics): the method's loss built on the
family's loss, the optimizer update on the parameters the method trains (frozen ones enter the
loss as constants and are never differentiated), and the method's per-step state update. It is
compiled once per job with explicit in/out shardings on the mesh, donates the old state's
buffers, and takes the learning rate as an input, so schedules never recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fomo_jax import params as params_lib
from fomo_jax import sharding


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any  # over the trained parameters only
    method_state: Any
    key: jax.Array  # the run's step key data (folded with the step count)


@dataclasses.dataclass
class StepInfo:
    """Inputs of `Method.step_update` besides the state and the updated weights."""

    step: jax.Array  # global step counter (before this step)
    batch: dict
    grads: Any  # gradients of the trained parameters (before clipping)
    learning_rate: jax.Array
    outputs: dict  # the `outputs` returned by `Method.loss`
    key: jax.Array


def trained(params, method):
    """The trained part of `params` (what the optimizer state is built on)."""
    return params_lib.partition(params, method.trainable)[0]


def fresh_state(params, method, tx, key_data) -> TrainState:
    """The state before the first step: `method`'s initial state and a new optimizer state."""
    return TrainState(np.zeros((), np.int32), params, tx.init(trained(params, method)),
                      method.init_state(params), key_data)  # fmt: skip


def step_key(seed: int) -> np.ndarray:
    """The key data of a run's steps (a stream of `jax.random.key`s folded with the step)."""
    return np.asarray(jax.random.key_data(jax.random.key(seed % 2**32)))


def lr_multipliers(train_params, group_of, multipliers: dict) -> Any:
    """Per trained leaf the learning-rate multiplier of its group (`config.optimizer.
    lr_multipliers`, {group: factor}); None where there is none (the plain rate)."""
    unknown = set(multipliers) - {group_of(p) for p in params_lib.flatten(train_params)}
    if unknown:
        raise ValueError(f"config.optimizer.lr_multipliers names groups {sorted(unknown)} with "
                         "no trained parameter")  # fmt: skip
    flat = {p: multipliers.get(group_of(p)) for p in params_lib.flatten(train_params)}
    return params_lib.unflatten({p: None if m in (None, 1) else float(m) for p, m in flat.items()})


def apply_gradients(params, opt_state, grads, loss, learning_rate, tx, multipliers=None):
    """The optimizer update `p - lr * m * u` (m: the leaf's learning-rate multiplier, when set)
    and the step's common metrics. Returns (params, opt_state, metrics)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    lr = jnp.asarray(learning_rate, jnp.float32)
    if multipliers is None:
        params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
    else:
        flat_m = params_lib.flatten(multipliers)
        flat = {k: v - (lr if flat_m.get(k) is None else lr * flat_m[k]) * u
                for (k, v), u in zip(params_lib.flatten(params).items(),
                                     jax.tree_util.tree_leaves(updates), strict=True)}  # fmt: skip
        params = params_lib.unflatten(flat)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(
        loss=loss,
        grad_norm=grad_norm,
        learning_rate=lr,
        finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    )
    return params, opt_state, metrics


def step_fn(state: TrainState, batch, learning_rate, *, loss_fn, tx, method, family,
            multipliers=None):  # fmt: skip
    train, frozen = params_lib.partition(state.params, method.trainable)
    key = jax.random.fold_in(state.key, state.step)

    def total_loss(train):
        params = params_lib.combine(train, frozen)
        loss, metrics, outputs = method.loss(params, state.method_state, batch, loss_fn, key)
        return loss, (metrics, outputs)

    (loss, (metrics, outputs)), grads = jax.value_and_grad(total_loss, has_aux=True)(train)
    train, opt_state, step_metrics = apply_gradients(
        train, state.opt_state, grads, loss, learning_rate, tx, multipliers
    )
    params = params_lib.combine(train, frozen)
    info = StepInfo(state.step, batch, grads, step_metrics["learning_rate"], outputs, key)
    method_state, method_metrics = method.step_update(state.method_state, params, info)
    new = TrainState(state.step + 1, params, opt_state, method_state, state.key)
    metrics = dict(metrics, **method_metrics, **step_metrics, **family.step_metrics(params))
    return new, metrics


def shardings_of(state: TrainState, mesh, rules: sharding.Rules) -> TrainState:
    """Shardings for a (possibly abstract) TrainState: the rules on params, optimizer state and
    method state (pytrees shaped like the params follow them), scalars replicated."""
    tree = functools.partial(sharding.tree_shardings, mesh=mesh, rules=rules)
    return TrainState(
        step=sharding.replicated(mesh),
        params=tree(state.params),
        opt_state=tree(state.opt_state),
        method_state=tree(state.method_state),
        key=sharding.replicated(mesh),
    )


def jit_step(step, mesh, state_sharding):
    """jit a (state, batch, lr) step with explicit shardings, donating the incoming state. The
    step is traced under the mesh (`jax.sharding.use_abstract_mesh`), so code that splits its
    work per shard with `shard_map` finds it: the Pallas attention kernel on several devices,
    the chunked contrastive losses' ring. The models and the dense losses do not read it."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(*args)

    return jax.jit(
        traced,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def compile_step(family, graphdef, tx, method, mesh, state_sharding: TrainState,
                 multipliers=None):  # fmt: skip
    """The jitted step of `method` on the family's model structure `graphdef`. A method whose
    step does not touch its state (`Method.state_in_step`) gets the step without it: the state
    stays where it is, and methods differing only outside the step (the merges and plain
    fine-tuning) compile one and the same program."""
    fn = functools.partial(step_fn, loss_fn=family.loss(graphdef), tx=tx, method=method,
                           family=family, multipliers=multipliers)  # fmt: skip
    if method.state_in_step or not jax.tree.leaves(state_sharding.method_state):
        return jit_step(fn, mesh, state_sharding)
    return _StateOutside(jit_step(fn, mesh, state_sharding.replace(method_state=None)))


class _StateOutside:
    """A jitted step over `TrainState`s without the method's state, called with whole ones:
    the incoming method state is passed around the step (neither an argument nor donated) and
    comes back unchanged in the new state."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, state: TrainState, batch, learning_rate):
        new, metrics = self.jitted(state.replace(method_state=None), batch, learning_rate)
        return new.replace(method_state=state.method_state), metrics

    def lower(self, state: TrainState, batch, learning_rate):
        return self.jitted.lower(state.replace(method_state=None), batch, learning_rate)


def place(state: TrainState, state_sharding: TrainState) -> TrainState:
    """`state` on the mesh, always as a copy: the step donates its input state, and without
    the copy `device_put` may alias arrays that the caller still holds (e.g. θ0)."""
    return jax.device_put(state, state_sharding, may_alias=False)
