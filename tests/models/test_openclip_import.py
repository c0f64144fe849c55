"""OpenCLIP state dicts (classic `CLIP`, ViT) load and match the HF model they were made from.

The OpenCLIP files are written by this test with its own renaming (fused in_proj, [W, E]
projections, `visual.conv1`, ...), independent of fomo_jax's converter.
"""

import numpy as np
import pytest
import torch

from fomo_jax import models
from fomo_jax.models import checkpoint_io, convert
from tests.models.hf_util import hf_embeddings, make_hf_clip, random_inputs

TOL = 1e-5


def openclip_state_dict(hf_model) -> dict[str, torch.Tensor]:
    hf = hf_model.state_dict()
    out = {
        "visual.conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": hf["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": hf["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": hf["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": hf["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": hf["vision_model.post_layernorm.bias"],
        "visual.proj": hf["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": hf["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": hf["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": hf["text_model.final_layer_norm.weight"],
        "ln_final.bias": hf["text_model.final_layer_norm.bias"],
        "text_projection": hf["text_projection.weight"].T.contiguous(),
        "logit_scale": hf["logit_scale"],
    }
    context = out["positional_embedding"].shape[0]
    out["attn_mask"] = torch.full((context, context), float("-inf")).triu(1)  # old files have it
    for src, dst, n in (
        ("vision_model", "visual.transformer", hf_model.config.vision_config.num_hidden_layers),
        ("text_model", "transformer", hf_model.config.text_config.num_hidden_layers),
    ):
        for i in range(n):
            a, b = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{b}attn.in_proj_{kind}"] = torch.cat(
                    [hf[f"{a}self_attn.{p}_proj.{kind}"] for p in "qkv"]
                )
                out[f"{b}attn.out_proj.{kind}"] = hf[f"{a}self_attn.out_proj.{kind}"]
                out[f"{b}ln_1.{kind}"] = hf[f"{a}layer_norm1.{kind}"]
                out[f"{b}ln_2.{kind}"] = hf[f"{a}layer_norm2.{kind}"]
                out[f"{b}mlp.c_fc.{kind}"] = hf[f"{a}mlp.fc1.{kind}"]
                out[f"{b}mlp.c_proj.{kind}"] = hf[f"{a}mlp.fc2.{kind}"]
    return out


@pytest.fixture(scope="module")
def hf_model():
    # 64-dim heads: what the shape-based fallback assumes for architectures it cannot name.
    return make_hf_clip("head64")


def _assert_matches(model, hf_model):
    pixels, ids = random_inputs(hf_model)
    want_image, want_text = hf_embeddings(hf_model, pixels, ids)
    np.testing.assert_allclose(np.asarray(model.encode_image(pixels)), want_image, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.encode_text(ids)), want_text, atol=TOL, rtol=0)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".safetensors"])
def test_openclip_file_matches_hf(hf_model, tmp_path, suffix):
    state = openclip_state_dict(hf_model)
    path = tmp_path / f"open_clip_model{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, path)
    else:  # OpenCLIP training checkpoints wrap the weights and carry DataParallel prefixes
        wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
        torch.save(wrapped if suffix == ".pt" else state, path)
    # The tiny shapes match no OpenCLIP architecture: heads fall back to width // 64.
    model = models.load_pretrained(path, activation="quick_gelu")
    assert (model.config.vision.heads, model.config.text.heads) == (2, 1)
    _assert_matches(model, hf_model)


def test_explicit_heads_for_other_head_widths(tmp_path):
    hf_model = make_hf_clip("gelu_3x3")  # 16- and 8-dim heads
    path = tmp_path / "m.bin"
    torch.save(openclip_state_dict(hf_model), path)
    with pytest.raises(ValueError, match="heads="):
        models.load_pretrained(path)
    _assert_matches(models.load_pretrained(path, heads=(3, 4)), hf_model)


def test_activation_is_not_guessed_wrong(hf_model, tmp_path):
    """OpenCLIP files do not record the activation; the wrong one gives wrong embeddings."""
    path = tmp_path / "m.bin"
    torch.save(openclip_state_dict(hf_model), path)
    with pytest.raises(AssertionError):
        _assert_matches(models.load_pretrained(path, activation="gelu"), hf_model)


def _shapes_of(name):
    """Key shapes of a classic OpenCLIP ViT written out by hand from OpenCLIP's configs."""
    arch = {  # width, layers, patch, text width, text layers, embed
        "ViT-B-32": (768, 12, 32, 512, 12, 512),
        "ViT-B-16": (768, 12, 16, 512, 12, 512),
        "ViT-L-14": (1024, 24, 14, 768, 12, 768),
        "ViT-S-16": (384, 12, 16, 384, 12, 384),
    }[name]
    w, layers, patch, tw, tlayers, embed = arch
    grid = 224 // patch
    shapes = {
        "visual.conv1.weight": (w, 3, patch, patch),
        "visual.class_embedding": (w,),
        "visual.positional_embedding": (grid * grid + 1, w),
        "visual.ln_pre.weight": (w,),
        "visual.ln_pre.bias": (w,),
        "visual.ln_post.weight": (w,),
        "visual.ln_post.bias": (w,),
        "visual.proj": (w, embed),
        "token_embedding.weight": (49408, tw),
        "positional_embedding": (77, tw),
        "ln_final.weight": (tw,),
        "ln_final.bias": (tw,),
        "text_projection": (tw, embed),
        "logit_scale": (),
    }
    for prefix, width, n in (("visual.transformer", w, layers), ("transformer", tw, tlayers)):
        for i in range(n):
            b = f"{prefix}.resblocks.{i}."
            shapes.update(
                {
                    b + "attn.in_proj_weight": (3 * width, width),
                    b + "attn.in_proj_bias": (3 * width,),
                    b + "attn.out_proj.weight": (width, width),
                    b + "attn.out_proj.bias": (width,),
                    b + "ln_1.weight": (width,),
                    b + "ln_1.bias": (width,),
                    b + "ln_2.weight": (width,),
                    b + "ln_2.bias": (width,),
                    b + "mlp.c_fc.weight": (4 * width, width),
                    b + "mlp.c_fc.bias": (4 * width,),
                    b + "mlp.c_proj.weight": (width, 4 * width),
                    b + "mlp.c_proj.bias": (width,),
                }
            )
    return shapes


@pytest.mark.parametrize(
    "name,heads",
    [("ViT-B-32", (12, 8)), ("ViT-B-16", (12, 8)), ("ViT-L-14", (16, 12)), ("ViT-S-16", (6, 6))],
)
def test_name_inferred_from_shapes(name, heads):
    state = {k: np.zeros(s, np.float32) for k, s in _shapes_of(name).items()}
    shaped = convert.config_from_hf_state(
        convert.openclip_to_hf_state(state),
        vision_heads=1,
        text_heads=1,
        activation="gelu",
        layer_norm_eps=1e-5,
    )
    assert convert.infer_openclip_name(shaped) == name
    assert (models.get_config(name).vision.heads, models.get_config(name).text.heads) == heads


def test_full_size_checkpoint_loads_with_inferred_heads(tmp_path):
    """A ViT-B-32-shaped OpenCLIP file: name inferred, heads 12/8, a forward pass runs."""
    rng = np.random.default_rng(0)
    state = {
        k: 0.02 * rng.standard_normal(s, dtype=np.float32)
        for k, s in _shapes_of("ViT-B-32").items()
    }
    path = tmp_path / "b32.safetensors"
    checkpoint_io.write_safetensors(path, state)
    model = models.load_pretrained(path)
    assert (model.config.vision.heads, model.config.text.heads) == (12, 8)
    assert model.config.activation == "gelu"
    ids = np.zeros((1, 77), np.int32)
    ids[0, :3] = [49406, 320, 49407]
    assert np.asarray(model.encode_text(ids)).shape == (1, 512)


def test_given_name_must_match_shapes(hf_model, tmp_path):
    path = tmp_path / "m.bin"
    torch.save(openclip_state_dict(hf_model), path)
    with pytest.raises(ValueError, match="ViT-B-16"):
        models.load_pretrained(path, model_name="ViT-B-16")


def test_unsupported_towers_are_named(tmp_path):
    path = tmp_path / "timm.safetensors"
    checkpoint_io.write_safetensors(path, {"visual.trunk.stem.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="timm"):
        models.load_pretrained(path)
