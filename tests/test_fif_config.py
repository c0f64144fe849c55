"""The real benchmark's config: θ0 from a checkpoint unless making it is asked for, and its
unset fields overridable from the command line; the other configs keep their keys."""

import json

import pytest

from fomo_jax import cli
from fomo_jax.configs import clip_synth, fif, fif_synth
from fomo_jax.continual import runner


def test_fif_without_a_checkpoint_stops_naming_the_key():
    config = fif.get_config()
    assert config.theta0.checkpoint is None and config.theta0.make is False
    with pytest.raises(ValueError) as error:
        runner.check_theta0(config)
    message = str(error.value)
    assert message.startswith("config.theta0.checkpoint is required")
    assert "--config.theta0.make=True" in message  # how to opt in


def test_a_fif_run_without_a_checkpoint_stops_before_anything(tmp_path):
    config = fif.get_config()
    config.data.root, config.tokenizer = str(tmp_path), "bytes"
    with pytest.raises(ValueError, match=r"^config.theta0.checkpoint is required"):
        runner.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_or_asking_for_theta0_making_passes_not_both():
    config = fif.get_config()
    config.theta0.checkpoint = "/ckpt/open_clip_vit_b16.safetensors"
    runner.check_theta0(config)
    config.theta0.make = True
    with pytest.raises(ValueError, match="not both"):
        runner.check_theta0(config)
    config.theta0.checkpoint = None
    runner.check_theta0(config)


def test_the_command_line_reaches_the_new_and_the_unset_fields():
    config = cli.load_config(
        [
            "--config=fif",
            "--config.theta0.make=True",
            "--config.steps_per_task=20",
            "--config.model.context_length=32",
        ]
    )
    assert config.theta0.make is True and config.steps_per_task == 20
    assert config.model.context_length == 32
    runner.check_theta0(config)
    with pytest.raises(ValueError, match="config.theta0.checkpoint is required"):
        runner.check_theta0(cli.load_config(["--config=fif"]))


@pytest.mark.parametrize(
    "config",
    [fif_synth.get_config(), fif_synth.get_config("smoke"), clip_synth.get_config()],
    ids=["fif_synth", "fif_synth:smoke", "clip_synth"],
)
def test_other_configs_make_theta0_as_before(config):
    if "theta0" in config:  # clip_synth has none
        assert "make" not in config.theta0  # their config.json is unchanged
        assert config.theta0.checkpoint is None
    runner.check_theta0(config)  # no key: θ0 is made when no checkpoint is given


def test_fif_config_json_adds_only_the_new_key():
    recorded = json.loads(fif.get_config().to_json_best_effort())
    synth = json.loads(fif_synth.get_config().to_json_best_effort())
    assert set(recorded["theta0"]) - set(synth["theta0"]) == {"make"}
    assert recorded["steps_per_task"] is None and recorded["model"]["context_length"] is None
    # Decoding every image into memory suits fif_synth's 40-px images, not the real data.
    assert synth["data"]["decode_once"] and not recorded["data"]["decode_once"]


def test_the_study_shares_the_default_theta0_and_total_compute():
    default, study = fif_synth.get_config(), fif_synth.get_config("study")
    assert study.num_tasks == 20
    assert study.theta0.to_dict() == default.theta0.to_dict()  # the same cached θ0
    assert study.data.to_dict() == default.data.to_dict()
    assert study.model.to_dict() == default.model.to_dict()
    assert (study.num_tasks * study.steps_per_task * study.batch_size
            == default.num_tasks * default.steps_per_task * default.batch_size)  # fmt: skip
