"""Memory levers of the model configs (`fomo_jax.models.stack`): rematerialisation ("full",
"save_matmuls") and scan over the blocks give the plain model's loss and gradients on the same
parameters (same tree, same paths), the traced program stays one block deep under scan, the
levers reach the models from run configs, and default configs keep their cache identities."""

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from fomo_jax import cli, models
from fomo_jax import params as params_lib
from fomo_jax.configs import fif_synth
from fomo_jax.continual import runner, theta0
from fomo_jax.families import clip as clip_family
from fomo_jax.families import vlm as vlm_family
from fomo_jax.models import adapters, llama, stack, vlm

LM = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
# Every non-default (remat, scan) pair; the default is the reference.
LEVERS = [("full", False), ("save_matmuls", False), ("none", True), ("full", True),
          ("save_matmuls", True)]  # fmt: skip


def _flat(tree):
    return {k: np.asarray(v, np.float64) for k, v in params_lib.flatten(tree).items()}


def _assert_same(result, reference):
    """Same loss (rtol 1e-5) and gradients under the same paths (rtol 1e-5, atol 1e-5 of the
    largest gradient: leaves whose gradient is zero in exact arithmetic, such as the key
    biases, hold float32 noise)."""
    (loss, grads), (ref_loss, ref_grads) = result, reference
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    grads, ref_grads = _flat(grads), _flat(ref_grads)
    assert list(grads) == list(ref_grads)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads.values())
    for path, ref in ref_grads.items():
        np.testing.assert_allclose(grads[path], ref, rtol=1e-5, atol=1e-5 * scale, err_msg=path)


# ---- CLIP: both towers -----------------------------------------------------------------------

PIXELS = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
IDS = np.array([[5, 9, 258, 0, 0, 0, 0, 0], [7, 258, 0, 0, 0, 0, 0, 0],
                [3, 4, 5, 6, 258, 0, 0, 0]], np.int32)  # fmt: skip


def _clip_loss(graphdef, pixels=PIXELS):
    def loss(params):
        image, text, _ = params_lib.merge(graphdef, params)(pixels, IDS)
        if pixels is None:  # the text tower alone
            return jnp.mean(jnp.square(text))
        image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
        text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
        logits = 10.0 * image @ text.T
        return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits))) + jnp.mean(jnp.square(image))

    return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def clip_reference():
    graphdef, params = params_lib.split(models.create_model("tiny", seed=0))
    return params, _clip_loss(graphdef)(params)


@pytest.mark.parametrize("remat,scan", LEVERS)
def test_clip_levers_match_the_plain_model(clip_reference, remat, scan):
    params, reference = clip_reference
    model = models.create_model("tiny", seed=1, remat=remat, scan=scan)
    graphdef, own = params_lib.split(model)
    assert list(params_lib.flatten(own)) == list(params_lib.flatten(params))  # same paths
    loss = _clip_loss(graphdef)
    _assert_same(loss(params), reference)
    _assert_levers_in(list(_equations(jax.make_jaxpr(loss)(params).jaxpr)), remat, scan, 2)


def test_clip_scan_with_vera_adapters():
    """VeRA's matrices are one Variable shared by every adapted linear: scanned blocks see it
    (stacked) and its gradient is the sum over blocks, as in the loop (text tower only)."""
    adapter = adapters.AdapterConfig("vera", 2, models.clip.ADAPTER_TARGETS["all_linear"])
    plain = models.get_config("tiny", adapter=adapter)
    graphdef, params = params_lib.split(models.create_model(plain, seed=0))
    # Non-zero d (zero at init) so the adapters contribute to the loss.
    flat = params_lib.flatten(params)
    flat = {k: (v + 0.3 if k.endswith("vera_d") else v) for k, v in flat.items()}
    params = params_lib.unflatten(flat)
    levered, _ = params_lib.split(models.create_model(plain.replace(remat="full", scan=True)))
    _assert_same(_clip_loss(levered, None)(params), _clip_loss(graphdef, None)(params))


def test_scan_refuses_blocks_of_different_structure():
    adapter = adapters.AdapterConfig("lora", 2, models.clip.ADAPTER_TARGETS["reference"],
                                     blocks=(0,))  # fmt: skip
    model = models.create_model("tiny", adapter=adapter, scan=True)
    with pytest.raises(ValueError, match="block 1 differs in structure from block 0"):
        model(PIXELS[:1])


# ---- the LM and the VLM ----------------------------------------------------------------------

TOKENS = np.random.default_rng(1).integers(1, 49, (2, 7)).astype(np.int32)
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2], np.int32)


def _lm_loss(graphdef):
    def loss(params):
        logits = params_lib.merge(graphdef, params)(TOKENS[:, :-1], attention_mask=MASK[:, :-1])
        logp = jax.nn.log_softmax(logits)
        picked = jnp.take_along_axis(logp, TOKENS[:, 1:, None], axis=-1)[..., 0]
        return -jnp.sum(picked * MASK[:, 1:]) / jnp.sum(MASK[:, 1:])

    return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def lm_reference():
    graphdef, params = params_lib.split(llama.create_lm(LM, seed=0))
    return params, _lm_loss(graphdef)(params)


