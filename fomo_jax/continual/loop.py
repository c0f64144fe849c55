"""The one training loop: every job (making θ0, the pretraining job, the continual stream, a
stage of a staged recipe) is a `Job` run by `train`.

A job trains a sequence of tasks (one for pretraining) with one jitted step (`fomo_jax.train.
step`) compiled once: at a task's start the method picks the weights training starts from; the
task's batches come from `Job.batches` (a pure function of (task, step), so a resumed job reads
exactly what an uninterrupted one does); after the task the method's end-of-task hook runs and
the job may evaluate. Along the way the loop writes orbax checkpoints (at the start, every
`checkpoint_every` steps, after every task), logs to `metrics.jsonl`, TensorBoard and W&B with
progress lines (samples/s, data wait, ETA), stops on a non-finite loss or state after saving it
aside (`diverged/`), turns SIGTERM into a checkpoint at the current step, and counts skipped
undecodable images. Data wait is logged twice: `data_wait_fraction`, the time spent getting
batches, and `data_wait_idle_fraction`, the part of it no step covered. Steps are dispatched
asynchronously, so the loop fetches the next batch while the devices still run earlier steps; a
wait counts as idle when the latest dispatched step had finished by its end (an upper
bound of the time the devices sat idle for lack of data). A killed job rerun with the same
arguments resumes from its last checkpoint to exactly the result of an uninterrupted one.

Several processes (`fomo_jax.distributed`): every process runs the loop on its share of each
global batch (`Job.batches` yields the process's rows; the loop assembles the global arrays),
checkpoints are written together (orbax), process 0 alone writes the logs, and the method's
task-level hooks and the evaluations see full host copies of the weights. A checkpoint records
the mesh it was written on; resuming on another one (a different number of processes or
devices, another mesh shape) needs `Job.resume_on_new_mesh`, and is then exact up to the
reductions' order (bitwise on the same mesh only).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from fomo_jax import distributed, sharding
from fomo_jax.continual import workdir as workdir_lib
from fomo_jax.continual.checkpoints import Checkpoints
from fomo_jax.continual.logger import RunLogger
from fomo_jax.continual.methods import Method
from fomo_jax.families.base import Family, Params
from fomo_jax.train import step as step_lib


@dataclasses.dataclass
class Job:
    """One call of the loop."""

    workdir: str  # checkpoints/, metrics.jsonl, tensorboard/, diverged/
    family: Family
    method: Method  # set up (`Method.setup`)
    tx: optax.GradientTransformation
    mesh: jax.sharding.Mesh
    steps: int  # per task
    num_tasks: int
    lr_of: Callable[[int, int], float]  # (task, step) -> learning rate
    # (task, record) -> the task's batches (`pipeline.TaskBatches`: `dataset(start_step)`,
    # `batch_size`, `sizes`)
    batches: Callable
    seed: int  # the step key's seed
    log_every: int
    checkpoint_every: int | None = None
    lr_multipliers: dict = dataclasses.field(default_factory=dict)  # {group: factor}
    carry_optimizer_state: bool = False  # keep AdamW's moments across tasks
    max_bad_images: int = 0  # undecodable images the job may skip (data.bad_images = "skip")
    bad_images_note: str = ""  # what sets the limit, for the error message
    config: ml_collections.ConfigDict | None = None  # for W&B (None: no W&B)
    name: str = ""  # prefix of the progress lines
    keep_losses: bool = False  # record every step's loss (`record["losses"]`)
    # Evaluation hooks: `zero_shot(params)` -> entries of the record before training (a
    # "zero_shot_full" entry is logged as evaluation 0); `after_task(task, params)` -> a point
    # appended to `record["trajectory"]` and logged, or None.
    zero_shot: Callable[[Params], dict] | None = None
    after_task: Callable[[int, Params], dict | None] | None = None
    eval_every_nth_task: int = 1
    final_evaluation: bool = False  # whether the caller evaluates after the loop (ETA)
    resume_on_new_mesh: bool = False  # restore a checkpoint written on another mesh
    # kind ("subset", "full") -> seconds of its latest evaluation in this process (the ETA)
    eval_seconds: dict = dataclasses.field(default_factory=dict)


def train(job: Job, start_params: Params):
    """Run (or resume) `job` from `start_params`; returns (final state, record)."""
    family, method, tx, steps = job.family, job.method, job.tx, job.steps
    key = step_lib.step_key(job.seed)
    abstract = jax.eval_shape(lambda p: step_lib.fresh_state(p, method, tx, key), start_params)
    state_sharding = step_lib.shardings_of(abstract, job.mesh, family.rules)
    multipliers = None
    if job.lr_multipliers:
        trained = step_lib.trained(abstract.params, method)
        multipliers = step_lib.lr_multipliers(trained, family.group_of, dict(job.lr_multipliers))
    step_fn = step_lib.compile_step(family, method.graphdef, tx, method, job.mesh,
                                    state_sharding, multipliers)  # fmt: skip

    def place(state):
        return step_lib.place(state, state_sharding)

    host = distributed.to_host if distributed.multiprocess() else (lambda tree: tree)
    mesh_record = dict(processes=jax.process_count(), devices=jax.device_count(),
                       shape=dict(job.mesh.shape))  # fmt: skip
    checkpoints = Checkpoints(os.path.join(job.workdir, "checkpoints"), keep_every=steps)
    latest = checkpoints.latest()
    if latest is not None:
        state, position, record = checkpoints.restore(latest, abstract, state_sharding)
        _check_mesh(job, checkpoints.directory, latest, record, mesh_record)
        record["mesh"] = mesh_record
        logging.info("%sresuming from checkpoint %d: task %d, step %d", _prefix(job), latest,
                     position["task"], position["step"])  # fmt: skip
    else:
        state = place(step_lib.fresh_state(start_params, method, tx, key))
        record = dict(metric_lines=0, batch_sizes=[], bad_images=0, trajectory=[],
                      mesh=mesh_record)  # fmt: skip
        if job.keep_losses:
            record["losses"] = []
        if job.zero_shot is not None:
            record.update(job.zero_shot(start_params))
        position = dict(task=0, step=0)
        checkpoints.save(0, state, position, record)

    resume_at = None
    if latest is not None:  # hide what a killed process logged after this checkpoint
        resume_at = (position["task"] * steps + position["step"] + 1, position["task"] + 1)
    log = RunLogger(job.workdir, job.config, keep_lines=record["metric_lines"],
                    resume_at=resume_at, write=distributed.primary())  # fmt: skip
    if latest is None and "zero_shot_full" in record:
        log.evaluation(record["zero_shot_full"], 0)
    loop = _Loop(job, step_fn, log, checkpoints, sharding.batch_sharding(job.mesh))
    try:
        with workdir_lib.Preemption() as preemption, preemption.deferred():
            loop.preemption = preemption
            for task in range(position["task"], job.num_tasks):
                batches = job.batches(task, record)
                if position["step"] == 0:  # a task starts: the method picks its training weights
                    params = method.train_params(task, host(state.params),
                                                 host(state.method_state))  # fmt: skip
                    opt_state = (state.opt_state if job.carry_optimizer_state
                                 else tx.init(step_lib.trained(params, method)))  # fmt: skip
                    state = place(state.replace(params=params, opt_state=opt_state))
                state = loop.train_task(task, batches, state, position, record)
                params, method_state = method.end_of_task(task, host(state.params),
                                                          host(state.method_state))  # fmt: skip
                state = place(state.replace(params=params, method_state=method_state))
                if not bool(_all_finite((state.params, state.method_state))):
                    loop.diverged(task, steps, state, position, record,
                                  where=f"after the end-of-task hook of {method.name}")  # fmt: skip
                last = task == job.num_tasks - 1
                if job.after_task and (last or (task + 1) % job.eval_every_nth_task == 0):
                    point = job.after_task(task, method.eval_params(task, params, method_state))
                    if point is not None:
                        record["trajectory"].append(point)
                        log.evaluation(point, task + 1)
                position.update(task=task + 1, step=0)
                record["batch_sizes"] = record["batch_sizes"][:task] + [dict(batches.sizes)]
                loop.save(state, position, record)
                loop.stop_if_preempted(position)
    finally:
        log.close()
        checkpoints.close()
    return state, record


def _check_mesh(job: Job, directory: str, index: int, saved: dict, current: dict) -> None:
    """A checkpoint written on another mesh is restored only when the job asks for it."""
    before = saved.get("mesh")
    if before is None or before == current or job.resume_on_new_mesh:
        if before not in (None, current):
            logging.warning("%sresuming checkpoint %d, written on %s, on %s: the result is the "
                            "same computation up to the order of its reductions, not bitwise",
                            _prefix(job), index, before, current)  # fmt: skip
        return
    raise ValueError(
        f"{directory}/{index} was written on {before} and this run has {current}; restoring it "
        "on another mesh changes the order of reductions (the result is no longer bitwise the "
        "uninterrupted run's): set config.resume_on_new_mesh=True to resume it anyway"
    )


def _prefix(job: Job) -> str:
    return f"{job.name}: " if job.name else ""


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every float entry of `tree` is finite."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]  # fmt: skip
    return jnp.stack(leaves).all() if leaves else jnp.bool_(True)


class _Loop:
    """The step loop of a task: logging, checkpoints, divergence, preemption, bad images."""

    def __init__(self, job: Job, step_fn, log: RunLogger, checkpoints: Checkpoints,
                 batch_sharding=None):  # fmt: skip
        self.job, self.step_fn, self.log, self.checkpoints = job, step_fn, log, checkpoints
        self.batch_sharding = batch_sharding
        self.preemption = None
        self.pending_losses = []  # device scalars not yet in record["losses"]

    def save(self, state, position, record):
        self._flush_losses(record)
        job = self.job
        self.checkpoints.save(position["task"] * job.steps + position["step"], state, position,
                              record)  # fmt: skip

    def _flush_losses(self, record):
        if self.job.keep_losses and self.pending_losses:
            record["losses"] += [float(x) for x in jax.device_get(self.pending_losses)]
            self.pending_losses = []

    def train_task(self, task, batches, state, position, record):
        job, steps = self.job, self.job.steps
        start_step = position["step"]
        window_start, last_logged = time.perf_counter(), start_step
        data_wait = data_idle = 0.0  # seconds of this log window: getting batches; of it, idle
        iterator = iter(batches.dataset(start_step))
        in_flight = None  # an output of the latest step dispatched (steps run asynchronously)
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            batch = next(iterator)
            waited = time.perf_counter() - t0
            data_wait += waited
            if in_flight is None or in_flight.is_ready():  # no step ran through (all of) the wait
                data_idle += waited
            skipped = int(batch["skipped"])
            if job.max_bad_images:  # "skip" policy: the processes agree on the run's count
                skipped = distributed.sum_over_processes(skipped)
            self._count_bad_images(task, step, skipped, record)
            batch = {k: batch[k] for k in job.family.batch_keys}
            batch = distributed.global_batch(batch, self.batch_sharding)
            state, metrics = self.step_fn(state, batch, job.lr_of(task, step))
            in_flight = metrics["loss"]
            if job.keep_losses:
                self.pending_losses.append(metrics["loss"])
            done = step + 1
            log_now = done % job.log_every == 0 or done == steps
            # The task's last step is saved by the end-of-task checkpoint (same global step).
            save_now = job.checkpoint_every and done % job.checkpoint_every == 0 and done < steps
            preempted = self.preemption.poll(task * steps + done) and done < steps
            if log_now or save_now or preempted:  # never log or checkpoint a diverged state
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not metrics["finite"]:
                    self.diverged(task, done, state, position, record)
            if log_now:
                self._flush_losses(record)
                elapsed = time.perf_counter() - window_start
                rate = (done - last_logged) * batches.batch_size / elapsed
                line = dict(task=task, step=done, samples_per_second=rate,
                            data_wait_fraction=data_wait / elapsed,
                            data_wait_idle_fraction=data_idle / elapsed, **metrics)  # fmt: skip
                self.log.step(line, global_step=task * steps + done)
                record["metric_lines"] = self.log.lines
                logging.info(
                    "%stask %d step %d/%d | loss %.4f | lr %.2e | %.0f samples/s | data wait "
                    "%.0f%% (idle %.0f%%) | ETA task %.0fs | %s%s", _prefix(job), task, done,
                    steps, metrics["loss"], metrics["learning_rate"], rate,
                    100 * data_wait / elapsed, 100 * data_idle / elapsed,
                    (steps - done) * batches.batch_size / rate,
                    self.run_progress(task, done, elapsed / (done - last_logged)),
                    f" | {record['bad_images']} bad images skipped" if record["bad_images"]
                    else "",
                )  # fmt: skip
                window_start, last_logged = time.perf_counter(), done
                data_wait = data_idle = 0.0
            if save_now or preempted:
                position.update(task=task, step=done)
                self.save(state, position, record)
            if preempted:
                self.stop_if_preempted(position)
        return state

    def run_progress(self, task: int, done: int, seconds_per_step: float) -> str:
        """The whole job's progress and time left: "run 540/1200 steps (45%) | ETA run 3m12s".

        Time left = the remaining training steps at the last log window's step time + the
        remaining evaluations (after each evaluated task, then the final full one) at the
        durations this process measured for their kind (a fresh run times both at zero-shot).
        A kind not timed yet (on a resumed run, until its first evaluation) counts as 0, and
        the ETA is then marked as a lower bound: "ETA run >3m12s"."""
        job = self.job
        total = job.steps * job.num_tasks
        global_step = task * job.steps + done
        pending = {}
        if job.after_task:
            last, every = job.num_tasks - 1, job.eval_every_nth_task
            pending["subset"] = sum(k == last or (k + 1) % every == 0
                                    for k in range(task, last + 1))  # fmt: skip
        if job.final_evaluation:
            pending["full"] = 1
        seconds = (total - global_step) * seconds_per_step
        seconds += sum(n * job.eval_seconds.get(kind, 0.0) for kind, n in pending.items())
        bound = ">" if any(kind not in job.eval_seconds for kind in pending) else ""
        return (f"run {global_step}/{total} steps ({100 * global_step / total:.0f}%) | "
                f"ETA run {bound}{format_duration(seconds)}")  # fmt: skip

    def stop_if_preempted(self, position):
        """After a checkpoint: stop if SIGTERM came (the checkpoint holds the position)."""
        if self.preemption.requested:
            index = position["task"] * self.job.steps + position["step"]
            where = f"checkpoint {index} at task {position['task']} step {position['step']}"
            logging.warning("SIGTERM: %s; stopping", where)
            raise workdir_lib.Preempted(f"SIGTERM: stopped after {where}")

    def _count_bad_images(self, task, step, skipped, record):
        if not skipped:
            return
        record["bad_images"] += skipped
        if record["bad_images"] > self.job.max_bad_images:
            raise ValueError(
                f"{_prefix(self.job)}task {task} step {step}: {record['bad_images']} "
                f"undecodable images skipped, more than {self.job.bad_images_note} allows "
                f"({self.job.max_bad_images}); the warnings above name the files"
            )

    def diverged(self, task, step, state, position, record, where=None):
        """Abort a diverged job, after saving its state aside for inspection (spec §7: the run
        aborts after writing a checkpoint). The state goes to a new entry of `diverged/` (one per
        divergence: a rerun that diverges again adds another), not to `checkpoints/`, so a rerun
        resumes from the last good checkpoint, not from non-finite weights."""
        workdir = self.job.workdir
        aside = Checkpoints(os.path.join(workdir, "diverged"), max_to_keep=None)
        index = (aside.latest() or 0) + 1
        self._flush_losses(record)
        aside.save(index, state, dict(task=task, step=step), record)
        aside.close()
        if where:
            what = f"non-finite parameters or method state {where} (step {step})"
        else:
            what = f"non-finite loss or gradient norm at step {step}"
        raise FloatingPointError(
            f"{_prefix(self.job)}task {task}: {what}. The state at this step is saved in "
            f"{os.path.join(workdir, 'diverged', str(index))}; the last good checkpoint is "
            f"{self.checkpoints.latest()} in {os.path.join(workdir, 'checkpoints')} (a rerun "
            "resumes from it and, with the same config, diverges again: lower the learning "
            "rate or raise the gradient clipping and start in a new workdir)."
        )


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m: minutes and seconds under an hour, hours and minutes above."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def finetuning(graphdef, tx, mesh, params, *, family: Family | None = None, seed: int = 0):
    """Full fine-tuning with the one step, outside a job (scripts, benchmarks, tests):
    (jitted step, the state of `params` on the mesh). Every parameter trains; `family`
    defaults to CLIP."""
    if family is None:
        from fomo_jax.families import clip

        family = clip.FAMILY
    method = Method()  # every hook the identity
    method.graphdef = graphdef
    key = step_lib.step_key(seed)
    abstract = jax.eval_shape(lambda p: step_lib.fresh_state(p, method, tx, key), params)
    shardings = step_lib.shardings_of(abstract, mesh, family.rules)
    step = step_lib.compile_step(family, graphdef, tx, method, mesh, shardings)
    return step, step_lib.place(step_lib.fresh_state(params, method, tx, key), shardings)
