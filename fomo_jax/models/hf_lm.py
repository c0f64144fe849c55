"""Hugging Face checkpoints of decoder LMs (Llama, Mistral, Qwen2) and LLaVA, in and out.

A checkpoint directory is `config.json` plus weights: `model.safetensors`, several shards with
`model.safetensors.index.json`, or `pytorch_model.bin` (read without torch). Weights are read one
tensor at a time through the memory-mapped `safetensors` reader and become float32, so loading
never holds a second copy of the whole file. Architecture numbers come from `config.json` as
transformers reads it (its defaults where a key is missing, `rope_theta` at the top level or in
`rope_parameters`, legacy `rope_scaling`); what `fomo_jax.models.llama` cannot compute (other
RoPE types, partial rotary) is refused with the key and its value.

One table per model maps our parameter paths to HF keys (with the layout transform), in both
directions. LLaVA checkpoints come in several key layouts (transformers < 4.52 and the files
5.x writes: `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.*`; 4.52+ in memory: `model.vision_tower.vision_model.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`); every key is renamed
to the latter before the table is applied, and the export writes it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from fomo_jax import params as params_lib
from fomo_jax.models import connectors, convert, llama
from fomo_jax.models.checkpoint_io import read_state_dict
from fomo_jax.models.clip import CLIPConfig, VisionConfig
from fomo_jax.models.llama import LanguageModel, LlamaConfig, abstract_lm
from fomo_jax.models.vlm import VisionLanguageModel, VLMConfig, abstract_vlm

LM_TYPES = ("llama", "mistral", "qwen2")
MODEL_TYPES = (*LM_TYPES, "llava")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
# transformers' config defaults (5.x), used where config.json omits a key.
_LM_DEFAULT_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
)  # fmt: skip
_LM_DEFAULTS = {  # num_key_value_heads None: as many as attention heads
    "llama": dict(zip(_LM_DEFAULT_KEYS, (32000, 4096, 11008, 32, 32, None, 2048), strict=True)),
    "mistral": dict(zip(_LM_DEFAULT_KEYS, (32000, 4096, 14336, 32, 32, 8, 131072), strict=True)),
    "qwen2": dict(zip(_LM_DEFAULT_KEYS, (151936, 4096, 22016, 32, 32, 32, 32768), strict=True)),
}
_CLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# The parameters each RoPE type of llama.py needs (besides rope_theta).
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# HF activation names that are the same function as one of ours.
_ACTIVATION_ALIASES = {"gelu_new": "gelu_pytorch_tanh", "gelu_fast": "gelu_pytorch_tanh"}
_PROJECTOR_TO_HF = {"gelu_tanh": "gelu_pytorch_tanh", "swish": "silu"}
# Buffers some checkpoints carry that are not parameters.
_IGNORED = re.compile(r"(^|\.)(inv_freq|position_ids)$")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


# -------------------------------------------------------------------------------------- weights


class HFWeights(Mapping):
    """The tensors of a HF checkpoint directory by key, each read on access as float32 numpy.

    safetensors files are memory-mapped (`safe_open`); bfloat16 needs the `flax` framework
    (numpy has no bfloat16), read onto the host CPU so that a GPU run does not stage the
    checkpoint in device memory. `pytorch_model.bin` files are read whole (torch-free reader).
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self._file_of: dict[str, str] = {}  # key -> file it is in
        self._eager: dict[str, np.ndarray] = {}
        self._handles: dict = {}
        for name in _WEIGHT_FILES:
            path = os.path.join(self.directory, name)
            if os.path.isfile(path):
                self.source = path
                break
        else:
            raise FileNotFoundError(
                f"{self.directory}: none of {list(_WEIGHT_FILES)} next to config.json"
            )
        if name.endswith(".index.json"):
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [name]
        for file in files:
            file = os.path.join(self.directory, file)
            if file.endswith(".safetensors"):
                self._file_of.update(dict.fromkeys(self._handle(file).keys(), file))
            else:
                self._eager.update(read_state_dict(file))

    def _handle(self, file):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="flax")
        return self._handles[file]

    def __getitem__(self, key) -> np.ndarray:
        if key in self._eager:
            return np.asarray(self._eager[key], np.float32)
        with jax.default_device(jax.devices("cpu")[0]):
            return np.asarray(self._handle(self._file_of[key]).get_tensor(key), np.float32)

    def __iter__(self):
        yield from self._file_of
        yield from self._eager

    def __len__(self):
        return len(self._file_of) + len(self._eager)


