"""The model-family seam: a family that is not CLIP (tests/continual/mlp_family.py) runs
through the runner, θ0 making included, with methods that use only the family's loss, groups
and paths; a method that needs CLIP is refused before any compute, naming both."""

import glob
import json

import numpy as np
import pytest

from fomo_jax import families
from fomo_jax.configs import fif_synth as fif_synth_config
from fomo_jax.continual import runner
from tests.continual import mlp_family

FAMILY = "tests.continual.mlp_family:FAMILY"
KEYS = ("knowledge_accumulation", "zero_shot_retention", "geometric_mean")


@pytest.fixture(scope="module")
def theta0_dir(tmp_path_factory):
    """Where the MLP family's θ0 is cached (not in the shared data root, whose θ0 is CLIP's)."""
    return str(tmp_path_factory.mktemp("mlp_theta0"))


def _config(data_root, method, theta0_dir):
    config = fif_synth_config.get_config("smoke")
    config.data.root = data_root
    config.theta0.cache_dir = theta0_dir
    config.family = FAMILY
    config.method = method
    config.methods.ewc.fisher_batches = 2
    return config


@pytest.fixture(scope="module")
def runs(smoke_data_root, theta0_dir, tmp_path_factory):
    out = {}
    for method in ("finetune", "lora", "ema_merge", "ewc"):
        workdir = tmp_path_factory.mktemp(f"mlp_{method}")
        results = runner.run(_config(smoke_data_root, method, theta0_dir), str(workdir))
        out[method] = (workdir, results)
    return out


@pytest.mark.parametrize("method", ["finetune", "lora", "ema_merge", "ewc"])
def test_a_non_clip_family_runs_through_the_runner(runs, method):
    workdir, results = runs[method]
    assert set(results["final"]) == set(KEYS)
    assert len(results["trajectory"]) == 3  # zero-shot and after each of the 2 tasks
    for point in [results["final"], *results["trajectory"]]:
        assert all(0 <= point[k] <= 100 for k in KEYS)
    assert json.loads((workdir / "results.json").read_text())["final"] == results["final"]
    exported = np.load(workdir / "model" / "params.npz")  # the family's own export
    assert "pixels/hidden/kernel" in exported.files
    assert not any("lora" in k for k in exported.files)  # adapters folded in


def _mlp_theta0(theta0_dir) -> dict:
    """The MLP family's θ0, made by the first run and cached."""
    (path,) = glob.glob(f"{theta0_dir}/theta0-*.npz")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_the_family_methods_do_what_they_say(runs, theta0_dir):
    def exported(method):
        with np.load(runs[method][0] / "model" / "params.npz") as f:
            return {k: f[k] for k in f.files}

    theta0 = _mlp_theta0(theta0_dir)
    finetune, lora = exported("finetune"), exported("lora")
    # Fine-tuning moves every linear; LoRA's default targets (the family's "reference" set:
    # the two output linears) move only those, and the embedding table stays θ0's.
    assert not np.array_equal(finetune["pixels/hidden/kernel"], theta0["pixels/hidden/kernel"])
    np.testing.assert_array_equal(lora["pixels/hidden/kernel"], theta0["pixels/hidden/kernel"])
    np.testing.assert_array_equal(lora["words/embed/embedding"], theta0["words/embed/embedding"])
    assert not np.array_equal(lora["pixels/out/kernel"], theta0["pixels/out/kernel"])
    # EMA-merge evaluates a merge of the endpoints with θ0: not fine-tuning's weights.
    assert runs["ema_merge"][1]["final"] != runs["finetune"][1]["final"]


def test_a_clip_only_method_is_refused_naming_both(smoke_data_root, theta0_dir, tmp_path):
    for method in ("zscl", "er"):
        with pytest.raises(ValueError, match=rf"method '{method}' works with the model families "
                           r"\['clip'\], not with config.family='mlp'"):  # fmt: skip
            runner.run(_config(smoke_data_root, method, theta0_dir), str(tmp_path / method))
        assert not (tmp_path / method).exists()  # stopped before anything was written


def test_unknown_family_is_an_error_naming_the_known_ones(smoke_data_root, theta0_dir, tmp_path):
    config = _config(smoke_data_root, "finetune", theta0_dir)
    config.family = "clap"
    with pytest.raises(ValueError, match=r"config.family='clap' is not a model family; known: "
                       r"\['clip', 'vlm'\]"):  # fmt: skip
        runner.run(config, str(tmp_path / "run"))
    assert families.get("clip").name == "clip"


def test_parameter_groups_and_lr_multipliers(smoke_data_root, theta0_dir, tmp_path):
    """A group's learning-rate multiplier of 0 keeps it at θ0; the other group trains."""
    config = _config(smoke_data_root, "finetune", theta0_dir)
    config.optimizer.lr_multipliers = {"words": 0.0}
    config.optimizer.weight_decay = 0.0  # p - lr·0·u: exactly θ0 with no decay either
    workdir = tmp_path / "run"
    runner.run(config, str(workdir))
    with np.load(workdir / "model" / "params.npz") as f:
        got = {k: f[k] for k in f.files}
    theta0 = _mlp_theta0(theta0_dir)
    family = mlp_family.FAMILY
    for key in got:
        if family.group_of(key) == "words":
            np.testing.assert_array_equal(got[key], theta0[key], err_msg=key)
        else:
            assert not np.array_equal(got[key], theta0[key]), key


def test_trainable_rules_label_full_frozen_and_lora(smoke_data_root, theta0_dir, tmp_path):
    """One rule list: an adapter on one linear, a whole group fully trained, the rest frozen
    (the shape of the VLM's "vision frozen, connector full, LM LoRA")."""
    config = _config(smoke_data_root, "lora", theta0_dir)
    config.trainable = ((r"^pixels/out/kernel$", "lora"), (r"^words/", "full"))
    workdir = tmp_path / "run"
    runner.run(config, str(workdir))
    with np.load(workdir / "model" / "params.npz") as f:
        got = {k: f[k] for k in f.files}
    theta0 = _mlp_theta0(theta0_dir)
    moved = {k for k in got if not np.array_equal(got[k], theta0[k])}
    # The adapter folds into pixels/out/kernel only (its bias is frozen, not adapted).
    assert moved == {"pixels/out/kernel", "words/embed/embedding", "words/out/kernel",
                     "words/out/bias"}  # fmt: skip
    with pytest.raises(ValueError, match="labels parameters 'lora', which method 'finetune'"):
        config = _config(smoke_data_root, "finetune", theta0_dir)
        config.trainable = ((r"^pixels/out/kernel$", "lora"),)
        runner.run(config, str(tmp_path / "bad"))
