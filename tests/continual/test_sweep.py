"""The schedule sweep: one command, one table and one figure over several schedules."""

import json

import pytest

from fomo_jax.configs import fif_synth as fif_synth_config
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
    assert all(f"| {v} | 6 |" in table for v in variants)  # variant, steps per task
    for name in ("trajectories.png", "schedules.png"):
        assert (workdir / name).stat().st_size > 5000
    # Each run used its own schedule (recorded in its config), and the runs differ.
    used = json.loads((workdir / "rsqrt_meta_meta_mode=continued" / "config.json").read_text())
    assert used["schedule"] == {"name": "rsqrt_meta", "meta_mode": "continued"}
    multistep = json.loads((workdir / "multistep" / "config.json").read_text())["schedule"]
    assert multistep["milestones"] == [round(f * 6 * 16) for f in sweep.MULTISTEP_FRACTIONS]
    # The runs differ: other rates at the logged steps, other trained weights. (Not their
    # scores: accuracies of barely trained tiny models may coincide, or not, on another CPU.)
    runs = [workdir / "warmup_cosine", workdir / "rsqrt_meta_meta_mode=continued"]
    logs = [(run / "metrics.jsonl").read_text().splitlines() for run in runs]
    rates = [[json.loads(line)["learning_rate"] for line in log] for log in logs]
    assert len(rates[0]) == 4 and rates[0] != rates[1]
    weights = [(run / "model" / "model.safetensors").read_bytes() for run in runs]
    assert weights[0] != weights[1]


def test_method_variants_set_the_method_and_its_hyperparameters():
    config = fif_synth_config.get_config("smoke")
    sweep.method_config("zs_merge:merge.name=ties;merge.prune_fraction=0.5", config)
    assert config.method == "zs_merge"
    assert config.methods.zs_merge.merge.name == "ties"
    assert config.methods.zs_merge.merge.prune_fraction == 0.5
    sweep.method_config("lora:rank=64", config)
    assert (config.method, config.methods.lora.rank) == ("lora", 64)
    assert set(sweep.all_methods()) >= {"finetune", "lora", "zs_merge", "offline_merge"}
    with pytest.raises(ValueError, match="unknown method 'lorra'"):
        sweep.method_config("lorra", config)
