"""Models: CLIP, decoder LMs (Llama family) and LLaVA-style VLMs; architecture, named
variants, checkpoint import/export."""

import os

from flax import nnx

from fomo_jax.models import convert, hf_lm, stack
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
from fomo_jax.models.hf_lm import vlm_from_parts
from fomo_jax.models.llama import LanguageModel, LlamaConfig, create_lm
from fomo_jax.models.variants import VARIANTS, get_config
from fomo_jax.models.vlm import VisionLanguageModel, VLMConfig, create_vlm


def create_model(config: CLIPConfig | str, seed: int = 0, **overrides) -> CLIP:
    """A randomly initialised CLIP from a config or a variant name."""
    if isinstance(config, str):
        config = get_config(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return CLIP(config, rngs=nnx.Rngs(seed))


def load_pretrained(
    path,
    model_name: str | None = None,
    *,
    heads: tuple[int, int] | None = None,
    activation: str | None = None,
    dtype: str = "float32",
    attention_implementation: str | None = None,
) -> CLIP | LanguageModel | VisionLanguageModel:
    """A model from a checkpoint, by the `model_type` of its `config.json`: `clip` (and a
    directory without a model_type, or an OpenCLIP file) as `convert.load_pretrained` (see there
    for `model_name`, `heads`, `activation`); `llama`, `mistral`, `qwen2` (a `LanguageModel`)
    and `llava` (a `VisionLanguageModel`) as `hf_lm.load_pretrained`."""
    numerics = dict(dtype=dtype, attention_implementation=attention_implementation)
    hf = hf_lm.read_config(path) if os.path.isdir(path) else None
    kind = None if hf is None else hf.get("model_type")
    if kind in hf_lm.MODEL_TYPES:
        clip_only = dict(model_name=model_name, heads=heads, activation=activation)
        if any(v is not None for v in clip_only.values()):
            given = [k for k, v in clip_only.items() if v is not None]
            raise TypeError(f"{path}: {given} apply to CLIP checkpoints, not {kind}")
        return hf_lm.load_pretrained(path, **numerics)
    if kind not in (None, "clip"):
        raise ValueError(
            f"{path}/config.json: model_type={kind!r} is not supported; known: "
            f"{['clip', *hf_lm.MODEL_TYPES]}"
        )
    return convert.load_pretrained(path, model_name, heads=heads, activation=activation, **numerics)


def export_hf(model: CLIP | LanguageModel | VisionLanguageModel, directory, tokenizer=None) -> None:
    """A Hugging Face directory (`config.json` + `model.safetensors`) for the model:
    `CLIPModel`, a causal LM (`AutoModelForCausalLM`) or `LlavaForConditionalGeneration`.
    A CLIP export also has `preprocessor_config.json` and, given its `tokenizer` (a
    `fomo_jax.tokenizer.ClipTokenizer` or `ByteTokenizer`), the tokenizer files (see
    `convert.export_hf`)."""
    if isinstance(model, CLIP):
        return convert.export_hf(model, directory, tokenizer=tokenizer)
    if tokenizer is not None:
        raise TypeError(
            f"export_hf: tokenizer= is for CLIP models; {type(model).__name__} exports no "
            "tokenizer files"
        )
    return hf_lm.export_hf(model, directory)


export_openclip = convert.export_openclip


def drop_default_memory_options(run_config: dict) -> dict:
    """A run config's dict without `model.remat` / `model.scan` where they hold their defaults
    (run identities, such as a work directory's recorded config, stay those of before the
    levers existed)."""
    model = run_config.get("model")
    if not isinstance(model, dict):
        return run_config
    model = {k: v for k, v in model.items() if not (k in stack.OPTIONS and v == stack.OPTIONS[k])}
    return {**run_config, "model": model}


def with_memory_options(config, options):
    """`config` (CLIPConfig, LlamaConfig, or VLMConfig: both its image tower and LM) with the
    memory levers `remat` and `scan` (`fomo_jax.models.stack`) that `options` holds, e.g. a run
    config's `model` block (`--config.model.remat=full --config.model.scan=True`); those it
    does not hold keep the config's values."""
    changes = {name: options[name] for name in stack.OPTIONS if name in options}
    if not changes:
        return config
    if isinstance(config, VLMConfig):
        return config.replace(vision=config.vision.replace(**changes),
                              lm=config.lm.replace(**changes))  # fmt: skip
    if not isinstance(config, CLIPConfig | LlamaConfig):
        raise TypeError(f"with_memory_options: {type(config).__name__} has no remat / scan")
    return config.replace(**changes)


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
    "export_openclip",
    "with_memory_options",
    "drop_default_memory_options",
    "LlamaConfig",
    "LanguageModel",
    "VLMConfig",
    "VisionLanguageModel",
    "create_lm",
    "create_vlm",
    "vlm_from_parts",
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
