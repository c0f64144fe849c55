"""Tiny random Hugging Face CLIP models for parity tests (built locally, never downloaded)."""

import math

import numpy as np
import torch
from transformers import CLIPConfig, CLIPModel

SHAPES = {
    # name: (vision kwargs, text kwargs, projection_dim)
    "gelu_3x3": (
        dict(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=3,
            image_size=30,
            patch_size=6,
            hidden_act="gelu",
        ),
        dict(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=12,
            hidden_act="gelu",
        ),
        24,
    ),
    "quickgelu_eps": (
        dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-6,
        ),
        dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=8,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-6,
        ),
        16,
    ),
    "head64": (  # OpenCLIP's default 64-dim heads, the fallback for unknown architectures
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=24,
            patch_size=8,
            hidden_act="quick_gelu",
        ),
        dict(
            vocab_size=120,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            max_position_embeddings=10,
            hidden_act="quick_gelu",
        ),
        32,
    ),
    "tanh_1layer": (
        dict(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=1,
            image_size=16,
            patch_size=4,
            hidden_act="gelu_pytorch_tanh",
        ),
        dict(
            vocab_size=50,
            hidden_size=24,
            intermediate_size=40,
            num_hidden_layers=1,
            num_attention_heads=3,
            max_position_embeddings=9,
            hidden_act="gelu_pytorch_tanh",
        ),
        8,
    ),
}


def make_hf_clip(name: str, seed: int = 0) -> CLIPModel:
    """A HF CLIPModel with every parameter randomised to O(1)-scale outputs.

    HF initialises LayerNorms to (1, 0) and biases to 0; randomising them makes any mix-up
    of scale/bias or a missing LayerNorm visible in the outputs.
    """
    vision, text, proj = SHAPES[name]
    vocab = text["vocab_size"]
    config = CLIPConfig(
        vision_config=vision,
        text_config=dict(text, eos_token_id=vocab - 1, bos_token_id=vocab - 2, pad_token_id=0),
        projection_dim=proj,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for key, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if key == "logit_scale":
                p.fill_(math.log(50.0))
            elif "layer_norm" in key or "layrnorm" in key or "layernorm" in key:
                p.copy_((1.0 if key.endswith("weight") else 0.0) + 0.2 * noise)
            elif p.ndim >= 2:
                p.copy_(noise / math.sqrt(p.shape[-1] if "embedding" not in key else 4.0))
            else:
                p.copy_(0.2 * noise)
    return model


def random_inputs(model: CLIPModel, batch: int = 5, seed: int = 0):
    """NHWC float32 pixels and CLIP-style ids: SOT, random tokens, EOT (row max), zero pad."""
    rng = np.random.default_rng(seed)
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    size, vocab, ctx = vcfg.image_size, tcfg.vocab_size, tcfg.max_position_embeddings
    pixels = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    ids = rng.integers(1, vocab - 2, (batch, ctx))
    ids[:, 0] = vocab - 2
    lengths = rng.integers(2, ctx + 1, batch)
    lengths[0] = ctx  # one row with no padding at all
    for row, length in enumerate(lengths):
        ids[row, length - 1] = vocab - 1
        ids[row, length:] = 0
    return pixels, ids.astype(np.int32)


def hf_embeddings(model: CLIPModel, pixels: np.ndarray, ids: np.ndarray):
    with torch.no_grad():
        image = model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        text = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    return image.numpy(), text.numpy()
