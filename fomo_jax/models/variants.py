"""Named CLIP architectures (OpenCLIP names) and tiny sizes for tests.

`get_config("ViT-B-16")`, `get_config("ViT-L-14-quickgelu", dtype="bfloat16")`. The table is
also what `load_pretrained` matches checkpoint shapes against to name an OpenCLIP file.
"""

from __future__ import annotations

from fomo_jax.models.clip import CLIPConfig, TextConfig, VisionConfig


def _vit(
    embed,
    image,
    patch,
    v_width,
    v_layers,
    v_heads,
    v_mlp,
    t_width,
    t_layers,
    t_heads,
    context=77,
    vocab=49408,
):
    return CLIPConfig(
        embed_dim=embed,
        vision=VisionConfig(image, patch, v_width, v_layers, v_heads, v_mlp),
        text=TextConfig(vocab, context, t_width, t_layers, t_heads, 4 * t_width),
    )


VARIANTS: dict[str, CLIPConfig] = {
    # OpenCLIP architectures (model_configs/*.json), exact-GELU by default.
    "ViT-S-16": _vit(384, 224, 16, 384, 12, 6, 1536, 384, 12, 6),
    "ViT-S-32": _vit(384, 224, 32, 384, 12, 6, 1536, 384, 12, 6),
    "ViT-B-32": _vit(512, 224, 32, 768, 12, 12, 3072, 512, 12, 8),
    "ViT-B-16": _vit(512, 224, 16, 768, 12, 12, 3072, 512, 12, 8),
    "ViT-L-14": _vit(768, 224, 14, 1024, 24, 16, 4096, 768, 12, 12),
    "ViT-L-14-336": _vit(768, 336, 14, 1024, 24, 16, 4096, 768, 12, 12),
    "ViT-H-14": _vit(1024, 224, 14, 1280, 32, 16, 5120, 1024, 24, 16),
    "ViT-g-14": _vit(1024, 224, 14, 1408, 40, 16, 6144, 1024, 24, 16),
    "ViT-bigG-14": _vit(1280, 224, 14, 1664, 48, 16, 8192, 1280, 32, 20),
    # Small sizes for tests and synthetic runs (byte-level vocabulary of 259 ids).
    "tiny": _vit(32, 32, 8, 64, 2, 2, 128, 64, 2, 2, context=16, vocab=259),
    "mini": _vit(64, 32, 8, 128, 3, 4, 512, 128, 3, 2, context=16, vocab=259),  # tiny's pixels
    "small": _vit(128, 64, 8, 192, 4, 3, 768, 128, 4, 2, context=32, vocab=259),
}


def get_config(name: str, **overrides) -> CLIPConfig:
    """The config of a named architecture; a `-quickgelu` suffix selects QuickGELU."""
    base, activation = name, "gelu"
    if name.endswith("-quickgelu"):
        base, activation = name[: -len("-quickgelu")], "quick_gelu"
    if base not in VARIANTS:
        raise ValueError(
            f"unknown CLIP variant {name!r}; known: {sorted(VARIANTS)} "
            "(append -quickgelu for QuickGELU)"
        )
    return VARIANTS[base].replace(**{"activation": activation, **overrides})