# ------------------------------------------------------------------------------- config.json in


def _rope(hf: dict, max_positions: int, where: str) -> tuple[float, tuple]:
    """(rope_theta, llama.py's rope_scaling) as transformers 5.x reads them: a legacy
    `rope_scaling` dict replaces `rope_parameters`; theta from that dict, else the top level."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = dict(hf.get(key) or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    nested = sorted(k for k, v in params.items() if isinstance(v, dict))
    if nested:  # per-layer-type RoPE (Gemma-style): llama.py has one RoPE for every layer
        raise ValueError(f"{where}: {key} per layer type {nested} is not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_KEYS:
        raise ValueError(
            f"{where}: {key}.rope_type={kind!r} is not supported (supported: {list(_ROPE_KEYS)})"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(
            f"{where}: partial_rotary_factor={partial!r} is not supported (only full rotary "
            "embeddings)"
        )
    if kind == "llama3":  # transformers' default for the pretraining length
        params.setdefault("original_max_position_embeddings", max_positions)
    missing = [name for name in _ROPE_KEYS[kind] if name not in params]
    if missing:
        raise ValueError(f"{where}: {key} of rope_type {kind!r} lacks {missing}")
    if kind == "default":
        return theta, ()
    return theta, (("rope_type", kind), *((name, params[name]) for name in _ROPE_KEYS[kind]))


def _sliding_window(hf: dict, kind: str, layers: int) -> int | None:
    if kind == "mistral":
        return hf.get("sliding_window", 4096)
    if kind == "qwen2" and hf.get("use_sliding_window", False):
        # Qwen2 slides only in the layers from max_window_layers on (or as layer_types say);
        # llama.py has one window for all layers, which it enforces by refusing longer inputs.
        start = hf.get("max_window_layers", 28)
        types = hf.get("layer_types") or [
            "sliding_attention" if i >= start else "full_attention" for i in range(layers)
        ]
        if "sliding_attention" in types:
            return hf.get("sliding_window", 4096)
    return None


def lm_config_from_hf(
    hf: dict,
    *,
    where: str = "config.json",
    dtype: str = "float32",
    attention_implementation: str | None = None,
) -> LlamaConfig:
    """The `LlamaConfig` of a HF Llama / Mistral / Qwen2 `config.json` (a dict)."""
    kind = hf.get("model_type", "llama")
    if kind not in LM_TYPES:
        raise ValueError(f"{where}: model_type={kind!r}; expected one of {list(LM_TYPES)}")
    value = {**_LM_DEFAULTS[kind], **hf}
    heads, hidden = value["num_attention_heads"], value["hidden_size"]
    act = value.get("hidden_act", "silu")
    theta, scaling = _rope(hf, value["max_position_embeddings"], where)
    biases = {
        "llama": (value.get("attention_bias", False),) * 2 + (value.get("mlp_bias", False),),
        "mistral": (False, False, False),
        "qwen2": (True, False, False),  # q/k/v always have biases, o_proj never
    }[kind]
    try:
        return LlamaConfig(
            vocab_size=value["vocab_size"],
            hidden_size=hidden,
            intermediate_size=value["intermediate_size"],
            num_hidden_layers=value["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=value["num_key_value_heads"] or heads,
            head_dim=value.get("head_dim") or hidden // heads,
            rms_norm_eps=float(value.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            qkv_bias=biases[0],
            o_bias=biases[1],
            mlp_bias=biases[2],
            tie_word_embeddings=bool(value.get("tie_word_embeddings", False)),
            hidden_act=_ACTIVATION_ALIASES.get(act, act),
            max_position_embeddings=value["max_position_embeddings"],
            sliding_window=_sliding_window(hf, kind, value["num_hidden_layers"]),
            model_type=kind,
            dtype=dtype,
            attention_implementation=attention_implementation,
            initializer_range=float(value.get("initializer_range", 0.02)),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _vision_config(hf: dict, where: str, **numerics) -> CLIPConfig:
    kind = hf.get("model_type", "clip_vision_model")
    if kind != "clip_vision_model":
        raise ValueError(f"{where}: vision_config.model_type={kind!r}; only clip_vision_model")
    value = {**_CLIP_VISION_DEFAULTS, **hf}
    if value["hidden_act"] not in convert._HF_ACTIVATIONS:
        raise ValueError(
            f"{where}: vision_config.hidden_act={value['hidden_act']!r} is not supported "
            f"(supported: {sorted(convert._HF_ACTIVATIONS)})"
        )
    if value.get("num_channels", 3) != 3:
        raise ValueError(f"{where}: vision_config.num_channels={value['num_channels']}; only 3")
    vision = VisionConfig(
        image_size=value["image_size"],
        patch_size=value["patch_size"],
        width=value["hidden_size"],
        layers=value["num_hidden_layers"],
        heads=value["num_attention_heads"],
        mlp_dim=value["intermediate_size"],
    )
    return CLIPConfig(
        vision=vision,
        activation=convert._HF_ACTIVATIONS[value["hidden_act"]],
        layer_norm_eps=float(value["layer_norm_eps"]),
        **numerics,
    )


def vlm_config_from_hf(
    hf: dict,
    *,
    where: str = "config.json",
    dtype: str = "float32",
    attention_implementation: str | None = None,
) -> VLMConfig:
    """The `VLMConfig` of a HF LLaVA `config.json` (a dict)."""
    for key in ("vision_config", "text_config"):
        if not isinstance(hf.get(key), dict):
            raise ValueError(f"{where}: a LLaVA config needs {key}")
    numerics = dict(dtype=dtype, attention_implementation=attention_implementation)
    vision = _vision_config(hf["vision_config"], where, **numerics)
    lm = lm_config_from_hf(
        {"model_type": "llama", **hf["text_config"]}, where=f"{where} text_config", **numerics
    )
    if hf.get("tie_word_embeddings"):  # LLaVA ties if either level says so
        lm = lm.replace(tie_word_embeddings=True)
    layer = hf.get("vision_feature_layer", -2)
    act = hf.get("projector_hidden_act", "gelu")
    try:
        cfg = VLMConfig(
            vision=vision,
            lm=lm,
            image_token_id=hf.get("image_token_id", hf.get("image_token_index", 32000)),
            vision_feature_layer=tuple(layer) if isinstance(layer, list) else layer,
            vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
            projector_hidden_act=_ACTIVATION_ALIASES.get(act, act),
            projector_bias=hf.get("multimodal_projector_bias", True),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    seq = hf.get("image_seq_length")
    if seq is not None and seq != cfg.image_seq_length:
        raise ValueError(
            f"{where}: image_seq_length={seq}, but the vision tower gives "
            f"{cfg.image_seq_length} visual tokens per image ({vision.vision.image_size}px / "
            f"patch {vision.vision.patch_size}, strategy {cfg.vision_feature_select_strategy!r})"
        )
    return cfg


# ------------------------------------------------------------------------------ config.json out


def _lm_export_type(cfg: LlamaConfig) -> str:
    """cfg.model_type if that HF architecture computes what cfg does, else a ValueError."""
    kind = cfg.model_type
    layouts = {  # (qkv_bias, o_bias, mlp_bias) each HF type can express
        "llama": {
            (False, False, False),
            (True, True, False),
            (False, False, True),
            (True, True, True),
        },
        "mistral": {(False, False, False)},
        "qwen2": {(True, False, False)},
    }
    if kind not in layouts:
        raise ValueError(f"model_type={kind!r} cannot be exported; expected one of {LM_TYPES}")
    biases = (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias)
    if biases not in layouts[kind]:
        fits = [k for k, v in layouts.items() if biases in v]
        raise ValueError(
            f"(qkv_bias, o_bias, mlp_bias)={biases} is not a {kind} layout; model_type "
            f"{fits} would be"
        )
    if kind == "llama" and cfg.sliding_window is not None:
        raise ValueError("a llama config has no sliding_window; use model_type mistral/qwen2")
    return kind


def lm_config_to_hf(cfg: LlamaConfig) -> dict:
    """A HF `config.json` dict for `cfg` (transformers 5 reads `rope_parameters`; 4.x reads
    `rope_theta` / `rope_scaling`, so both are written)."""
    kind = _lm_export_type(cfg)
    scaling = dict(cfg.rope_scaling)
    rope = {"rope_theta": cfg.rope_theta, "rope_type": "default", **scaling}
    out = {
        "architectures": [_ARCHITECTURES[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope,
        "rope_scaling": rope if scaling else None,
        "dtype": "float32",
    }
    if kind == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif kind == "mistral":
        out.update(sliding_window=cfg.sliding_window)
    else:  # every layer slides when a window is set (llama.py's one window)
        window = cfg.sliding_window is not None
        out.update(
            use_sliding_window=window,
            sliding_window=cfg.sliding_window,
            max_window_layers=0 if window else cfg.num_hidden_layers,
        )
    return out


def vlm_config_to_hf(cfg: VLMConfig) -> dict:
    """A HF LLaVA `config.json` dict for `cfg`."""
    text = lm_config_to_hf(cfg.lm)
    del text["architectures"]
    layer = cfg.vision_feature_layer
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "vision_config": convert.hf_vision_config(cfg.vision),
        "text_config": text,
        "image_token_index": cfg.image_token_id,
        "image_seq_length": cfg.image_seq_length,
        "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "projector_hidden_act": _PROJECTOR_TO_HF.get(
            cfg.projector_hidden_act, cfg.projector_hidden_act
        ),
        "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": cfg.lm.tie_word_embeddings,
        "dtype": "float32",
    }


# ----------------------------------------------------------------------------------- key tables


def _lm_table(cfg: LlamaConfig, prefix: str, head: str):
    """(our path, HF key, HF->ours transform) for every LM parameter; HF keys `prefix` + the
    decoder's (`embed_tokens.weight`, `layers.{i}...`, `norm.weight`) and `head`."""
    t, same = convert._T, convert._SAME
    rows = [
        ("lm/embed_tokens/embedding", f"{prefix}embed_tokens.weight", same),
        ("lm/norm/scale", f"{prefix}norm.weight", same),
    ]
    if not cfg.tie_word_embeddings:
        rows.append(("lm/lm_head/kernel", head, t))
    linears = [(f"attn/{n}_proj", f"self_attn.{n}_proj", cfg.qkv_bias) for n in "qkv"]
    linears.append(("attn/o_proj", "self_attn.o_proj", cfg.o_bias))
    linears += [(f"mlp/{n}_proj", f"mlp.{n}_proj", cfg.mlp_bias) for n in ("gate", "up", "down")]
    for i in range(cfg.num_hidden_layers):
        ours, hf = f"lm/transformer/resblocks/{i}", f"{prefix}layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            rows.append((f"{ours}/{norm}/scale", f"{hf}.{norm}.weight", same))
        for our_name, hf_name, bias in linears:
            rows.append((f"{ours}/{our_name}/kernel", f"{hf}.{hf_name}.weight", t))
            if bias:
                rows.append((f"{ours}/{our_name}/bias", f"{hf}.{hf_name}.bias", same))
    return rows


