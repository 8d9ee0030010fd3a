"""Checkpoints: round trip, canonical bytes, and every way a model file can be bad."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from puma_cli.errors import CheckpointError, OutputExistsError
from puma_cli.io.checkpoint import Checkpoint, DataRecord, load_checkpoint, save_checkpoint
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
