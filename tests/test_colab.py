"""The notebooks of colab/, checked without running them: valid notebooks stored without
outputs, an install cell that finds the checkout (and clones only outside one), the commands
and flags they run, and their link from the README.

CI executes every notebook for real, install cell included, with nbclient in a throwaway venv
(.ci/install_check.sh): running them takes minutes and installs packages, which a test of the
suite must not do to the test environment.
"""

import ast
import json
import os
import re

import pytest

from fomo_jax import cli, runtime

COLAB = os.path.join(runtime.REPO_ROOT, "colab")
NOTEBOOKS = ["quickstart.ipynb", "real_data.ipynb"]


def _read(name):
    with open(os.path.join(COLAB, name)) as f:
        return json.load(f)


def _code(notebook) -> list[str]:
    return ["".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code"]


def _text(notebook) -> str:
    return "\n".join("".join(c["source"]) for c in notebook["cells"])


def test_every_notebook_is_checked_and_executed_in_ci():
    assert sorted(n for n in os.listdir(COLAB) if n.endswith(".ipynb")) == sorted(NOTEBOOKS)
    with open(os.path.join(runtime.REPO_ROOT, ".ci", "install_check.sh")) as f:
        script = f.read()
    assert "for notebook in colab/*.ipynb" in script and "NotebookClient" in script


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_and_stored_clean(name):
    notebook = _read(name)
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in notebook["cells"]:
        assert cell["cell_type"] in ("markdown", "code") and isinstance(cell["source"], (str, list))
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, cell["id"]
            if not "".join(cell["source"]).startswith("%%"):
                ast.parse("".join(cell["source"]))  # plain Python cells parse


def _install_cell(name) -> str:
    first = _code(_read(name))[0]
    assert "pip" in first and '"install"' in first
    return first


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_installs_the_checkout_and_clones_only_outside_one(name, tmp_path):
    source = _install_cell(name)
    assert '"install", "-q", "."' in source  # `pip install .` from the checkout
    assert "/content" not in source  # never a fixed Colab folder
    assert source.index("find_checkout(os.getcwd())") < source.index('"git", "clone"')
    # The checkout finder itself: from the repository root or a folder inside it, the root;
    # outside any checkout, None (then the cell clones).
    tree = ast.parse(source)
    finder = next(n for n in tree.body if isinstance(n, ast.FunctionDef))
    namespace = {"os": os}
    exec(compile(ast.Module([finder], []), name, "exec"), namespace)
    find_checkout = namespace["find_checkout"]
    assert find_checkout(runtime.REPO_ROOT) == runtime.REPO_ROOT
    assert find_checkout(COLAB) == runtime.REPO_ROOT
    assert find_checkout(str(tmp_path)) is None


def _has_field(config, field: str) -> bool:
    """Whether `--config.FIELD=` names a field of `config` (a typo would stop the run)."""
    node = config
    for part in field.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def test_quickstart_runs_the_continual_benchmark_and_compares():
    notebook = _read("quickstart.ipynb")
    text = _text(notebook)
    for needed in [
        "fomo-jax run $SIZE --workdir=runs/quickstart/finetune",
        '"--config=fif_synth:smoke"',
        "--config.schedule.name=rsqrt",  # two schedules, one flag apart
        "--config.method=ema_merge",  # a merge method against fine-tuning
        "fomo-jax compare runs/quickstart/finetune runs/quickstart/rsqrt runs/quickstart/ema_merge",
        "plots/ka_zs_trajectory.png",
        "comparison/trajectories.png",
        "knowledge_accumulation",
        "zero_shot_retention",
        "models.load_pretrained(model_dir)",
        'model_dir = "runs/quickstart/finetune/model"',
    ]:
        assert needed in text, needed
    config = cli.load_config(["--config=fif_synth:smoke"])
    for field in re.findall(r"--config\.([\w.]+)=", "\n".join(_code(notebook))):
        assert _has_field(config, field), field


def test_real_data_notebook_runs_the_fif_config_with_a_checkpoint():
    notebook = _read("real_data.ipynb")
    text = _text(notebook)
    for needed in [
        'DATA_ROOT = ""',
        "write_standin(DATA_ROOT)",
        "fomo-jax prepare --data_root=$DATA_ROOT",
        "fomo-jax eval --config=fif $COMMON --model=$CHECKPOINT",
        "fomo-jax run --config=fif $COMMON --config.theta0.checkpoint=$CHECKPOINT $SHORT",
        "export_openclip",
    ]:
        assert needed in text, needed
    config = cli.load_config(["--config=fif"])
    for field in re.findall(r"--config\.([\w.]+)=", "\n".join(_code(notebook))):
        assert _has_field(config, field), field


def test_readme_links_the_notebooks():
    with open(os.path.join(runtime.REPO_ROOT, "README.md")) as f:
        readme = f.read()
    head = readme[: readme.index("## What is here")]
    assert "colab.research.google.com" in head and "colab/quickstart.ipynb" in head
    assert "colab/real_data.ipynb" in readme
