"""Import CLIP weights from Hugging Face and OpenCLIP checkpoints, and export to both.

Both sources go through one canonical form, a Hugging Face `CLIPModel`-keyed state dict of
numpy arrays: OpenCLIP keys are renamed into it (splitting the fused `in_proj`) and back
(fusing it), and one table maps it to fomo_jax parameter paths in both directions.
Architecture numbers are read from tensor shapes (width, depth, MLP size, patch, image size,
context, vocabulary); only head count, activation and LayerNorm epsilon, which shapes cannot
tell, come from the HF `config.json`, the OpenCLIP model name, or the metadata
`export_openclip` writes.

An HF export carries what `CLIPProcessor` needs besides the weights: `preprocessor_config.json`
(the evaluation transform) and, given the run's tokenizer, its tokenizer files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from fomo_jax import params as params_lib
from fomo_jax import tokenizer as tokenizer_lib
from fomo_jax.models import variants
from fomo_jax.models.checkpoint_io import read_state_dict, write_safetensors
from fomo_jax.models.clip import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    CLIPConfig,
    TextConfig,
    VisionConfig,
    abstract_clip,
)

# HF names for activations -> ours.
_HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}
# transformers' CLIP config defaults, used where config.json omits a key.
_HF_DEFAULTS = {
    "vision_heads": 12,
    "text_heads": 8,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

_T = lambda a: np.ascontiguousarray(np.swapaxes(a, -1, -2))
_PATCH_TO_OURS = lambda w: np.ascontiguousarray(w.transpose(2, 3, 1, 0))  # [W,3,P,P]->[P,P,3,W]
_PATCH_TO_HF = lambda w: np.ascontiguousarray(w.transpose(3, 2, 0, 1))
_SAME = lambda a: a


def _block_table(ours: str, hf: str):
    rows = [
        ("ln_1/scale", "layer_norm1.weight", _SAME),
        ("ln_1/bias", "layer_norm1.bias", _SAME),
        ("ln_2/scale", "layer_norm2.weight", _SAME),
        ("ln_2/bias", "layer_norm2.bias", _SAME),
        ("mlp/c_fc/kernel", "mlp.fc1.weight", _T),
        ("mlp/c_fc/bias", "mlp.fc1.bias", _SAME),
        ("mlp/c_proj/kernel", "mlp.fc2.weight", _T),
        ("mlp/c_proj/bias", "mlp.fc2.bias", _SAME),
    ]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        rows += [
            (f"attn/{name}/kernel", f"self_attn.{name}.weight", _T),
            (f"attn/{name}/bias", f"self_attn.{name}.bias", _SAME),
        ]
    return [(f"{ours}/{o}", f"{hf}.{h}", fn) for o, h, fn in rows]


def _table(cfg: CLIPConfig):
    """(our path, HF key, HF->ours transform) for every parameter."""
    rows = [
        ("image/patch_embed", "vision_model.embeddings.patch_embedding.weight", _PATCH_TO_OURS),
        ("image/class_embedding", "vision_model.embeddings.class_embedding", _SAME),
        ("image/positional_embedding", "vision_model.embeddings.position_embedding.weight", _SAME),
        ("image/ln_pre/scale", "vision_model.pre_layrnorm.weight", _SAME),
        ("image/ln_pre/bias", "vision_model.pre_layrnorm.bias", _SAME),
        ("image/ln_post/scale", "vision_model.post_layernorm.weight", _SAME),
        ("image/ln_post/bias", "vision_model.post_layernorm.bias", _SAME),
        ("image/proj", "visual_projection.weight", _T),
        ("text/token_embedding/embedding", "text_model.embeddings.token_embedding.weight", _SAME),
        ("text/positional_embedding", "text_model.embeddings.position_embedding.weight", _SAME),
        ("text/ln_final/scale", "text_model.final_layer_norm.weight", _SAME),
        ("text/ln_final/bias", "text_model.final_layer_norm.bias", _SAME),
        ("text/proj", "text_projection.weight", _T),
        ("logit_scale", "logit_scale", _SAME),
    ]
    if cfg.logit_bias is not None:  # a sigmoid-loss CLIP's bias (not a HF CLIPModel weight)
        rows.append(("logit_bias", "logit_bias", _SAME))
    for i in range(cfg.vision.layers):
        rows += _block_table(f"image/transformer/resblocks/{i}", f"vision_model.encoder.layers.{i}")
    for i in range(cfg.text.layers):
        rows += _block_table(f"text/transformer/resblocks/{i}", f"text_model.encoder.layers.{i}")
    return rows


# The safetensors metadata key under which export_openclip records what shapes cannot tell.
_ARCHITECTURE_KEY = "fomo_jax.architecture"

# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(^|\.)(position_ids|attn_mask)$")


def hf_state_to_params(state: dict, cfg: CLIPConfig, source="checkpoint") -> dict:
    """HF-keyed state dict -> nested fomo_jax params (float32 numpy)."""
    table = _table(cfg)
    missing = [hf for _, hf, _ in table if hf not in state]
    unexpected = sorted(
        set(state) - {hf for _, hf, _ in table} - {k for k in state if _IGNORED.search(k)}
    )
    if missing or unexpected:
        raise ValueError(
            f"{source}: not a CLIP ViT checkpoint of the expected layout; missing keys "
            f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected keys "
            f"{unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    flat = {ours: np.asarray(fn(np.asarray(state[hf])), np.float32) for ours, hf, fn in table}
    for scalar in ("logit_scale", "logit_bias"):
        if scalar in flat:
            flat[scalar] = flat[scalar].reshape(())
    return params_lib.unflatten(flat)


def params_to_hf_state(params: dict, cfg: CLIPConfig) -> dict:
    """Nested fomo_jax params -> HF-keyed state dict (numpy, PyTorch layouts)."""
    flat = params_lib.flatten(params)
    inverse = {_SAME: _SAME, _T: _T, _PATCH_TO_OURS: _PATCH_TO_HF}
    return {hf: inverse[fn](np.asarray(flat[ours], np.float32)) for ours, hf, fn in _table(cfg)}


def _count_layers(state, prefix):
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state for m in [pattern.match(k)] if m})


def config_from_hf_state(
    state: dict,
    *,
    vision_heads: int,
    text_heads: int,
    activation: str,
    layer_norm_eps: float,
    source="checkpoint",
) -> CLIPConfig:
    """Architecture from tensor shapes; heads/activation/eps must be given."""
    try:
        patch = state["vision_model.embeddings.patch_embedding.weight"]
        v_pos = state["vision_model.embeddings.position_embedding.weight"]
        tok = state["text_model.embeddings.token_embedding.weight"]
        t_pos = state["text_model.embeddings.position_embedding.weight"]
        v_fc = state["vision_model.encoder.layers.0.mlp.fc1.weight"]
        t_fc = state["text_model.encoder.layers.0.mlp.fc1.weight"]
        embed_dim = state["visual_projection.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"{source}: missing CLIP tensor {e.args[0]!r}") from None
    grid = math.isqrt(v_pos.shape[0] - 1)
    if grid * grid + 1 != v_pos.shape[0]:
        raise ValueError(
            f"{source}: {v_pos.shape[0]} image positions is not a square grid + class token"
        )
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=grid * patch.shape[-1],
            patch_size=patch.shape[-1],
            width=patch.shape[0],
            layers=_count_layers(state, "vision_model.encoder.layers."),
            heads=vision_heads,
            mlp_dim=v_fc.shape[0],
        ),
        text=TextConfig(
            vocab_size=tok.shape[0],
            context_length=t_pos.shape[0],
            width=tok.shape[1],
            layers=_count_layers(state, "text_model.encoder.layers."),
            heads=text_heads,
            mlp_dim=t_fc.shape[0],
        ),
        activation=activation,
        layer_norm_eps=layer_norm_eps,
        logit_bias=float(np.asarray(state["logit_bias"])) if "logit_bias" in state else None,
    )


# ------------------------------------------------------------------------------------ OpenCLIP

_OPENCLIP_BLOCK = [
    ("ln_1.", "layer_norm1."),
    ("ln_2.", "layer_norm2."),
    ("mlp.c_fc.", "mlp.fc1."),
    ("mlp.c_proj.", "mlp.fc2."),
    ("attn.out_proj.", "self_attn.out_proj."),
]
_OPENCLIP_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
    "logit_bias": "logit_bias",  # SigLIP-trained CLIPs (open_clip's init_logit_bias)
}


def openclip_to_hf_state(state: dict, source="checkpoint") -> dict:
    """Rename an OpenCLIP (classic `CLIP` class, ViT image tower) state dict to HF keys."""
    if "visual.conv1.weight" not in state:
        kinds = {
            "visual.trunk.": "a timm image tower",
            "visual.attnpool.": "a ResNet image tower",
            "text.transformer.": "an HF text tower (CustomTextCLIP)",
        }
        for prefix, what in kinds.items():
            if any(k.startswith(prefix) for k in state):
                raise ValueError(
                    f"{source}: OpenCLIP model with {what} is not supported (only ViT CLIPs)"
                )
        raise ValueError(f"{source}: not an OpenCLIP CLIP state dict (no visual.conv1.weight)")
    out = {}
    block = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")
    for key, value in state.items():
        if key in _OPENCLIP_TOP:
            out[_OPENCLIP_TOP[key]] = value
        elif key == "visual.proj":
            out["visual_projection.weight"] = _T(value)
        elif key == "text_projection":
            out["text_projection.weight"] = _T(value)
        elif m := block.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_") :]  # weight [3W, W] or bias [3W], q/k/v stacked
                for name, part in zip(
                    ("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0), strict=True
                ):
                    out[f"{prefix}self_attn.{name}.{kind}"] = part
                continue
            for old, new in _OPENCLIP_BLOCK:
                if rest.startswith(old):
                    out[prefix + new + rest[len(old) :]] = value
                    break
            else:
                out[key] = value  # reported as unexpected by hf_state_to_params
        else:
            out[key] = value
    return out


_HF_BLOCK = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
_QKV = re.compile(r"^self_attn\.(q|k|v)_proj\.(weight|bias)$")


def hf_to_openclip_state(state: dict) -> dict:
    """Rename an HF-keyed CLIP state dict to OpenCLIP's keys: the inverse of
    `openclip_to_hf_state` (q/k/v fused into `in_proj`, projections as [width, embed])."""
    top = {hf: oc for oc, hf in _OPENCLIP_TOP.items()}
    block = [(hf, oc) for oc, hf in _OPENCLIP_BLOCK]
    out, fused = {}, {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
        elif key == "visual_projection.weight":
            out["visual.proj"] = _T(value)
        elif key == "text_projection.weight":
            out["text_projection"] = _T(value)
        elif m := _HF_BLOCK.match(key):
            tower = "visual.transformer" if m.group(1) == "vision_model" else "transformer"
            prefix, rest = f"{tower}.resblocks.{m.group(2)}.", m.group(3)
            if qkv := _QKV.match(rest):
                fused.setdefault(f"{prefix}attn.in_proj_{qkv.group(2)}", {})[qkv.group(1)] = value
                continue
            new = next((oc + rest[len(hf) :] for hf, oc in block if rest.startswith(hf)), None)
            if new is None:
                raise ValueError(f"no OpenCLIP name for CLIP tensor {key!r}")
            out[prefix + new] = value
        elif not _IGNORED.search(key):
            raise ValueError(f"no OpenCLIP name for CLIP tensor {key!r}")
    for key, parts in fused.items():  # OpenCLIP's in_proj stacks q, k, v along the output axis
        if sorted(parts) != ["k", "q", "v"]:
            raise ValueError(f"{key}: needs q, k and v projections, got {sorted(parts)}")
        out[key] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    return out


def _variant_shapes(cfg: CLIPConfig):
    v, t = cfg.vision, cfg.text
    return (
        v.patch_size,
        v.width,
        v.layers,
        v.mlp_dim,
        v.image_size,
        t.vocab_size,
        t.context_length,
        t.width,
        t.layers,
        t.mlp_dim,
        cfg.embed_dim,
    )


def infer_openclip_name(cfg_from_shapes: CLIPConfig) -> str | None:
    """The OpenCLIP architecture whose shapes equal these, or None."""
    shapes = _variant_shapes(cfg_from_shapes)
    for name, cfg in variants.VARIANTS.items():
        if _variant_shapes(cfg) == shapes:
            return name
    return None


def _architecture(cfg: CLIPConfig) -> tuple:
    """What fixes the function a CLIP computes (not its numerics or initialisation)."""
    return cfg.embed_dim, cfg.vision, cfg.text, cfg.activation, cfg.layer_norm_eps


def variant_name(cfg: CLIPConfig) -> str | None:
    """The name `variants.get_config` rebuilds this exact architecture from (heads, activation
    and epsilon included, `-quickgelu` appended for QuickGELU), or None."""
    base = infer_openclip_name(cfg)
    if base is None:
        return None
    name = base + "-quickgelu" if cfg.activation == "quick_gelu" else base
    try:
        named = variants.get_config(name)
    except ValueError:
        return None
    return name if _architecture(named) == _architecture(cfg) else None


# ---------------------------------------------------------------------------------- public API


def model_from_params(params: dict, cfg: CLIPConfig) -> CLIP:
    """A CLIP module holding `params` (no random initialisation is run)."""
    graphdef, shapes = params_lib.split(abstract_clip(cfg))
    expected = {k: tuple(v.shape) for k, v in params_lib.flatten(shapes).items()}
    got = {k: tuple(np.shape(v)) for k, v in params_lib.flatten(params).items()}
    if expected != got:
        wrong = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
        raise ValueError(
            f"parameters do not match the config at {wrong[:5]}: expected "
            f"{[expected.get(k) for k in wrong[:5]]}, got {[got.get(k) for k in wrong[:5]]}"
        )
    return params_lib.merge(graphdef, jax.tree_util.tree_map(jnp.asarray, params))


_HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _read_hf_weights(path):
    """The state dict of a HF directory, single-file or sharded (with an index JSON)."""
    for name in _HF_WEIGHT_FILES:
        weights = os.path.join(path, name)
        if not os.path.isfile(weights):
            continue
        if not name.endswith(".index.json"):
            return read_state_dict(weights), weights
        with open(weights) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_state_dict(os.path.join(path, shard)))
        return state, weights
    raise FileNotFoundError(f"{path}: none of {list(_HF_WEIGHT_FILES)} next to config.json")


def _load_hf_dir(path, *, dtype, attention_implementation):
    with open(os.path.join(path, "config.json")) as f:
        hf_cfg = json.load(f)
    state, weights = _read_hf_weights(path)
    vision, text = hf_cfg.get("vision_config", {}), hf_cfg.get("text_config", {})
    acts = {
        vision.get("hidden_act", _HF_DEFAULTS["hidden_act"]),
        text.get("hidden_act", _HF_DEFAULTS["hidden_act"]),
    }
    eps = {
        vision.get("layer_norm_eps", _HF_DEFAULTS["layer_norm_eps"]),
        text.get("layer_norm_eps", _HF_DEFAULTS["layer_norm_eps"]),
    }
    if len(acts) != 1 or len(eps) != 1 or not acts <= set(_HF_ACTIVATIONS):
        raise ValueError(
            f"{path}/config.json: towers must share a supported hidden_act "
            f"({sorted(_HF_ACTIVATIONS)}) and layer_norm_eps; got {acts}, {eps}"
        )
    cfg = config_from_hf_state(
        state,
        vision_heads=vision.get("num_attention_heads", _HF_DEFAULTS["vision_heads"]),
        text_heads=text.get("num_attention_heads", _HF_DEFAULTS["text_heads"]),
        activation=_HF_ACTIVATIONS[acts.pop()],
        layer_norm_eps=float(eps.pop()),
        source=weights,
    )
    cfg = cfg.replace(dtype=dtype, attention_implementation=attention_implementation)
    return model_from_params(hf_state_to_params(state, cfg, source=weights), cfg)


def _openclip_metadata(path) -> dict:
    """The architecture `export_openclip` recorded in a safetensors file's metadata, as
    {model_name?, heads?, activation?, layer_norm_eps?}; empty for any other file."""
    if not os.fspath(path).endswith(".safetensors"):
        return {}
    try:
        with safetensors.safe_open(path, framework="numpy") as f:
            metadata = f.metadata() or {}
    except Exception:  # not a safetensors file after all: read_state_dict reports it
        return {}
    out = {}
    if metadata.get("model_name"):
        out["model_name"] = metadata["model_name"]
    if _ARCHITECTURE_KEY in metadata:
        try:
            arch = json.loads(metadata[_ARCHITECTURE_KEY])
            out.update(
                heads=(int(arch["vision_heads"]), int(arch["text_heads"])),
                activation=str(arch["activation"]),
                layer_norm_eps=float(arch["layer_norm_eps"]),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(
                f"{path}: metadata {_ARCHITECTURE_KEY!r} is not a valid architecture record: "
                f"{metadata[_ARCHITECTURE_KEY]!r} ({e!r})"
            ) from None
    return out


def _load_openclip_file(path, model_name, *, heads, activation, dtype, attention_implementation):
    state = openclip_to_hf_state(read_state_dict(path), source=path)
    shaped = config_from_hf_state(
        state, vision_heads=1, text_heads=1, activation="gelu", layer_norm_eps=1e-5, source=path
    )
    # Arguments first, then what export_openclip recorded, then the (given or inferred) name.
    recorded = _openclip_metadata(path)
    heads = heads or recorded.get("heads")
    activation = activation or recorded.get("activation")
    shaped = shaped.replace(layer_norm_eps=recorded.get("layer_norm_eps", shaped.layer_norm_eps))
    model_name = model_name or recorded.get("model_name")
    if model_name is None:
        model_name = infer_openclip_name(shaped)
    if model_name is not None:
        named = variants.get_config(model_name)
        if _variant_shapes(named) != _variant_shapes(shaped):
            raise ValueError(f"{path}: tensor shapes do not match OpenCLIP model {model_name!r}")
        heads = heads or (named.vision.heads, named.text.heads)
        activation = activation or named.activation
    elif heads is None:
        # OpenCLIP's default head width is 64; anything else must be said explicitly.
        widths = (shaped.vision.width, shaped.text.width)
        if any(w % 64 for w in widths):
            raise ValueError(
                f"{path}: shapes match no known OpenCLIP architecture and widths {widths} are "
                "not multiples of 64; pass heads=(vision_heads, text_heads)"
            )
        heads = (widths[0] // 64, widths[1] // 64)
        logging.warning("%s: unknown OpenCLIP architecture; assuming 64-dim heads %s", path, heads)
    cfg = shaped.replace(
        vision=dataclasses.replace(shaped.vision, heads=heads[0]),
        text=dataclasses.replace(shaped.text, heads=heads[1]),
        activation=activation or "gelu",
        dtype=dtype,
        attention_implementation=attention_implementation,
    )
    return model_from_params(hf_state_to_params(state, cfg, source=path), cfg)


def load_pretrained(
    path,
    model_name: str | None = None,
    *,
    heads: tuple[int, int] | None = None,
    activation: str | None = None,
    dtype: str = "float32",
    attention_implementation: str | None = None,
) -> CLIP:
    """A ready CLIP from a HF CLIP directory or an OpenCLIP checkpoint file.

    Args:
      path: a directory with `config.json` and `model.safetensors` / `pytorch_model.bin`
        (Hugging Face `CLIPModel`), or an OpenCLIP state-dict file (`.safetensors`, `.bin`,
        `.pt`, `.pth`).
      model_name: OpenCLIP architecture name (e.g. "ViT-B-16", "ViT-L-14-quickgelu"); inferred
        from tensor shapes when omitted. Unused for HF directories.
      heads: (vision, text) attention heads of an OpenCLIP file, for architectures that are
        not in `fomo_jax.models.VARIANTS` and do not use 64-dim heads.
      activation: override the activation ("gelu", "quick_gelu", "gelu_tanh") for OpenCLIP files,
        whose weights do not record it (OpenAI-trained weights use QuickGELU).
      dtype: compute dtype; parameters are float32.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: a HF CLIP directory needs config.json")
        return _load_hf_dir(path, dtype=dtype, attention_implementation=attention_implementation)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    return _load_openclip_file(
        path,
        model_name,
        heads=heads,
        activation=activation,
        dtype=dtype,
        attention_implementation=attention_implementation,
    )