def _vlm_table(cfg: VLMConfig):
    if cfg.connector != "mlp2x_gelu":
        raise ValueError(f"the LLaVA checkpoint layout has an mlp2x_gelu projector; this VLM's "
                         f"connector is {cfg.connector!r}")  # fmt: skip
    rows = [
        (ours, f"model.vision_tower.{hf}", fn)  # hf: "vision_model.…"
        for ours, hf, fn in convert._table(cfg.vision)
        if ours.startswith("image/") and ours != "image/proj"
    ]
    for n in (1, 2):
        hf = f"model.multi_modal_projector.linear_{n}"
        rows.append((f"connector/linear_{n}/kernel", f"{hf}.weight", convert._T))
        if cfg.projector_bias:
            rows.append((f"connector/linear_{n}/bias", f"{hf}.bias", convert._SAME))
    return rows + _lm_table(cfg.lm, "model.language_model.", "lm_head.weight")


# Every LLaVA layout -> the transformers 4.52+ one (applied in order).
_LLAVA_RENAMES = [
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^(vision_tower|multi_modal_projector)\."), r"model.\1."),
    (re.compile(r"^model\.vision_tower\.(?!vision_model\.)"), "model.vision_tower.vision_model."),
]


def _llava_key(key: str) -> str:
    for pattern, replacement in _LLAVA_RENAMES:
        key = pattern.sub(replacement, key)
    return key


