"""The contrastive losses of `config.loss`: dense SigLIP against a float64 formula, the chunked
forms against the dense ones (one device here, 8 fake devices in a worker process), the CLIP
family's loss switch, the model's `logit_bias` option and the config key."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.configs import fif_synth
from fomo_jax.continual import runner
from fomo_jax.families import clip, vlm
from fomo_jax.train import losses
from tests.train.test_losses import numpy_clip_loss
from tests.train.test_step import _batch

HERE = os.path.dirname(os.path.abspath(__file__))


def numpy_siglip_loss(image, text, logit_scale, logit_bias):
    """-1/B Σ_ij log σ(z_ij (e^s <x̂_i, ŷ_j> + b)) in float64 (Zhai et al. 2023, Algorithm 1)."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    logits = np.exp(logit_scale) * image @ text.T + logit_bias
    z = 2 * np.eye(len(image)) - 1
    return -np.sum(-np.logaddexp(0, -z * logits)) / len(image)  # log σ(u) = -log(1 + e^-u)


def test_siglip_matches_float64_formula():
    rng = np.random.default_rng(0)
    for batch, dim, scale, bias in ((8, 16, math.log(10), -10.0), (33, 5, 2.0, 1.5), (2, 3, 0, 0)):
        image, text = rng.standard_normal((2, batch, dim))
        x, y = jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32)
        loss, _ = losses.siglip_loss(x, y, jnp.float32(scale), jnp.float32(bias))
        np.testing.assert_allclose(float(loss), numpy_siglip_loss(image, text, scale, bias),
                                   rtol=2e-6)  # fmt: skip


def test_siglip_gradients_of_scale_and_bias():
    rng = np.random.default_rng(1)
    image, text = rng.standard_normal((2, 7, 5))
    grads = jax.grad(lambda s, b: losses.siglip_loss(image, text, s, b)[0], argnums=(0, 1))(
        jnp.float32(1.5), jnp.float32(-2.0)
    )
    eps = 1e-5
    f = lambda s, b: numpy_siglip_loss(image, text, s, b)  # noqa: E731
    numeric = ((f(1.5 + eps, -2.0) - f(1.5 - eps, -2.0)) / (2 * eps),
               (f(1.5, -2.0 + eps) - f(1.5, -2.0 - eps)) / (2 * eps))  # fmt: skip
    np.testing.assert_allclose([float(g) for g in grads], numeric, rtol=1e-3)


def _all_grads(fn, *inputs):
    argnums = tuple(range(len(inputs)))
    return jax.jit(jax.value_and_grad(fn, argnums=argnums, has_aux=True))(*inputs)


@pytest.mark.parametrize("chunk_size", [12, 5, 1])  # 5: the largest divisor of 12 below, 4
def test_chunked_equals_dense_on_one_device(chunk_size):
    rng = np.random.default_rng(2)
    image, text = rng.standard_normal((2, 12, 6)).astype(np.float32)
    text[3] = text[7]  # a tie in the argmax (jnp.argmax: the lower index)
    image[7] = text[7]
    scale, bias = jnp.float32(2.0), jnp.float32(-3.0)
    cases = [
        (lambda x, y, s: losses.clip_loss(x, y, s),
         lambda x, y, s: losses.chunked_clip_loss(x, y, s, chunk_size=chunk_size), (scale,)),
        (losses.siglip_loss,
         lambda x, y, s, b: losses.chunked_siglip_loss(x, y, s, b, chunk_size=chunk_size),
         (scale, bias)),
    ]  # fmt: skip
    for dense, chunked, extra in cases:
        (want, want_metrics), want_grads = _all_grads(dense, image, text, *extra)
        (got, got_metrics), got_grads = _all_grads(chunked, image, text, *extra)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for g, w in zip(got_grads, want_grads, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(w))))
        assert {k: float(v) for k, v in got_metrics.items()} == {
            k: float(v) for k, v in want_metrics.items()
        }


