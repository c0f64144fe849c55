"""Several processes, one run: start-up, the one writer, barriers and host copies.

A run on a TPU pod or a multi-node GPU cluster is one process per host, each driving its local
devices; together they hold one global mesh (`jax.distributed`). `initialize` starts it from
explicit flags (`--coordinator_address`, `--num_processes`, `--process_id`), or detects the
cluster (TPU pod, SLURM) when none are given; on CPU (tests: several processes on localhost
with fake devices) the collectives go through gloo. With one process every helper here is the
plain single-process behaviour, so nothing changes for a run on one host.

- `primary()`: process 0 is the one writer of a run's files (config, metrics, TensorBoard,
  plots, results, exports, caches); `barrier(name)` makes the others wait for it.
- `to_host(tree)`: a full host copy of a (possibly sharded across processes) pytree on every
  process; `jax.device_get` cannot read shards that live on another host.
- `local_rows(sharding, size)`: the rows of a global batch this process's devices hold, so
  each process loads and decodes only its share; `global_batch` assembles the global arrays.
- `preemption_sync_point(step)`: SIGTERM on any process -> every process stops at one step.
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:  # fmt: skip
    """Join the run's processes (before any JAX computation). Explicit flags win; without them
    a TPU pod or a SLURM job with several tasks is detected by `jax.distributed`; otherwise the
    run is one process and nothing happens."""
    explicit = coordinator_address is not None
    if explicit and (num_processes is None or process_id is None):
        raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not explicit and not _cluster_detected():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; else unused
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d; %d local of %d devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())  # fmt: skip


def _cluster_detected() -> bool:
    """A SLURM job with more than one task, or a TPU pod slice with more than one host."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h]) > 1


def multiprocess() -> bool:
    return jax.process_count() > 1


def primary() -> bool:
    """Whether this process writes the run's files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all arrive (nothing with one process)."""
    if multiprocess():
        multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str):
    """The body runs on process 0 first (e.g. writing a cache), then on the others."""
    if primary():
        yield
        barrier(name)
    else:
        barrier(name)
        yield


def to_host(tree):
    """A full numpy copy of every leaf on every process (sharded leaves gathered)."""
    if not multiprocess():
        return jax.device_get(tree)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)


def broadcast_from_primary(value: bool) -> bool:
    """Process 0's `value` on every process (a collective), so that all take one branch."""
    if not multiprocess():
        return value
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(value)))


def sum_over_processes(count: int) -> int:
    """The sum of `count` over the processes (a collective: every process must call it)."""
    if not multiprocess():
        return count
    return int(np.sum(multihost_utils.process_allgather(np.int64(count))))


def preemption_sync_point(step: int) -> bool:
    """Whether the processes agreed to stop at `step` after a SIGTERM reached any of them (JAX's
    preemption sync point; every process must call it at every step, with the same steps)."""
    return multihost_utils.reached_preemption_sync_point(step)


def local_rows(sharding, size: int) -> np.ndarray:
    """The rows (of a global batch of `size` split along its first axis by `sharding`) that
    this process's devices hold, in order; a contiguous range."""
    indices = sharding.addressable_devices_indices_map((size,)).values()
    rows = sorted({r for index in indices for r in range(*index[0].indices(size))})
    rows = np.asarray(rows, np.int64)
    if len(rows) and not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        raise ValueError(f"this process's batch rows are not contiguous: {rows.tolist()}")
    return rows


def global_batch(local: dict, sharding) -> dict:
    """The global arrays of a batch whose process-local rows are `local` (one process: as is)."""
    if not multiprocess():
        return local
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}  # fmt: skip
