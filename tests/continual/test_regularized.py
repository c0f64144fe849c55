"""Online EWC and SI (spec §8.2) on a tiny CLIP, against float64 numpy references.

Each method's step is compiled once (module fixtures) and driven directly; the Fisher pass and
the end-of-task hooks are called as the runner calls them. One smoke run through the runner
covers EWC's hooks end to end (the Fisher pass reads the task's update pool).
"""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fomo_jax import params as params_lib
from fomo_jax.configs import fif_synth as fif_synth_config
from fomo_jax.continual import methods, runner
from fomo_jax.data import mixture
from fomo_jax.families import clip
from fomo_jax.models.clip import CLIP_MEAN, CLIP_STD
from fomo_jax.train import optimizer
from fomo_jax.train.step import TrainState, step_fn

B = 8
CLIP_NORM = 0.05  # small enough that every step of the SI test is clipped


def micro_config():
    return ml_collections.ConfigDict(
        {
            "seed": 0,
            "batch_size": B,
            "num_tasks": 2,
            "mixture": {"pretraining": 0.25, "update": 0.5, "buffer": 0.25},
            "optimizer": {"clip_norm": CLIP_NORM},
        }
    )


def random_batch(rng, cfg, n=B):
    size, length = cfg.vision.image_size, cfg.text.context_length
    ids = rng.integers(1, 250, (n, length)).astype(np.int32)
    ids[:, -1] = 258  # EOT: the row maximum
    return {"images": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), "token_ids": ids}


def flat64(tree):
    return {
        k: np.asarray(v, np.float64) for k, v in params_lib.flatten(jax.device_get(tree)).items()
    }


def perturbed(params, rng, scale):
    return jax.tree_util.tree_map(
        lambda p: p + scale * rng.standard_normal(p.shape).astype(np.float32), params
    )


def reference_clip_loss(graphdef, params, batch, true_temperature=True):
    """CLIP loss written independently of `fomo_jax.train.losses` (optax cross-entropy). The
    cosine similarities are multiplied by exp(logit_scale), or with `true_temperature` False
    by logit_scale itself (the reference's Fisher-pass bug)."""
    model = params_lib.merge(graphdef, params)
    pixels = (batch["images"].astype(jnp.float32) / 255.0 - np.asarray(CLIP_MEAN)) / np.asarray(
        CLIP_STD
    )
    image, text, _ = model(pixels, batch["token_ids"])
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    s = params["logit_scale"]
    logits = jnp.where(true_temperature, jnp.exp(s), s) * image @ text.T
    labels = jnp.arange(logits.shape[0])
    ce = optax.softmax_cross_entropy_with_integer_labels
    return 0.5 * (jnp.mean(ce(logits, labels)) + jnp.mean(ce(logits.T, labels)))


@functools.partial(jax.jit, static_argnums=0)
def reference_grad(graphdef, params, batch, true_temperature, importance, previous, c):
    """∇θ of the CLIP loss plus c·Σ importance ⊙ (θ − previous)² (one compile for all tests)."""

    def loss(p):
        leaves = (jax.tree_util.tree_leaves(t) for t in (importance, p, previous))
        penalty = sum(jnp.sum(w * (x - y) ** 2) for w, x, y in zip(*leaves, strict=True))
        return reference_clip_loss(graphdef, p, batch, true_temperature) + c * penalty

    return jax.grad(loss)(params)


@pytest.fixture(scope="module")
def micro(tiny_model):
    cfg = tiny_model.config
    graphdef, theta0 = params_lib.split(tiny_model)
    theta0 = jax.device_get(theta0)
    rng = np.random.default_rng(0)
    return cfg, graphdef, theta0, rng


class Harness:
    """One method on the micro config, its step compiled once."""

    def __init__(self, name, micro, update_batches=None, **overrides):
        cfg, graphdef, theta0, _ = micro
        self.graphdef, self.theta0 = graphdef, theta0
        self.method = methods.get(name, overrides or None)
        self.calls = []

        calls = self.calls

        class Data(methods.NoData):
            def update_batches(self, task, batch_size, num_batches):
                calls.append((task, batch_size, num_batches))
                yield from update_batches[:num_batches]

        self.method.setup(methods.Context(
            config=micro_config(), family=clip.FAMILY, model_config=cfg, tokenizer=None,
            data=Data(), workdir="", steps_per_task=4,
        ))  # fmt: skip
        self.tx = optimizer.adamw(clip_norm=CLIP_NORM)
        self.step = jax.jit(functools.partial(
            step_fn, loss_fn=clip.FAMILY.loss(graphdef), tx=self.tx, method=self.method,
            family=clip.FAMILY,
        ))  # fmt: skip

    def state(self, params, method_state=None):
        if method_state is None:
            method_state = self.method.init_state(params)
        key = jax.random.key_data(jax.random.key(0))
        return TrainState(jnp.int32(0), params, self.tx.init(params), method_state, key)