# ---------------------------------------------------------------------------------------- load


def _module_from_checkpoint(
    abstract: nnx.Module, rows, weights: HFWeights, *, rename=None, ignore=()
):
    """`abstract` holding the checkpoint's tensors, placed by `rows` (HF keys after `rename`);
    errors name missing, unexpected and wrongly shaped keys. `ignore`: keys that may be there
    and are not read (a tied head's `lm_head.weight`, which transformers ignores too)."""
    keys = {(rename(k) if rename else k): k for k in weights}
    wanted = {hf for _, hf, _ in rows}
    ignored = {k for k in keys if _IGNORED.search(k) or k in ignore}
    missing = sorted(wanted - set(keys))
    unexpected = sorted(set(keys) - wanted - ignored)
    if missing or unexpected:
        raise ValueError(
            f"{weights.source}: keys do not match config.json; missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''} ({len(missing)}), unexpected "
            f"{[keys[k] for k in unexpected[:6]]}{'...' if len(unexpected) > 6 else ''} "
            f"({len(unexpected)})"
        )
    graphdef, shapes = params_lib.split(abstract)
    expected = params_lib.flatten(shapes)
    assert set(expected) == {ours for ours, _, _ in rows}, "table and model disagree"
    flat = {}
    # One tensor at a time: besides the parameters, at most one checkpoint tensor is in memory.
    for ours, hf, fn in rows:
        array = fn(weights[keys[hf]])
        if array.shape != tuple(expected[ours].shape):
            raise ValueError(
                f"{weights.source}: {keys[hf]} has shape {array.shape}, config.json implies "
                f"{tuple(expected[ours].shape)} for {ours}"
            )
        flat[ours] = jnp.asarray(array)
    return params_lib.merge(graphdef, params_lib.unflatten(flat))


