"""LoRA / DoRA / VeRA adapters: spec formulas (float64 numpy, torch layout), factorized forward
against merged weights, init identity, DoRA's stop-gradient norm, targets, VeRA sharing and
seeding, checkpoints and the Kaiming bound (spec §8.2)."""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.models import adapters
from fomo_jax.models import clip as clip_lib
from fomo_jax.models.adapters import AdapterConfig
from fomo_jax.models.clip import ADAPTER_TARGETS, abstract_clip
from fomo_jax.models.convert import model_from_params

KINDS = ("lora", "dora", "vera")
RANK = 4
TINY = models.get_config("tiny")
REFERENCE = ("attn/q_proj", "attn/k_proj", "attn/v_proj", "mlp/c_proj")
BLOCK_LINEARS = (
    "attn/q_proj",
    "attn/k_proj",
    "attn/v_proj",
    "attn/out_proj",
    "mlp/c_fc",
    "mlp/c_proj",
)


def _cfg(kind, **adapter):
    """TINY with an adapter; `targets` may name one of CLIP's sets ("reference" default)."""
    targets = adapter.pop("targets", "reference")
    targets = ADAPTER_TARGETS.get(targets, targets)
    rank = adapter.pop("rank", RANK)
    return TINY.replace(adapter=AdapterConfig(kind, rank, targets, **adapter))


def _params(cfg, seed=0):
    return params_lib.split(models.create_model(cfg, seed=seed))


def _randomize(params, seed=1):
    """Non-zero trainable adapter leaves (VeRA's shared matrices are kept)."""
    rng = np.random.default_rng(seed)
    flat = params_lib.flatten(params)
    for path, value in flat.items():
        if not adapters.trainable(path):
            continue
        noise = rng.normal(size=np.shape(value)).astype(np.float32)
        if path.endswith("dora_m"):
            flat[path] = np.asarray(value) * (1 + 0.3 * noise)
        else:
            flat[path] = 0.5 * noise
    return params_lib.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _adapted_modules(flat):
    return {k.rsplit("/", 1)[0] for k in flat if adapters.trainable(k)}


def _dense_reference(flat, kind, s):
    """Spec §8.2 in torch layout (W in R^{out x in}) and float64: the effective kernels."""
    f64 = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    out = {}
    for module in _adapted_modules(flat):
        w = f64[f"{module}/kernel"].T  # [out, in]
        if kind == "vera":
            in_dim, out_dim = w.shape[1], w.shape[0]
            pair = f"adapter_shared/vera_{in_dim}x{out_dim}"
            a_r, b_r = f64[f"{pair}/random_a"].T, f64[f"{pair}/random_b"].T  # [r,in], [out,r]
            d, b = f64[f"{module}/vera_d"], f64[f"{module}/vera_b"]
            w_eff = w + s * np.diag(b) @ b_r @ np.diag(d) @ a_r
        else:
            a, b = f64[f"{module}/lora_a"].T, f64[f"{module}/lora_b"].T  # [r,in], [out,r]
            w_eff = w + s * b @ a
            if kind == "dora":
                row_norm = np.linalg.norm(w_eff, axis=1, keepdims=True)
                w_eff = f64[f"{module}/dora_m"][:, None] * w_eff / row_norm
        out[f"{module}/kernel"] = w_eff.T
    return out


def _inputs():
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    tokens = rng.integers(1, 250, size=(3, 16)).astype(np.int32)
    tokens[:, 0], tokens[np.arange(3), [5, 9, 15]] = 256, 258  # start, EOT = row max
    return pixels, tokens


def _embed(model):
    pixels, tokens = _inputs()
    return np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(tokens))


@pytest.mark.parametrize("kind", KINDS)
def test_merge_matches_spec_formula_in_float64(kind):
    cfg = _cfg(kind, scale=0.7)
    _, params = _params(cfg)
    params = _randomize(params)
    flat = params_lib.flatten(params)
    merged = params_lib.flatten(adapters.merge_adapters(params, config=cfg))
    _, plain = _params(adapters.plain_config(cfg))
    assert merged.keys() == params_lib.flatten(plain).keys()
    want = _dense_reference(flat, kind, 0.7)
    assert len(want) == 16  # q, k, v, c_proj x 2 blocks x 2 towers
    for path, value in merged.items():
        expected = want.get(path, flat[path])
        np.testing.assert_allclose(value, expected, rtol=2e-5, atol=2e-6, err_msg=path)
    # The same from the split form.
    base, ads = adapters.split_adapters(params)
    again = params_lib.flatten(adapters.merge_adapters(base, ads, config=cfg))
    for path in merged:
        np.testing.assert_array_equal(again[path], merged[path], err_msg=path)


