"""Atomic orbax checkpoints of a continual run: train state, method state and run progress.

One checkpoint holds the `ContinualState` (params, optimizer state, method state, step counter)
and a JSON record of everything else a resumed run needs: the task and step to continue from
(the input pipeline is a pure function of them), the evaluation trajectory so far, and how many
metric lines were written. orbax writes to a temporary directory and renames it when complete,
so a kill at any moment leaves the previous checkpoint intact (and the temporary directory,
which the next run's manager removes).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, *, max_to_keep: int | None = 2):
        # cleanup_tmp_directories: a save killed before its rename leaves a temporary
        # directory behind; it is removed when the run restarts.
        self.manager = ocp.CheckpointManager(
            os.path.abspath(directory),
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True
            ),
        )

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def save(self, index: int, state, progress: dict) -> None:
        """Save under a monotonically increasing index (the global step count)."""
        self.manager.save(
            index,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, index: int, abstract_state, shardings):
        """(state placed with `shardings`, progress dict) of checkpoint `index`."""
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            shardings,
        )
        restored = self.manager.restore(
            index,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), progress=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.progress

    def close(self) -> None:
        self.manager.close()
