"""The torch-free readers against torch / safetensors themselves."""

import io
import json
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fomo_jax.models import checkpoint_io


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(10),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "transposed": base.t(),  # non-contiguous view
        "offset_view": base[2:, 1:3],  # shares storage with "transposed", with an offset
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def test_torch_zip_matches_torch_load(tmp_path):
    tensors = _tensors()
    path = tmp_path / "w.bin"
    torch.save(tensors, path)
    got = checkpoint_io.read_torch_zip(path)
    assert sorted(got) == sorted(tensors)
    for key, tensor in tensors.items():
        want = _numpy(tensor)
        assert got[key].dtype == want.dtype, key
        assert got[key].shape == want.shape, key
        np.testing.assert_array_equal(got[key], want, err_msg=key)


def test_malicious_pickle_is_refused(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"x": Exploit()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        checkpoint_io.read_torch_zip(path)


def test_legacy_format_is_named(tmp_path):
    path = tmp_path / "old.bin"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="old.bin"):
        checkpoint_io.read_state_dict(path)


def test_safetensors_round_trip_with_peer_library(tmp_path):
    tensors = {k: v.detach().contiguous() for k, v in _tensors().items() if k != "param"}
    peer = tmp_path / "peer.safetensors"
    save_file(tensors, peer)
    ours = checkpoint_io.read_safetensors(peer)
    for key, tensor in tensors.items():
        np.testing.assert_array_equal(ours[key], _numpy(tensor), err_msg=key)
        assert ours[key].dtype == _numpy(tensor).dtype
    # and the other direction: our writer, the library's reader
    written = tmp_path / "ours.safetensors"
    checkpoint_io.write_safetensors(written, ours)
    back = load_file(written)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and back[key].shape == tensor.shape, key
        assert torch.equal(back[key], tensor), key


def test_wrapped_and_prefixed_state_dicts(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(
        {"epoch": 1, "state_dict": {"module.a": torch.ones(2), "module.b": torch.zeros(1)}}, path
    )
    got = checkpoint_io.read_state_dict(path)
    assert sorted(got) == ["a", "b"]


def test_not_a_safetensors_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(ValueError, match="x.safetensors"):
        checkpoint_io.read_safetensors(path)


def test_views_sharing_one_storage_load_as_torch_does(tmp_path):
    """Views at the edges of their storage (the last element, an empty slice at its end, a
    stride-0 expansion) are legitimate and load as torch loads them."""
    flat = torch.arange(30.0)
    grid = flat.view(6, 5)
    tensors = {
        "grid": grid,
        "offset_transposed": grid[1:, 2:].t(),
        "strided": grid[1::2, ::3],
        "last": flat[29],  # 0-d at offset 29: the storage's last element
        "tail": flat[27:],
        "empty_at_end": flat[30:],  # zero-size, offset = storage size
        "expanded": torch.arange(3.0).expand(4, 3),  # stride (0, 1)
    }
    path = tmp_path / "views.bin"
    torch.save(tensors, path)
    got = checkpoint_io.read_torch_zip(path)
    for key, tensor in torch.load(path).items():
        assert got[key].shape == tuple(tensor.shape), key
        np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)


class _Pid:
    def __init__(self, pid):
        self.pid = pid


class _Rebuild:
    """A `torch._utils._rebuild_tensor_v2` call whose arguments can be edited."""

    def __init__(self, args):
        self.args = list(args)

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, tuple(self.args))