def test_chunked_refuses_bad_shapes():
    x = jnp.ones((12, 4))
    with pytest.raises(ValueError, match="chunk_size=0"):
        losses.chunked_clip_loss(x, x, jnp.float32(0), chunk_size=0)
    mesh = jax.sharding.AbstractMesh((8, 1), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"batch 12 does not split into 8 shards"):
        losses.chunked_clip_loss(x, x, jnp.float32(0), mesh=mesh)
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        losses.chunked_siglip_loss(x, x[:6], jnp.float32(0), jnp.float32(0))


@pytest.fixture(scope="module")
def equivalence():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, os.path.join(HERE, "contrastive_equivalence.py")],
                            capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_chunked_equals_dense_on_8_devices(equivalence, kind):
    """data=8 and data=2 x fsdp=4, one and four chunks per ring step, the mesh of
    `jax.set_mesh`, and no mesh: loss and gradients (embeddings, scale, bias) to 1e-5 relative
    to the largest entry, and the same argmax metrics (with a tie)."""
    cases = {k: v for k, v in equivalence.items() if k.startswith(kind + " ") and "dense" not in k}
    assert len(cases) == 6, sorted(cases)
    for name, r in cases.items():
        assert r["loss"] < 1e-5 and r["metrics_equal"], (name, r)
        for grad in ("image", "text", "logit_scale", "logit_bias"):
            assert r[grad] < 1e-5, (name, grad, r)
        # a ring of collective permutes with a mesh; XLA's own partitioning without one
        assert (r["ring"] > 0) == ("no mesh" not in name), (name, r)
    assert equivalence[f"{kind} dense"]["metrics"]["i2t_accuracy"] > 0  # the metrics say something


def test_the_runners_train_step_takes_the_ring(equivalence):
    """`step.jit_step` traces the step under its mesh: the chunked loss finds it."""
    assert equivalence["train step ring"] > 0


# ------------------------------------------------------------------- the family and the model


def _config(loss="clip"):
    config = fif_synth.get_config()
    config.loss = loss
    config.model.context_length = None  # tiny's own 16: the shared tiny model's graph
    return config


def test_bad_loss_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"config.loss='softmax'; expected one of"):
        runner.family_of(_config("softmax"))
    config = _config("clip_chunked")
    config.loss_chunk_size = 0
    with pytest.raises(ValueError, match=r"config.loss_chunk_size=0; expected a positive"):
        runner.family_of(config)
    with pytest.raises(ValueError, match=r"config.loss='siglip' is a CLIP family loss"):
        vlm.FAMILY.configured(ml_collections.ConfigDict({"loss": "siglip"}))


@pytest.mark.parametrize("loss", ["siglip", "siglip_chunked"])
def test_methods_with_their_own_softmax_loss_refuse_a_sigmoid_loss(loss):
    """ER, DER, DER++ and ZSCL compute CLIP's softmax loss themselves: with a sigmoid
    `config.loss` they stop at the config check; every other method accepts it."""
    from fomo_jax.continual import methods

    family = runner.family_of(_config(loss))
    refused = set()
    for name in methods.METHODS:
        try:
            methods.get(name).check_family(family)
        except ValueError as error:
            assert f"config.loss={loss!r}" in str(error) and repr(name) in str(error)
            refused.add(name)
    assert refused == {"er", "der", "derpp", "zscl"}
    for name in refused:  # the softmax losses are theirs
        methods.get(name).check_family(runner.family_of(_config("clip_chunked")))


def test_default_loss_keeps_family_model_and_config_json():
    config = _config()
    assert runner.family_of(config) is clip.FAMILY
    model_config = clip.FAMILY.model_config(config)
    assert model_config.logit_bias is None and "logit_bias" not in repr(model_config)
    assert "loss" not in json.loads(runner._config_json(config))  # as before the key
    assert json.loads(runner._config_json(_config("siglip")))["loss"] == "siglip"