def read_config(path) -> dict | None:
    """The `config.json` of a checkpoint directory as a dict, or None if there is none."""
    file = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def load_pretrained(
    path, *, dtype: str = "float32", attention_implementation: str | None = None
) -> LanguageModel | VisionLanguageModel:
    """A `LanguageModel` (model_type llama / mistral / qwen2) or `VisionLanguageModel` (llava)
    from a HF checkpoint directory; parameters float32, `dtype` the compute dtype."""
    path = os.fspath(path)
    hf = read_config(path)
    if hf is None:
        raise FileNotFoundError(f"{path}: a HF checkpoint directory needs config.json")
    where = os.path.join(path, "config.json")
    kind = hf.get("model_type")
    numerics = dict(dtype=dtype, attention_implementation=attention_implementation)
    if kind in LM_TYPES:
        cfg = lm_config_from_hf(hf, where=where, **numerics)
        abstract, rows, rename = abstract_lm(cfg), _lm_table(cfg, "model.", "lm_head.weight"), None
        tied = cfg.tie_word_embeddings
    elif kind == "llava":
        cfg = vlm_config_from_hf(hf, where=where, **numerics)
        abstract, rows, rename = abstract_vlm(cfg), _vlm_table(cfg), _llava_key
        tied = cfg.lm.tie_word_embeddings
    else:
        raise ValueError(f"{where}: model_type={kind!r}; expected one of {list(MODEL_TYPES)}")
    ignore = ("lm_head.weight",) if tied else ()
    return _module_from_checkpoint(abstract, rows, HFWeights(path), rename=rename, ignore=ignore)


