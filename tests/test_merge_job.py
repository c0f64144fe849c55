"""`merge_checkpoints`: checkpoints on disk merged by name and exported as a HF directory."""

import json
import shutil

import jax
import numpy as np
import pytest

from fomo_jax import merge_job, merging, models
from fomo_jax import params as params_lib


def _flat64(params):
    return {k: np.asarray(v, np.float64) for k, v in params_lib.flatten(params).items()}


@pytest.fixture(scope="module")
def checkpoints(tiny_model, tmp_path_factory):
    """θ0 (the tiny model, with a tokenizer file next to it) and two fine-tuned versions of
    it (θ0 plus different noise), as HF directories; with their float32 parameters."""
    root = tmp_path_factory.mktemp("merge")
    graphdef, theta0 = params_lib.split(tiny_model)
    rng = np.random.default_rng(0)
    trees = {"theta0": jax.device_get(theta0)}
    for name in ("a", "b"):
        trees[name] = jax.tree_util.tree_map(
            lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x))).astype(np.float32),
            trees["theta0"],
        )
    paths = {}
    for name, tree in trees.items():
        paths[name] = str(root / name)
        models.export_hf(params_lib.merge(graphdef, tree), paths[name])
    (root / "theta0" / "tokenizer.json").write_text('{"model": "a tokenizer"}')
    return paths, trees


def _merged_params(out):
    return params_lib.split(models.load_pretrained(out))[1]


def test_interpolation_is_the_weighted_average(checkpoints, tmp_path):
    paths, trees = checkpoints
    out = merge_job.merge_checkpoints(paths["theta0"], [paths["a"], paths["b"]],
                                      str(tmp_path / "avg"), method="interpolate",
                                      weights=[0.3, 0.7])  # fmt: skip
    assert out == str(tmp_path / "avg")
    got = _flat64(_merged_params(out))
    a, b = _flat64(trees["a"]), _flat64(trees["b"])
    assert got.keys() == a.keys()
    for path in a:  # against a float64 average of the float32 inputs
        np.testing.assert_allclose(got[path], 0.3 * a[path] + 0.7 * b[path], rtol=0, atol=1e-6,
                                   err_msg=path)  # fmt: skip
    record = json.loads((tmp_path / "avg" / "merge.json").read_text())
    assert record["method"] == "interpolation" and record["options"] == {"weights": [0.3, 0.7]}
    assert record["models"] == [paths["a"], paths["b"]] and record["base"] == paths["theta0"]
    # The base's tokenizer travels with the merged weights.
    assert (tmp_path / "avg" / "tokenizer.json").read_text() == '{"model": "a tokenizer"}'
    assert "tokenizer.json" in record["processor_files"]


@pytest.mark.parametrize(
    "method, options",
    [("ties", dict(prune_fraction=0.2)), ("random", dict(scale=0.8, seed=3))],
)
def test_merges_run_from_disk_as_in_memory(checkpoints, tmp_path, method, options):
    """The job hands θ0 as the anchor, the models in order, the options and (for a randomised
    merge) the seed's key. (TIES itself is checked against a reference in test_merging.py.)"""
    paths, trees = checkpoints
    out = merge_job.merge_checkpoints(paths["theta0"], [paths["a"], paths["b"]],
                                      str(tmp_path / method), method=method, **options)  # fmt: skip
    options = dict(options)
    key = jax.random.key(options.pop("seed")) if "seed" in options else None
    want = _flat64(merging.merge(method, trees["theta0"], [trees["a"], trees["b"]], key=key,
                                 **options))  # fmt: skip
    got = _flat64(_merged_params(out))
    theta0 = _flat64(trees["theta0"])
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=0, atol=1e-6, err_msg=path)
    assert any(not np.allclose(got[p], theta0[p]) for p in want)  # it moved from θ0


def test_unknown_method_and_options_list_the_known_ones(checkpoints, tmp_path):
    paths, _ = checkpoints
    args = (paths["theta0"], [paths["a"]], str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"unknown merge 'tie'; known: \[.*'ties'.*\]"):
        merge_job.merge_checkpoints(*args, method="tie")
    with pytest.raises(ValueError, match=r"takes no option \['prune'\]; it takes \[.*'scale'"):
        merge_job.merge_checkpoints(*args, method="ties", prune=0.2)
    assert "seed" in merge_job.merge_options("random") and "seed" not in merge_job.merge_options(
        "ties"
    )
    assert not (tmp_path / "out").exists()


def test_an_architecture_mismatch_is_refused(checkpoints, tmp_path):
    paths, _ = checkpoints
    other = tmp_path / "other_heads"  # same tensor shapes, another head count
    shutil.copytree(paths["a"], other)
    config = json.loads((other / "config.json").read_text())
    config["vision_config"]["num_attention_heads"] = 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{other} is not the architecture of the base.*heads"):
        merge_job.merge_checkpoints(paths["theta0"], [paths["a"], str(other)],
                                    str(tmp_path / "out"), method="task_arithmetic")  # fmt: skip
    assert not (tmp_path / "out").exists()