# ------------------------------------------------------------------------------------- EWC


@pytest.fixture(scope="module")
def fisher_batches(micro):
    cfg, *_, rng = micro
    # Whatever batch size the method asks for (checked below), the same shape as the steps'
    # batches, so one compiled reference gradient serves every test.
    return [random_batch(np.random.default_rng(i), cfg) for i in range(3)]


@pytest.fixture(scope="module")
def ewc(micro, fisher_batches):
    return Harness("ewc", micro, update_batches=fisher_batches, fisher_batches=3)


def test_ewc_penalty_matches_numpy_and_is_zero_in_task_0(ewc, micro):
    *_, rng = micro
    params = ewc.theta0
    batch = random_batch(rng, micro[0])
    _, metrics = ewc.step(ewc.state(params), batch, 1e-3)
    assert float(metrics["ewc_penalty"]) == 0.0  # F = 0 before the first Fisher pass
    assert float(metrics["loss"]) == float(metrics["clip_loss"])

    fisher = jax.tree_util.tree_map(lambda p: rng.uniform(0, 3, p.shape).astype(np.float32), params)
    anchor = perturbed(params, rng, 0.05)
    _, metrics = ewc.step(ewc.state(params, {"fisher": fisher, "anchor": anchor}), batch, 1e-3)
    f, p, a = flat64(fisher), flat64(params), flat64(anchor)
    want = 0.5 * 1.0 * sum(np.sum(f[k] * (p[k] - a[k]) ** 2) for k in f)  # λ = 1
    assert want > 1e-3
    np.testing.assert_allclose(float(metrics["ewc_penalty"]), want, rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["loss"]), float(metrics["clip_loss"]) + want, rtol=1e-5
    )


def assert_trees_close(got, want, rtol):
    """Leaf by leaf, with an absolute floor relative to each leaf's largest entry and to the
    largest entry overall (e.g. key-projection biases have zero gradient up to rounding)."""
    assert got.keys() == want.keys()
    top = max(np.max(np.abs(v)) for v in want.values())
    for k in want:
        floor = max(1e-4 * np.max(np.abs(want[k])), 1e-6 * top)
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=floor, err_msg=k)


def test_ewc_fisher_is_the_mean_squared_batch_gradient_at_the_model_temperature(
    ewc, micro, fisher_batches
):
    params = perturbed(ewc.theta0, np.random.default_rng(1), 0.01)
    state = ewc.method.init_state(ewc.theta0)
    _, state = ewc.method.end_of_task(0, params, state)
    # The task's update-pool batch size (spec §4.2) and `fisher_batches` batches.
    sizes = [mixture.pool_batch_sizes(B, dict(micro_config().mixture), k)["update"] for k in (0, 1)]
    assert ewc.calls[-1] == (0, sizes[0], 3)

    zeros = jax.tree_util.tree_map(np.zeros_like, params)

    def reference(true_temperature):  # float64 mean over batches of squared gradients
        total = None
        for batch in fisher_batches:
            grads = reference_grad(
                ewc.graphdef, params, batch, true_temperature, zeros, params, 0.0
            )
            squared = {k: v**2 for k, v in flat64(grads).items()}
            total = squared if total is None else {k: total[k] + squared[k] for k in total}
        return {k: v / len(fisher_batches) for k, v in total.items()}

    want = reference(True)
    assert_trees_close(flat64(state["fisher"]), want, rtol=1e-3)
    # The reference's temperature 1/logit_scale gives a clearly different Fisher.
    wrong = reference(False)
    total = lambda f: sum(np.sum(v) for v in f.values())  # noqa: E731
    assert abs(total(wrong) / total(want) - 1) > 0.2
    anchor, p = flat64(state["anchor"]), flat64(params)
    assert all(np.array_equal(anchor[k], p[k]) for k in p)  # θ* ← θ

    # Online accumulation F ← γF + F_new (γ = 1), at the next task's update batch size.
    _, state = ewc.method.end_of_task(1, params, state)
    assert ewc.calls[-1] == (1, sizes[1], 3)
    assert_trees_close(flat64(state["fisher"]), {k: 2 * v for k, v in want.items()}, rtol=1e-3)


