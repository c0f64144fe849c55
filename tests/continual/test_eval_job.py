"""`evaluate_model`: any checkpoint scored as a run scores its final model."""

import json

import pytest

from fomo_jax import models
from fomo_jax.configs import fif_synth as fif_synth_config
from fomo_jax.continual import eval_job, runner
from fomo_jax.families import clip

KEYS = clip.METRIC_KEYS
# A reload is another computation (a safetensors round trip, another compiled graph): equal
# up to float noise, not bit for bit, hence the 0.05 points.
TOLERANCE = 0.05


def _config(data_root, **overrides):
    config = fif_synth_config.get_config("smoke")
    config.data.root = data_root
    for key, value in overrides.items():
        config[key] = value
    return config


def _snapshot(directory):
    return {p: p.stat().st_mtime_ns for p in directory.rglob("*")}


def _assert_reproduces(record, results):
    for key in KEYS:
        assert record[key] == pytest.approx(results["final"][key], abs=TOLERANCE), key
    want = results["per_dataset"]["final_full"]
    assert record["per_dataset"].keys() == want.keys()
    for name, scores in want.items():
        assert record["per_dataset"][name] == pytest.approx(scores, abs=TOLERANCE), name


# One test per run (not a module fixture shared by several tests), so that pytest-xdist runs
# each smoke run once rather than once per worker.
@pytest.mark.parametrize("method", ["finetune", "zs_merge", "zscl"])
def test_model_and_last_checkpoint_reproduce_the_final_evaluation(
    method, smoke_data_root, tmp_path, capsys
):
    """A finished smoke run's model/, the run directory itself, and its last checkpoint
    evaluate to its results.json `final`. zs_merge reports a merge, not its trained weights,
    so its checkpoint must be evaluated through the method; zscl's state holds an array sized
    by the run's data (its reference texts), which a state built without data cannot know."""
    config = _config(smoke_data_root, method=method)
    workdir = tmp_path / "run"
    results = runner.run(config, str(workdir))
    capsys.readouterr()

    record = eval_job.evaluate_model(config, str(workdir / "model"), str(tmp_path / "eval"),
                                     config_name="fif_synth:smoke")  # fmt: skip
    _assert_reproduces(record, results)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == record
    assert record["model"] == str(workdir / "model") and record["step"] is None
    assert record["config"] == "fif_synth:smoke" and record["evaluation"] == "full"
    table = capsys.readouterr().out
    assert "synth_pairs" in table and f"{record['knowledge_accumulation']:8.2f}" in table
    assert eval_job.load_model(str(workdir)).path == str(workdir / "model")  # the run: model/

    last = eval_job.checkpoint_steps(str(workdir))[-1]
    before = _snapshot(workdir)
    record = eval_job.evaluate_model(config, str(workdir), str(tmp_path / "eval_step"), step=last)
    _assert_reproduces(record, results)
    assert record["step"] == last
    assert record["checkpoint"] == dict(task=config.num_tasks, step_in_task=0, method=method)
    assert _snapshot(workdir) == before  # reading a run's checkpoint writes nothing there


def _fake_run(directory, steps=(5, 6)):
    """What `evaluate_model` checks before loading anything: config.json and checkpoints/."""
    for step in steps:
        (directory / "checkpoints" / str(step)).mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    return directory


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    models.export_hf(tiny_model, tmp_path / "tiny")
    return tmp_path / "tiny"


def test_bad_model_paths_are_named(model_dir, tmp_path):
    config = _config(str(tmp_path / "data"))
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match=f"{missing}.*HF CLIP directory"):
        eval_job.evaluate_model(config, str(missing), str(tmp_path / "out"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}.*no config.json"):
        eval_job.evaluate_model(config, str(tmp_path / "empty"), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="step=1 needs a run directory"):
        eval_job.evaluate_model(config, str(model_dir), str(tmp_path / "out"), step=1)
    run = _fake_run(tmp_path / "run")
    with pytest.raises(ValueError, match=r"no checkpoint 999; it has \[5, 6\]"):
        eval_job.evaluate_model(config, str(run), str(tmp_path / "out"), step=999)
    with pytest.raises(FileNotFoundError, match=r"no exported model/.*checkpoints \[5, 6\]"):
        eval_job.evaluate_model(config, str(run), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


class _WideTokenizer:
    vocab_size = 1000


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(eval_job, "load_tokenizer", lambda spec, context_length: _WideTokenizer())
    config = _config(str(tmp_path / "data"), tokenizer="bpe/tokenizer.json")
    with pytest.raises(ValueError, match="'bpe/tokenizer.json' has 1000 ids but .* embeds 259"):
        eval_job.evaluate_model(config, str(model_dir), str(tmp_path / "out"))
