"""The torch-free readers against torch / safetensors themselves."""

import io
import pickle
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
