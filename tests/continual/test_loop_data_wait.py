"""The loop's two data-wait measures: time spent getting batches, and the part of it no step
covered (`data_wait_idle_fraction`). Steps run asynchronously, so a wait behind a slow step
in flight is not idle time; a wait behind a finished step is."""

from __future__ import annotations

import functools
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from fomo_jax.continual import loop as loop_lib

SLEEP = 0.03  # seconds the fake pipeline takes per batch


class _SlowBatches:
    batch_size, sizes = 4, {"update": 4}

    def dataset(self, start_step):
        for _ in range(start_step, 1000):
            time.sleep(SLEEP)
            yield {"x": np.ones((4,), np.float32), "skipped": np.int64(0)}


class _Log:
    def __init__(self):
        self.records, self.lines = [], 0

    def step(self, record, global_step):
        self.records.append(record)
        self.lines += 1


@functools.partial(jax.jit, static_argnums=3)
def _step(state, batch, lr, matmuls):
    """A step of `matmuls` 512 x 512 products: from ~0 to far longer than SLEEP."""
    m = jnp.full((512, 512), 1e-3, jnp.float32) + batch["x"].sum() * 1e-6
    m = jax.lax.fori_loop(0, matmuls, lambda i, a: jnp.tanh(a @ a), m)
    loss = m.mean() + state
    return state + 1.0, {"loss": loss, "learning_rate": lr, "finite": jnp.isfinite(loss)}


def _window(matmuls: int, steps: int = 8) -> dict:
    """One log window of `steps` steps; its metrics line."""
    step_fn = functools.partial(_step, matmuls=matmuls)
    jax.block_until_ready(step_fn(jnp.float32(0), {"x": np.ones((4,), np.float32)}, 0.0))
    job = types.SimpleNamespace(
        steps=steps, max_bad_images=0, family=types.SimpleNamespace(batch_keys=("x",)),
        lr_of=lambda task, step: 0.0, keep_losses=False, log_every=steps, checkpoint_every=0,
        num_tasks=1, after_task=None, final_evaluation=False, eval_seconds={}, name="",
    )  # fmt: skip
    log = _Log()
    loop = loop_lib._Loop(job, step_fn, log, checkpoints=None)
    loop.preemption = types.SimpleNamespace(poll=lambda step: False, requested=False)
    record = dict(bad_images=0)
    loop.train_task(0, _SlowBatches(), jnp.float32(0), dict(task=0, step=0), record)
    (line,) = log.records
    return line


def test_a_wait_behind_finished_steps_is_idle():
    line = _window(matmuls=0)  # the step is done long before the next batch comes
    assert line["data_wait_fraction"] > 0.5
    assert line["data_wait_idle_fraction"] > 0.9 * line["data_wait_fraction"]


def test_a_wait_behind_a_step_in_flight_is_not_idle():
    # Each step takes several times SLEEP, so only the first wait (nothing dispatched yet)
    # finds the devices idle.
    line = _window(matmuls=60)
    assert line["data_wait_fraction"] > 0
    assert line["data_wait_idle_fraction"] < 0.5 * line["data_wait_fraction"]
