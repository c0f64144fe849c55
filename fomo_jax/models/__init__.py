"""CLIP models: architecture, named variants, checkpoint import/export."""

from flax import nnx

from fomo_jax.models.adapters import (
    AdapterConfig,
    add_adapters,
    is_adapter,
    is_frozen_adapter,
    merge_adapters,
    plain_config,
    split_adapters,
)
from fomo_jax.models.checkpoint_io import load_model, read_state_dict, save_model
from fomo_jax.models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from fomo_jax.models.convert import export_hf, load_pretrained
from fomo_jax.models.variants import VARIANTS, get_config


def create_model(config: CLIPConfig | str, seed: int = 0, **overrides) -> CLIP:
    """A randomly initialised CLIP from a config or a variant name."""
    if isinstance(config, str):
        config = get_config(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return CLIP(config, rngs=nnx.Rngs(seed))


__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "VARIANTS",
    "get_config",
    "create_model",
    "load_pretrained",
    "export_hf",
    "read_state_dict",
    "save_model",
    "load_model",
    "AdapterConfig",
    "add_adapters",
    "split_adapters",
    "merge_adapters",
    "plain_config",
    "is_adapter",
    "is_frozen_adapter",
]