@pytest.mark.parametrize("kind", KINDS)
def test_factorized_forward_equals_merged_plain_model(kind):
    cfg = _cfg(kind, targets="all_linear", scale=0.7)
    graphdef, params = _params(cfg)
    params = _randomize(params)
    adapted = params_lib.merge(graphdef, params)
    plain = model_from_params(
        adapters.merge_adapters(params, config=cfg), adapters.plain_config(cfg)
    )
    for got, want in zip(_embed(adapted), _embed(plain), strict=True):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
    # The adapters matter: the base model alone gives something else.
    base, _ = adapters.split_adapters(params)
    base_model = model_from_params(base, adapters.plain_config(cfg))
    assert np.abs(_embed(base_model)[0] - _embed(plain)[0]).max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_init_equals_base_model_and_add_adapters(kind):
    cfg = _cfg(kind)
    plain_model = models.create_model(TINY, seed=0)
    adapted_model = models.create_model(cfg, seed=0)
    _, plain = params_lib.split(plain_model)
    _, adapted = params_lib.split(adapted_model)
    base, _ = adapters.split_adapters(adapted)
    # The base weights are the plain model's (adapters draw nothing from the model's rngs) ...
    jax.tree_util.tree_map(np.testing.assert_array_equal, base, plain)
    # ... and the adapter leaves are what add_adapters makes from them.
    fresh = params_lib.flatten(adapters.add_adapters(plain, cfg))
    flat = params_lib.flatten(adapted)
    assert fresh.keys() == flat.keys()
    for path in flat:
        np.testing.assert_array_equal(fresh[path], flat[path], err_msg=path)
    # dW = 0 at init (B = 0; DoRA m = ||W||; VeRA d = 0, b = 0.1).
    for path, value in flat.items():
        name = path.rsplit("/", 1)[-1]
        if name == "lora_b" or name == "vera_d":
            assert not np.any(value), path
        elif name == "vera_b":
            np.testing.assert_array_equal(value, np.full(value.shape, 0.1, np.float32))
        elif name == "dora_m":
            kernel = flat[path.replace("dora_m", "kernel")]
            np.testing.assert_allclose(value, np.linalg.norm(kernel, axis=0), rtol=1e-6)
    # The outputs agree to rounding, not bit for bit: the adapted model is another compiled
    # program (its extra matmuls add exact zeros, but XLA may fuse and order the base matmul
    # differently), and DoRA's m / ||V|| is 1 only up to rounding. dW = 0 exactly is checked on
    # the leaves above.
    for got, want in zip(_embed(adapted_model), _embed(plain_model), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_add_adapters_key_changes_a_but_not_vera_matrices():
    _, plain = _params(TINY)
    lora = _cfg("lora")
    a0 = params_lib.flatten(adapters.add_adapters(plain, lora))
    a1 = params_lib.flatten(adapters.add_adapters(plain, lora, key=jax.random.key(7)))
    path = "text/transformer/resblocks/1/mlp/c_proj/lora_a"
    assert not np.allclose(a0[path], a1[path])
    vera = _cfg("vera", seed=3)
    v0 = params_lib.flatten(adapters.add_adapters(plain, vera))
    v1 = params_lib.flatten(adapters.add_adapters(plain, vera, key=jax.random.key(7)))
    for path in v0:
        np.testing.assert_array_equal(v0[path], v1[path], err_msg=path)
    with pytest.raises(ValueError, match="already hold adapter"):
        adapters.add_adapters(adapters.add_adapters(plain, lora), lora)


def _dense_dora_kernel(kernel, a, b, m, s, stop):
    """Independent dense DoRA (flax layout): m * V / ||V|| per kernel column, V = W + s A B."""
    v = kernel + s * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
    norm = jnp.sqrt(jnp.sum(v * v, axis=0))
    return m * v / (jax.lax.stop_gradient(norm) if stop else norm)


def test_dora_layer_gradient_is_the_stop_gradient_one():
    sites = adapters.Sites(AdapterConfig("dora", RANK, ADAPTER_TARGETS["reference"], scale=0.7))
    layer = sites.linear("image/transformer/resblocks/0/attn/q_proj", 24, 16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    layer.lora_b[...] = jnp.asarray(rng.normal(size=(RANK, 16)), jnp.float32)
    layer.dora_m[...] = layer.dora_m[...] * 1.5
    x = jnp.asarray(rng.normal(size=(5, 24)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(5, 16)), jnp.float32)
    graphdef, params = params_lib.split(layer)
    leaves = {n: params[n] for n in ("lora_a", "lora_b", "dora_m")}

    def loss(leaves):
        return jnp.sum(params_lib.merge(graphdef, {**params, **leaves})(x) * weights)

    def dense(leaves, stop):
        kernel = _dense_dora_kernel(
            layer.kernel[...], leaves["lora_a"], leaves["lora_b"], leaves["dora_m"], 0.7, stop
        )
        return jnp.sum((x @ kernel + layer.bias[...]) * weights)

    got = jax.jit(jax.grad(loss))(leaves)
    want = jax.jit(jax.grad(lambda t: dense(t, True)))(leaves)
    through_norm = jax.jit(jax.grad(lambda t: dense(t, False)))(leaves)
    for name in leaves:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)
    for name in ("lora_a", "lora_b"):  # the test can tell the two apart
        assert np.abs(through_norm[name] - want[name]).max() > 1e-2 * np.abs(want[name]).max()


def test_dora_model_gradient_treats_the_norm_as_constant():
    cfg = _cfg("dora", scale=0.7)
    cfg = cfg.replace(
        vision=dataclasses.replace(cfg.vision, layers=1),
        text=dataclasses.replace(cfg.text, layers=1),
    )
    graphdef, params = _params(cfg)
    params = _randomize(params, seed=3)
    trained, frozen = _partition(params, adapters.trainable)
    plain_graphdef, _ = _params(adapters.plain_config(cfg))
    pixels, _ = _inputs()
    weights = np.random.default_rng(5).normal(size=(3, TINY.embed_dim)).astype(np.float32)

    def objective(model):  # the image tower (the text tower's adapters get zero gradient)
        return jnp.sum(model.image(jnp.asarray(pixels))[0] * weights)

    def loss(trained):
        return objective(params_lib.merge(graphdef, _combine(trained, frozen)))

    def dense_loss(trained):
        flat = params_lib.flatten(_combine(trained, frozen))
        for module in _adapted_modules(flat):
            a, b, m = (flat.pop(f"{module}/{n}") for n in ("lora_a", "lora_b", "dora_m"))
            kernel = flat[f"{module}/kernel"]
            flat[f"{module}/kernel"] = _dense_dora_kernel(kernel, a, b, m, 0.7, stop=True)
        return objective(params_lib.merge(plain_graphdef, params_lib.unflatten(flat)))

    got = params_lib.flatten(jax.jit(jax.grad(loss))(trained))
    want = params_lib.flatten(jax.jit(jax.grad(dense_loss))(trained))
    assert got.keys() == want.keys() and len(got) == 24  # 3 leaves x 4 linears x 2 towers
    for path in got:
        if path.startswith("text/"):
            assert not np.any(got[path]) and not np.any(want[path]), path
            continue
        tol = 1e-4 * np.abs(want[path]).max() + 1e-7
        np.testing.assert_allclose(got[path], want[path], rtol=1e-3, atol=tol, err_msg=path)
        assert np.abs(want[path]).max() > 0, path


def _partition(params, select):
    flat = params_lib.flatten(params)
    return (
        params_lib.unflatten({k: v for k, v in flat.items() if select(k)}),
        params_lib.unflatten({k: v for k, v in flat.items() if not select(k)}),
    )


def _combine(*trees):
    flat = {}
    for tree in trees:
        flat.update(params_lib.flatten(tree))
    return params_lib.unflatten(flat)


def _expected_modules(names, towers=("image", "text"), blocks=(0, 1)):
    return {
        f"{tower}/transformer/resblocks/{i}/{name}"
        for tower in towers
        for i in blocks
        for name in names
    }


@pytest.mark.parametrize(
    "targets,blocks,expected",
    [
        ("reference", (), _expected_modules(REFERENCE)),
        ("all_linear", (), _expected_modules(BLOCK_LINEARS)),
        ("reference", (1,), _expected_modules(REFERENCE, blocks=(1,))),
        (r"text/.*/attn/(k|v)_proj", (), _expected_modules(REFERENCE[1:3], towers=("text",))),
        (r".*/mlp/c_fc", (0,), _expected_modules(["mlp/c_fc"], blocks=(0,))),
    ],
)  # fmt: skip
def test_targets_and_blocks(targets, blocks, expected):
    for kind in KINDS:
        cfg = _cfg(kind, targets=targets, blocks=blocks)
        adapter = cfg.adapter
        assert {p for p in clip_lib.linear_paths(cfg) if adapter.selects(p)} == expected
        _, params = params_lib.split(abstract_clip(cfg))
        flat = params_lib.flatten(params)
        assert _adapted_modules(flat) == expected, kind
        for module in expected:
            leaves = {k.rsplit("/", 1)[1] for k in flat if k.startswith(module + "/")}
            assert leaves == {"kernel", "bias", *adapters.LEAVES[kind]}, module


def test_reference_targets_leave_out_proj_and_c_fc_plain():
    model = models.create_model(_cfg("lora"))
    block = model.image.transformer.resblocks[0]
    assert isinstance(block.attn.q_proj, adapters.AdaptedLinear)
    assert isinstance(block.mlp.c_proj, adapters.AdaptedLinear)
    assert type(block.attn.out_proj) is type(block.mlp.c_fc) is not adapters.AdaptedLinear  # noqa: E721
    assert not any(re.search(r"(out_proj|c_fc)/(lora|dora|vera)", k) for k in _flat(model))


def _flat(model):
    return params_lib.flatten(params_lib.split(model)[1])


def test_bad_adapter_configs_are_refused():
    with pytest.raises(ValueError, match="kind"):
        AdapterConfig("ia3", 4, ".*")
    with pytest.raises(ValueError, match="rank"):
        AdapterConfig("lora", 0, ".*")
    with pytest.raises(ValueError, match="regex"):
        AdapterConfig("lora", 4, targets="(")
    with pytest.raises(ValueError, match="select no linear"):
        abstract_clip(_cfg("lora", targets=r".*/nothing"))
    with pytest.raises(ValueError, match="2 blocks"):
        abstract_clip(_cfg("lora", blocks=(0, 5)))
    with pytest.raises(ValueError, match="AdapterConfig"):
        TINY.replace(adapter={"kind": "lora"})


def test_vera_matrices_shared_by_shape_and_reproducible_from_the_seed():
    cfg = _cfg("vera", targets="all_linear", seed=3)
    model = models.create_model(cfg, seed=0)
    blocks = [*model.image.transformer.resblocks, *model.text.transformer.resblocks]
    square = [
        getattr(b.attn, n) for b in blocks for n in ("q_proj", "k_proj", "v_proj", "out_proj")
    ]
    assert all(lin.random_a is square[0].random_a for lin in square)  # one array, one Variable
    assert all(lin.random_b is square[0].random_b for lin in square)
    assert blocks[0].attn.q_proj.vera_b is not blocks[0].attn.k_proj.vera_b  # own b and d
    flat = _flat(model)
    shared = sorted(k for k in flat if adapters.is_frozen_adapter(k))
    # One pair per kernel shape: 64x64 (attention), 64x128/128x64 (image MLP), 64x256/256x64.
    assert shared == [
        f"adapter_shared/vera_{s}/random_{x}"
        for s in ("128x64", "256x64", "64x128", "64x256", "64x64")
        for x in "ab"
    ]
    assert not any("/transformer/" in k and "random" in k for k in flat)
    # Sharing survives split / merge (the training path).
    graphdef, params = params_lib.split(model)
    again = params_lib.merge(graphdef, params)
    block = again.text.transformer.resblocks[1].attn
    assert block.q_proj.random_a is again.image.transformer.resblocks[0].attn.v_proj.random_a
    # A pure function of the adapter seed: not of the model seed, different for another seed.
    other_model_seed = _flat(models.create_model(cfg, seed=1))
    other_seed = _flat(models.create_model(_cfg("vera", targets="all_linear", seed=4)))
    for path in shared:
        np.testing.assert_array_equal(other_model_seed[path], flat[path], err_msg=path)
        assert not np.allclose(other_seed[path], flat[path]), path
        in_dim, out_dim = map(int, re.search(r"vera_(\d+)x(\d+)", path).groups())
        remade = adapters.init_vera_shared(3, in_dim, out_dim, RANK)[path.rsplit("/", 1)[1]]
        np.testing.assert_array_equal(remade, flat[path])


def test_trainable_rule_and_split():
    cfg = _cfg("vera")
    _, params = _params(cfg)
    flat = params_lib.flatten(params)
    trained = sorted(k for k in flat if adapters.trainable(k))
    assert len(trained) == 32 and all(k.endswith(("vera_b", "vera_d")) for k in trained)
    assert adapters.is_adapter("adapter_shared/vera_64x64/random_a")
    assert not adapters.trainable("adapter_shared/vera_64x64/random_a")
    assert not adapters.is_adapter("image/transformer/resblocks/0/attn/q_proj/kernel")
    assert not adapters.is_adapter("logit_scale")
    base, ads = adapters.split_adapters(params)
    assert all(adapters.is_adapter(k) for k in params_lib.flatten(ads))
    plain = model_from_params(base, adapters.plain_config(cfg))  # loads into a plain CLIP
    assert plain.config.adapter is None and "adapter" not in repr(plain.config)
    assert "AdapterConfig(kind='vera'" in repr(cfg)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_round_trip(kind, tmp_path):
    cfg = _cfg(kind, targets=r".*/(attn/v_proj|mlp/c_fc)", blocks=(1,), scale=0.5, seed=9)
    graphdef, params = _params(cfg)
    model = params_lib.merge(graphdef, _randomize(params))
    path = tmp_path / "model.safetensors"
    models.save_model(path, model)
    loaded = models.load_model(path)
    assert loaded.config == cfg
    assert models.CLIPConfig.from_dict(cfg.to_dict()) == cfg
    want, got = _flat(model), _flat(loaded)
    assert got.keys() == want.keys()
    assert any(adapters.is_adapter(k) for k in got)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    if kind == "vera":
        a, b = loaded.image.transformer.resblocks[1], loaded.text.transformer.resblocks[1]
        assert a.attn.v_proj.random_a is b.attn.v_proj.random_a


def test_kaiming_uniform_bound():
    rank = 8
    cfg = _cfg("vera", targets="all_linear", rank=rank)
    flat = params_lib.flatten(
        adapters.add_adapters(_params(TINY)[1], _cfg("lora", targets="all_linear", rank=rank))
    )
    flat.update(_flat(models.create_model(cfg)))
    pools = {}
    for path, value in flat.items():
        name = path.rsplit("/", 1)[-1]
        if name in ("lora_a", "random_a"):
            fan_in = value.shape[0]  # A^T is [in, r]: torch fan_in = in
        elif name == "random_b":
            fan_in = rank  # B_r in R^{out x r}: torch fan_in = r
        else:
            continue
        pools.setdefault(math.sqrt(6 / ((1 + rank) * fan_in)), []).append(np.ravel(value))
    assert len(pools) == 4  # in = 64, 128, 256 and fan_in r
    for bound, values in pools.items():
        values = np.concatenate(values)
        assert np.abs(values).max() <= bound
        assert np.abs(values).max() > 0.9 * bound
        if values.size > 1000:
            np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=0.06)
            assert abs(values.mean()) < 0.05 * bound


def test_bfloat16_compute_close_to_float32():
    cfg = _cfg("dora", targets="all_linear", scale=0.7)  # as above: the float32 run is compiled
    graphdef, params = _params(cfg)
    params = _randomize(params)
    f32 = params_lib.merge(graphdef, params)
    bf16 = model_from_params(params, cfg.replace(dtype="bfloat16"))
    for got, want in zip(_embed(bf16), _embed(f32), strict=True):
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
