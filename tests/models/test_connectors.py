"""VLM connectors: VILA's 2x2 downsampling against a numpy loop, Idefics2's Perceiver connector
against transformers' `Idefics2Connector` on the same weights, the Perceiver's context padding
mask, and every connector inside the VLM."""

import numpy as np
import pytest
import torch
from flax import nnx

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.models import connectors, llama, vlm
from tests import compiled

LM = llama.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8)  # fmt: skip
PERCEIVER = dict(perceiver_latents=5, perceiver_depth=2, perceiver_heads=4, perceiver_kv_heads=2,
                 perceiver_head_dim=6)  # fmt: skip


def _cfg(connector, **options):
    return vlm.VLMConfig(vision=models.get_config("tiny"), lm=LM, image_token_id=49,
                         connector=connector, **options)  # fmt: skip


def _downsample_reference(x):
    """The VILA rule written out: token (i, j) of the half grid = patches (2i, 2j), (2i, 2j+1),
    (2i+1, 2j), (2i+1, 2j+1) of the zero-padded grid, features concatenated in that order."""
    n, tokens, c = x.shape
    g = int(round(tokens**0.5))
    grid = np.zeros((n, g + g % 2, g + g % 2, c), x.dtype)
    grid[:, :g, :g] = x.reshape(n, g, g, c)
    half = grid.shape[1] // 2
    out = np.zeros((n, half * half, 4 * c), x.dtype)
    for i in range(half):
        for j in range(half):
            block = [grid[:, 2 * i + a, 2 * j + b] for a in (0, 1) for b in (0, 1)]
            out[:, i * half + j] = np.concatenate(block, axis=-1)
    return out


@pytest.mark.parametrize("grid", [4, 5, 1])
def test_downsample_concatenates_2x2_neighbours(grid):
    x = np.random.default_rng(grid).normal(size=(2, grid * grid, 3)).astype(np.float32)
    got = np.asarray(connectors.downsample_2x2(x))
    np.testing.assert_array_equal(got, _downsample_reference(x))
    assert got.shape[1] == ((grid + 1) // 2) ** 2


def test_downsample_needs_a_square_grid():
    with pytest.raises(ValueError, match="square patch grid; got 6 tokens"):
        connectors.downsample_2x2(np.zeros((1, 6, 2), np.float32))


def _hf_connector(cfg):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.Idefics2Config(
        vision_config=dict(hidden_size=cfg.vision.vision.width),
        text_config=dict(model_type="mistral", hidden_size=LM.hidden_size,
                         intermediate_size=LM.intermediate_size, hidden_act="silu",
                         rms_norm_eps=LM.rms_norm_eps),
        perceiver_config=dict(hidden_act="silu", resampler_n_latents=cfg.perceiver_latents,
                              resampler_depth=cfg.perceiver_depth,
                              resampler_n_heads=cfg.perceiver_heads,
                              resampler_head_dim=cfg.perceiver_head_dim,
                              num_key_value_heads=cfg.perceiver_kv_heads,
                              rms_norm_eps=LM.rms_norm_eps),
    )  # fmt: skip
    hf_cfg.perceiver_config._attn_implementation = "eager"
    from transformers.models.idefics2 import modeling_idefics2

    torch.manual_seed(0)
    module = modeling_idefics2.Idefics2Connector(hf_cfg).eval()
    with torch.no_grad():  # non-trivial latents and norm gains (HF initialises them to ones)
        for name, p in module.named_parameters():
            if "norm" in name or name.endswith("latents"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    return module


def _ours_from_hf(cfg, hf) -> connectors.Perceiver:
    """Our Perceiver with the HF module's weights (linear weights transposed)."""
    ours = connectors.make(cfg, rngs=nnx.Rngs(0))
    graphdef, params = params_lib.split(ours)
    flat = params_lib.flatten(params)
    hf_state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    names = {"latents_norm": "input_latents_norm", "context_norm": "input_context_norm",
             "post_attention_norm": "post_attention_layernorm", "attn": "self_attn"}  # fmt: skip
    new = {}
    for path in flat:
        parts = path.split("/")
        if parts[0] == "layers":
            parts = ["perceiver_resampler", "layers", *[names.get(p, p) for p in parts[1:]]]
        elif parts[0] in ("latents", "norm"):
            parts = ["perceiver_resampler", *parts]
        key = ".".join(parts).replace(".kernel", ".weight").replace(".scale", ".weight")
        value = hf_state.pop(key)
        new[path] = value.T if path.endswith("kernel") else value
    assert not hf_state, sorted(hf_state)  # every HF weight was used
    return params_lib.merge(graphdef, params_lib.unflatten(new))


def test_perceiver_matches_transformers_idefics2_connector():
    cfg = _cfg("perceiver", **PERCEIVER)
    hf = _hf_connector(cfg)
    ours = _ours_from_hf(cfg, hf)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 16, cfg.vision.vision.width)).astype(np.float32)
    mask = np.ones((3, 16), bool)
    mask[1, 11:] = False  # row 1: five padded context tokens
    with torch.no_grad():
        want = hf(torch.from_numpy(x), torch.from_numpy(mask.astype(np.int64))).numpy()
    got = np.asarray(compiled.call(ours, x, mask))
    assert got.shape == (3, cfg.perceiver_latents, LM.hidden_size)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_perceiver_ignores_the_content_of_padded_context():
    cfg = _cfg("perceiver", **PERCEIVER)
    perceiver = connectors.make(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 16, cfg.vision.vision.width)).astype(np.float32)
    mask = np.arange(16)[None] < np.array([[16], [9]])
    changed = x.copy()
    changed[1, 9:] = 100 * rng.normal(size=changed[1, 9:].shape)
    a = np.asarray(compiled.call(perceiver, x, mask))
    b = np.asarray(compiled.call(perceiver, changed, mask))
    np.testing.assert_array_equal(a, b)
    unmasked = np.asarray(compiled.call(perceiver, changed))
    assert not np.allclose(unmasked, a)  # unmasked, the padding counts


@pytest.mark.parametrize("connector,tokens", [("linear", 16), ("mlp2x_gelu", 16),
                                              ("mlp_downsample", 4), ("perceiver", 5)])  # fmt: skip
def test_every_connector_feeds_the_vlm(connector, tokens):
    cfg = _cfg(connector, **PERCEIVER)
    assert cfg.image_seq_length == tokens  # tiny ViT: 4 x 4 patches
    model = vlm.create_vlm(cfg, seed=0)
    ids = np.ones((2, tokens + 3), np.int32)
    ids[0, 1 : 1 + tokens] = 49
    logits = compiled.call(
        model, ids, np.zeros((2, 32, 32, 3), np.float32), image_valid=np.array([True, False])
    )
    assert logits.shape == (2, tokens + 3, 50) and np.isfinite(np.asarray(logits)).all()


def test_connector_configuration_errors():
    with pytest.raises(ValueError, match="connector='qformer'"):
        _cfg("qformer")
    with pytest.raises(ValueError, match="needs vision_feature_select_strategy='default'"):
        _cfg("mlp_downsample", vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="perceiver_heads=5 is not a multiple"):
        _cfg("perceiver", perceiver_heads=5, perceiver_kv_heads=2)
    from fomo_jax.models import hf_lm

    with pytest.raises(ValueError, match="mlp2x_gelu projector; this VLM's connector is 'linear'"):
        hf_lm._vlm_table(_cfg("linear"))
