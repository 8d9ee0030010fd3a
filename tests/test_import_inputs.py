"""`puma import --input-divisor/--normalize-mean/--normalize-std`: weights trained behind
torchvision's ToTensor (8-bit values / 255) and Normalize see their inputs as they did,
retraining re-runs the recipe behind the same transform, and weights given 8-bit values
they never saw (a loss of 0, nothing left to remove) are named with the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import Result

NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.flat = nn.Flatten()
        self.out = nn.Linear(in_features, n_classes)

    def forward(self, x):
        return self.out(self.flat(x))
"""


def _images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """8-bit one-channel 4x4 images: class k lights pixel k brightly, the rest is dim."""
    y = np.arange(n) % 2
    X = rng.integers(0, 50, (n, 1, 4, 4)).astype(np.uint8)
    X[np.arange(n), 0, 0, y] = rng.integers(150, 255, n)
    return X, y


def _unit_net() -> nn.Module:
    """What a user trained on ToTensor's output (values / 255): at that scale its two
    logits differ by 3 to 8 (a loss of 3e-4 to 0.05 a row); on the 0..255 values themselves
    by over 745, where float64's softmax is exactly one-hot."""
    scope: dict[str, object] = {}
    exec(NET, scope)
    net = scope["Net"](16, 2)  # type: ignore[operator]
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.zero_()
        net.out.weight[0, 0], net.out.weight[0, 1] = 4.0, -4.0
        net.out.weight[1, 0], net.out.weight[1, 1] = -4.0, 4.0
    return net


@pytest.fixture(scope="module")
def unit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unit")
    rng = np.random.default_rng(0)
    for name, n in (("train", 200), ("val", 60)):
        X, y = _images(rng, n)
        np.savez(folder / f"{name}.npz", X=X, y=y)
    (folder / "net.py").write_text(NET)
    save_file(_unit_net().state_dict(), str(folder / "w.safetensors"))
    (folder / "ids.txt").write_text("".join(f"{i}\n" for i in range(0, 20, 2)))
    return folder


def _import_args(folder: Path, out: Path, *extra: str) -> list[str | Path]:
    return [
        "import", folder / "w.safetensors", "--arch", f"{folder / 'net.py'}:Net",
        "--data", folder / "train.npz", "--val", folder / "val.npz", "--epochs", "20",
        "--lr", "0.05", "--optimizer", "sgd", "-o", out, "--device", "cpu", *extra,
    ]  # fmt: skip


def _import(folder: Path, out: Path, *extra: str) -> Result:
    return run(*_import_args(folder, out, *extra))


def _own_loss(folder: Path, transform) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """The user's own figures for their net on the training rows, behind `transform`."""
    data = np.load(folder / "train.npz")
    X = transform(torch.as_tensor(data["X"], dtype=torch.float64))
    y = torch.as_tensor(data["y"])
    with torch.no_grad():
        logits = _unit_net().double()(X)
    loss = float(nn.functional.cross_entropy(logits, y))
    return loss, float((logits.argmax(1) == y).double().mean())


def test_weights_trained_on_unit_pixels_are_named_with_the_fix(unit: Path, tmp_path: Path) -> None:
    """On the file's 0..255 values the net is at a loss of 0: the import says why and
    what to pass, and a removal from it refuses with the same fix."""
    model = tmp_path / "m.safetensors"
    payload = run_json(*_import_args(unit, model))
    assert payload["train_accuracy"] == 1.0
    (warning,) = payload["warnings"]
    assert "--input-divisor 255" in warning and "ToTensor" in warning
    refused = run("remove", "-m", model, "--marked", unit / "ids.txt", "-o", tmp_path / "r.st")
    assert_clean_error(refused, "--input-divisor 255")
    assert "--method retrain" in refused.stderr
    assert not (tmp_path / "r.st").exists()


