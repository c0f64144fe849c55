"""The jitted train step: learns, never retraces for a new learning rate, donates its input."""

import jax
import numpy as np
import pytest

from fomo_jax import models, sharding
from fomo_jax import params as params_lib
from fomo_jax.continual.loop import finetuning
from fomo_jax.data import synthetic
from fomo_jax.families import clip
from fomo_jax.tokenizer import ByteTokenizer
from fomo_jax.train import optimizer


def _batch(model, size=16, seed=0):
    cfg = model.config
    source = synthetic.SyntheticPairs(size, cfg.vision.image_size, seed=seed)
    examples = [source[i] for i in range(size)]
    return {
        "pixels": synthetic.normalize(np.stack([e["image"] for e in examples])),
        "token_ids": ByteTokenizer(cfg.text.context_length)([e["text"] for e in examples]),
    }


@pytest.fixture(scope="module")
def setup(tiny_model):
    graphdef, params = params_lib.split(tiny_model)
    tx = optimizer.adamw()
    mesh = sharding.make_mesh()
    return graphdef, params, tx, mesh, finetuning(graphdef, tx, mesh, params)[0]


def _fresh_state(setup):
    graphdef, params, tx, mesh, _ = setup
    return finetuning(graphdef, tx, mesh, params)[1]


def test_learns_a_fixed_batch_and_never_retraces(setup, tiny_model):
    step = setup[-1]
    state = _fresh_state(setup)
    batch = _batch(tiny_model)
    losses = []
    for i, lr in enumerate(np.linspace(1e-3, 2e-3, 12)):  # a new learning rate every step
        state, metrics = step(state, batch, float(lr))
        losses.append(float(metrics["loss"]))
        assert float(metrics["learning_rate"]) == pytest.approx(lr, rel=1e-6)
        assert int(state.step) == i + 1
    assert losses[-1] < 0.5 * losses[0]
    assert step._cache_size() == 1  # one compilation for every learning rate


def test_input_state_is_donated(setup, tiny_model):
    step = setup[-1]
    state = _fresh_state(setup)
    old_kernel = state.params["image"]["proj"]
    state, _ = step(state, _batch(tiny_model), 1e-3)
    assert old_kernel.is_deleted()
    assert not state.params["image"]["proj"].is_deleted()
    assert not tiny_model.image.proj[...].is_deleted()  # the model the params came from lives


def test_zero_learning_rate_changes_nothing(setup, tiny_model):
    step = setup[-1]
    state = _fresh_state(setup)
    before = jax.device_get(state.params)
    state, metrics = step(state, _batch(tiny_model), 0.0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.device_get(state.params))
    assert float(metrics["grad_norm"]) > 0


def test_bfloat16_compute_matches_float32_loss(tiny_model):
    graphdef, params = params_lib.split(tiny_model)
    bf16_graphdef, _ = params_lib.split(
        models.create_model(tiny_model.config.replace(dtype="bfloat16"))
    )
    batch = _batch(tiny_model, seed=1)
    f32 = jax.jit(clip.FAMILY.loss(graphdef))(params, batch, None)[0]
    bf16 = jax.jit(clip.FAMILY.loss(bf16_graphdef))(params, batch, None)[0]
    assert bf16.dtype == np.float32
    np.testing.assert_allclose(float(bf16), float(f32), rtol=2e-2)
    assert float(bf16) != float(f32)
