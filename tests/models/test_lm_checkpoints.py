"""HF decoder-LM and LLaVA checkpoints in and out (fomo_jax.models.hf_lm) against transformers.

Every checkpoint is a tiny random model that transformers builds and saves here (float32,
CPU); logits are compared at the non-padding positions as max |ours - HF| / max |HF|.
"""

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fomo_jax import models
from fomo_jax import params as params_lib
from fomo_jax.models import connectors, hf_lm
from tests.models.hf_util import make_hf_clip

TOL = 1e-4

_LM = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2)
LM_SPECS = {
    # name: (HF config, input length, LlamaConfig fields the loader must read)
    "llama_gqa_theta": (
        transformers.LlamaConfig(
            **_LM, num_attention_heads=6, num_key_value_heads=2, rope_theta=5000.0
        ),
        11,
        dict(num_key_value_heads=2, head_dim=8, rope_theta=5000.0, qkv_bias=False),
    ),
    "llama_bias": (
        transformers.LlamaConfig(
            **_LM,
            num_attention_heads=6,
            num_key_value_heads=3,
            head_dim=12,
            attention_bias=True,
            mlp_bias=True,
            rms_norm_eps=1e-5,
            hidden_act="gelu_pytorch_tanh",
        ),
        11,
        dict(head_dim=12, qkv_bias=True, o_bias=True, mlp_bias=True, rms_norm_eps=1e-5),
    ),
    "llama3_rope": (
        transformers.LlamaConfig(
            **_LM,
            num_attention_heads=3,
            num_key_value_heads=1,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            ),
        ),
        11,
        dict(head_dim=16, rope_theta=500000.0),
    ),
    "qwen2_tied": (
        transformers.Qwen2Config(
            **_LM, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True
        ),
        11,
        dict(qkv_bias=True, o_bias=False, tie_word_embeddings=True, sliding_window=None),
    ),
    "mistral_window": (  # the input is exactly as long as the window
        transformers.MistralConfig(
            **_LM, num_attention_heads=6, num_key_value_heads=2, sliding_window=12
        ),
        12,
        dict(sliding_window=12, model_type="mistral"),
    ),
}
HF_LM_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random at O(1) output scale (HF's init leaves norms at 1 and biases at
    0, which would hide a missing or misplaced norm or bias)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in key or "layrnorm" in key:
                p.copy_((1.0 if key.endswith("weight") else 0.0) + 0.2 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / (2.0 if "embed" in key else p.shape[-1] ** 0.5))
            else:
                p.copy_(0.2 * noise)
    return model.eval()


def _rel_err(got, want, valid) -> float:
    got, want = np.asarray(got), np.asarray(want)
    return float(np.abs(got - want)[valid].max() / np.abs(want[valid]).max())


def _lm_inputs(vocab: int, length: int, seed: int = 0):
    """Three rows: full, left-padded by 3, right-padded by 2."""
    ids = np.random.default_rng(seed).integers(0, vocab, (3, length))
    mask = np.ones((3, length), np.int64)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    return ids, mask


def _hf_logits(model, ids, mask, **extra) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **extra)
    return out.logits.numpy()


