"""The CLIP train step: a pure `jax.jit` function of explicit state.

`TrainState` holds the step counter, the parameter pytree and the optimizer state. The step
takes (state, batch, learning_rate) and returns (new state, metrics); it is compiled once
with explicit in/out shardings on the mesh and donates the old state's buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from fomo_jax import params as params_lib
from fomo_jax import sharding
from fomo_jax.data.synthetic import CLIP_MEAN, CLIP_STD
from fomo_jax.train.losses import clip_loss

# {"images": u8 [B, H, W, 3] or "pixels": f32 [B, H, W, 3] (normalized), "token_ids": i32 [B, L]}
Batch = dict[str, jax.Array]


def batch_pixels(batch: Batch) -> jax.Array:
    """Normalized float pixels: uint8 `images` are normalized on the device (4x less to send)."""
    if "pixels" in batch:
        return batch["pixels"]
    images = batch["images"].astype(jnp.float32) / 255.0
    return (images - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params, tx: optax.GradientTransformation) -> TrainState:
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def make_loss_fn(graphdef) -> Callable:
    """(params, batch) -> (loss, metrics) for the model structure `graphdef`."""

    def loss_fn(params, batch: Batch):
        model = params_lib.merge(graphdef, params)
        image_emb, text_emb, _ = model(batch_pixels(batch), batch["token_ids"])
        return clip_loss(image_emb, text_emb, model.logit_scale[...])

    return loss_fn


def apply_gradients(params, opt_state, grads, loss, learning_rate, tx):
    """The optimizer update `p - lr * u` and the step's common metrics.

    Returns (params, opt_state, metrics); shared by this step and the continual step.
    """
    updates, opt_state = tx.update(grads, opt_state, params)
    lr = jnp.asarray(learning_rate, jnp.float32)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(
        loss=loss,
        grad_norm=grad_norm,
        learning_rate=lr,
        finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    )
    return params, opt_state, metrics


def train_step(state: TrainState, batch: Batch, learning_rate, *, loss_fn, tx):
    """One AdamW step; `learning_rate` is a traced scalar, so schedules never recompile."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    params, opt_state, step_metrics = apply_gradients(
        state.params, state.opt_state, grads, loss, learning_rate, tx
    )
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new, dict(metrics, **step_metrics, logit_scale=params["logit_scale"])


def init_state(params, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """A TrainState placed on the mesh, always as a copy.

    The step donates its input state; without the copy `device_put` may alias the arrays of
    the model the params came from, and that model would be deleted by the first step.
    """
    return jax.device_put(TrainState.create(params, tx), shardings, may_alias=False)


def state_shardings(state: TrainState, mesh, rules=sharding.CLIP_RULES) -> TrainState:
    """Shardings for a (possibly abstract) TrainState: the rules on params and optimizer state."""
    return TrainState(
        step=sharding.replicated(mesh),
        params=sharding.tree_shardings(state.params, mesh, rules),
        opt_state=sharding.tree_shardings(state.opt_state, mesh, rules),
    )


def jit_step(step, mesh, state_sharding):
    """jit a (state, batch, lr) step with explicit shardings, donating the incoming state."""
    return jax.jit(
        step,
        in_shardings=(state_sharding, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )


def compile_train_step(graphdef, tx, mesh, state_sharding: TrainState):
    """The jitted CLIP step for the model structure `graphdef`."""
    step = functools.partial(train_step, loss_fn=make_loss_fn(graphdef), tx=tx)
    return jit_step(step, mesh, state_sharding)