# Our activation names -> HF's `hidden_act`.
TO_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def hf_vision_config(cfg: CLIPConfig) -> dict:
    """The HF `CLIPVisionConfig` dict of a CLIP's image tower (CLIP and LLaVA exports)."""
    v = cfg.vision
    return {
        "model_type": "clip_vision_model",
        "hidden_size": v.width,
        "intermediate_size": v.mlp_dim,
        "num_hidden_layers": v.layers,
        "num_attention_heads": v.heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": 3,
        "hidden_act": TO_HF_ACTIVATION[cfg.activation],
        "layer_norm_eps": cfg.layer_norm_eps,
    }


def _hf_config(cfg: CLIPConfig, logit_scale: float, bos_id: int, eos_id: int) -> dict:
    t = cfg.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": logit_scale,
        "vision_config": {**hf_vision_config(cfg), "projection_dim": cfg.embed_dim},
        "text_config": {
            "model_type": "clip_text_model",
            "vocab_size": t.vocab_size,
            "hidden_size": t.width,
            "intermediate_size": t.mlp_dim,
            "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads,
            "max_position_embeddings": t.context_length,
            "hidden_act": TO_HF_ACTIVATION[cfg.activation],
            "layer_norm_eps": cfg.layer_norm_eps,
            "projection_dim": cfg.embed_dim,
            # HF pools at the first `eos_token_id`; fomo_jax at argmax(ids). They agree because
            # the EOT is the tokenizer's largest id (CLIP: 49407, start 49406).
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": 0,
        },
    }


