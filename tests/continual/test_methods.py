"""Parameter-selective, parameter-efficient and online-EMA methods, a few real steps each.

Each method's step is compiled once on a tiny CLIP and run for three steps; the assertions are
the methods' defining properties: what is frozen stays bitwise equal, what is trained moves,
frozen parameters are not differentiated (no optimizer state, fewer FLOPs), adapters fold into
a plain CLIP with the same outputs, and the online EMA equals its float64 recurrence.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fomo_jax import params as params_lib
from fomo_jax import profiling
from fomo_jax.configs import fif_synth
from fomo_jax.continual import methods, runner
from fomo_jax.models.clip import abstract_clip
from fomo_jax.train import optimizer
from fomo_jax.train.step import TrainState, step_fn, trained

STEPS = 3


@pytest.fixture(scope="module")
def micro(tiny_model):
    cfg = tiny_model.config
    theta0 = jax.device_get(params_lib.split(tiny_model)[1])
    rng = np.random.default_rng(0)
    size, length = cfg.vision.image_size, cfg.text.context_length
    batches = [
        {
            "images": rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8),
            "token_ids": np.concatenate(
                [rng.integers(1, 200, (8, length - 1)), np.full((8, 1), 255)], axis=1
            ).astype(np.int32),
        }
        for _ in range(STEPS)
    ]
    return cfg, theta0, batches


def setup_method(name, cfg, **overrides):
    config = fif_synth.get_config("smoke")
    config.method = name
    config.methods[name] = overrides
    method = runner.profiling_instance(config, cfg)  # set up without data
    return method, method.graphdef


def run(name, micro, **overrides):
    """(method, start params, trajectory of params after each step, final state)."""
    cfg, theta0, batches = micro
    method, graphdef = setup_method(name, cfg, **overrides)
    tx = optimizer.adamw(weight_decay=0.2)
    params = method.init_params(theta0)
    state = TrainState(
        jnp.zeros((), jnp.int32), params, tx.init(trained(params, method)),
        method.init_state(params), jax.random.key_data(jax.random.key(0)),
    )  # fmt: skip
    family = method.ctx.family
    step = jax.jit(lambda s, b: step_fn(s, b, 1e-2, loss_fn=family.loss(graphdef), tx=tx,
                                        method=method, family=family))  # fmt: skip
    trajectory = []
    for batch in batches:
        state, metrics = step(state, batch)
        assert bool(metrics["finite"])
        trajectory.append(jax.device_get(state.params))
    return method, jax.device_get(params), trajectory, state


def _leaves(tree):
    return {k: np.asarray(v) for k, v in params_lib.flatten(tree).items()}


# The spec's parameter sets (§8.2), written out independently of the methods' rules.
def _is_layer_norm(path):
    return path.split("/")[-2:-1] in (["ln_1"], ["ln_2"], ["ln_pre"], ["ln_post"], ["ln_final"])


SELECTIVE = {
    "locked_image": lambda p: not p.startswith("image/"),
    "locked_text": lambda p: p.startswith("image/"),
    "lnfit": _is_layer_norm,
    "bitfit": lambda p: p.endswith("/bias"),
}


@pytest.mark.parametrize("name", sorted(SELECTIVE))
def test_selective_methods_train_exactly_their_parameters(name, micro):
    method, start, trajectory, state = run(name, micro)
    before, after = _leaves(start), _leaves(trajectory[-1])
    expected = {k for k in before if SELECTIVE[name](k)}
    assert expected and expected != set(before)
    assert {k for k in before if method.trainable(k)} == expected
    for key in before:
        if key in expected and key.endswith("k_proj/bias"):
            # Its gradient is zero in exact arithmetic (a key bias adds the same q·b to every
            # logit of a query; softmax ignores it): whether rounding makes it move depends on
            # the CPU's kernels. It is trained (`expected`, the optimizer moments below).
            continue
        if key in expected:
            assert not np.array_equal(before[key], after[key]), f"{key} did not train"
        else:
            np.testing.assert_array_equal(before[key], after[key], err_msg=key)
    # Frozen parameters have no optimizer state: the moments cover exactly the trained set.
    moments = {params_lib.key_path_str(path) for path, leaf in
               jax.tree_util.tree_leaves_with_path(state.opt_state) if leaf.ndim}  # fmt: skip
    assert moments == {k for k in expected if before[k].ndim}


def test_frozen_parameters_are_not_differentiated(micro):
    """The compiled step of a method that freezes most weights does less work."""
    cfg = micro[0]
    tx = optimizer.adamw()
    flops = {}
    for name in ("finetune", "locked_image", "lnfit"):
        method, _ = setup_method(name, cfg)
        flops[name] = profiling.profile_method(method, cfg, tx, 8)["flops"]
    assert flops["locked_image"] < 0.8 * flops["finetune"]
    # LNFit still backpropagates through every layer but computes no weight gradients.
    assert flops["lnfit"] < 0.9 * flops["finetune"]


def test_logit_scale_follows_tune_logit_scale(micro):
    cfg = micro[0]
    assert not setup_method("lnfit", cfg)[0].trainable("logit_scale")
    assert setup_method("lnfit", cfg, tune_logit_scale=True)[0].trainable("logit_scale")
    assert not setup_method("locked_text", cfg)[0].trainable("logit_scale")
    assert setup_method("locked_image", cfg)[0].trainable("logit_scale")
    custom = setup_method("lnfit", cfg, rules=[(r"^text/proj$", True)])[0]
    assert custom.trainable("text/proj") and not custom.trainable("text/ln_final/scale")


@pytest.mark.parametrize("name", ["lora", "dora", "vera"])
def test_adapters_train_while_base_weights_stay_bitwise_equal(name, micro):
    cfg, theta0, batches = micro
    method, start, trajectory, state = run(name, micro, rank=2)
    base0, before, after = _leaves(theta0), _leaves(start), _leaves(trajectory[-1])
    for key in base0:  # every base weight, logit_scale included
        np.testing.assert_array_equal(base0[key], after[key], err_msg=key)
    adapter_keys = set(after) - set(base0)
    trainable = {k for k in adapter_keys if not k.startswith("adapter_shared/")}
    leaf_names = {k.rsplit("/", 1)[1] for k in trainable}
    assert leaf_names == {"lora": {"lora_a", "lora_b"}, "dora": {"lora_a", "lora_b", "dora_m"},
                          "vera": {"vera_b", "vera_d"}}[name]  # fmt: skip
    modules = {k.rsplit("/", 1)[0] for k in trainable}
    pattern = r"(image|text)/transformer/resblocks/\d+/(attn/(q|k|v)_proj|mlp/c_proj)"
    assert modules and all(re.fullmatch(pattern, m) for m in modules)
    assert len(modules) == 4 * (cfg.vision.layers + cfg.text.layers)
    for key in trainable:
        assert not np.array_equal(before[key], after[key]), f"{key} did not train"
    for key in adapter_keys - trainable:  # VeRA's shared random matrices are frozen
        np.testing.assert_array_equal(before[key], after[key], err_msg=key)

    # The exported plain CLIP (adapters folded in) computes what the adapted model computes.
    export_config, export_params = method.export_params(trajectory[-1])
    assert export_config.adapter is None
    plain = params_lib.merge(params_lib.split(abstract_clip(export_config))[0], export_params)
    adapted = params_lib.merge(method.graphdef, trajectory[-1])
    pixels = jnp.asarray(batches[0]["images"], jnp.float32) / 255.0
    outputs = adapted(pixels, batches[0]["token_ids"])[:2], plain(pixels, batches[0]["token_ids"])
    for a, b in zip(*outputs, strict=False):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_online_ema_follows_its_recurrence(micro):
    method, start, trajectory, state = run("ema_online", micro, decay=0.9)
    ema = {k: v.astype(np.float64) for k, v in _leaves(start).items()}
    for params in trajectory:
        for k, v in _leaves(params).items():
            ema[k] = 0.9 * ema[k] + 0.1 * v.astype(np.float64)
    got = _leaves(jax.device_get(state.method_state["ema"]))
    for k in ema:
        np.testing.assert_allclose(got[k], ema[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # θ_ema is what is evaluated and what the next task trains from.
    params, method_state = method.end_of_task(0, state.params, state.method_state)
    chex_equal = jax.tree_util.tree_map(np.array_equal, params, method_state["ema"])
    assert all(jax.tree_util.tree_leaves(chex_equal))
    assert method.eval_params(0, state.params, method_state) is method_state["ema"]


def test_method_configs_reject_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys.*rnak"):
        methods.get("lora", {"rnak": 4})
    with pytest.raises(ValueError, match="unknown method"):
        methods.get("lorra")
    assert set(methods.default_configs()) == set(methods.METHODS)
