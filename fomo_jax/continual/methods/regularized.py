"""Regularization methods: online EWC and Synaptic Intelligence (spec §8.2).

Both train every parameter with the model family's loss (CLIP: the contrastive loss) plus a
quadratic penalty that pulls the weights towards an anchor, weighted per parameter by an
importance estimate. The importances and anchors are pytrees shaped like the parameters and
live in the method state, so the runner shards them with the parameter rules, the jitted step
evaluates the penalty on device, and checkpoints save them.

- `ewc` (online EWC): at the end of task k, θ* ← θ and F ← γ·F + F_new, with F_new the mean of
  squared batch-mean gradients of the family's loss over `fisher_batches` batches of the task's
  update pool (CLIP: at the model's learnable temperature exp(logit_scale); [FIX]: the
  reference uses 1/logit_scale). Loss L + (λ/2)·Σ F ⊙ (θ − θ*)²; F = 0 during task 0.
- `si` (Synaptic Intelligence, Mammoth's form): after every step ω += η_t·g², g the gradient
  after the global-norm clip (steps whose gradient is not finite add nothing); at the end of a
  task Ω += ω / ((θ − θ_prev)² + ξ), θ_prev ← θ, ω ← 0. Loss L + c·Σ Ω ⊙ (θ − θ_prev)².
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from ml_collections import config_dict

from fomo_jax import profiling
from fomo_jax.continual.methods.base import Method, register
from fomo_jax.data import mixture


def weighted_squared_distance(weights, params, anchor):
    """Σ over all leaves of weights ⊙ (params − anchor)², in float32."""
    terms = jax.tree_util.tree_map(
        lambda w, p, a: jnp.sum(w * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
        weights,
        params,
        anchor,
    )
    return sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), jnp.float32))


def zeros_like_tree(tree):
    """float32 zeros shaped like `tree`, placed like its leaves (a committed array's zeros
    keep its sharding): a jitted accumulator then sees the same input placement on its first
    call as on the later ones, which feed it its own outputs, and compiles once."""
    return jax.tree_util.tree_map(lambda x: jnp.zeros_like(x, jnp.float32), tree)


@functools.partial(jax.jit, static_argnames="loss_fn", donate_argnums=0)
def _accumulate_squared_grads(total, params, batch, *, loss_fn):
    """total + (∇θ L(batch))² (the gradient of the batch-mean loss)."""
    key = jax.random.key(0)  # the loss's key in the Fisher pass (CLIP's loss ignores it)
    grads = jax.grad(lambda p: loss_fn(p, batch, key)[0])(params)
    return jax.tree_util.tree_map(lambda t, g: t + jnp.square(g.astype(jnp.float32)), total, grads)


@jax.jit
def _online_fisher(fisher, total, count, gamma):
    """γ·F + total / count."""
    return jax.tree_util.tree_map(lambda f, t: gamma * f + t / count, fisher, total)


@register
class EWC(Method):
    """Online EWC: L + (λ/2)·Σ F ⊙ (θ − θ*)² (spec §8.2)."""

    name = "ewc"
    defaults = {
        "ewc_lambda": 1.0,  # λ
        "gamma": 1.0,  # F ← γ·F + F_new
        # The reference's ⌈50,000 / 512⌉ = 98 batches of the update-pool batch size.
        "fisher_batches": 98,
        # None: the update-pool batch size of the task's mixture (spec §4.2).
        "fisher_batch_size": functools.partial(config_dict.placeholder, int),
    }

    def setup(self, ctx):
        super().setup(ctx)
        if int(self.config.fisher_batches) < 1:
            raise ValueError(f"ewc fisher_batches must be >= 1, got {self.config.fisher_batches}")
        self.loss_fn = ctx.family.loss(self.graphdef)

    def init_state(self, params):
        return {"fisher": zeros_like_tree(params), "anchor": params}

    def fisher_batch_size(self, task: int) -> int:
        if self.config.fisher_batch_size:
            return int(self.config.fisher_batch_size)
        config = self.ctx.config
        sizes = mixture.pool_batch_sizes(config.batch_size, dict(config.mixture), task)
        return sizes["update"]

    def extra_step_flops(self, model_config) -> float:
        """A task's Fisher pass (`fisher_batches` forward+backward passes at the update-pool
        batch size of tasks >= 1), charged per step as the paper does (spec §5.2)."""
        batch_size = self.fisher_batch_size(1)
        flops = profiling.grad_pass_flops(self.ctx.family, model_config, batch_size)
        return int(self.config.fisher_batches) * flops

    def fisher(self, task: int, params):
        """F_new of `task`: the mean over `fisher_batches` update-pool batches of the squared
        gradient of the batch-mean loss of the family (CLIP: at the model's temperature)."""
        total, count = zeros_like_tree(params), 0
        batches = self.ctx.data.update_batches(
            task, self.fisher_batch_size(task), int(self.config.fisher_batches)
        )
        for batch in batches:
            total = _accumulate_squared_grads(total, params, batch, loss_fn=self.loss_fn)
            count += 1
        if not count:
            raise ValueError(f"ewc: the update pool of task {task} gave no batches")
        return total, count

    def end_of_task(self, task, params, state):
        total, count = self.fisher(task, params)
        fisher = _online_fisher(
            state["fisher"], total, jnp.float32(count), jnp.float32(self.config.gamma)
        )
        return params, {"fisher": fisher, "anchor": params}

    def loss(self, params, state, batch, loss_fn, key):
        base, metrics, outputs = super().loss(params, state, batch, loss_fn, key)
        penalty = (
            0.5
            * self.config.ewc_lambda
            * weighted_squared_distance(state["fisher"], params, state["anchor"])
        )
        return base + penalty, dict(metrics, clip_loss=base, ewc_penalty=penalty), outputs


@jax.jit
def _si_consolidate(state, params, xi):
    """Ω += ω / ((θ − θ_prev)² + ξ); θ_prev ← θ; ω ← 0."""
    importance = jax.tree_util.tree_map(
        lambda big, small, p, prev: big + small / (jnp.square(p - prev) + xi),
        state["importance"],
        state["omega"],
        params,
        state["previous"],
    )
    return {
        "omega": jax.tree_util.tree_map(jnp.zeros_like, state["omega"]),
        "importance": importance,
        "previous": params,
    }


@register
class SI(Method):
    """Synaptic Intelligence: L + c·Σ Ω ⊙ (θ − θ_prev)² (spec §8.2)."""

    name = "si"
    defaults = {"c": 0.5, "xi": 1.0}

    def init_state(self, params):
        zeros = zeros_like_tree(params)
        return {"omega": zeros, "importance": zeros_like_tree(params), "previous": params}

    def loss(self, params, state, batch, loss_fn, key):
        base, metrics, outputs = super().loss(params, state, batch, loss_fn, key)
        penalty = self.config.c * weighted_squared_distance(
            state["importance"], params, state["previous"]
        )
        return base + penalty, dict(metrics, clip_loss=base, si_penalty=penalty), outputs

    def clip_factor(self, norm):
        """min(1, clip_norm / ‖g‖): the optimizer's global-norm clip (1 without a clip)."""
        clip_norm = self.ctx.config.optimizer.clip_norm
        if clip_norm is None:
            return jnp.ones((), jnp.float32)
        return jnp.minimum(1.0, clip_norm / norm)

    def step_update(self, state, params, info):
        norm = optax.tree.norm(info.grads)
        finite = jnp.isfinite(norm)
        scale = self.clip_factor(norm)
        lr = jnp.asarray(info.learning_rate, jnp.float32)
        omega = jax.tree_util.tree_map(
            lambda w, g: w + jnp.where(finite, lr * jnp.square(g.astype(jnp.float32) * scale), 0.0),
            state["omega"],
            info.grads,
        )
        return dict(state, omega=omega), {"si_skipped": 1.0 - finite.astype(jnp.float32)}

    def end_of_task(self, task, params, state):
        return params, _si_consolidate(state, params, jnp.float32(self.config.xi))