@pytest.mark.parametrize("remat,scan", LEVERS)
def test_lm_levers_match_the_plain_model(lm_reference, remat, scan):
    params, reference = lm_reference
    graphdef, own = params_lib.split(llama.create_lm(LM.replace(remat=remat, scan=scan), seed=1))
    assert list(params_lib.flatten(own)) == list(params_lib.flatten(params))
    _assert_same(_lm_loss(graphdef)(params), reference)


def test_lm_decoding_with_a_cache_under_scan_runs_the_loop(lm_reference):
    """Prefill and one decoding step of a scan + remat LM equal the plain LM's."""
    params, _ = lm_reference
    outputs = []
    for cfg in (LM, LM.replace(remat="full", scan=True)):
        model = params_lib.merge(params_lib.split(llama.create_lm(cfg))[0], params)
        cache = llama.init_cache(cfg, 2, 8)
        prompt = TOKENS[:, :4]
        logits, cache = model(prompt, cache=cache, attention_mask=np.ones((2, 4)))
        mask = np.zeros((2, 8), np.int32)
        mask[:, :5] = 1
        step, _ = model(TOKENS[:, 4:5], cache=cache, cache_index=4, attention_mask=mask,
                        positions=np.full((2, 1), 4))  # fmt: skip
        outputs.append((logits, step))
    for got, want in zip(outputs[1], outputs[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_vlm_levers_match_the_plain_model():
    """Image tower (hidden states up to the feature layer, scanned) and LM through the VLM."""
    cfg = vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM, image_token_id=49)
    seq = cfg.image_seq_length
    ids = np.ones((2, seq + 4), np.int32)
    ids[:, 1 : 1 + seq] = 49
    ids[:, -3:] = [[5, 6, 7], [8, 9, 10]]
    images = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype(np.float32)

    def loss_fn(graphdef):
        def loss(params):
            logits = params_lib.merge(graphdef, params)(ids, images)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 3])

        return jax.jit(jax.value_and_grad(loss))

    graphdef, params = params_lib.split(vlm.create_vlm(cfg, seed=0))
    levered = models.with_memory_options(cfg, {"remat": "save_matmuls", "scan": True})
    assert levered.vision.scan and levered.lm.remat == "save_matmuls"
    levered_graphdef, own = params_lib.split(vlm.create_vlm(levered, seed=1))
    assert list(params_lib.flatten(own)) == list(params_lib.flatten(params))
    _assert_same(loss_fn(levered_graphdef)(params), loss_fn(graphdef)(params))


# ---- the traced program -----------------------------------------------------------------------


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs inside it (scan, checkpoint, pjit bodies)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _equations(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _equations(sub)


def _lm_program(cfg):
    """The equations of the LM's loss and gradient, traced on shapes only (no compile)."""
    graphdef, params = params_lib.split(llama.abstract_lm(cfg))

    def loss(p):
        logits = params_lib.merge(graphdef, p)(TOKENS[:, :-1])
        return jnp.mean(logits)

    return list(_equations(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr))


def _count(equations, name):
    return sum(eqn.primitive.name == name for eqn in equations)


def _clip_program(depth, scan):
    """The equations of a CLIP's loss and gradient (both towers at `depth`), on shapes only."""
    base = models.get_config("tiny", scan=scan)
    cfg = base.replace(vision=dataclasses.replace(base.vision, layers=depth),
                       text=dataclasses.replace(base.text, layers=depth))  # fmt: skip
    graphdef, params = params_lib.split(models.clip.abstract_clip(cfg))

    def loss(p):
        image, text, _ = params_lib.merge(graphdef, p)(PIXELS, IDS)
        return jnp.mean(image) + jnp.mean(text)

    return list(_equations(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr))


@pytest.mark.parametrize("model", ["lm", "clip"])
def test_scan_keeps_the_traced_program_one_block_deep(model):
    """Matmuls in the traced loss + gradient: under scan the same at depth 2 and 8 (one block
    body per stack, forward and backward); without scan they grow with depth (the count sees
    blocks)."""
    stacks = {"lm": 1, "clip": 2}[model]
    dots = {}
    for scan in (False, True):
        for depth in (2, 8):
            if model == "lm":
                program = _lm_program(LM.replace(num_hidden_layers=depth, scan=scan))
            else:
                program = _clip_program(depth, scan)
            dots[scan, depth] = _count(program, "dot_general")
            assert _count(program, "scan") == 2 * scan * stacks  # forward and backward
    assert dots[True, 2] == dots[True, 8]
    assert dots[False, 8] > dots[False, 2]


def test_scan_keeps_the_lowered_program_one_block_deep():
    """The same in the StableHLO handed to XLA (what it compiles): the LM's matmuls at depth
    2 and 8 under scan, in two while loops (forward and backward; not unrolled)."""
    dots = []
    for depth in (2, 8):
        graphdef, params = params_lib.split(
            llama.abstract_lm(LM.replace(num_hidden_layers=depth, scan=True))
        )
        loss = lambda p, graphdef=graphdef: jnp.mean(params_lib.merge(graphdef, p)(TOKENS))
        text = jax.jit(jax.grad(loss)).lower(params).as_text()
        dots.append(text.count("stablehlo.dot_general"))
        assert text.count("stablehlo.while") == 2
    assert dots[0] == dots[1] > 0


def _assert_levers_in(program, remat, scan, stacks=1):
    """The flags are in the program: `stacks` scans (each forward and backward), checkpoints
    with the documented policy."""
    assert _count(program, "scan") == 2 * scan * stacks
    # jax.checkpoint's equations (named "remat2" once differentiated) carry its policy.
    checkpoints = [eqn for eqn in program if {"policy", "prevent_cse"} <= set(eqn.params)]
    if remat == "none":
        assert not checkpoints
    else:
        assert checkpoints
        assert {eqn.params["policy"] for eqn in checkpoints} == {stack.POLICIES[remat]}


@pytest.mark.parametrize("remat,scan", LEVERS)
def test_levers_are_applied(remat, scan):
    _assert_levers_in(_lm_program(LM.replace(remat=remat, scan=scan)), remat, scan)
    policies = jax.checkpoint_policies
    assert stack.POLICIES["save_matmuls"] is policies.dots_with_no_batch_dims_saveable


# ---- bad input --------------------------------------------------------------------------------


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="remat='partial'"):
        models.get_config("tiny", remat="partial")
    with pytest.raises(ValueError, match="scan='yes'"):
        LM.replace(scan="yes")
    with pytest.raises(TypeError, match="has no remat / scan"):
        models.with_memory_options(adapters.AdapterConfig("lora", 1, "x"), {"scan": True})


