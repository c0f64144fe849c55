"""Every job of the one loop resumes after kill -9 to exactly the uninterrupted result: making
θ0 inside a continual run, and the pretraining job (configs/clip_synth.py). A work directory
written before the loop's checkpoint format is refused by name."""

import glob
import json
import os
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

from fomo_jax import runtime
from fomo_jax.configs import fif_synth as fif_synth_config
from fomo_jax.continual import runner
from tests.continual import processes

RUN = os.path.join(runtime.REPO_ROOT, "run.py")
STEPS = 24  # long enough to kill in the middle (checkpoints every 2 steps in the smoke configs)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("fif_synth_smoke_resume"))


def _continual(data_root, cache_dir, workdir):
    return [sys.executable, RUN, "--config=configs/fif_synth.py:smoke",
            f"--config.data.root={data_root}", f"--config.theta0.steps={STEPS}",
            f"--config.theta0.cache_dir={cache_dir}", f"--workdir={workdir}"]  # fmt: skip


def _pretraining(data_root, workdir):
    return [sys.executable, RUN, "--config=configs/clip_synth.py:smoke",
            f"--config.data.root={data_root}", f"--config.steps={STEPS}",
            f"--workdir={workdir}"]  # fmt: skip


def _npz(pattern):
    (path,) = glob.glob(pattern)
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_kill_while_theta0_is_made_resumes_bitwise(data_root, tmp_path):
    processes.run(_continual(data_root, tmp_path / "cache_a", tmp_path / "reference"))
    command = _continual(data_root, tmp_path / "cache_b", tmp_path / "killed")
    processes.kill_when(command, str(tmp_path / "cache_b" / "theta0-*.work" / "checkpoints" / "8"))
    assert not glob.glob(str(tmp_path / "cache_b" / "theta0-*.npz"))  # killed while making it
    result = processes.run(command)
    assert "θ0: resuming from checkpoint" in result.stderr
    want, got = _npz(str(tmp_path / "cache_a" / "theta0-*.npz")), _npz(
        str(tmp_path / "cache_b" / "theta0-*.npz"))  # fmt: skip
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    for key in ("final", "trajectory", "per_dataset"):
        assert resumed[key] == reference[key], key
    # θ0's job leaves its log, not its checkpoints, next to the cache.
    (work,) = glob.glob(str(tmp_path / "cache_b" / "theta0-*.work"))
    assert os.path.exists(os.path.join(work, "metrics.jsonl"))
    assert not os.path.exists(os.path.join(work, "checkpoints"))


def test_kill_during_the_pretraining_job_resumes_bitwise(data_root, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    processes.run(_pretraining(data_root, reference))
    processes.kill_when(_pretraining(data_root, killed), str(killed / "checkpoints" / "8"))
    assert not (killed / "results.json").exists()
    result = processes.run(_pretraining(data_root, killed))
    assert "resuming from checkpoint" in result.stderr
    want = json.loads((reference / "results.json").read_text())
    got = json.loads((killed / "results.json").read_text())
    for key in ("first_loss", "final_loss", "zero_shot_before", "zero_shot_after"):
        assert got[key] == want[key], key
    for name in os.listdir(reference / "model"):
        assert (killed / "model" / name).read_bytes() == (reference / "model" / name).read_bytes()
    lines = lambda d: [{k: v for k, v in json.loads(x).items()  # noqa: E731
                        if k not in ("samples_per_second", "data_wait_fraction",
                                     "data_wait_idle_fraction")}
                       for x in (d / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert lines(killed) == lines(reference)
    assert (killed / "plots" / "training.png").exists()


def test_a_workdir_from_before_the_loop_format_is_refused(data_root, tmp_path):
    """Checkpoints with the old items (state + progress, indexed by a save counter)."""
    directory = tmp_path / "old" / "checkpoints"
    manager = ocp.CheckpointManager(str(directory))
    manager.save(3, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": np.zeros(2, np.float32)}),
        progress=ocp.args.JsonSave({"task": 1, "step": 0, "saves": 3}),
    ))  # fmt: skip
    manager.wait_until_finished()
    manager.close()
    config = fif_synth_config.get_config("smoke")
    config.data.root = data_root
    with pytest.raises(ValueError, match=r"checkpoints/3 was written by an older fomo_jax .* "
                       r"start it in a new work directory"):  # fmt: skip
        runner.run(config, str(tmp_path / "old"))
