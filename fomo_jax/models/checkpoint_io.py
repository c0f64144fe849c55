"""Read and write PyTorch-world weight files as numpy, without importing torch.

* safetensors: parsed directly (the `safetensors` numpy API cannot hold bfloat16).
* torch.save zip files (`pytorch_model.bin`, OpenCLIP `.pt`/`.bin`): unpickled with a
  restricted unpickler that understands tensors and storages and refuses any other global,
  so loading a checkpoint never runs code from it; every tensor must lie inside its storage.
* fomo_jax's own model files (`save_model` / `load_model`): safetensors keyed by parameter path
  (adapter leaves included) with the `CLIPConfig` (adapter included) as JSON metadata.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

_TORCH_STORAGES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _safetensors_header(path, raw: bytes) -> tuple[dict, int]:
    if len(raw) < 8:
        raise ValueError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad header: {e})") from None
    return header, 8 + header_len


def read_safetensors_metadata(path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (empty if it has none)."""
    with open(path, "rb") as f:
        head = f.read(8)
        raw = head + f.read(struct.unpack("<Q", head)[0] if len(head) == 8 else 0)
    return dict(_safetensors_header(path, raw)[0].get("__metadata__", {}))


def read_safetensors(path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        raw = f.read()
    header, base = _safetensors_header(path, raw)
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        start, end = entry["data_offsets"]
        array = np.frombuffer(
            raw,
            _ST_DTYPES[entry["dtype"]],
            count=(end - start) // np.dtype(_ST_DTYPES[entry["dtype"]]).itemsize,
            offset=base + start,
        )
        out[name] = array.reshape(entry["shape"]).copy()
    return out


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write a safetensors file (tensors in the given order, 8-byte aligned header)."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        array = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if array.dtype not in _ST_NAMES:
            raise ValueError(
                f"tensor {name!r}: dtype {array.dtype} cannot be written to safetensors"
            )
        data = array.tobytes()
        header[name] = {
            "dtype": _ST_NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for data in chunks:
            f.write(data)
    os.replace(tmp, path)


class _Storage:
    def __init__(self, dtype):
        self.dtype = dtype


class _PendingTensor:
    """A tensor as the pickle describes it; `_materialise` checks it against its storage and
    copies it out once the key it is stored under is known (for the error message)."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def array(self, where: str) -> np.ndarray:
        storage, offset, size, stride = self.storage, self.offset, self.size, self.stride
        described = f"offset={offset!r}, size={size!r}, stride={stride!r}"
        if (
            not isinstance(size, tuple | list)
            or not isinstance(stride, tuple | list)
            or len(size) != len(stride)
            or not all(type(v) is int for v in (offset, *size, *stride))
        ):
            raise ValueError(f"{where}: malformed tensor metadata ({described})")
        if offset < 0 or min((*size, *stride), default=0) < 0:
            raise ValueError(f"{where}: negative tensor offset, size or stride ({described})")
        if 0 in size:
            return np.zeros(tuple(size), storage.dtype)
        # Python ints: exact, no overflow however large the crafted values.
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= storage.size:
            raise ValueError(
                f"{where}: tensor ({described}) reaches element {last} of a storage of "
                f"{storage.size} elements"
            )
        itemsize = storage.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)
        )
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *_):
    return _PendingTensor(storage, offset, size, stride)


def _materialise(obj, path, keys: tuple = ()):
    """`obj` with every `_PendingTensor` in its dicts, lists and tuples replaced by its array."""
    if isinstance(obj, _PendingTensor):
        return obj.array(f"{path}: tensor {'/'.join(map(str, keys)) or '<top level>'!r}")
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, path, (*keys, k))) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v, path, (*keys, i)) for i, v in enumerate(obj))
    return obj


class _TorchUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *_: data
        if module == "torch" and name in _TORCH_STORAGES:
            return _Storage(np.dtype(_TORCH_STORAGES[name]))
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch" and name == "Size":
            return tuple
        raise pickle.UnpicklingError(
            f"{self.path}: refusing to load global {module}.{name} (only tensors, dicts and plain "
            "values are read from checkpoints)"
        )

    def persistent_load(self, pid):
        kind, storage, key, _location, _numel = pid
        if kind != "storage" or not isinstance(storage, _Storage):
            raise pickle.UnpicklingError(f"{self.path}: unknown persistent id {pid!r}")
        if key not in self.storages:
            name = f"{self.prefix}/data/{key}"
            try:
                raw = self.archive.read(name)
            except KeyError:
                raise ValueError(f"{self.path}: storage {name} is missing") from None
            if len(raw) % storage.dtype.itemsize:
                raise ValueError(
                    f"{self.path}: storage {name} has {len(raw)} bytes, not a multiple of "
                    f"{storage.dtype.itemsize} ({storage.dtype})"
                )
            self.storages[key] = np.frombuffer(raw, storage.dtype)
        return self.storages[key]


def read_torch_zip(path):
    """Load a `torch.save` zip archive (torch >= 1.6 format) into numpy arrays. Every tensor's
    offset, sizes and strides must lie inside its storage (ValueError naming the key if not)."""
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a torch zip checkpoint (legacy torch.save format is not "
            "supported; re-save it with a current torch, or convert it to safetensors)"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("/data.pkl")]
        with archive.open(pickles[0]) as f:
            return _materialise(_TorchUnpickler(f, archive, prefix, path).load(), path)


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A flat {key: array} state dict from a .safetensors or torch .bin/.pt/.pth file.

    Training checkpoints that wrap the weights (`{"state_dict": ...}`) and DataParallel
    `module.` prefixes are unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        state = read_safetensors(path)
    else:
        state = read_torch_zip(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: np.asarray(v) for k, v in state.items() if isinstance(v, np.ndarray)}


CONFIG_METADATA_KEY = "fomo_jax_config"


def save_model(path, model) -> None:
    """Write a CLIP, adapters included, as one safetensors file: every parameter under its
    '/'-joined path (e.g. `image/transformer/resblocks/0/attn/q_proj/lora_a`,
    `adapter_shared/vera_768x768/random_a`) and `model.config` as JSON metadata."""
    import jax

    from fomo_jax import params as params_lib

    _, params = params_lib.split(model)
    flat = {k: np.asarray(v) for k, v in params_lib.flatten(jax.device_get(params)).items()}
    metadata = {
        "format": "fomo_jax",
        CONFIG_METADATA_KEY: json.dumps(model.config.to_dict(), sort_keys=True),
    }
    write_safetensors(os.fspath(path), flat, metadata=metadata)


def load_model(path, **config_overrides):
    """The CLIP `save_model` wrote (config from the file; `config_overrides`, e.g. `dtype`, are
    applied to it)."""
    from fomo_jax import params as params_lib
    from fomo_jax.models.clip import CLIPConfig
    from fomo_jax.models.convert import model_from_params

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    metadata = read_safetensors_metadata(path)
    if CONFIG_METADATA_KEY not in metadata:
        raise ValueError(f"{path}: not a fomo_jax model file (no {CONFIG_METADATA_KEY} metadata)")
    cfg = CLIPConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]))
    if config_overrides:
        cfg = cfg.replace(**config_overrides)
    return model_from_params(params_lib.unflatten(read_safetensors(path)), cfg)
