"""Where a run's numbers go: JSON lines, TensorBoard events, and optionally Weights & Biases.

`metrics.jsonl` is the record of truth: on resume it is cut back to the lines the checkpoint
knew about, so a resumed run's file equals an uninterrupted one's. TensorBoard events are
append-only; after a resume the steps replayed since the checkpoint appear twice in the event
files (TensorBoard shows the later value).
"""

from __future__ import annotations

import json
import os


class RunLogger:
    def __init__(self, workdir: str, config, keep_lines: int):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.lines = keep_lines
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = f.readlines()[:keep_lines]
            with open(self.path, "w") as f:
                f.writelines(kept)
        self.file = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.wandb = None
        if config.wandb.enabled:
            try:
                import wandb
            except ImportError:
                raise ImportError(
                    "config.wandb.enabled is set but wandb is not installed: pip install wandb"
                ) from None
            self.wandb = wandb.init(
                project=config.wandb.project,
                name=config.wandb.name or os.path.basename(os.path.abspath(workdir)),
                config=json.loads(config.to_json_best_effort()),
                resume="allow",
                id=config.wandb.name or None,
            )

    def step(self, record: dict, global_step: int) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.lines += 1
        for key, value in record.items():
            if key not in ("task", "step"):
                self.tensorboard.add_scalar(f"train/{key}", value, global_step)
        if self.wandb:
            self.wandb.log({f"train/{k}": v for k, v in record.items()}, step=global_step)

    def evaluation(self, point: dict, index: int) -> None:
        """One evaluation point (index 0 = zero-shot, k + 1 = after task k)."""
        scalars = {f"eval/{k}": v for k, v in point.items() if isinstance(v, float)}
        for name, entry in point.get("per_dataset", {}).items():
            for metric, value in entry.items():
                scalars[f"eval_{point['evaluation']}/{name}/{metric}"] = value
        for key, value in scalars.items():
            self.tensorboard.add_scalar(key, value, index)
        self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(dict(scalars, evaluation_index=index))

    def close(self) -> None:
        self.file.close()
        self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()