def _preprocessor_config(image_size: int) -> dict:
    """`CLIPImageProcessor` settings for `data.transforms.test_transform` + normalisation:
    shorter side to `image_size` (bicubic, by PIL in both), centre crop, /255, CLIP mean and
    std. HF places the crop at floor((side - crop) / 2) where torchvision rounds half to even,
    so when the resized longer side exceeds the crop by 3 mod 4 pixels, HF's crop sits one
    pixel further left (or up) than ours."""
    return {
        "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,  # PIL.Image.Resampling.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [round(float(x), 8) for x in CLIP_MEAN],
        "image_std": [round(float(x), 8) for x in CLIP_STD],
    }


def _exportable_config(model: CLIP) -> CLIPConfig:
    if model.config.adapter is not None:
        raise ValueError(
            f"the model carries {model.config.adapter.kind} adapters, which a CLIP checkpoint "
            "cannot hold; fold them in first (models.merge_adapters)"
        )
    return model.config


def _check_tokenizer(tokenizer, cfg: CLIPConfig) -> None:
    """The tokenizer's ids must index the model's embedding, and it must know how to save."""
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(
            f"tokenizer {tokenizer!r} has no save_pretrained; expected a "
            "fomo_jax.tokenizer.ClipTokenizer or ByteTokenizer"
        )
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but the model's text "
            f"embedding has {cfg.text.vocab_size} rows; it is not this model's tokenizer"
        )


