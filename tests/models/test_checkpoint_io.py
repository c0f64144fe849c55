"""The torch-free readers against torch / safetensors themselves."""

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