# -------------------------------------------------------------------------------------- export


def _inverse(fn):
    return {convert._PATCH_TO_OURS: convert._PATCH_TO_HF}.get(fn, fn)  # _T and _SAME: own


def export_hf(model: LanguageModel | VisionLanguageModel, directory) -> None:
    """Write `config.json` + `model.safetensors` (float32) that transformers loads as
    `AutoModelForCausalLM` (an LM) or `LlavaForConditionalGeneration` (a VLM)."""
    cfg = model.config
    lm_cfg = cfg.lm if isinstance(model, VisionLanguageModel) else cfg
    if lm_cfg.added_tokens:  # checkpoints store them as ordinary rows of a larger vocabulary
        graphdef, params = params_lib.split(model)
        params, folded = llama.fold_added_tokens(params, lm_cfg)
        cfg = cfg.replace(lm=folded) if isinstance(model, VisionLanguageModel) else folded
        abstract = abstract_vlm(cfg) if isinstance(model, VisionLanguageModel) else abstract_lm(cfg)
        model = params_lib.merge(params_lib.split(abstract)[0], params)
    if isinstance(model, VisionLanguageModel):
        hf_config, rows = vlm_config_to_hf(cfg), _vlm_table(cfg)
    elif isinstance(model, LanguageModel):
        hf_config, rows = lm_config_to_hf(cfg), _lm_table(cfg, "model.", "lm_head.weight")
    else:
        raise TypeError(f"export_hf takes a LanguageModel or VisionLanguageModel, not {model!r}")
    flat = params_lib.flatten(jax.device_get(params_lib.split(model)[1]))
    state = {hf: _inverse(fn)(np.asarray(flat[ours], np.float32)) for ours, hf, fn in rows}
    os.makedirs(directory, exist_ok=True)
    weights = os.path.join(directory, "model.safetensors")
    save_file(state, f"{weights}.tmp", metadata={"format": "pt"})
    os.replace(f"{weights}.tmp", weights)
    tmp = os.path.join(directory, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(hf_config, f, indent=2)
    os.replace(tmp, os.path.join(directory, "config.json"))


# ------------------------------------------------------------------------------- VLM from parts


def vlm_from_parts(
    clip_path,
    lm_path,
    *,
    image_token_id: int,
    vision_feature_layer: int | tuple[int, ...] = -2,
    vision_feature_select_strategy: str = "default",
    projector_hidden_act: str = "gelu",
    seed: int = 0,
    dtype: str = "float32",
    attention_implementation: str | None = None,
    connector: str = "mlp2x_gelu",
    **connector_options,
) -> VisionLanguageModel:
    """A LLaVA-style VLM from a CLIP checkpoint's image tower (HF directory or OpenCLIP file,
    as `convert.load_pretrained` reads it; CLIP's `proj` is dropped), an LM checkpoint's
    decoder and a fresh connector (`connectors.make(cfg, rngs=nnx.Rngs(seed))`; its options are
    `VLMConfig` fields, e.g. perceiver_latents)."""
    numerics = dict(dtype=dtype, attention_implementation=attention_implementation)
    clip = convert.load_pretrained(clip_path, **numerics)
    lm = load_pretrained(lm_path, **numerics)
    if not isinstance(lm, LanguageModel):
        raise ValueError(f"{lm_path}: not a decoder LM checkpoint (got {type(lm).__name__})")
    cfg = VLMConfig(
        vision=clip.config,
        lm=lm.config,
        image_token_id=image_token_id,
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=vision_feature_select_strategy,
        projector_hidden_act=projector_hidden_act,
        connector=connector,
        **connector_options,
    )
    image = dict(params_lib.split(clip)[1]["image"])
    del image["proj"]
    params = {
        "image": image,
        "connector": params_lib.split(connectors.make(cfg, rngs=nnx.Rngs(seed)))[1],
        "lm": params_lib.split(lm)[1]["lm"],
    }
    graphdef, _ = params_lib.split(abstract_vlm(cfg))
    return params_lib.merge(graphdef, params)
