"""Reading PyTorch weight files tensor by tensor: formats, dtypes, shards, and every kind of bad file."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch
import torch

from ipadapter_jax.weights.torch_layout import ConversionError
from ipadapter_jax.weights.weight_files import open_state_dict, with_variant

NAME = "diffusion_pytorch_model"


def tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "norm.bias": rng.standard_normal(4).astype(np.float16),
        "emb.weight": rng.standard_normal((5, 2)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(6, dtype=np.int64).reshape(2, 3),
        "scalar": np.array(1.5, np.float64),
    }


def write_safetensors(folder: Path, state: dict, name: str = f"{NAME}.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    # safetensors' numpy writer has no bfloat16: write through torch.
    safetensors.torch.save_file({k: _to_torch(v) for k, v in state.items()}, path)
    return path


def _to_torch(value: np.ndarray) -> torch.Tensor:
    if value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(value.copy())


def assert_same(state, expected: dict) -> None:
    assert set(state) == set(expected)
    for key, value in expected.items():
        read = state[key]
        assert read.dtype == value.dtype and read.shape == value.shape, key
        np.testing.assert_array_equal(read.astype(np.float64), value.astype(np.float64))


def test_safetensors_all_dtypes_lazily(tmp_path):
    path = write_safetensors(tmp_path, tensors())
    state = open_state_dict(tmp_path)
    assert state.source == path and {ref.file for ref in state.refs.values()} == {path}
    assert_same(state, tensors())
    placeholders = state.placeholders()
    assert all(p.strides == (0,) * p.ndim and p.shape == tensors()[k].shape for k, p in placeholders.items())


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_formats(tmp_path, zip_format):
    torch.save(
        {k: _to_torch(v) for k, v in tensors().items()},
        tmp_path / f"{NAME}.bin",
        _use_new_zipfile_serialization=zip_format,
    )
    assert_same(open_state_dict(tmp_path), tensors())


def test_safetensors_preferred_over_bin_and_variants(tmp_path):
    torch.save({"a": torch.zeros(1)}, tmp_path / f"{NAME}.bin")
    write_safetensors(tmp_path, {"b": np.ones(2, np.float32)})
    write_safetensors(tmp_path, {"c": np.ones(2, np.float16)}, with_variant(f"{NAME}.safetensors", "fp16"))
    assert list(open_state_dict(tmp_path)) == ["b"]
    assert list(open_state_dict(tmp_path, variant="fp16")) == ["c"]
    assert with_variant("m.safetensors.index.json", "fp16") == "m.safetensors.index.fp16.json"


def test_sharded_index(tmp_path):
    state = tensors()
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[:2], "part-2.safetensors": keys[2:]}
    for shard, shard_keys in shards.items():
        write_safetensors(tmp_path, {k: state[k] for k in shard_keys}, shard)
    index = {"metadata": {}, "weight_map": {k: shard for shard, ks in shards.items() for k in ks}}
    (tmp_path / f"{NAME}.safetensors.index.json").write_text(json.dumps(index))
    loaded = open_state_dict(tmp_path)
    assert {ref.file.name for ref in loaded.refs.values()} == set(shards)
    assert_same(loaded, state)

    os.remove(tmp_path / "part-2.safetensors")
    missing_shard = "lists shard 'part-2.safetensors', which is missing.*incomplete download"
    with pytest.raises(ConversionError, match=missing_shard):
        open_state_dict(tmp_path)


def test_no_weights_names_what_is_there(tmp_path):
    write_safetensors(tmp_path, {"a": np.ones(1, np.float16)}, f"{NAME}.fp16.safetensors")
    hint = r"no weight file found.*diffusion_pytorch_model.fp16.safetensors.*variant"
    with pytest.raises(ConversionError, match=hint):
        open_state_dict(tmp_path)


def test_truncated_safetensors_names_tensor_and_sizes(tmp_path):
    path = write_safetensors(tmp_path, tensors())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ConversionError) as info:
        open_state_dict(tmp_path)
    message = str(info.value)
    assert str(path) in message and "truncated" in message and "interrupted download" in message
    assert f"has {len(data) - 10} bytes (the header describes {len(data)})" in message
    assert "'scalar'" in message or "'ids'" in message or "'emb.weight'" in message  # the tensor cut off


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x01\x02",
        b"\xff" * 64,
        (20).to_bytes(8, "little") + b"{not json at all!!}",
        (2).to_bytes(8, "little") + b"[]",
        b"<html>404</html>" * 4,
    ],
    ids=["empty", "tiny", "garbage", "bad-json", "json-list", "html"],
)
def test_corrupt_safetensors(tmp_path, content):
    (tmp_path / f"{NAME}.safetensors").write_bytes(content)
    with pytest.raises(ConversionError, match=f"{NAME}.safetensors: (not a readable safetensors|corrupt safetensors)"):
        open_state_dict(tmp_path)


def test_header_inconsistent_with_shape(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    (tmp_path / f"{NAME}.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    with pytest.raises(ConversionError, match=r"tensor 'w' declares shape \(2, 2\) float32 \(16 bytes\) but spans 12"):
        open_state_dict(tmp_path)


class _Payload:
    """Unpickling this runs `os.system`: what a malicious `.bin` does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_with_arbitrary_objects_is_refused_without_running_them(tmp_path):
    marker = tmp_path / "payload_ran"
    torch.save({"weight": torch.zeros(2), "extra": _Payload(marker)}, tmp_path / f"{NAME}.bin")
    with pytest.raises(ConversionError) as info:
        open_state_dict(tmp_path)
    message = str(info.value)
    assert f"{NAME}.bin: refused to load" in message and "system" in message and "weights_only=True" in message
    assert ".safetensors" in message
    assert not marker.exists()

    # A plain (legacy-format) pickle with the same payload is refused too.
    (tmp_path / f"{NAME}.bin").write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(ConversionError, match=r"refused to load: .*GLOBAL (posix|nt).system"):
        open_state_dict(tmp_path)
    assert not marker.exists()


def test_bin_that_is_not_a_state_dict(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "epoch": 3}, tmp_path / f"{NAME}.bin")
    with pytest.raises(ConversionError, match="not a flat state dict of tensors.*training checkpoint"):
        open_state_dict(tmp_path)


def test_truncated_bin(tmp_path):
    path = tmp_path / f"{NAME}.bin"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ConversionError, match=f"{NAME}.bin: not a readable PyTorch checkpoint.*truncated or corrupt"):
        open_state_dict(tmp_path)
