"""`python run.py` end to end (the smoke config), through absl flags as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fomo_jax import runtime

RUN = os.path.join(runtime.REPO_ROOT, "run.py")


def _run(*args, **kwargs):
    return subprocess.run(
        [sys.executable, RUN, *args], capture_output=True, text=True, timeout=600, **kwargs
    )


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    result = _run(
        "--config=configs/clip_synth.py:smoke",
        f"--workdir={workdir}",
        f"--config.data.root={workdir / 'data'}",
        cwd=runtime.REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, result


def test_outputs(smoke_run):
    workdir, result = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    assert results["steps"] == 6 and results["samples"] == 6 * 16
    assert np.isfinite(results["final_loss"])
    assert results["pool_manifest"]["total"] == 400  # the smoke pool, logged with the run
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert all(r["samples_per_second"] > 0 for r in records)
    assert (workdir / "plots" / "training.png").stat().st_size > 1000
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["name"] == "tiny"
    assert "ETA" in result.stderr  # progress lines


def test_exported_model_reproduces_the_reported_scores(smoke_run):
    """The HF export of the trained weights, reloaded, scores what the run reported: every
    decision the same but those within EPS of a tie, which another computation of the scores
    (another model object and process; another CPU for the float64 reference) may flip."""
    from fomo_jax import evaluate, models
    from fomo_jax.data import fif_synth
    from fomo_jax.tokenizer import ByteTokenizer
    from tests.evaluation_reference import assert_scores_agree, one_shot_reference

    workdir, _ = smoke_run
    results = json.loads((workdir / "results.json").read_text())
    model = models.load_pretrained(workdir / "model")
    cfg = model.config
    assert cfg.text.context_length == 48  # the config's override reached the model
    root = str(workdir / "data")
    datasets = fif_synth.load_datasets(root)
    tokenizer = ByteTokenizer(cfg.text.context_length)
    scores = evaluate.evaluate_datasets(model, root, datasets, tokenizer, cfg.vision.image_size)
    assert set(scores) == set(datasets) and len(scores) == 9
    reference, slack = one_shot_reference(model, root, datasets, tokenizer, cfg.vision.image_size)
    assert all(v <= 5.0 for v in slack.values()), slack  # few near ties: a real comparison
    assert_scores_agree(results["zero_shot_after"]["per_dataset"], scores, slack, "reported")
    assert_scores_agree(scores, reference, slack, "float64 reference")


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config.not_a_key=1", "not_a_key"),
        ("--config.steps=abc", "steps"),
        ("--config=configs/clip_synth.py:bogus", "bogus"),
    ],
)
def test_config_errors_stop_before_compute(tmp_path, flag, message):
    result = _run(flag, f"--workdir={tmp_path}", cwd=runtime.REPO_ROOT)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_divergence_stops_with_the_step(tmp_path):
    """A diverging run stops and names the first step whose loss is not finite."""
    result = _run(
        "--config=configs/clip_synth.py:smoke",
        "--config.optimizer.lr=1e30",
        f"--workdir={tmp_path}",
        cwd=runtime.REPO_ROOT,
    )
    assert result.returncode != 0
    assert "non-finite loss or gradient norm at step" in result.stderr
    assert (tmp_path / "diverged" / "1").is_dir()  # the state is kept aside for inspection
    assert not (tmp_path / "results.json").exists()
