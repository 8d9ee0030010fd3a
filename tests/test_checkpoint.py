"""Checkpoints: round trip, canonical bytes, and every way a model file can be bad."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from puma_cli.errors import CheckpointError, OutputExistsError
from puma_cli.io.checkpoint import (
    Checkpoint,
    DataRecord,
    checkpoint_pieces,
    load_checkpoint,
    save_checkpoint,
    tensor_bytes,
)
from puma_cli.models.architectures import Architecture, Classifier


def _checkpoint(hidden: tuple[int, ...], n_features: int, n_classes: int, seed: int) -> Checkpoint:
    torch.manual_seed(seed)
    model = Classifier(Architecture("mlp", (n_features,), n_classes, hidden))
    return Checkpoint(
        model=model,
        recipe={"epochs": 1, "seed": seed},
        data={"train": DataRecord("/nowhere/train.csv", "ab" * 32, 10), "test": None},
        roles=np.array([0, 1, 0, 0, 0, 0, 0, 0, 1, 0], dtype=np.uint8),
        feature_names=tuple(f"f{i}" for i in range(n_features)),
        class_names=None,
        metrics={"train": {"accuracy": 0.5}},
        provenance=[{"op": "test"}],
    )


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    hidden=st.lists(st.integers(1, 8), min_size=1, max_size=3).map(tuple),
    n_features=st.integers(1, 5),
    n_classes=st.integers(2, 4),
    seed=st.integers(0, 1000),
)
def test_round_trip_keeps_weights_and_record(
    tmp_path: Path, hidden: tuple[int, ...], n_features: int, n_classes: int, seed: int
) -> None:
    original = _checkpoint(hidden, n_features, n_classes, seed)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, original, overwrite=True)
    loaded = load_checkpoint(path)
    for (name, a), (_, b) in zip(
        original.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert loaded.metadata() == original.metadata()
    np.testing.assert_array_equal(loaded.roles, original.roles)
    x = torch.randn(3, n_features)
    assert torch.equal(loaded.model(x), original.model.eval()(x))


def test_same_content_gives_same_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_checkpoint(a, _checkpoint((4,), 2, 2, 0))
    save_checkpoint(b, _checkpoint((4,), 2, 2, 0))
    assert a.read_bytes() == b.read_bytes()


def test_the_streamed_file_is_the_librarys_file(tmp_path: Path) -> None:
    """A checkpoint is written a tensor at a time; its bytes are safetensors' own file of
    the same tensors and metadata (header keys sorted), whatever the tensors' dtypes and
    sizes, with a tied layer, a scalar and empty tensors among them, and it loads back."""
    original = _checkpoint((4,), 3, 2, 0)
    inner = original.model.net  # type: ignore[union-attr]
    linears = [m for m in inner.modules() if isinstance(m, torch.nn.Linear)]
    original.extra = {
        "sisa.a": torch.arange(6, dtype=torch.int16).reshape(2, 3),
        "sisa.b": torch.randn(5, dtype=torch.float64),
        "sisa.c": torch.randn(3, 2).to(torch.bfloat16),
        "sisa.d": torch.zeros(0, dtype=torch.float32),
        "sisa.e": torch.tensor(7, dtype=torch.int64),
        "sisa.f": torch.zeros((2, 0), dtype=torch.float64),
        "sisa.g": torch.tensor([True, False]),
        "sisa.h": linears[0].weight.detach(),  # tied to the model's first layer
    }
    state = {f"model.{k}": v.clone() for k, v in original.model.state_dict().items()}
    state["rows.role"] = torch.from_numpy(original.roles.astype(np.uint8))
    state.update({k: v.clone() for k, v in original.extra.items()})
    meta = {k: json.dumps(v, sort_keys=True) for k, v in original.metadata().items()}
    streamed = b"".join(checkpoint_pieces(original))
    assert streamed == tensor_bytes(state, meta)
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, original)
    assert path.read_bytes() == streamed
    loaded = load_checkpoint(path)
    assert loaded.extra.keys() == original.extra.keys()
    for name, tensor in original.extra.items():
        assert loaded.extra[name].dtype == tensor.dtype
        assert torch.equal(loaded.extra[name], tensor), name


def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_checkpoint(path, _checkpoint((4,), 2, 2, 0))
    assert path.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [path]


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _checkpoint((4,), 2, 2, 0))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="truncated or damaged"):
        load_checkpoint(path)


def test_pickle_is_never_loaded(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(path)
    torch.save({"w": torch.zeros(2)}, tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(tmp_path / "t.pt")


def test_foreign_safetensors_is_not_a_puma_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a puma checkpoint"):
        load_checkpoint(path)


def test_weights_that_do_not_fit_the_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_checkpoint(path, _checkpoint((4,), 2, 2, 0))
    # Same file, but the metadata now claims a wider hidden layer.
    raw = path.read_bytes().replace(b'\\"hidden\\":[4]'.replace(b":", b": "), b'\\"hidden\\": [5]')
    assert raw != path.read_bytes()
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"expected torch\.float32 of shape 5x2 for its arch"):
        load_checkpoint(path)
