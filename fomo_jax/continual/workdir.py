"""A run's work directory: one writer at a time, files replaced whole, and preemption.

- `locked(workdir)`: an OS lock (`flock`) on `<workdir>/.lock`, held while a run writes. The
  kernel releases it when the process dies, however it dies (kill -9 included), so a killed
  run never blocks its rerun; a second live run stops at once, naming the holder's host and
  pid. (`flock` is local to a machine: on a network file system shared by several machines
  it may not exclude a run on another machine.)
- `write_atomic(path, text)`: a temporary file in the same folder, then a rename, so a reader
  (or a rerun after a kill) sees the old file or the new one, never half of one.
- `Preemption`: SIGTERM (a scheduler's preemption notice) becomes a request that the training
  loop honours at its next step by checkpointing there; the run then stops with exit status
  `EXIT_PREEMPTED` (75, EX_TEMPFAIL: "try again"), and the same command resumes it. Outside
  the loop (data preparation, the evaluations) nothing is lost by stopping, so the signal
  stops the run at once with the same status. With several processes, JAX's preemption
  notifier owns SIGTERM: a signal to any process makes all of them agree on one step (JAX's
  preemption sync point, polled at every step) and checkpoint that step together; outside the
  loop the notice waits for the next training step or is ignored once training is over.
- `same_config_or_fresh(workdir, config_json)`: a run's identity recorded in `config.json`; a
  directory holding another run's state is refused.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import tempfile
import threading

from fomo_jax import distributed

EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: the run is checkpointed; run it again
LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
    """Another live process holds the work directory."""


class Preempted(Exception):
    """The run stopped on SIGTERM; its state is checkpointed. Exit with `EXIT_PREEMPTED`."""

    exit_code = EXIT_PREEMPTED


@contextlib.contextmanager
def locked(workdir: str):
    """Hold the work directory's lock for the duration of the block."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "a process"
        os.close(fd)
        raise WorkdirBusy(
            f"{workdir} is in use by another run ({holder}); wait for it to end or use "
            "another --workdir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


def write_atomic(path: str, text: str) -> None:
    """Replace `path` with `text` in one rename."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


class Preemption:
    """SIGTERM handling for one run (main thread only; elsewhere the signal keeps its default).

    One process: inside `deferred()` a SIGTERM only sets `requested`, and the loop checkpoints
    and raises `Preempted` at its next check; outside, or on a second SIGTERM, `Preempted` is
    raised at once. Several processes: no Python handler (it would replace JAX's notifier);
    `poll(global_step)`, called by every process at every step, sets `requested` on all of
    them at the one step they agree on after any of them received SIGTERM.
    """

    def __init__(self):
        self.requested = False
        self._depth = 0
        self._previous = None

    def __enter__(self):
        if distributed.multiprocess():
            return self  # jax.distributed's preemption notifier holds SIGTERM
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def poll(self, global_step: int) -> bool:
        """Whether to checkpoint and stop at `global_step` (a collective decision across
        processes: every process calls this at every step, with the same steps)."""
        if not self.requested and distributed.multiprocess():
            self.requested = distributed.preemption_sync_point(global_step)
            if self.requested:
                logging.warning("SIGTERM on a process of this run: all processes stop at "
                                "global step %d", global_step)  # fmt: skip
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        again = self.requested
        self.requested = True
        if not self._depth or again:
            raise Preempted("SIGTERM: stopped before the next checkpoint point")
        logging.warning("SIGTERM: checkpointing at the next step, then stopping")

    @contextlib.contextmanager
    def deferred(self):
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1


def holds_state(workdir: str) -> bool:
    """Whether `workdir` holds a run's state: results or a checkpoint."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.exists(os.path.join(workdir, "results.json")) or (
        os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))
    )


def same_config_or_fresh(workdir: str, config_json: str) -> None:
    """Record the config in `workdir`; a different one is refused once the directory holds a
    run's state (a checkpoint or results), and replaced before that (a failed start)."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == config_json:
                return
        if holds_state(workdir):
            raise ValueError(f"{workdir} holds a run with a different config ({path})")
        logging.info("%s: replacing the config of a start that made no checkpoint", path)
    os.makedirs(workdir, exist_ok=True)
    write_atomic(path, config_json)