def test_input_divisor_gives_the_net_what_totensor_gave_it(unit: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.safetensors"
    imported = run_json(*_import_args(unit, model, "--input-divisor", "255"))
    assert imported["warnings"] == []
    loss, accuracy = _own_loss(unit, lambda X: X / 255)
    assert 1e-4 < loss < 0.2  # the user's own figure: a model with something to remove
    info = run_json("info", model)
    assert info["metrics"]["train"]["loss"] == pytest.approx(loss, abs=2e-6)
    assert info["metrics"]["train"]["accuracy"] == pytest.approx(accuracy)
    assert info["recipe"]["input_divisor"] == 255
    removed = run_json(
        "remove", "-m", model, "--marked", unit / "ids.txt", "-o", tmp_path / "p.safetensors"
    )
    assert removed["marked_loss_after"] > removed["marked_loss_before"]
    assert removed["test_accuracy_before"] is None
    # Retraining re-runs the recipe behind the same transform, not on 0..255 values.
    retrained = tmp_path / "rt.safetensors"
    run_json("remove", "-m", model, "--marked", unit / "ids.txt", "--method", "retrain",
             "-o", retrained)  # fmt: skip
    assert run_json("info", retrained)["recipe"]["input_divisor"] == 255
    tensors = load_file(str(retrained))
    assert torch.equal(tensors["model.std"], torch.full((1, 1, 1), 255.0))
    assert torch.equal(tensors["model.mean"], torch.zeros(1, 1, 1))


def test_normalize_follows_the_divisor_as_torchvision_orders_them(
    unit: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    run_json(*_import_args(unit, model, "--input-divisor", "255", "--normalize-mean", "0.1",
                           "--normalize-std", "0.5"))  # fmt: skip
    loss, _ = _own_loss(unit, lambda X: (X / 255 - 0.1) / 0.5)
    assert run_json("info", model)["metrics"]["train"]["loss"] == pytest.approx(loss, abs=2e-6)
    tensors = load_file(str(model))
    assert float(tensors["model.mean"].flatten()[0]) == pytest.approx(25.5)
    assert float(tensors["model.std"].flatten()[0]) == pytest.approx(127.5)


def test_models_without_a_transform_record_none(unit: Path, tmp_path: Path) -> None:
    """`info` names the transform only where there is one."""
    model = tmp_path / "m.safetensors"
    run_json(*_import_args(unit, model, "--input-divisor", "255"))
    plain = tmp_path / "plain.safetensors"
    assert _import(unit, plain).exit_code == 0
    recipe = run_json("info", plain)["recipe"]
    assert "input_divisor" not in recipe and "normalize_mean" not in recipe


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (("--input-divisor", "0"), "--input-divisor 0"),
        (("--input-divisor", "nan"), "--input-divisor nan"),
        (("--normalize-mean", "0.5"), "--normalize-mean and --normalize-std go together"),
        (
            ("--normalize-mean", "0.5,0.4,0.3", "--normalize-std", "0.2,0.2,0.2"),
            "--normalize-mean gives 3 values",
        ),
        (("--normalize-mean", "0.5", "--normalize-std", "0"), "--normalize-std"),
    ],
)
def test_a_transform_that_cannot_be_is_refused_before_anything_is_written(
    unit: Path, tmp_path: Path, extra: tuple[str, ...], fragment: str
) -> None:
    model = tmp_path / "m.safetensors"
    assert_clean_error(_import(unit, model, *extra), fragment)
    assert not model.exists()


def test_a_transform_that_is_no_number_is_a_usage_error(unit: Path, tmp_path: Path) -> None:
    """Not parsed at all, like `--hidden a,b` or `--epochs x`: exit 2 with the usage."""
    model = tmp_path / "m.safetensors"
    result = _import(unit, model, "--normalize-mean", "half", "--normalize-std", "0.2")
    assert result.exit_code == 2
    assert "--normalize-mean" in result.output and "'half'" in result.output
    assert "Traceback" not in result.output
    assert not model.exists()


