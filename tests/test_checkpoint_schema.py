"""The checkpoint schema: any bytes, any tampered field or tensor, gives a CheckpointError
that names what is wrong, or a checkpoint every command can use; never another exception."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from puma_cli.errors import CheckpointError
from puma_cli.io.checkpoint import Checkpoint, checkpoint_pieces, load_checkpoint
from puma_cli.models.recipe import TrainRecipe

SLOW = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)


def _parts(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    meta = {k: json.loads(v) for k, v in header["__metadata__"].items()}
    return load_file(str(path)), meta


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    save_file(tensors, str(path), metadata={k: json.dumps(v) for k, v in meta.items()})


def _loads_or_refuses(path: Path) -> Checkpoint | None:
    """The property: a CheckpointError, or a checkpoint whose record is usable."""
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(exc).startswith(str(path)), exc
        return None
    TrainRecipe.from_dict(checkpoint.recipe).validate()
    json.dumps(checkpoint.metadata())
    b"".join(checkpoint_pieces(checkpoint))
    assert checkpoint.roles.shape == (checkpoint.data["train"].n,)  # type: ignore[union-attr]
    return checkpoint


def _write_and_load(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    path = folder / "m.safetensors"
    _write(path, tensors, meta)
    _loads_or_refuses(path)


def _paths(meta: dict[str, Any]) -> list[tuple[str, ...]]:
    """Every key path in the metadata, nested mappings included."""
    found: list[tuple[str, ...]] = []

    def walk(value: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                found.append((*prefix, key))
                walk(inner, (*prefix, key))

    walk(meta, ())
    return found


@pytest.fixture(scope="module")
def sisa_file(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sisa") / "s.safetensors"
    result = run(
        "train", data_dir / "radial.csv", "-o", path, "--shards", "2", "--slices", "2",
        "--epochs", "2", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return path


@SLOW
@given(blob=st.binary(max_size=400))
def test_random_bytes_are_refused(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


@SLOW
@given(data=st.data())
def test_tampered_metadata_is_refused_or_harmless(
    tmp_path: Path, model_file: Path, sisa_file: Path, data: st.DataObject
) -> None:
    tensors, meta = _parts(data.draw(st.sampled_from([model_file, sisa_file])))
    where = data.draw(st.sampled_from(_paths(meta)))
    holder = meta
    for key in where[:-1]:
        holder = holder[key]
    if data.draw(st.booleans()):
        holder.pop(where[-1])
    else:
        holder[where[-1]] = data.draw(json_values)
    _write_and_load(tmp_path, tensors, meta)


@SLOW
@given(data=st.data())
def test_tampered_tensors_are_refused_or_harmless(
    tmp_path: Path, model_file: Path, sisa_file: Path, data: st.DataObject
) -> None:
    tensors, meta = _parts(data.draw(st.sampled_from([model_file, sisa_file])))
    name = data.draw(st.sampled_from(sorted(tensors)))
    change = data.draw(st.sampled_from(["drop", "shorter", "dtype", "add", "values"]))
    tensor = tensors[name]
    if change == "drop":
        tensors.pop(name)
    elif change == "shorter" and tensor.ndim:
        tensors[name] = tensor[: data.draw(st.integers(0, max(tensor.shape[0] - 1, 0)))].clone()
    elif change == "dtype":
        tensors[name] = tensor.to(data.draw(st.sampled_from([torch.float64, torch.int64])))
    elif change == "add":
        tensors[f"{name.rsplit('.', 1)[0]}.extra"] = torch.zeros(2)
    else:
        values = [3, 99, 200] + ([] if tensor.dtype == torch.uint8 else [-7])
        values += [float("nan")] if tensor.is_floating_point() else []
        tensors[name] = torch.full_like(tensor, data.draw(st.sampled_from(values)))
    _write_and_load(tmp_path, tensors, meta)


def _tamper(source: Path, folder: Path, change: Any) -> Path:
    tensors, meta = _parts(source)
    change(tensors, meta)
    path = folder / "bad.safetensors"
    _write(path, tensors, meta)
    return path


TAMPERED = {
    "text format version": (
        lambda t, m: m.update(format_version="one"),
        "metadata 'format_version' is text, not a whole number",
    ),
    "recipe a string": (lambda t, m: m.update(recipe="adam"), "'recipe' is text, not a mapping"),
    "provenance of ints": (
        lambda t, m: m.update(provenance=[1, 2]),
        "'provenance[0]' is a int, not a mapping",
    ),
    "short role tensor": (
        lambda t, m: t.update({"rows.role": t["rows.role"][:-3].clone()}),
        "tensor rows.role is torch.uint8 of shape 157",
    ),
    "huge shard count": (
        lambda t, m: (m["architecture"].update(shards=10**6), m["recipe"].update(shards=10**6)),
        "'architecture.shards' is 1000000, more than its 160 rows",
    ),
    "huge width": (
        lambda t, m: m["architecture"].update(hidden=[10**6, 32]),
        "expected torch.float32 of shape 1000000x2",
    ),
    "bad sha256": (
        lambda t, m: m["data"]["train"].update(sha256="xyz"),
        "'data.train.sha256' is not a sha256",
    ),
    "unknown augmentation": (
        lambda t, m: m["recipe"].update(augment="rotate"),
        "is not a usable training recipe (--augment 'rotate': choose none, flip, crop",
    ),
    "numeric schedule": (
        lambda t, m: m["recipe"].update(lr_schedule=3),
        "'recipe.lr_schedule' is a int, not text",
    ),
    "text input divisor": (
        lambda t, m: m["recipe"].update(input_divisor="255"),
        "'recipe.input_divisor' is text, not a number",
    ),
    "normalize mean not a list": (
        lambda t, m: m["recipe"].update(normalize_mean=0.5, normalize_std=[0.2]),
        "'recipe.normalize_mean' is a float, not a list of numbers",
    ),
    "normalize std of zero": (
        lambda t, m: m["recipe"].update(
            standardize=False, normalize_mean=[0.5], normalize_std=[0.0]
        ),
        "is not a usable training recipe (--normalize-std 0: give positive numbers)",
    ),
    "divisor beside a fitted standardisation": (
        lambda t, m: m["recipe"].update(input_divisor=255),
        "the recipe cannot have both",
    ),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_each_tampered_field_is_named_through_the_cli(
    case: str, model_file: Path, tmp_path: Path
) -> None:
    change, message = TAMPERED[case]
    bad = _tamper(model_file, tmp_path, change)
    for command in (["info", bad], ["eval", "-m", bad]):
        assert_clean_error(run(*command, "--device", "cpu"), message)


def test_sisa_states_of_the_wrong_shape_or_stage_are_refused(
    sisa_file: Path, tmp_path: Path
) -> None:
    def wrong_stage(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        name = next(k for k in tensors if k.startswith("sisa.state.0.0."))
        tensors[name.replace("sisa.state.0.0.", "sisa.state.0.5.")] = tensors.pop(name)

    bad = _tamper(sisa_file, tmp_path, wrong_stage)
    assert_clean_error(run("info", bad), "names no stage of its 2 shards x 2 slices")

    def wrong_plan(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        tensors["sisa.shard"] = torch.full_like(tensors["sisa.shard"], 7)

    bad = _tamper(sisa_file, tmp_path, wrong_plan)
    assert_clean_error(run("info", bad), "tensor sisa.shard is torch.int16 of shape 160")


def test_a_valid_checkpoint_still_loads_after_the_schema(model_file: Path) -> None:
    checkpoint = _loads_or_refuses(model_file)
    assert checkpoint is not None
    assert np.isin(checkpoint.roles, (0, 1, 2)).all()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: {"updates": t["updates"]}, "lacks its 'updates' or 'batch_rows' tensor"),
        (lambda t: {**t, "updates": t["updates"][:, :-1].clone()}, "belongs to another model"),
        (lambda t: {**t, "batch_rows": t["batch_rows"] + 10**6}, "names rows outside the 160"),
        (lambda t: {**t, "updates": t["updates"] * float("nan")}, "holds NaN or inf updates"),
    ],
)
def test_a_tampered_amnesiac_sidecar_is_refused(
    change: Any, message: str, data_dir: Path, tmp_path: Path
) -> None:
    import hashlib

    model = tmp_path / "m.safetensors"
    result = run(
        "train", data_dir / "radial.csv", "-o", model, "--record-updates", "--epochs", "2",
        "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    sidecar = tmp_path / "m.updates.safetensors"
    save_file(change(load_file(str(sidecar))), str(sidecar))
    tensors, meta = _parts(model)  # the tamperer re-records the sidecar's sha256 too
    meta["sidecars"]["updates"]["sha256"] = hashlib.sha256(sidecar.read_bytes()).hexdigest()
    _write(model, tensors, meta)
    (tmp_path / "ids.txt").write_text("0\n2\n")
    result = run(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--method", "amnesiac",
        "--device", "cpu",
    )  # fmt: skip
    assert_clean_error(result, message)
    assert not (tmp_path / "m.removed.safetensors").exists()
