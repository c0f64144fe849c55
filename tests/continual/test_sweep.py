"""The schedule sweep: one command, one table and one figure over several schedules."""

import json

from configs import fif_synth as fif_synth_config
from fomo_jax.continual import sweep


def test_sweep_compares_schedules(tmp_path_factory):
    data_root = str(tmp_path_factory.mktemp("sweep_data"))
    config = fif_synth_config.get_config("smoke")
    config.data.root = data_root
    workdir = tmp_path_factory.mktemp("sweep")
    variants = ["warmup_cosine", "multistep", "rsqrt_meta:meta_mode=continued"]
    rows = sweep.run_sweep(config, str(workdir), variants)
    assert list(rows) == variants
    saved = json.loads((workdir / "comparison.json").read_text())
    assert saved == rows
    table = (workdir / "comparison.md").read_text()
    assert all(f"| {v} |" in table for v in variants)
    for name in ("trajectories.png", "schedules.png"):
        assert (workdir / name).stat().st_size > 5000
    # Each run used its own schedule (recorded in its config), and the runs differ.
    used = json.loads((workdir / "rsqrt_meta_meta_mode=continued" / "config.json").read_text())
    assert used["schedule"] == {"name": "rsqrt_meta", "meta_mode": "continued"}
    multistep = json.loads((workdir / "multistep" / "config.json").read_text())["schedule"]
    assert multistep["milestones"] == [round(f * 6 * 16) for f in sweep.MULTISTEP_FRACTIONS]
    assert rows["warmup_cosine"]["final"] != rows["rsqrt_meta:meta_mode=continued"]["final"]