def test_blocks_with_state_other_than_parameters_are_refused():
    class Noisy(nnx.Module):
        def __init__(self):
            self.dropout = nnx.Dropout(0.1, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.dropout(x)

    blocks = nnx.List([Noisy(), Noisy()])
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="block 0 holds .* state at dropout/rngs"):
        stack.run(blocks, x, lambda block, h: block(h), remat="full")
    assert stack.run(blocks, x, lambda block, h: h + 1).shape == x.shape  # the plain loop


# ---- run configs and identities ---------------------------------------------------------------


def test_levers_reach_the_models_from_run_configs():
    family = clip_family.Clip()
    config = cli.load_config(["--config=fif_synth:smoke"])
    assert (family.model_config(config).remat, family.model_config(config).scan) == ("none", False)
    config = cli.load_config(["--config=fif_synth:smoke", "--config.model.remat=save_matmuls",
                              "--config.model.scan=True"])  # fmt: skip
    cfg = family.model_config(config)
    assert (cfg.remat, cfg.scan) == ("save_matmuls", True)
    # The pretraining job (clip_synth) builds its model config from `config.model` the same way.
    config = cli.load_config(["--config=clip_synth:smoke", "--config.model.remat=full"])
    run = ml_collections.ConfigDict(
        dict(theta0=dict(checkpoint=None), model=config.model.to_dict())
    )
    assert family.model_config(run).remat == "full"
    run = ml_collections.ConfigDict(dict(
        theta0=dict(checkpoint=None),
        model=dict(vlm=dict(vision="tiny", lm=LM.to_dict(), image_token_id=49), remat="full",
                   scan=True)))  # fmt: skip
    cfg = vlm_family.VLM().model_config(run)
    assert (cfg.vision.remat, cfg.vision.scan, cfg.lm.remat, cfg.lm.scan) == ("full", True) * 2


def test_default_levers_keep_cache_identities():
    """θ0's cache key and a VLM config's repr as computed before the levers existed (values
    from the code before this change); a lever that is set changes them."""
    tiny = models.get_config("tiny")
    assert theta0.cache_path("d", tiny, {"seed": 0}) == "d/theta0-16daf36ab83543e6.npz"
    assert theta0.cache_path("d", tiny.replace(scan=True), {"seed": 0}) != (
        "d/theta0-16daf36ab83543e6.npz")  # fmt: skip
    cfg = vlm.VLMConfig(vision=tiny, lm=LM, image_token_id=49)
    assert hashlib.sha256(repr(cfg).encode()).hexdigest()[:16] == "fb081be7eea09687"
    assert "remat='full'" in repr(LM.replace(remat="full"))
    # A run's recorded config: with the levers at their defaults, that of a config without them.
    config = fif_synth.get_config("smoke")
    config.method = "finetune"
    recorded = runner._config_json(config)
    config.model.scan = True
    assert runner._config_json(config) != recorded
    without = fif_synth.get_config("smoke")
    without.method = "finetune"
    del without.model["remat"], without.model["scan"]
    assert runner._config_json(without) == recorded