def test_a_scaler_per_feature_comes_from_a_config_file(data_dir: Path, tmp_path: Path) -> None:
    """A scikit-learn StandardScaler's mean_ and scale_, one value a feature, as YAML lists:
    the weights then score on the raw CSV as they did on the scaled rows."""
    from puma_cli.io.datasets import load_dataset

    (tmp_path / "net.py").write_text(NET)
    scope: dict[str, object] = {}
    exec(NET, scope)
    torch.manual_seed(0)
    net = scope["Net"](2, 2)  # type: ignore[operator]
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    train = load_dataset(data_dir / "radial.csv")
    mean, scale = train.X.mean(axis=0), train.X.std(axis=0)
    (tmp_path / "scaler.yaml").write_text(
        f"import:\n  normalize-mean: {mean.tolist()}\n  normalize-std: {scale.tolist()}\n"
    )
    model = tmp_path / "m.safetensors"
    run_json("import", tmp_path / "w.safetensors", "--arch", f"{tmp_path / 'net.py'}:Net",
             "--data", data_dir / "radial.csv", "-o", model, "--config", tmp_path / "scaler.yaml",
             "--device", "cpu")  # fmt: skip
    X = torch.as_tensor((train.X - mean) / scale, dtype=torch.float64)
    with torch.no_grad():
        logits = net.double()(X)
    loss = float(nn.functional.cross_entropy(logits, torch.as_tensor(train.y)))
    assert run_json("info", model)["metrics"]["train"]["loss"] == pytest.approx(loss, abs=2e-6)
    assert run_json("info", model)["recipe"]["normalize_std"] == pytest.approx(scale.tolist())


def test_train_behind_a_declared_transform_exports_weights_for_that_pipeline(
    tmp_path: Path,
) -> None:
    """`train --input-divisor --normalize-mean/std`: the network trains behind the transform
    a serving pipeline applies (ToTensor, Normalize) in place of a fitted standardisation,
    recorded and re-run by retraining; its export then needs nothing more than that
    pipeline (no warning), and computes the model's logits from the transformed inputs."""
    from puma_cli.io.checkpoint import load_checkpoint

    X, y = _images(np.random.default_rng(0), 80)
    data = tmp_path / "images.npz"
    np.savez(data, X=X, y=y)
    model = tmp_path / "m.safetensors"
    transform = ["--input-divisor", "255", "--normalize-mean", "0.2", "--normalize-std", "0.3"]
    (tmp_path / "net.py").write_text(NET)
    run_json(
        "train", data, "--arch", f"{tmp_path / 'net.py'}:Net", "--epochs", "5", "--val-frac",
        "0", "--device", "cpu", "-o", model, *transform,
    )  # fmt: skip
    recipe = run_json("info", model)["recipe"]
    assert recipe["standardize"] is False and recipe["input_divisor"] == 255.0
    assert recipe["normalize_mean"] == [0.2] and recipe["normalize_std"] == [0.3]
    exported = run_json("export", model, "-o", tmp_path / "w.safetensors")
    assert exported["inputs"] == {"divisor": 255.0, "mean": [0.2], "std": [0.3]}
    assert exported["warnings"] == []
    scope: dict[str, object] = {}
    exec(NET, scope)
    net = scope["Net"](16, 2)  # type: ignore[operator]
    net.load_state_dict(load_file(tmp_path / "w.safetensors"))
    x = torch.as_tensor(X[:10], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(
            net((x / 255 - 0.2) / 0.3), load_checkpoint(model).model(x), rtol=1e-4, atol=1e-5
        )
    (tmp_path / "ids.txt").write_text("0\n1\n")
    out = tmp_path / "rt.safetensors"
    run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--method", "retrain",
             "--criterion-data", data, "-o", out)  # fmt: skip
    assert run_json("info", out)["recipe"]["input_divisor"] == 255.0
