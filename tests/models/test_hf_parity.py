"""fomo_jax CLIP == Hugging Face PyTorch CLIP on the same weights (float32, CPU)."""

import json
import os

import numpy as np
import pytest
import torch

from fomo_jax import models
from fomo_jax.models import checkpoint_io
from tests.models.hf_util import SHAPES, hf_embeddings, make_hf_clip, random_inputs

TOL = 1e-5


@pytest.fixture(scope="module", params=sorted(SHAPES))
def hf_dir(request, tmp_path_factory):
    model = make_hf_clip(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return model, path


def test_embeddings_match_hf(hf_dir):
    hf_model, path = hf_dir
    model = models.load_pretrained(path)
    pixels, ids = random_inputs(hf_model)
    want_image, want_text = hf_embeddings(hf_model, pixels, ids)
    np.testing.assert_allclose(np.asarray(model.encode_image(pixels)), want_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(ids)), want_text, atol=TOL, rtol=0)
    assert float(model.logit_scale[...]) == pytest.approx(hf_model.logit_scale.item(), abs=1e-7)
    # The outputs are O(1), so 1e-5 is a real constraint, not a vacuous one.
    assert np.abs(want_image).mean() > 0.1 and np.abs(want_text).mean() > 0.1


def test_architecture_read_from_checkpoint(hf_dir):
    hf_model, path = hf_dir
    cfg = models.load_pretrained(path).config
    hv, ht = hf_model.config.vision_config, hf_model.config.text_config
    assert (cfg.vision.width, cfg.vision.layers, cfg.vision.heads, cfg.vision.mlp_dim) == (
        hv.hidden_size,
        hv.num_hidden_layers,
        hv.num_attention_heads,
        hv.intermediate_size,
    )
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (hv.image_size, hv.patch_size)
    assert (cfg.text.width, cfg.text.layers, cfg.text.heads, cfg.text.mlp_dim) == (
        ht.hidden_size,
        ht.num_hidden_layers,
        ht.num_attention_heads,
        ht.intermediate_size,
    )
    assert (cfg.text.vocab_size, cfg.text.context_length) == (
        ht.vocab_size,
        ht.max_position_embeddings,
    )
    assert cfg.layer_norm_eps == hv.layer_norm_eps
    assert cfg.embed_dim == hf_model.config.projection_dim


def test_pytorch_model_bin_directory(tmp_path):
    """`pytorch_model.bin` (torch.save zip) loads without torch and matches HF."""
    hf_model = make_hf_clip("gelu_3x3", seed=3)
    hf_model.config.save_pretrained(tmp_path)
    torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model = models.load_pretrained(tmp_path)
    pixels, ids = random_inputs(hf_model, seed=1)
    want_image, want_text = hf_embeddings(hf_model, pixels, ids)
    np.testing.assert_allclose(np.asarray(model.encode_image(pixels)), want_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(ids)), want_text, atol=TOL, rtol=0)


def test_sharded_checkpoint_directory(tmp_path):
    """Large HF checkpoints come as several safetensors files plus an index."""
    hf_model = make_hf_clip("gelu_3x3", seed=4)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = models.load_pretrained(tmp_path)
    pixels, ids = random_inputs(hf_model, seed=5)
    want_image, want_text = hf_embeddings(hf_model, pixels, ids)
    np.testing.assert_allclose(np.asarray(model.encode_image(pixels)), want_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(ids)), want_text, atol=TOL, rtol=0)


def test_export_round_trip(hf_dir, tmp_path):
    """load -> export_hf reproduces the original tensors exactly, and HF loads the export."""
    from transformers import CLIPModel

    hf_model, path = hf_dir
    models.export_hf(models.load_pretrained(path), tmp_path)
    exported = checkpoint_io.read_safetensors(tmp_path / "model.safetensors")
    original = {k: v.numpy() for k, v in hf_model.state_dict().items() if "position_ids" not in k}
    assert sorted(exported) == sorted(original)
    for key, value in original.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)
    reloaded = CLIPModel.from_pretrained(tmp_path).eval()
    pixels, ids = random_inputs(hf_model, seed=2)
    for got, want in zip(
        hf_embeddings(reloaded, pixels, ids), hf_embeddings(hf_model, pixels, ids), strict=False
    ):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["vision_config"]["num_attention_heads"] == (
        hf_model.config.vision_config.num_attention_heads
    )


def test_config_defaults_when_keys_are_missing(hf_dir, tmp_path):
    """A config.json that omits keys falls back to transformers' CLIP defaults."""
    hf_model, path = hf_dir
    for name in os.listdir(path):
        os.link(path / name, tmp_path / name)
    config = json.loads((path / "config.json").read_text())
    for tower in ("vision_config", "text_config"):
        config[tower].pop("hidden_act")
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert models.load_pretrained(tmp_path).config.activation == "quick_gelu"


def test_bfloat16_compute_close_to_float32(hf_dir):
    hf_model, path = hf_dir
    f32 = models.load_pretrained(path)
    bf16 = models.load_pretrained(path, dtype="bfloat16")
    pixels, ids = random_inputs(hf_model)
    for a, b in (
        (f32.encode_image(pixels), bf16.encode_image(pixels)),
        (f32.encode_text(ids), bf16.encode_text(ids)),
    ):
        a, b = np.asarray(a), np.asarray(b)
        assert b.dtype == np.float32
        cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
        assert cos.min() > 0.99
        assert np.abs(a - b).max() > 0  # bf16 really was used


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        models.load_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.load_pretrained(tmp_path / "nowhere.safetensors")


def test_wrong_layout_names_the_keys(hf_dir, tmp_path):
    hf_model, path = hf_dir
    state = checkpoint_io.read_safetensors(path / "model.safetensors")
    del state["vision_model.pre_layrnorm.weight"]
    state["vision_model.extra.weight"] = np.zeros(3, np.float32)
    checkpoint_io.write_safetensors(tmp_path / "model.safetensors", state)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"pre_layrnorm\.weight.*extra\.weight"):
        models.load_pretrained(tmp_path)
