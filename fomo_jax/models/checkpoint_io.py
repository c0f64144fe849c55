"""Read and write PyTorch-world weight files as numpy, without importing torch.

* safetensors: through the `safetensors` library. Files are memory-mapped (`safe_open`) and each
  tensor is copied out once, so a read never holds the file's bytes twice; bfloat16 comes back
  as `ml_dtypes.bfloat16`; a `*.safetensors.index.json` reads every shard it names (Hugging
  Face's sharded layout, which `write_sharded_safetensors` writes).
* torch.save zip files (`pytorch_model.bin`, OpenCLIP `.pt`/`.bin`): unpickled with a
  restricted unpickler that understands tensors and storages and refuses any other global,
  so loading a checkpoint never runs code from it; every tensor must lie inside its storage.
* fomo_jax's own model files (`save_model` / `load_model`): safetensors keyed by parameter path
  (adapter leaves included) with the `CLIPConfig` (adapter included) as JSON metadata.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import pickle
import re
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as _safetensors_bytes
from safetensors.numpy import save_file as _save_file

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
INDEX_SUFFIX = ".safetensors.index.json"


@contextlib.contextmanager
def _open_safetensors(path):
    """`safe_open` (numpy, memory-mapped) with a malformed file reported as a ValueError naming
    it; a missing file stays a FileNotFoundError."""
    try:
        handle = safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    with handle as f:
        yield f


def _tensor(handle, path, name) -> np.ndarray:
    try:
        return handle.get_tensor(name)
    except (SafetensorError, AttributeError, TypeError, ValueError) as e:
        # e.g. a float8 tensor: numpy has no such dtype
        raise ValueError(f"{path}: tensor {name!r} cannot be read as numpy ({e})") from None


def read_safetensors_metadata(path) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file (empty if it has none)."""
    with _open_safetensors(os.fspath(path)) as f:
        return dict(f.metadata() or {})


def read_safetensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file, in file order, or of all the shards that a
    `*.safetensors.index.json` names."""
    path = os.fspath(path)
    if path.endswith(INDEX_SUFFIX):
        return _read_sharded(path)
    with _open_safetensors(path) as f:
        return {name: _tensor(f, path, name) for name in f.offset_keys()}


def _read_sharded(index_path) -> dict[str, np.ndarray]:
    """The shards of a HF index one after the other; each key must be in the shard the index
    names for it, and every shard's keys must be in the index (a stale or mixed-up shard set
    is an error, not a silent mix of two exports)."""
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no 'weight_map' of tensor name -> shard file")
    out = {}
    for shard in dict.fromkeys(weight_map.values()):
        shard_path = os.path.join(os.path.dirname(index_path), shard)
        if not os.path.isfile(shard_path):
            raise FileNotFoundError(f"{index_path}: shard {shard} not found at {shard_path}")
        tensors = read_safetensors(shard_path)
        misplaced = sorted(k for k in tensors if weight_map.get(k) != shard)
        if misplaced:
            raise ValueError(
                f"{index_path}: shard {shard} holds {misplaced[:5]}, which the index places "
                f"{[weight_map.get(k) for k in misplaced[:5]]}"
            )
        out.update(tensors)
    missing = [k for k in weight_map if k not in out]
    if missing:
        raise ValueError(
            f"{index_path}: {missing[:5]} are not in the shards the index names for them "
            f"({[weight_map[k] for k in missing[:5]]})"
        )
    return out


@functools.cache
def _writable(dtype: np.dtype) -> bool:
    try:
        _safetensors_bytes({"probe": np.zeros(0, dtype)})
    except (SafetensorError, TypeError, ValueError):
        return False
    return True


def _contiguous(tensors: dict) -> dict[str, np.ndarray]:
    """C-contiguous numpy copies where needed: the library writes an array's buffer as it lies
    in memory, so a transposed view would be written scrambled."""
    out = {}
    for name, array in tensors.items():
        array = np.asarray(array, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
        if not _writable(array.dtype):
            raise ValueError(
                f"tensor {name!r}: dtype {array.dtype} cannot be written to safetensors"
            )
        out[name] = array
    return out


def write_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict | None = None):
    """Write a safetensors file (`metadata` values as strings), atomically: a reader never sees
    a half-written file, and one that memory-mapped the old file keeps reading the old one."""
    path = os.fspath(path)
    arrays = _contiguous(tensors)
    metadata = {str(k): str(v) for k, v in metadata.items()} if metadata else None
    tmp = f"{path}.tmp"
    _save_file(arrays, tmp, metadata=metadata)
    os.replace(tmp, path)


def _stale_weight_files(directory, prefix) -> list[str]:
    pattern = re.compile(rf"{re.escape(prefix)}(-\d{{5}}-of-\d{{5}})?\.safetensors(\.index\.json)?")
    return [n for n in os.listdir(directory) if pattern.fullmatch(n)]


def write_sharded_safetensors(
    directory,
    tensors: dict[str, np.ndarray],
    *,
    max_shard_bytes: int,
    metadata: dict | None = None,
    prefix: str = "model",
) -> list[str]:
    """Write `tensors` in Hugging Face's layout: `model.safetensors` when they fit in one shard
    of at most `max_shard_bytes`, else `model-00001-of-0000N.safetensors` shards (in the given
    order; a tensor larger than a shard gets one of its own) and `model.safetensors.index.json`
    (`{"metadata": {"total_size": bytes}, "weight_map": {name: shard}}`). `metadata` goes into
    every shard. Weight files of an earlier export under the same prefix are removed first, so
    a reader never meets a stale single file beside a new index. Returns the names written."""
    directory = os.fspath(directory)
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    arrays = _contiguous(tensors)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in arrays.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    os.makedirs(directory, exist_ok=True)
    for stale in _stale_weight_files(directory, prefix):
        os.remove(os.path.join(directory, stale))
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, f"{prefix}.safetensors"), arrays, metadata)
        return [f"{prefix}.safetensors"]
    names = [
        f"{prefix}-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        write_safetensors(os.path.join(directory, name), shard, metadata)
        weight_map.update(dict.fromkeys(shard, name))
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in arrays.values())},
        "weight_map": weight_map,
    }
    index_name = f"{prefix}{INDEX_SUFFIX}"
    tmp = os.path.join(directory, f"{index_name}.tmp")
    with open(tmp, "w") as f:
        json.dump(index, f, indent=2)
    os.replace(tmp, os.path.join(directory, index_name))
    return [*names, index_name]


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
    """A flat {key: array} state dict from a .safetensors file (or the shards of a
    `*.safetensors.index.json`) or a torch .bin/.pt/.pth file.

    Training checkpoints that wrap the weights (`{"state_dict": ...}`) and DataParallel
    `module.` prefixes are unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith((".safetensors", INDEX_SUFFIX)):
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