def test_logit_bias_leaf_only_when_set(tiny_model):
    assert "logit_bias" not in params_lib.split(tiny_model)[1]
    cfg = tiny_model.config.replace(logit_bias=-10.0)
    assert "logit_bias=-10.0" in repr(cfg)
    assert models.CLIPConfig.from_dict(cfg.to_dict()) == cfg
    params = params_lib.split(models.create_model(cfg, seed=0))[1]
    assert float(params["logit_bias"]) == -10.0


@pytest.fixture(scope="module")
def siglip_model():
    model_config = clip.with_loss("siglip").model_config(_config("siglip"))
    return models.create_model(model_config, seed=0)


@pytest.mark.parametrize("loss", losses.LOSSES)
def test_family_loss_switch(loss, tiny_model, siglip_model):
    """The family `config.loss` asks for computes that loss (float64 formulas on the model's
    own embeddings), the chunked ones in blocks of `config.loss_chunk_size` = 4 texts (two
    per batch); SigLIP's model starts at t' = log 10, b = -10."""
    config = _config(loss)
    config.loss_chunk_size = 4
    family = runner.family_of(config)
    chunked = loss.endswith("_chunked")
    assert family.chunk_size == (4 if chunked else losses.DEFAULT_CHUNK)
    assert ("loss_chunk_size" in json.loads(runner._config_json(config))) == chunked
    sigmoid = loss.startswith("siglip")
    model = siglip_model if sigmoid else tiny_model
    graphdef, params = params_lib.split(model)
    batch = _batch(model, size=8)
    got, metrics, _ = jax.jit(family.loss(graphdef))(params, batch, None)
    image, text, scale = jax.device_get(jax.jit(clip.forward(graphdef))(params, batch))
    image, text = np.asarray(image, np.float64), np.asarray(text, np.float64)
    if sigmoid:
        assert float(params["logit_bias"]) == -10.0
        np.testing.assert_allclose(float(params["logit_scale"]), math.log(10.0), rtol=1e-7)
        want = numpy_siglip_loss(image, text, float(scale), -10.0)
    else:
        want = numpy_clip_loss(image, text, float(scale))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert set(metrics) == {"i2t_accuracy", "t2i_accuracy"}


def test_siglip_train_step_trains_the_bias(siglip_model):
    from fomo_jax import sharding
    from fomo_jax.continual.loop import finetuning
    from fomo_jax.train import optimizer

    graphdef, params = params_lib.split(siglip_model)
    family = clip.with_loss("siglip_chunked")
    step, state = finetuning(graphdef, optimizer.adamw(), sharding.make_mesh(), params,
                             family=family)  # fmt: skip
    state, metrics = step(state, _batch(siglip_model, size=8), 1e-2)
    assert float(metrics["logit_bias"]) != -10.0  # the step's params: the bias moved
    assert np.isfinite(float(metrics["loss"]))


def test_siglip_needs_the_bias(tiny_model):
    graphdef, params = params_lib.split(tiny_model)
    with pytest.raises(ValueError, match="needs the model's logit_bias"):
        jax.eval_shape(clip.with_loss("siglip").loss(graphdef), params,
                       _batch(tiny_model, size=4), None)  # fmt: skip


def test_siglip_from_a_clip_checkpoint_gets_the_bias(tiny_model, tmp_path):
    """θ0 given as a CLIP checkpoint (no bias): the SigLIP run keeps its weights and scale
    and starts the bias at -10."""
    models.export_hf(tiny_model, tmp_path / "clip")
    config = _config("siglip")
    config.theta0.checkpoint = str(tmp_path / "clip")
    family = runner.family_of(config)
    model_config = family.model_config(config)
    assert model_config.logit_bias == -10.0
    params = family.load_params(config.theta0.checkpoint, model_config)
    assert float(params["logit_bias"]) == -10.0
    want = params_lib.split(tiny_model)[1]
    np.testing.assert_allclose(float(params["logit_scale"]), float(want["logit_scale"]), rtol=1e-6)
    models.convert.model_from_params(params, model_config)  # the shapes the model expects
