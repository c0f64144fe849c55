"""Where a run's numbers go: JSON lines, TensorBoard events, and optionally Weights & Biases.

`metrics.jsonl` is the record of truth: on resume it is cut back to the lines the checkpoint
knew about, so a resumed run's file equals an uninterrupted one's. TensorBoard event files are
append-only; a resumed run starts new ones that open with a purge marker (a SessionLog START
at the first step it will log), so TensorBoard hides what the killed process logged after the
checkpoint. Training scalars (step axis: global step) and evaluations (step axis: evaluation
index) go to separate runs, `tensorboard/train` and `tensorboard/eval`, because a purge marker
acts on one step axis.

Weights & Biases (`config.wandb.enabled`): the run's W&B id is kept in `<workdir>/wandb_id`, so
a resumed run continues the same W&B run. Training scalars are plotted against `global_step`
and evaluation points against `evaluation_index` (their own axes, declared with
`define_metric`); neither is passed as W&B's internal `step`, which must only grow and would
drop the points a resumed run logs again after its checkpoint. W&B has no purge marker, so
those points appear twice there (TensorBoard and `metrics.jsonl` keep them once).
"""

from __future__ import annotations

import json
import os
import secrets
import string
import time

from fomo_jax.continual.workdir import write_atomic


class EventFile:
    """A TensorBoard event file written synchronously and flushed at every write.

    tensorboardX's `SummaryWriter` hands events to a writer thread, and its `flush` does not
    drain that queue, so a killed run loses what it logged last; this writes in the caller.
    """

    def __init__(self, directory: str, purge_step: int | None = None):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._event, self._summary = event_pb2, summary_pb2
        os.makedirs(directory, exist_ok=True)
        # The name holds the time in seconds; the nanosecond suffix keeps a run resumed within
        # the same second from overwriting the killed process's file, and keeps names in order.
        self.writer = EventsWriter(os.path.join(directory, "events"), f".{time.time_ns()}")
        if purge_step is not None:
            start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
            self._write(event_pb2.Event(wall_time=time.time(), step=purge_step, session_log=start))

    def scalars(self, values: dict[str, float], step: int) -> None:
        value = self._summary.Summary.Value
        summary = self._summary.Summary(
            value=[value(tag=tag, simple_value=float(v)) for tag, v in values.items()]
        )
        self._write(self._event.Event(wall_time=time.time(), step=step, summary=summary))

    def _write(self, event) -> None:
        self.writer.write_event(event)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


WANDB_ID_FILE = "wandb_id"
# W&B's own format for run ids (wandb.util.generate_id): 8 characters of [a-z0-9].
_ID_ALPHABET = string.ascii_lowercase + string.digits


def wandb_run_id(workdir: str) -> str:
    """The W&B run id of the run in `workdir`: read from `<workdir>/wandb_id`, or made and
    written there (atomically) before the run first starts W&B, so every resume finds it."""
    path = os.path.join(workdir, WANDB_ID_FILE)
    if os.path.exists(path):
        with open(path) as f:
            run_id = f.read().strip()
        if not run_id or any(c in run_id for c in "/\\#?%:"):
            raise ValueError(f"{path} holds {run_id!r}, not a W&B run id; delete it to start anew")
        return run_id
    run_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(8))
    write_atomic(path, run_id + "\n")
    return run_id


def _start_wandb(workdir: str, config):
    """Start (or resume: same id, resume="allow") the W&B run of `workdir`, with training
    scalars on the global-step axis and evaluation points on the evaluation-index axis."""
    try:
        import wandb
    except ImportError:
        raise ImportError(
            "config.wandb.enabled is set but wandb is not installed: pip install wandb "
            "(or pip install 'fomo_jax[wandb]')"
        ) from None
    run = wandb.init(
        project=config.wandb.project,
        name=config.wandb.name or os.path.basename(os.path.abspath(workdir)),
        config=json.loads(config.to_json_best_effort()),
        id=wandb_run_id(workdir),
        resume="allow",
        dir=workdir,  # W&B's local files stay with the run, not in the current folder
    )
    run.define_metric("global_step")
    run.define_metric("train/*", step_metric="global_step")
    run.define_metric("evaluation_index")
    for pattern in ("eval/*", "eval_*"):  # headline metrics; per-dataset eval_<kind>/...
        run.define_metric(pattern, step_metric="evaluation_index")
    return run


class RunLogger:
    def __init__(self, workdir: str, config, keep_lines: int, resume_at: tuple[int, int] | None,
                 write: bool = True):  # fmt: skip
        """`resume_at`: (first global step, first evaluation index) the resumed run will log, or
        None for a fresh run. `config`: the run's config, for W&B (None: no W&B). `write`:
        False on the processes of a multi-process run that are not its writer (lines are
        counted, nothing is written)."""
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.lines = keep_lines
        self.write = write
        if not write:
            return
        if os.path.exists(self.path):  # cut back in one rename: a kill here loses no line
            with open(self.path) as f:
                kept = f.readlines()[:keep_lines]
            write_atomic(self.path, "".join(kept))
        self.file = open(self.path, "a")
        purge = resume_at or (None, None)
        board = os.path.join(workdir, "tensorboard")
        self.train_board = EventFile(os.path.join(board, "train"), purge_step=purge[0])
        self.eval_board = EventFile(os.path.join(board, "eval"), purge_step=purge[1])
        enabled = config is not None and config.wandb.enabled
        self.wandb = _start_wandb(workdir, config) if enabled else None

    def step(self, record: dict, global_step: int) -> None:
        if not self.write:
            self.lines += 1
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines += 1
        scalars = {f"train/{k}": v for k, v in record.items() if k not in ("task", "step")}
        self.train_board.scalars(scalars, global_step)
        if self.wandb:
            self.wandb.log(dict(scalars, global_step=global_step))

    def evaluation(self, point: dict, index: int) -> None:
        """One evaluation point (index 0 = zero-shot, k + 1 = after task k)."""
        if not self.write:
            return
        scalars = {f"eval/{k}": v for k, v in point.items() if isinstance(v, float)}
        for name, entry in point.get("per_dataset", {}).items():
            for metric, value in entry.items():
                scalars[f"eval_{point['evaluation']}/{name}/{metric}"] = value
        self.eval_board.scalars(scalars, index)
        if self.wandb:
            self.wandb.log(dict(scalars, evaluation_index=index))

    def close(self) -> None:
        if not self.write:
            return
        self.file.close()
        self.train_board.close()
        self.eval_board.close()
        if self.wandb:
            self.wandb.finish()
