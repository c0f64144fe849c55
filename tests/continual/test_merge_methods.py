"""Merge-based continual methods (spec §8.1-8.4) against float64 numpy recurrences.

The hook-level tests stand in for training with random task endpoints, so every task's
training start and evaluated weights can be checked over a longer stream; the runner tests run
each method in the smoke config and check that the weights evaluated after each task are the
specified merge of the trained endpoints the run produced.
"""

import json

import jax
import numpy as np
import pytest

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.configs import fif_synth
from fomo_jax.continual import methods, runner
from fomo_jax.continual.methods import merge as merge_methods
from fomo_jax.families import clip
from fomo_jax.models import get_config

TASKS = 4


def _tree(rng):
    return {
        "image": {"a": rng.normal(size=(3, 4)).astype(np.float32),
                  "b": rng.normal(size=(5,)).astype(np.float32)},
        "text": {"a": rng.normal(size=(4, 2)).astype(np.float32)},
        "logit_scale": np.float32(rng.normal()),
    }  # fmt: skip


def _flat64(tree):
    return {k: np.asarray(v, np.float64) for k, v in params_lib.flatten(tree).items()}


def _setup(name, tmp_path, **overrides):
    method = methods.get(name, overrides or None)
    method.setup(methods.Context(
        config=fif_synth.get_config("smoke"), family=clip.FAMILY,
        model_config=get_config("tiny"), tokenizer=None, data=methods.NoData(),
        workdir=str(tmp_path), steps_per_task=1,
    ))  # fmt: skip
    return method


def simulate(method, theta0, seed=0):
    """Drive the hooks as the runner does, with 'training' = start + a random step.
    Returns (starts, trained endpoints, evaluated weights) as flat float64 dicts."""
    rng = np.random.default_rng(seed)
    params, state = theta0, method.init_state(theta0)
    starts, endpoints, evaluated = [], [], []
    for task in range(TASKS):
        params = method.train_params(task, params, state)
        starts.append(_flat64(params))
        step = _tree(rng)
        params = jax.tree_util.tree_map(lambda p, s: np.float32(p + 0.5 * s), params, step)
        endpoints.append(_flat64(params))
        params, state = method.end_of_task(task, params, state)
        evaluated.append(_flat64(jax.device_get(method.eval_params(task, params, state))))
    return starts, endpoints, evaluated


def _mix(trees, weights):
    return {k: sum(w * t[k] for w, t in zip(weights, trees, strict=True)) for k in trees[0]}


def _close(got, want, tol=1e-5):
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def theta0():
    return _tree(np.random.default_rng(42))


def test_zs_merge(theta0, tmp_path):
    starts, thetas, evaluated = simulate(_setup("zs_merge", tmp_path), theta0)
    t0, m = _flat64(theta0), _flat64(theta0)
    for k in range(TASKS):
        _close(starts[k], t0)  # every task fine-tunes θ0
        m = _mix([thetas[k], m], [0.5, 0.5])
        _close(evaluated[k], m)


def test_ft_merge(theta0, tmp_path):
    starts, thetas, evaluated = simulate(_setup("ft_merge", tmp_path), theta0)
    t0 = _flat64(theta0)
    _close(starts[0], t0)
    for k in range(TASKS):
        e = _mix([thetas[k], t0], [0.5, 0.5])
        _close(evaluated[k], e)
        if k + 1 < TASKS:
            _close(starts[k + 1], e)


def test_ema_merge_and_its_task_arithmetic_variant(theta0, tmp_path):
    starts, thetas, evaluated = simulate(_setup("ema_merge", tmp_path), theta0)
    m = _flat64(theta0)
    for k in range(TASKS):
        _close(starts[k], m)
        m = _mix([thetas[k], m], [0.5, 0.5])
        _close(evaluated[k], m)
    # m_k = θ0 + 0.1·[(θ_k − θ0) + (m_{k−1} − θ0)] (the shipped TA variant)
    merge = merge_methods.merge_config("task_arithmetic")
    merge.scale = 0.1
    starts, thetas, evaluated = simulate(_setup("ema_merge", tmp_path, merge=merge), theta0)
    t0 = m = _flat64(theta0)
    for k in range(TASKS):
        m = {p: t0[p] + 0.1 * ((thetas[k][p] - t0[p]) + (m[p] - t0[p])) for p in t0}
        _close(evaluated[k], m)


def test_merge_function_per_tower(theta0, tmp_path):
    """magmax on the image tower, ½/½ interpolation on the text tower (with logit_scale)."""
    image = merge_methods.merge_config("magmax")
    _, thetas, evaluated = simulate(_setup("ft_merge", tmp_path, merge_image=image), theta0)
    t0 = _flat64(theta0)
    for k in range(TASKS):
        want = _mix([thetas[k], t0], [0.5, 0.5])
        for p in want:
            if p.startswith("image/"):  # magmax of [τ_k, 0]: τ_k wherever it is non-zero
                want[p] = thetas[k][p]
        _close(evaluated[k], want)