class _PickleReader(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda *args: _Rebuild(args)
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return _Pid(pid)


class _PickleWriter(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _Pid) else None


def _edit_tensor(path, key, **changes):
    """Rewrite the data.pkl of the torch.save file `path` with the storage offset / size /
    stride of tensor `key` replaced (the storages and the other records are kept)."""
    with zipfile.ZipFile(path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    (name,) = [n for n in entries if n.endswith("/data.pkl")]
    state = _PickleReader(io.BytesIO(entries[name])).load()
    for field, value in changes.items():
        state[key].args[{"offset": 1, "size": 2, "stride": 3}[field]] = value
    out = io.BytesIO()
    _PickleWriter(out, protocol=2).dump(state)
    entries[name] = out.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)


def _saved(tmp_path):
    path = tmp_path / "crafted.bin"
    torch.save({"ok": torch.ones(2), "visual.proj": torch.arange(30.0).view(6, 5)}, path)
    return path


def test_rewritten_file_without_changes_loads(tmp_path):
    path = _saved(tmp_path)
    _edit_tensor(path, "visual.proj")  # the rewrite itself keeps a valid file
    got = checkpoint_io.read_torch_zip(path)
    for key, tensor in torch.load(path).items():
        np.testing.assert_array_equal(got[key], tensor.numpy(), err_msg=key)


@pytest.mark.parametrize(
    "changes",
    [
        {"stride": (6, 1)},  # last element 5·6 + 4 = 34 of 30
        {"stride": (5, 2)},
        {"size": (7, 5)},
        {"offset": 1},  # one past the end: element 30 of 30
        {"offset": 30, "size": (), "stride": ()},  # a 0-d tensor past the end
        {"offset": 10**20},
        {"size": (2, 5), "stride": (2**64, 1)},  # 2^64 wraps to 0 in 64-bit arithmetic
        {"offset": -1},
        {"offset": 4, "size": (5,), "stride": (-1,)},  # negative strides
        {"size": (-1, 5)},
    ],
    ids=repr,
)
def test_tensor_outside_its_storage_is_rejected(tmp_path, changes):
    path = _saved(tmp_path)
    _edit_tensor(path, "visual.proj", **changes)
    with pytest.raises((RuntimeError, TypeError, ValueError)):
        torch.load(path)  # torch refuses these files too
    with pytest.raises(ValueError, match=r"crafted\.bin: tensor 'visual\.proj'"):
        checkpoint_io.read_torch_zip(path)


# ----------------------------------------------------------- safetensors through the library


def _numpy_tensors(seed=0):
    """Every dtype fomo_jax writes, a 0-d array, an odd-length bf16 (misaligns what follows in
    the old layout) and a transposed view (non-contiguous: must not be written scrambled)."""
    rng = np.random.default_rng(seed)
    grid = rng.standard_normal((4, 3)).astype(np.float32)
    return {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "bf16": rng.standard_normal((3,)).astype(ml_dtypes.bfloat16),
        "f16": rng.standard_normal((2, 2)).astype(np.float16),
        "f64": rng.standard_normal(5),
        "i32": np.arange(7, dtype=np.int32),
        "u8": np.arange(3, dtype=np.uint8),
        "bool": np.array([True, False]),
        "scalar": np.array(2.5, np.float32),
        "transposed": grid.T,
    }


def _assert_same(got: dict, want: dict):
    assert list(got) == list(want) or sorted(got) == sorted(want), (sorted(got), sorted(want))
    for key, value in want.items():
        value = np.asarray(value)
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def _torch_numpy(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: _numpy(v) for k, v in tensors.items()}


def test_float32_and_bfloat16_round_trip_read_by_torch(tmp_path):
    tensors = _numpy_tensors()
    path = tmp_path / "w.safetensors"
    checkpoint_io.write_safetensors(path, tensors)
    _assert_same(checkpoint_io.read_safetensors(path), tensors)
    # the independent reader: the library's torch loader sees the same values and dtypes
    _assert_same(_torch_numpy(load_file(path)), tensors)


def test_files_the_library_writes_load_equal(tmp_path):
    from safetensors.numpy import save_file as numpy_save_file

    tensors = {k: np.ascontiguousarray(v) for k, v in _numpy_tensors(seed=1).items()}
    path = tmp_path / "numpy.safetensors"
    numpy_save_file(tensors, path, metadata={"format": "np"})
    _assert_same(checkpoint_io.read_safetensors(path), tensors)
    assert checkpoint_io.read_safetensors_metadata(path) == {"format": "np"}
    torch_tensors = {k: v.detach().contiguous() for k, v in _tensors().items() if k != "param"}
    path = tmp_path / "torch.safetensors"
    save_file(torch_tensors, path)
    _assert_same(checkpoint_io.read_state_dict(path), _torch_numpy(torch_tensors))


def test_metadata_round_trip(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoint_io.write_safetensors(path, {"a": np.ones(2, np.float32)}, {"format": "pt", "n": 3})
    assert checkpoint_io.read_safetensors_metadata(path) == {"format": "pt", "n": "3"}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "n": "3"}
    checkpoint_io.write_safetensors(path, {"a": np.ones(2, np.float32)})
    assert checkpoint_io.read_safetensors_metadata(path) == {}


def test_unwritable_dtype_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match=r"tensor 'names': dtype <U3"):
        checkpoint_io.write_safetensors(tmp_path / "x.safetensors", {"names": np.array(["abc"])})
    assert not (tmp_path / "x.safetensors").exists()