def _write_json(path, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def export_hf(model: CLIP, directory, tokenizer=None) -> None:
    """Write the Hugging Face `CLIPModel` layout: `config.json`, `model.safetensors`, and
    `preprocessor_config.json` (the evaluation transform, for `CLIPImageProcessor`).

    With the model's `tokenizer` (`fomo_jax.tokenizer.ClipTokenizer` or `ByteTokenizer`) its
    files are written too (see their `save_pretrained`) and tokenizer files of another kind
    left by an earlier export are removed, so `CLIPProcessor.from_pretrained(directory)` (CLIP
    BPE) or `tokenizers.Tokenizer.from_file(directory/tokenizer.json)` (bytes) tokenize like
    the run did. Without one, tokenizer files already in `directory` are left alone.
    """
    cfg = _exportable_config(model)
    bos_id, eos_id = cfg.text.vocab_size - 2, cfg.text.vocab_size - 1  # CLIP's, by default
    if tokenizer is not None:
        _check_tokenizer(tokenizer, cfg)
        bos_id, eos_id = tokenizer.sot_id, tokenizer.eot_id
    _, params = params_lib.split(model)
    state = params_to_hf_state(jax.device_get(params), cfg)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    write_safetensors(
        os.path.join(directory, "model.safetensors"), state, metadata={"format": "pt"}
    )
    config = _hf_config(cfg, float(state["logit_scale"]), bos_id, eos_id)
    _write_json(os.path.join(directory, "config.json"), config)
    preprocessor = _preprocessor_config(cfg.vision.image_size)
    _write_json(os.path.join(directory, "preprocessor_config.json"), preprocessor)
    if tokenizer is not None:
        written = tokenizer.save_pretrained(directory, context_length=cfg.text.context_length)
        for name in set(tokenizer_lib.HF_TOKENIZER_FILES) - set(written):
            stale = os.path.join(directory, name)
            if os.path.isfile(stale):
                os.remove(stale)


def export_openclip(model: CLIP, path) -> str | None:
    """Write the model as an OpenCLIP state dict (`open_clip.create_model(name,
    pretrained=path)` keys: fused `in_proj`, `visual.conv1`, `[width, embed]` projections) in
    a `.safetensors` file, float32, which `load_pretrained(path)` reads back bit for bit.

    Shapes do not tell heads, activation or LayerNorm epsilon, so they are recorded in the
    file's metadata, with `model_name` when a known variant (`models.VARIANTS`, `-quickgelu`
    for QuickGELU) has exactly this architecture. Returns that name, or None: OpenCLIP itself
    needs it (`create_model(name, pretrained=path)`).
    """
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"{path}: export_openclip writes safetensors; name the file *.safetensors")
    cfg = _exportable_config(model)
    _, params = params_lib.split(model)
    state = hf_to_openclip_state(params_to_hf_state(jax.device_get(params), cfg))
    architecture = {
        "vision_heads": cfg.vision.heads,
        "text_heads": cfg.text.heads,
        "activation": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
    }
    metadata = {"format": "pt", _ARCHITECTURE_KEY: json.dumps(architecture)}
    name = variant_name(cfg)
    if name is not None:
        metadata["model_name"] = name
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # Through a temporary name, so an interrupted export never leaves a truncated checkpoint.
    tmp = path[: -len(".safetensors")] + ".tmp.safetensors"
    write_safetensors(tmp, state, metadata=metadata)
    os.replace(tmp, path)
    return name