def _copy_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def saved_lm(tmp_path_factory):
    """name -> (HF model, saved directory), each LM spec built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            hf_config = LM_SPECS[name][0]
            torch.manual_seed(0)
            model = _randomise(HF_LM_CLASSES[hf_config.model_type](hf_config), seed=1)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            if name == "qwen2_tied":
                # Released Qwen2 configs carry a sliding_window with use_sliding_window false,
                # and no layer_types (transformers 4): the window must then not apply, though
                # max_window_layers would make every layer slide.
                config = json.loads((path / "config.json").read_text())
                assert config.pop("use_sliding_window") is False  # false is the default
                del config["layer_types"]
                config.update(sliding_window=4, max_window_layers=0)
                (path / "config.json").write_text(json.dumps(config))
            cache[name] = model, path
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(LM_SPECS))
def test_lm_logits_match_transformers(saved_lm, name):
    hf_model, path = saved_lm(name)
    _, length, fields = LM_SPECS[name]
    model = models.load_pretrained(path)
    assert isinstance(model, models.LanguageModel)
    assert {k: getattr(model.config, k) for k in fields} == fields
    ids, mask = _lm_inputs(hf_model.config.vocab_size, length)
    want = _hf_logits(hf_model, ids, mask)
    err = _rel_err(model(ids, attention_mask=mask), want, mask.astype(bool))
    print(f"{name}: max relative logit error {err:.1e}")
    assert err <= TOL
    assert np.abs(want).max() > 1.0  # O(1) logits: the tolerance is a real constraint


def test_llama3_rope_scaling_changes_the_logits(saved_lm):
    """The llama3 case above would fail if the scaling were dropped."""
    hf_model, path = saved_lm("llama3_rope")
    model = models.load_pretrained(path)
    assert dict(model.config.rope_scaling)["rope_type"] == "llama3"
    graphdef, params = params_lib.split(models.create_lm(model.config.replace(rope_scaling=())))
    unscaled = params_lib.merge(graphdef, params_lib.split(model)[1])
    ids, mask = _lm_inputs(hf_model.config.vocab_size, 11)
    want = _hf_logits(hf_model, ids, mask)
    assert _rel_err(unscaled(ids, attention_mask=mask), want, mask.astype(bool)) > 1e-2


@pytest.mark.parametrize("name", sorted(LM_SPECS))
def test_lm_export_loads_in_transformers(saved_lm, tmp_path, name):
    hf_model, path = saved_lm(name)
    models.export_hf(models.load_pretrained(path), tmp_path)
    exported = load_file(tmp_path / "model.safetensors")
    original = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        del original["lm_head.weight"]  # transformers does not save a tied head either
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(hf_model)
    ids, mask = _lm_inputs(hf_model.config.vocab_size, LM_SPECS[name][1], seed=1)
    err = _rel_err(_hf_logits(reloaded, ids, mask), _hf_logits(hf_model, ids, mask), mask > 0)
    print(f"{name} export: max relative logit error {err:.1e}")
    assert err <= 1e-6
    assert models.load_pretrained(tmp_path).config == models.load_pretrained(path).config


def test_mistral_input_longer_than_the_window_is_refused(saved_lm):
    _, path = saved_lm("mistral_window")
    model = models.load_pretrained(path)
    with pytest.raises(ValueError, match=r"sliding_window=12 .*13 positions"):
        model(np.zeros((1, 13), np.int32))


@pytest.fixture(scope="module")
def llama_dir(saved_lm):
    return saved_lm("llama_gqa_theta")


@pytest.mark.parametrize("form", ["bfloat16", "sharded", "pytorch_model.bin"])
def test_weight_file_forms(llama_dir, tmp_path, form):
    hf_model, _ = llama_dir
    reference = hf_model
    if form == "bfloat16":
        copy.deepcopy(hf_model).to(torch.bfloat16).save_pretrained(tmp_path)
        with safe_open(tmp_path / "model.safetensors", framework="flax") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        # transformers in float32 on the same bf16-rounded weights (loaded from the file: a
        # model cast to bf16 and back would also have rounded its RoPE frequencies)
        reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    elif form == "sharded":
        hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    else:
        hf_model.config.save_pretrained(tmp_path)
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model = models.load_pretrained(tmp_path)
    leaves = params_lib.flatten(params_lib.split(model)[1]).values()
    assert {v.dtype for v in leaves} == {np.dtype(np.float32)}
    ids, mask = _lm_inputs(hf_model.config.vocab_size, 11, seed=2)
    want = _hf_logits(reference, ids, mask)
    err = _rel_err(model(ids, attention_mask=mask), want, mask > 0)
    print(f"{form}: max relative logit error {err:.1e}")
    assert err <= TOL
    if form == "bfloat16":  # the rounding is visible: not the float32 weights by accident
        assert _rel_err(_hf_logits(hf_model, ids, mask), want, mask > 0) > 1e-3


def test_compute_dtype_is_passed_through(llama_dir):
    hf_model, path = llama_dir
    model = models.load_pretrained(path, dtype="bfloat16")
    assert model.config.dtype == "bfloat16"
    leaves = params_lib.flatten(params_lib.split(model)[1]).values()
    assert {v.dtype for v in leaves} == {np.dtype(np.float32)}
    ids, mask = _lm_inputs(hf_model.config.vocab_size, 11)
    err = _rel_err(model(ids, attention_mask=mask), _hf_logits(hf_model, ids, mask), mask > 0)
    assert 1e-4 < err < 5e-2  # bf16 matmuls: close, not equal


def test_wrong_keys_are_named(llama_dir, tmp_path):
    _, path = llama_dir
    shutil.copy(path / "config.json", tmp_path / "config.json")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.self_attn.q_norm.weight"] = np.ones(8, np.float32)
    state["model.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # a buffer: ignored
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(
        ValueError,
        match=r"missing \['model\.layers\.1\.mlp\.up_proj\.weight'\]"
        r".*unexpected \['model\.layers\.0\.self_attn\.q_norm\.weight'\]",
    ):
        models.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            dict(rope_parameters=dict(rope_type="yarn", factor=4.0, rope_theta=1e4)),
            r"rope_parameters\.rope_type='yarn'",
        ),
        (dict(rope_scaling=dict(type="dynamic", factor=2.0)), r"rope_scaling\.rope_type='dynamic'"),
        (
            dict(rope_parameters=dict(rope_type="longrope", rope_theta=1e4)),
            r"rope_parameters\.rope_type='longrope'",
        ),
        (dict(rope_parameters=dict(rope_type="linear", rope_theta=1e4)), r"lacks \['factor'\]"),
        (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0\.5"),
        (
            dict(rope_parameters=dict(full_attention=dict(rope_type="default"))),
            r"rope_parameters per layer type \['full_attention'\]",
        ),
    ],
)
def test_unsupported_rope_is_refused(llama_dir, tmp_path, changes, match):
    _, path = llama_dir
    with pytest.raises(ValueError, match=match):
        models.load_pretrained(_copy_with_config(path, tmp_path / "ckpt", **changes))


def test_rope_read_like_transformers():
    """Theta at the top level (transformers 4) or inside rope_parameters (5); a legacy
    rope_scaling dict with `type`; llama3's pretraining length defaults to the model's."""
    base = dict(
        model_type="llama",
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=10,
        intermediate_size=8,
        num_hidden_layers=1,
        max_position_embeddings=64,
    )
    read = lambda **kw: hf_lm.lm_config_from_hf({**base, **kw})  # noqa: E731
    assert read(rope_theta=123.0).rope_theta == 123.0
    assert read(rope_parameters=dict(rope_theta=77.0, rope_type="default")).rope_theta == 77.0
    assert read().rope_theta == 10000.0
    linear = read(rope_theta=5.0, rope_scaling=dict(type="linear", factor=2.0))
    assert (linear.rope_theta, dict(linear.rope_scaling)) == (
        5.0,
        {"rope_type": "linear", "factor": 2.0},
    )
    llama3 = read(
        rope_parameters=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0
        )
    )
    assert dict(llama3.rope_scaling)["original_max_position_embeddings"] == 64


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"model_type='gpt2'.*'clip', 'llama', .*'llava'"):
        models.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='gpt2'"):
        hf_lm.load_pretrained(tmp_path)


def test_clip_options_are_refused_for_an_lm(llama_dir):
    with pytest.raises(TypeError, match=r"\['heads'\] apply to CLIP"):
        models.load_pretrained(llama_dir[1], heads=(2, 2))


@pytest.mark.parametrize(
    "changes",
    [
        dict(),
        dict(
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            rope_scaling=(("factor", 2.0), ("rope_type", "linear")),
        ),
        dict(model_type="qwen2", qkv_bias=True, tie_word_embeddings=True, sliding_window=64),
        dict(model_type="mistral", sliding_window=32, hidden_act="gelu", head_dim=16),
    ],
)
def test_lm_config_round_trip(changes):
    cfg = models.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ).replace(**changes)
    assert hf_lm.lm_config_from_hf(hf_lm.lm_config_to_hf(cfg)) == cfg


def test_export_refuses_a_layout_the_model_type_cannot_hold():
    cfg = models.LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        qkv_bias=True,
    )
    with pytest.raises(ValueError, match=r"not a llama layout; model_type \['qwen2'\]"):
        hf_lm.lm_config_to_hf(cfg)


# ---------------------------------------------------------------------------------------- LLaVA

_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)
LLAVA_SPECS = {
    # name: (LlavaConfig kwargs, visual tokens per image)
    "llava_llama": (
        dict(
            vision_config=transformers.CLIPVisionConfig(**_VISION, hidden_act="quick_gelu"),
            text_config=transformers.LlamaConfig(
                **{**_LM, "vocab_size": 120}, num_attention_heads=6, num_key_value_heads=2
            ),
            image_token_index=119,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            image_seq_length=16,
        ),
        16,
    ),
    "llava_qwen2_full": (
        dict(
            vision_config=transformers.CLIPVisionConfig(**_VISION, hidden_act="gelu"),
            text_config=transformers.Qwen2Config(
                **{**_LM, "vocab_size": 120}, num_attention_heads=6, num_key_value_heads=3
            ),
            image_token_index=117,
            vision_feature_layer=[-3, -1],
            vision_feature_select_strategy="full",
            projector_hidden_act="gelu_pytorch_tanh",
            image_seq_length=17,
            tie_word_embeddings=True,
        ),  # tied at the top level only
        17,
    ),
}


def _layout(key: str, layout: str) -> str:
    """A key of transformers' in-memory LLaVA (5.x: `model.vision_tower.embeddings…`) in one
    of the file layouts: `new` (4.52+: `model.vision_tower.vision_model.…`, `lm_head.…`) or
    `old` (< 4.52: `vision_tower.vision_model.…`, `language_model.model.…`)."""
    key = re.sub(
        r"^model\.vision_tower\.(?!vision_model\.)", "model.vision_tower.vision_model.", key
    )
    if layout == "old":
        key = re.sub(r"^model\.language_model\.", "language_model.model.", key)
        key = re.sub(r"^lm_head\.", "language_model.lm_head.", key)
        key = re.sub(r"^model\.", "", key)
    return key


@pytest.fixture(scope="module", params=sorted(LLAVA_SPECS))
def hf_llava_dir(request, tmp_path_factory):
    kwargs, seq = LLAVA_SPECS[request.param]
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(**kwargs))
    model = _randomise(model, seed=3)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path, seq


def _llava_inputs(hf_model, seq: int, seed: int = 0):
    """Row 0: two images; row 1: text only, left-padded by 3; row 2: one image."""
    token = hf_model.config.image_token_index
    size = hf_model.config.vision_config.image_size
    rng = np.random.default_rng(seed)
    length = 2 * seq + 8
    ids = rng.integers(0, token, (3, length))
    ids[0, 1 : 1 + seq] = ids[0, 3 + seq : 3 + 2 * seq] = token
    ids[2, 4 : 4 + seq] = token
    mask = np.ones((3, length), np.int64)
    mask[1, :3] = 0
    images = rng.standard_normal((3, 2, size, size, 3)).astype(np.float32)
    valid = np.array([[True, True], [False, False], [True, False]])
    hf_pixels = torch.from_numpy(images[valid].transpose(0, 3, 1, 2).copy())
    return ids, mask, images, valid, hf_pixels


@pytest.mark.parametrize("layout", ["saved", "new", "old"])
def test_llava_logits_match_transformers(hf_llava_dir, tmp_path, layout):
    name, hf_model, path, seq = hf_llava_dir
    if layout != "saved":  # the same tensors under another layout's keys
        shutil.copy(path / "config.json", tmp_path / "config.json")
        state = {_layout(k, layout): v.numpy() for k, v in hf_model.state_dict().items()}
        save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
        path = tmp_path
    model = models.load_pretrained(path)
    assert isinstance(model, models.VisionLanguageModel)
    assert model.config.image_seq_length == seq
    ids, mask, images, valid, hf_pixels = _llava_inputs(hf_model, seq)
    want = _hf_logits(hf_model, ids, mask, pixel_values=hf_pixels)
    got = model(ids, images, image_valid=valid, attention_mask=mask)
    err = _rel_err(got, want, mask > 0)
    print(f"{name} {layout} layout: max relative logit error {err:.1e}")
    assert err <= TOL
    assert np.abs(want).max() > 1.0


def test_llava_export_loads_in_transformers(hf_llava_dir, tmp_path):
    name, hf_model, path, seq = hf_llava_dir
    model = models.load_pretrained(path)
    models.export_hf(model, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert all(
        re.match(
            r"^(model\.(vision_tower\.vision_model|multi_modal_projector|"
            r"language_model)|lm_head)\.",
            k,
        )
        for k in keys
    )
    reloaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids, mask, images, valid, hf_pixels = _llava_inputs(hf_model, seq, seed=1)
    want = _hf_logits(hf_model, ids, mask, pixel_values=hf_pixels)
    err = _rel_err(_hf_logits(reloaded, ids, mask, pixel_values=hf_pixels), want, mask > 0)
    print(f"{name} export: max relative logit error {err:.1e}")
    assert err <= 1e-6
    assert models.load_pretrained(tmp_path).config == model.config


def test_llava_image_token_count_mismatch(hf_llava_dir):
    name, hf_model, path, seq = hf_llava_dir
    model = models.load_pretrained(path)
    ids, _, images, valid, _ = _llava_inputs(hf_model, seq)
    valid = valid.copy()
    valid[0, 1] = False  # row 0 keeps its two runs of image tokens but has one image
    with pytest.raises(ValueError, match=rf"{3 * seq} image tokens.*2 images.*= {2 * seq}"):
        model(ids, images, image_valid=valid)


def test_llava_image_seq_length_mismatch(hf_llava_dir, tmp_path):
    _, _, path, seq = hf_llava_dir
    with pytest.raises(ValueError, match=rf"image_seq_length={seq - 1}.*gives {seq} visual"):
        models.load_pretrained(_copy_with_config(path, tmp_path / "ckpt", image_seq_length=seq - 1))


def test_vlm_from_parts(llama_dir, tmp_path):
    """The CLIP checkpoint's image tower and the LM checkpoint's decoder, as they are; a
    fresh projector from `seed`."""
    _, lm_path = llama_dir
    make_hf_clip("quickgelu_eps").save_pretrained(tmp_path)
    vlm = hf_lm.vlm_from_parts(tmp_path, lm_path, image_token_id=96, seed=5)
    parts = params_lib.split(vlm)[1]
    clip_image = params_lib.flatten(params_lib.split(models.load_pretrained(tmp_path))[1]["image"])
    assert clip_image.pop("proj") is not None
    assert set(params_lib.flatten(parts["image"])) == set(clip_image)
    for key, value in params_lib.flatten(parts["image"]).items():
        np.testing.assert_array_equal(value, clip_image[key], err_msg=key)
    lm = params_lib.flatten(params_lib.split(models.load_pretrained(lm_path))[1]["lm"])
    for key, value in params_lib.flatten(parts["lm"]).items():
        np.testing.assert_array_equal(value, lm[key], err_msg=key)
    assert vlm.config.vision.activation == "quick_gelu" and vlm.config.lm.rope_theta == 5000.0
    fresh = lambda seed: params_lib.flatten(  # noqa: E731
        params_lib.split(connectors.make(vlm.config, rngs=nnx.Rngs(seed)))[1]
    )
    for key, value in params_lib.flatten(parts["connector"]).items():
        np.testing.assert_array_equal(value, fresh(5)[key], err_msg=key)
    assert not np.array_equal(parts["connector"]["linear_1"]["kernel"], fresh(6)["linear_1/kernel"])
    ids = np.full((1, vlm.config.image_seq_length + 2), 96)
    ids[0, -2:] = (3, 4)
    logits = vlm(ids, np.zeros((1, 32, 32, 3), np.float32))
    assert logits.shape == (1, ids.shape[1], 97) and np.isfinite(logits).all()