def test_reading_holds_the_tensors_once(tmp_path):
    """The file is memory-mapped and each tensor copied out once: the allocations peak at the
    tensors' size, not at file bytes + tensors as a whole-file read would."""
    import tracemalloc

    tensors = {f"w{i}": np.full((256, 1024), i, np.float32) for i in range(8)}  # 8 MiB
    path = tmp_path / "big.safetensors"
    checkpoint_io.write_safetensors(path, tensors)
    size = sum(a.nbytes for a in tensors.values())
    tracemalloc.start()
    try:
        got = checkpoint_io.read_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _assert_same(got, tensors)
    assert peak < 1.25 * size, (peak, size)


def _old_writer_bytes(tensors: dict[str, np.ndarray], metadata: dict | None) -> bytes:
    """The byte layout of the hand-written writer fomo_jax used before the library: tensors in
    the given order with no alignment, compact JSON header padded with spaces to 8 bytes,
    `__metadata__` last."""
    names = {
        np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
        np.dtype(np.float16): "F16", np.dtype(np.float64): "F64", np.dtype(np.int32): "I32",
        np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL", np.dtype(np.int64): "I64",
    }  # fmt: skip
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        data = np.asarray(array, order="C").tobytes()
        header[name] = {
            "dtype": names[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + b"".join(chunks)


def test_file_in_the_old_layout_loads(tmp_path):
    tensors = _numpy_tensors(seed=2)
    path = tmp_path / "old.safetensors"
    path.write_bytes(_old_writer_bytes(tensors, {"format": "pt"}))
    got = checkpoint_io.read_safetensors(path)
    assert list(got) == list(tensors)  # file order, as the old reader gave
    _assert_same(got, tensors)
    assert checkpoint_io.read_safetensors_metadata(path) == {"format": "pt"}


def test_model_file_in_the_old_layout_loads(tiny_model, tmp_path):
    import jax

    from fomo_jax import models
    from fomo_jax import params as params_lib

    _, params = params_lib.split(tiny_model)
    flat = {k: np.asarray(v) for k, v in params_lib.flatten(jax.device_get(params)).items()}
    metadata = {
        "format": "fomo_jax",
        checkpoint_io.CONFIG_METADATA_KEY: json.dumps(tiny_model.config.to_dict(), sort_keys=True),
    }
    path = tmp_path / "model.safetensors"
    path.write_bytes(_old_writer_bytes(flat, metadata))
    loaded = models.load_model(path)
    assert loaded.config == tiny_model.config
    _, loaded_params = params_lib.split(loaded)
    _assert_same(params_lib.flatten(jax.device_get(loaded_params)), flat)
    # and what save_model writes now reads back the same
    models.save_model(tmp_path / "new.safetensors", tiny_model)
    _assert_same(checkpoint_io.read_safetensors(tmp_path / "new.safetensors"), flat)


# --------------------------------------------------------------------------------- sharding


def _torch_state(seed=0) -> dict[str, torch.Tensor]:
    """The state dict of `_torch_module` (several shards at a 100-byte shard size)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(4, 6, generator=g),
        "encoder.bias": torch.randn(4, generator=g),
        "head.weight": torch.randn(3, 4, generator=g).bfloat16(),
        "norm.weight": torch.randn(3, generator=g),
    }


def _torch_module() -> torch.nn.Module:
    return torch.nn.ModuleDict(
        {
            "encoder": torch.nn.Linear(6, 4),
            "head": torch.nn.Linear(4, 3, bias=False, dtype=torch.bfloat16),
            "norm": torch.nn.LayerNorm(3, elementwise_affine=True, bias=False),
        }
    )


def test_sharded_index_from_huggingface_hub_loads(tmp_path):
    from huggingface_hub import save_torch_state_dict

    state = _torch_state()
    save_torch_state_dict(state, tmp_path, max_shard_size=100)
    index = tmp_path / "model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    want = _torch_numpy(state)
    _assert_same(checkpoint_io.read_safetensors(index), want)
    _assert_same(checkpoint_io.read_state_dict(index), want)


def test_sharded_write_loads_in_huggingface_hub(tmp_path):
    from huggingface_hub import load_torch_model

    want = _torch_numpy(_torch_state(seed=3))
    written = checkpoint_io.write_sharded_safetensors(
        tmp_path, want, max_shard_bytes=100, metadata={"format": "pt"}
    )
    assert written[-1] == "model.safetensors.index.json" and len(written) > 2
    assert written[0] == f"model-00001-of-{len(written) - 1:05d}.safetensors"
    module = _torch_module()
    load_torch_model(module, tmp_path, strict=True)
    _assert_same(_torch_numpy(dict(module.state_dict())), want)
    _assert_same(checkpoint_io.read_safetensors(tmp_path / written[-1]), want)
    index = json.loads((tmp_path / written[-1]).read_text())
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())


def test_sharded_write_replaces_an_earlier_export(tmp_path):
    tensors = _torch_numpy(_torch_state())
    (tmp_path / "other.safetensors").write_bytes(b"kept")
    checkpoint_io.write_sharded_safetensors(tmp_path, tensors, max_shard_bytes=100)
    assert checkpoint_io.write_sharded_safetensors(tmp_path, tensors, max_shard_bytes=10**6) == [
        "model.safetensors"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "other.safetensors"]
    _assert_same(checkpoint_io.read_safetensors(tmp_path / "model.safetensors"), tensors)
    checkpoint_io.write_sharded_safetensors(tmp_path, tensors, max_shard_bytes=100)
    assert not (tmp_path / "model.safetensors").exists()


def test_inconsistent_index_is_named(tmp_path):
    tensors = _torch_numpy(_torch_state())
    written = checkpoint_io.write_sharded_safetensors(tmp_path, tensors, max_shard_bytes=100)
    index_path = tmp_path / written[-1]
    first, second = written[0], written[1]
    good = json.loads(index_path.read_text())

    def rewrite(**weight_map):
        index_path.write_text(
            json.dumps({**good, "weight_map": {**good["weight_map"], **weight_map}})
        )

    moved = next(k for k, v in good["weight_map"].items() if v == second)
    rewrite(**{moved: first})  # the index places a key of the second shard in the first
    with pytest.raises(ValueError, match=rf"shard {second} holds \['{moved}'\], which the index"):
        checkpoint_io.read_safetensors(index_path)
    rewrite(ghost=first)  # a key no shard holds
    with pytest.raises(ValueError, match=rf"\['ghost'\] are not in the shards .*{first}"):
        checkpoint_io.read_safetensors(index_path)
    rewrite()
    (tmp_path / second).unlink()
    with pytest.raises(FileNotFoundError, match=second):
        checkpoint_io.read_safetensors(index_path)
