"""The `fomo-jax` command: help, packaged configs, work-directory and cache locations, and the
wiring of each subcommand to the function it runs (no training here: .ci/install_check.sh runs
the real commands after a non-editable install)."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import pytest
from absl import flags

import fomo_jax
from fomo_jax import cli, configs, runtime

PACKAGE = os.path.dirname(os.path.abspath(fomo_jax.__file__))
FLAGS_OF = {
    "run": ["--config", "--workdir"],
    "eval": ["--config", "--model", "--step", "--workdir"],
    "sweep": ["--config", "--workdir", "--schedules", "--methods"],
    "compare": ["--runs", "--out"],
    "merge": ["--base", "--models", "--out", "--method", "--kwargs", "--option"],
    "plot-schedule": ["--names", "--steps_per_task", "--num_tasks", "--out"],
}


def _python(*args, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


# --- help ---------------------------------------------------------------------------------


def test_top_help_lists_every_command():
    result = _python("-m", "fomo_jax.cli", "--help")
    assert result.returncode == 0, result.stderr
    for name, command in cli.COMMANDS.items():
        assert f"  {name} " in result.stdout and command.summary in result.stdout
    assert "packaged configs: clip_synth, fif, fif_synth" in result.stdout


@pytest.mark.parametrize("name", list(FLAGS_OF))
def test_command_help_lists_its_flags(name):
    result = _python("-m", "fomo_jax.cli", name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"usage: fomo-jax {name}" in result.stdout
    for flag in FLAGS_OF[name]:  # in the list of flags, not just the usage line
        assert re.search(rf"^ +{flag}[: ]", result.stdout, re.M), (name, flag)


def test_help_in_process(capsys):
    """main() itself (the console script's entry point), without a subprocess."""
    assert cli.main(["fomo-jax", "-h"]) == 0
    assert "usage: fomo-jax COMMAND" in capsys.readouterr().out
    for name in ("run", "eval", "merge"):
        assert cli.main(["fomo-jax", name, "--help"]) == 0
        out = capsys.readouterr().out
        assert all(f"--{flag.lstrip('-')}:" in out for flag in FLAGS_OF[name]), out


def test_bad_commands_and_configs_are_refused_by_name(capsys):
    assert cli.main(["fomo-jax"]) == 2
    assert cli.main(["fomo-jax", "trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert cli.main(["fomo-jax", "run", "--config=fif_synht:smoke"]) == 2
    err = capsys.readouterr().err
    assert "'fif_synht' is neither a config file nor a packaged config" in err
    assert "clip_synth, fif, fif_synth" in err


def test_run_py_and_the_sweep_module_are_the_same_commands():
    result = _python(os.path.join(runtime.REPO_ROOT, "run.py"), "--help", cwd="/")
    assert result.returncode == 0 and "usage: fomo-jax run" in result.stdout, result.stderr
    result = _python("-m", "fomo_jax.continual.sweep", "--help")
    assert result.returncode == 0 and "usage: fomo-jax sweep" in result.stdout, result.stderr
    assert "--schedules" in result.stdout


# --- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["fif_synth", "fif_synth:smoke", "fif", "clip_synth:smoke"])
def test_packaged_name_is_the_config_file(value):
    """--config=NAME[:ARG] gives the same config as --config=configs/NAME.py[:ARG] (the
    checkout's file), overrides included, and reads the file inside the package."""
    name, sep, arg = value.partition(":")
    path = os.path.join(runtime.REPO_ROOT, "configs", f"{name}.py") + sep + arg
    override = ["--config.seed=7"]
    by_name = cli.load_config([f"--config={value}", *override])
    by_path = cli.load_config(["--config", path, *override])
    assert by_name.seed == 7
    assert by_name.to_json() == by_path.to_json()
    resolved = configs.resolve(value)
    assert resolved == os.path.join(PACKAGE, "configs", f"{name}.py") + sep + arg


def test_default_config_is_fif_synth_and_args_reach_get_config():
    from fomo_jax.configs import fif_synth

    assert cli.load_config([]).to_json() == fif_synth.get_config().to_json()
    assert cli.load_config(["--config=fif_synth:smoke"]).num_tasks == 2
    with pytest.raises(flags.Error, match="unknown config argument 'bogus'"):
        cli.load_config(["--config=clip_synth:bogus"])


def test_a_key_shadowed_by_a_configdict_method_is_set_through_its_group():
    """`--config.mixture.update=1` would reach ConfigDict.update (a method) and fail with an
    unreadable type error: it is refused with the group form, and that form works."""
    with pytest.raises(ValueError, match=r"--config.mixture.update: a key named 'update'"):
        cli.load_config(["--config=fif_synth:smoke", "--config.mixture.update=1"])
    config = cli.load_config(
        [
            "--config=fif_synth:smoke",
            '--config.mixture={"pretraining": 0, "update": 1, "buffer": 0}',
        ]
    )
    assert dict(config.mixture) == {"pretraining": 0, "update": 1, "buffer": 0}
    assert cli.load_config(["--config.mixture.buffer=0.5"]).mixture.buffer == 0.5


def test_run_names():
    assert configs.run_name(configs.resolve("fif_synth")) == "fif_synth"
    assert configs.run_name(configs.resolve("fif_synth:smoke")) == "fif_synth_smoke"
    assert configs.run_name("my/exp.py:a b") == "exp_a_b"
    assert configs.short(configs.resolve("fif:x")) == "fif:x"
    assert configs.short("my/fif.py:x") == "my/fif.py:x"
    assert cli.eval_name("/x/runs/lora64/model", None) == "eval_lora64"
    assert cli.eval_name("ckpt/ViT-B-16.safetensors", None) == "eval_ViT-B-16"
    assert cli.eval_name("runs/lora64/", 300) == "eval_lora64_step300"


def test_parse_kwargs():
    parsed = cli.parse_kwargs("prune_fraction=0.2, weights=[0.5,0.5],name=ties,flag=true")
    assert parsed == {"prune_fraction": 0.2, "weights": [0.5, 0.5], "name": "ties", "flag": True}
    assert cli.parse_kwargs("") == {}
    with pytest.raises(ValueError, match="'0.2' is not key=value"):
        cli.parse_kwargs("0.2")


# --- wiring: what each command runs, with which arguments, where ---------------------------

# The job functions are replaced by recorders, so the commands run for real (absl parsing,
# defaults, app.run) but nothing trains; each call prints one JSON line.
WIRING = textwrap.dedent(
    """
    import json, sys, types
    from fomo_jax import cli

    def recorder(name):
        def record(*args, **kwargs):
            args = [a.get("num_tasks") if hasattr(a, "to_json") else a for a in args]  # config
            print("CALL " + json.dumps([name, args, kwargs]))
            return "merged-path"
        return record

    cli.run_job = recorder("run_job")
    for module, function in [("fomo_jax.continual.eval_job", "evaluate_model"),
                             ("fomo_jax.continual.compare", "compare_runs"),
                             ("fomo_jax.merge_job", "merge_checkpoints")]:
        sys.modules[module] = types.SimpleNamespace(**{function: recorder(function)})
    for line in sys.stdin:
        try:
            cli.main(["fomo-jax", *json.loads(line)])
        except SystemExit as stop:
            assert not stop.code, (line, stop.code)
    """
)


def test_commands_call_their_functions_with_defaults_under_the_cwd(tmp_path):
    commands = [
        ["run", "--config=fif_synth:smoke"],
        ["run"],
        ["run", "--config", "clip_synth", "--workdir=out"],
        ["run", "--config=fif_synth:smoke", "--config.num_tasks=3"],
        ["run", "--config.num_tasks", "5"],  # an override of the default config
        ["eval", "--config=fif_synth:smoke", "--model=runs/r1", "--step=5"],
        ["eval", "--model=W/model", "--workdir=W2"],
        ["compare", "runs/a", "runs/b", "--runs=runs/c"],
        ["merge", "--base=t0", "--models=a,b", "--method=ties", "--out=m",
         "--kwargs=prune_fraction=0.2,weights=[1,2]", "--option=seed=3"],
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", WIRING],
        input="\n".join(json.dumps(c) for c in commands),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    calls = [json.loads(line[5:]) for line in result.stdout.splitlines() if line[:5] == "CALL "]
    here = str(tmp_path)
    assert calls == [
        ["run_job", [2, f"{here}/runs/fif_synth_smoke"], {}],
        ["run_job", [4, f"{here}/runs/fif_synth"], {}],
        ["run_job", [None, "out"], {}],  # clip_synth has no num_tasks
        ["run_job", [3, f"{here}/runs/fif_synth_smoke"], {}],
        ["run_job", [5, f"{here}/runs/fif_synth"], {}],
        ["evaluate_model", [2, "runs/r1", f"{here}/runs/eval_r1_step5"],
         {"step": 5, "config_name": "fif_synth:smoke"}],
        ["evaluate_model", [4, "W/model", "W2"], {"step": None, "config_name": "fif_synth"}],
        ["compare_runs", [["runs/a", "runs/b", "runs/c"], f"{here}/runs/comparison"], {}],
        ["merge_checkpoints", ["t0", ["a", "b"], "m"],
         {"method": "ties", "prune_fraction": 0.2, "weights": [1, 2], "seed": 3}],
    ]  # fmt: skip
    assert not os.listdir(tmp_path)  # parsing alone writes nothing


# --- the compilation cache ------------------------------------------------------------------


def test_cache_dir_is_the_users_never_the_packages(monkeypatch, tmp_path):
    monkeypatch.delenv("FOMO_JAX_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.default_cache_dir() == str(tmp_path / "home/.cache/fomo_jax/jax_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")  # as the XDG spec says
    assert runtime.default_cache_dir() == str(tmp_path / "home/.cache/fomo_jax/jax_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.default_cache_dir() == str(tmp_path / "xdg/fomo_jax/jax_cache")
    monkeypatch.setenv("FOMO_JAX_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.default_cache_dir() == str(tmp_path / "mine")
    for variable in ("FOMO_JAX_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(variable)
        assert not runtime.default_cache_dir().startswith(PACKAGE + os.sep)
        assert not runtime.default_cache_dir().startswith(runtime.REPO_ROOT + os.sep)


def test_enable_compilation_cache_uses_the_default(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("FOMO_JAX_CACHE_DIR", str(tmp_path / "c"))
    try:
        assert runtime.enable_compilation_cache() == str(tmp_path / "c")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "c")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
