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


def train_step(state: TrainState, batch: Batch, learning_rate, *, loss_fn, tx):
    """One AdamW step; `learning_rate` is a traced scalar, so schedules never recompile."""
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = jnp.asarray(learning_rate, jnp.float32)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, state.params, updates)
    grad_norm = optax.tree.norm(grads)
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        learning_rate=lr,
        logit_scale=params["logit_scale"],
        finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    )
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


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


def compile_train_step(graphdef, tx, mesh, state_sharding: TrainState):
    """jit with explicit shardings and donation of the incoming state."""
    step = functools.partial(train_step, loss_fn=make_loss_fn(graphdef), tx=tx)
    batch_sharding = sharding.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh)),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=(0,),
    )
