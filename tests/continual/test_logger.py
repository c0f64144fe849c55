"""The run logger's Weights & Biases side, against a fake `wandb` module (wandb is not a
dependency): one W&B run per work directory across resumes, and evaluation points on their own
axis."""

import fnmatch
import sys
import types

import ml_collections
import pytest

from fomo_jax.continual import logger as logger_lib


class FakeWandb:
    """Records what the logger asks of W&B: init kwargs, define_metric and log calls."""

    def __init__(self):
        self.inits, self.runs = [], []

    def module(self) -> types.ModuleType:
        module = types.ModuleType("wandb")
        module.init = self.init
        return module

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run = FakeRun()
        self.runs.append(run)
        return run


class FakeRun:
    def __init__(self):
        self.metrics, self.logs, self.finished = {}, [], False

    def define_metric(self, name, step_metric=None):
        self.metrics[name] = step_metric

    def log(self, data, step=None, commit=None):
        assert step is None, "a custom axis, never W&B's internal step (it must only grow)"
        self.logs.append(dict(data))

    def finish(self):
        self.finished = True

    def axis_of(self, key):
        """The x axis W&B plots `key` against: the step metric of the first matching
        define_metric (exact names first, then globs), else W&B's internal step."""
        if key in self.metrics:
            return self.metrics[key] or key
        for pattern, axis in self.metrics.items():
            if "*" in pattern and fnmatch.fnmatchcase(key, pattern):
                return axis
        return "_step"


@pytest.fixture
def fake_wandb(monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake.module())
    return fake


def _config(name=None):
    config = ml_collections.ConfigDict({"wandb": {"enabled": True, "project": "proj"}, "seed": 0})
    config.wandb.name = ml_collections.config_dict.placeholder(str)
    config.wandb.name = name
    return config


def _log_a_task(log, first_step, evaluation_index):
    for step in range(first_step, 4):
        log.step({"task": 0, "step": step, "loss": 1.0 / step}, global_step=step)
    log.evaluation(
        {
            "knowledge_accumulation": 10.0,
            "zero_shot_retention": 20.0,
            "evaluation": "subset",
            "per_dataset": {"synth_glyphs": {"accuracy": 30.0}},
        },
        evaluation_index,
    )
    log.close()


def test_a_resumed_run_continues_the_same_wandb_run(fake_wandb, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = _config()
    _log_a_task(logger_lib.RunLogger(str(workdir), config, 0, resume_at=None), 1, 0)
    run_id = (workdir / "wandb_id").read_text().strip()
    assert len(run_id) == 8 and run_id.isalnum()
    # Killed, then resumed from a checkpoint at step 2: the same W&B run, resumed.
    _log_a_task(logger_lib.RunLogger(str(workdir), config, 2, resume_at=(3, 1)), 3, 1)
    first, resumed = fake_wandb.inits
    assert first["id"] == resumed["id"] == run_id
    assert first["resume"] == resumed["resume"] == "allow"
    assert first["name"] == "run" and first["project"] == "proj"
    assert first["dir"] == str(workdir)  # W&B's files stay in the work directory
    assert first["config"]["seed"] == 0
    assert all(run.finished for run in fake_wandb.runs)
    # Another work directory is another W&B run.
    (tmp_path / "other").mkdir()
    _log_a_task(logger_lib.RunLogger(str(tmp_path / "other"), _config(), 0, None), 1, 0)
    assert fake_wandb.inits[2]["id"] != run_id


def test_a_given_name_is_the_display_name_not_the_id(fake_wandb, tmp_path):
    _log_a_task(logger_lib.RunLogger(str(tmp_path), _config("lora64"), 0, None), 1, 0)
    (init,) = fake_wandb.inits
    assert init["name"] == "lora64" and init["id"] == (tmp_path / "wandb_id").read_text().strip()


def test_evaluation_points_are_on_their_own_axis(fake_wandb, tmp_path):
    _log_a_task(logger_lib.RunLogger(str(tmp_path), _config(), 0, resume_at=None), 1, 0)
    (run,) = fake_wandb.runs
    train = [entry for entry in run.logs if "global_step" in entry]
    evaluations = [entry for entry in run.logs if "evaluation_index" in entry]
    assert len(train) + len(evaluations) == len(run.logs)
    assert [entry["global_step"] for entry in train] == [1, 2, 3]
    assert [entry["train/loss"] for entry in train] == [1.0, 0.5, 1 / 3]
    (point,) = evaluations
    assert point["evaluation_index"] == 0
    assert point["eval/knowledge_accumulation"] == 10.0
    assert point["eval_subset/synth_glyphs/accuracy"] == 30.0
    for entry in train:
        for key in entry.keys() - {"global_step"}:
            assert run.axis_of(key) == "global_step", key
    for key in point.keys() - {"evaluation_index"}:
        assert run.axis_of(key) == "evaluation_index", key
    assert run.axis_of("evaluation_index") == "evaluation_index"  # an axis of its own


def test_a_damaged_wandb_id_file_is_named(fake_wandb, tmp_path):
    (tmp_path / "wandb_id").write_text("a/b\n")
    with pytest.raises(ValueError, match=r"wandb_id holds 'a/b', not a W&B run id"):
        logger_lib.RunLogger(str(tmp_path), _config(), 0, resume_at=None)
