"""Atomic orbax checkpoints of a training job: train state, loop position and the run's record.

One checkpoint holds the `TrainState` (params, optimizer state, method state, step counter, step
key), the loop's position (`{"task", "step"}`: the input pipeline is a pure function of it) and
the run's record (JSON: evaluations so far, batch sizes, metric lines written, ...), indexed by
the global step (task x steps per task + step). Checkpoints at multiples of `keep_every` (the
zero-shot start and every task's end) are all kept; `max_to_keep` limits the others (the
in-task ones). orbax writes to a temporary directory and renames it when complete, so a kill
at any moment leaves the previous checkpoint intact (and the temporary directory, which the
next run's manager removes).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policy

FORMAT = "state + position + record, indexed by the global step"


def check_format(directory: str) -> None:
    """Refuse, by name, a checkpoint directory written in the format before this one (items
    `state` + `progress`, indexed by a save counter): it cannot be resumed by this code."""
    if not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        items = os.path.join(directory, name)
        if name.isdigit() and os.path.isdir(os.path.join(items, "progress")):
            raise ValueError(
                f"{items} was written by an older fomo_jax (checkpoint items state + progress, "
                f"indexed by a save counter) and cannot be resumed by this one ({FORMAT}); "
                "finish the run with fomo_jax at commit c9cca82 or earlier, or start it in a "
                "new work directory"
            )


class Checkpoints:
    def __init__(self, directory: str, *, max_to_keep: int | None = 2,
                 keep_every: int | None = None):  # fmt: skip
        self.directory = os.path.abspath(directory)
        if max_to_keep is None:
            preserve = policy.PreserveAll()
        else:
            preserve = [policy.LatestN(max_to_keep)]
            if keep_every:
                preserve.append(policy.EveryNSteps(keep_every))
            preserve = policy.AnyPreservationPolicy(preserve)
        # cleanup_tmp_directories: a save killed before its rename leaves a temporary
        # directory behind; it is removed when the run restarts.
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=preserve, create=True, cleanup_tmp_directories=True
            ),
        )

    def latest(self) -> int | None:
        """The index of the newest checkpoint (an older format is refused: `check_format`)."""
        check_format(self.directory)
        return self.manager.latest_step()

    def save(self, index: int, state, position: dict, record: dict) -> None:
        """Save under `index`, the global step count."""
        self.manager.save(
            index,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                position=ocp.args.JsonSave(position),
                record=ocp.args.JsonSave(record),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, index: int, abstract_state, shardings):
        """(state placed with `shardings`, position, record) of checkpoint `index`."""
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_state,
            shardings,
        )
        restored = self.manager.restore(
            index,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                position=ocp.args.JsonRestore(),
                record=ocp.args.JsonRestore(),
            ),
        )
        return restored.state, restored.position, restored.record

    def close(self) -> None:
        self.manager.close()