@pytest.mark.parametrize(
    "weighting,include_zero_shot", [(None, False), ("linear", False), ("reverse_exp", True)]
)
def test_offline_merge(theta0, tmp_path, weighting, include_zero_shot):
    method = _setup("offline_merge", tmp_path, weighting=weighting,
                    include_zero_shot=include_zero_shot)  # fmt: skip
    starts, thetas, evaluated = simulate(method, theta0)
    t0 = _flat64(theta0)
    raw = {None: lambda i: 1.0, "linear": lambda i: float(i), "reverse_exp": None}
    for k in range(TASKS):
        _close(starts[k], t0)
        models_ = ([t0] if include_zero_shot else []) + thetas[: k + 1]
        n = len(models_)
        if n < 2:
            _close(evaluated[k], thetas[k])  # a single checkpoint is evaluated as it is
            continue
        if weighting == "reverse_exp":
            w = [2.0 ** (n - i) for i in range(1, n + 1)]  # 2^(i−1) reversed
        else:
            w = [raw[weighting](i) for i in range(1, n + 1)]
        _close(evaluated[k], _mix(models_, np.asarray(w) / sum(w)))
    assert len(list((tmp_path / "task_endpoints").iterdir())) == TASKS


@pytest.mark.parametrize("init", ["zs", "ft", "unrolled", "all"])
@pytest.mark.parametrize("deploy", ["ft", "unrolled", "all"])
def test_double_merge_grid(theta0, tmp_path, init, deploy):
    method = _setup("double_merge", tmp_path, init=init, deploy=deploy)
    starts, thetas, evaluated = simulate(method, theta0)
    t0 = _flat64(theta0)
    u = None
    for k in range(TASKS):
        u = thetas[0] if k == 0 else _mix([thetas[k], u], [0.5, 0.5])  # u_1 = θ1
        a = _mix(thetas[: k + 1], [1 / (k + 1)] * (k + 1))
        pick = {"zs": t0, "ft": thetas[k], "unrolled": u, "all": a}
        _close(evaluated[k], pick[deploy])
        if k + 1 < TASKS:
            _close(starts[k + 1], pick[init])
    _close(starts[0], t0)


def test_double_merge_presets_and_bad_names():
    assert len(merge_methods.DOUBLE_MERGE_PRESETS) == 8
    method = methods.get("double_merge", {"preset": "unrolled_all"})
    assert (method.init, method.deploy) == ("unrolled", "all")
    with pytest.raises(ValueError, match="preset"):
        methods.get("double_merge", {"preset": "all_zs"})
    with pytest.raises(ValueError, match="merge 'tie'"):
        _setup("zs_merge", "/tmp", merge=merge_methods.merge_config("tie"))


# ------------------------------------------------------------------- through the runner


def _recording(name):
    """`name` that records the trained endpoints and evaluated weights of a run."""
    base = methods.METHODS[name]

    class Recording(base):
        log = {"endpoints": [], "evaluated": []}

        def end_of_task(self, task, params, state):
            self.log["endpoints"].append(_flat64(jax.device_get(params)))
            return super().end_of_task(task, params, state)

        def eval_params(self, task, params, state):
            out = super().eval_params(task, params, state)
            self.log["evaluated"].append(_flat64(jax.device_get(out)))
            return out

    return Recording


@pytest.mark.parametrize(
    "name", ["zs_merge", "ft_merge", "ema_merge", "offline_merge", "double_merge"]
)
def test_runner_evaluates_the_specified_merge(name, smoke_data_root, tmp_path, monkeypatch):
    recording = _recording(name)
    monkeypatch.setitem(methods.METHODS, name, recording)
    config = fif_synth.get_config("smoke")
    config.data.root = smoke_data_root
    config.method = name
    config.num_tasks = 3
    if name == "double_merge":
        config.methods.double_merge.preset = "unrolled_all"
    workdir = tmp_path / name
    results = runner.run(config, str(workdir))
    thetas, evaluated = recording.log["endpoints"], recording.log["evaluated"]
    assert len(thetas) == 3 and len(evaluated) == 4  # after each task, and the final one
    half = [0.5, 0.5]
    if name in ("zs_merge", "ema_merge", "ft_merge"):
        t0 = _theta0(config)
        m = t0
        for k, theta in enumerate(thetas):
            m = _mix([theta, m if name != "ft_merge" else t0], half)
            _close(evaluated[k], m, tol=1e-5)
    elif name == "offline_merge":
        _close(evaluated[0], thetas[0])
        for k in (1, 2):
            _close(evaluated[k], _mix(thetas[: k + 1], [1 / (k + 1)] * (k + 1)))
    else:  # unrolled_all
        for k in range(3):
            _close(evaluated[k], _mix(thetas[: k + 1], [1 / (k + 1)] * (k + 1)))
    _close(evaluated[3], evaluated[2])  # the final full evaluation
    exported = _flat64(params_lib.split(models.load_pretrained(workdir / "model"))[1])
    _close(exported, evaluated[3], tol=1e-6)
    assert np.isfinite(results["final"]["geometric_mean"])
    assert json.loads((workdir / "results.json").read_text())["final"] == results["final"]


def _theta0(config):
    import glob

    (path,) = glob.glob(f"{config.data.root}/theta0-*.npz")
    with np.load(path) as f:
        return {k: np.asarray(f[k], np.float64) for k in f.files}