# -------------------------------------------------------------------------------------- SI


@pytest.fixture(scope="module")
def si(micro):
    return Harness("si", micro)


def test_si_omega_penalty_and_consolidation(si, micro):
    cfg, graphdef, theta0, rng = micro
    c, xi = 0.5, 1.0
    params = theta0
    importance = jax.tree_util.tree_map(
        lambda p: rng.uniform(0, 2, p.shape).astype(np.float32), params
    )
    previous = perturbed(params, rng, 0.05)
    zeros = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float32), params)
    state = si.state(params, {"omega": zeros, "importance": importance, "previous": previous})

    omega = {k: np.zeros_like(v) for k, v in flat64(params).items()}
    rates = [1e-3, 3e-3, 2e-3]
    for step, lr in enumerate(rates):
        batch = random_batch(rng, cfg)
        p = flat64(state.params)
        grads = reference_grad(graphdef, state.params, batch, True, importance, previous, c)
        grads = flat64(grads)
        norm = np.sqrt(sum(np.sum(g**2) for g in grads.values()))
        assert norm > CLIP_NORM  # the clip is active: ω must use the clipped gradient
        for k in omega:
            omega[k] += lr * (grads[k] * CLIP_NORM / norm) ** 2
        state, metrics = si.step(state, batch, lr)
        if step == 0:  # the penalty of the loss, at the step's starting weights
            prev, imp = flat64(previous), flat64(importance)
            want = c * sum(np.sum(imp[k] * (p[k] - prev[k]) ** 2) for k in p)
            np.testing.assert_allclose(float(metrics["si_penalty"]), want, rtol=1e-5)
        assert float(metrics["si_skipped"]) == 0.0
    assert_trees_close(flat64(state.method_state["omega"]), omega, rtol=1e-3)

    # End of task: Ω += ω/((θ − θ_prev)² + ξ); θ_prev ← θ; ω ← 0.
    params, consolidated = si.method.end_of_task(0, state.params, state.method_state)
    p, prev, imp = flat64(params), flat64(previous), flat64(importance)
    want = {k: imp[k] + omega[k] / ((p[k] - prev[k]) ** 2 + xi) for k in p}
    assert_trees_close(flat64(consolidated["importance"]), want, rtol=1e-3)
    assert all(np.array_equal(v, p[k]) for k, v in flat64(consolidated["previous"]).items())
    assert all(not np.any(v) for v in flat64(consolidated["omega"]).values())


def test_si_skips_non_finite_gradients(si, micro):
    params = micro[2]
    state = si.method.init_state(params)
    grads = jax.tree_util.tree_map(lambda p: np.ones(p.shape, np.float32), params)
    grads["logit_scale"] = np.float32(np.nan)
    info = methods.StepInfo(jnp.int32(0), {}, grads, jnp.float32(1e-3), {}, None)
    new, metrics = si.method.step_update(state, params, info)
    assert float(metrics["si_skipped"]) == 1.0
    assert all(not np.any(v) for v in flat64(new["omega"]).values())


def test_si_starts_from_theta0(si, micro):
    state = si.method.init_state(micro[2])
    prev, theta0 = flat64(state["previous"]), flat64(micro[2])
    assert all(np.array_equal(prev[k], theta0[k]) for k in theta0)
    assert all(not np.any(v) for v in flat64(state["importance"]).values())


# ------------------------------------------------------------------------------- the runner


def test_ewc_through_the_runner(smoke_data_root, tmp_path):
    config = fif_synth_config.get_config("smoke")
    config.data.root = smoke_data_root
    config.method = "ewc"
    config.methods["ewc"] = {"fisher_batches": 2}
    config.checkpoint_every = 0
    results = runner.run(config, str(tmp_path / "run"))
    assert len(results["trajectory"]) == 3
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    penalty = {(r["task"], r["step"]): r["ewc_penalty"] for r in lines}
    assert penalty[(0, 3)] == 0 and penalty[(0, 6)] == 0  # no penalty during task 0
    assert penalty[(1, 3)] > 0 and penalty[(1, 6)] > 0  # F and θ* from task 0's end
