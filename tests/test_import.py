"""`puma import`: weights trained outside puma become a checkpoint every command takes;
weights that do not fit are refused by the first tensor that does not."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json
from safetensors.torch import load_file, save_file
from safetensors.torch import save as save_bytes
from torch import nn

from puma_cli.io.datasets import load_dataset

NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes, width=16):
        super().__init__()
        self.hidden = nn.Linear(in_features, width)
        self.out = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.out(self.hidden(x).relu())
"""


def _net(width: int) -> nn.Module:
    scope: dict[str, object] = {}
    exec(NET, scope)  # the same class the user's file defines
    return scope["Net"](2, 2, width)  # type: ignore[operator]


@pytest.fixture(scope="module")
def elsewhere(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A net trained by plain PyTorch on the raw features (no standardisation), saved as
    a safetensors state dict, and the file that defines its class."""
    folder = tmp_path_factory.mktemp("elsewhere")
    (folder / "net.py").write_text(NET)
    train = load_dataset(data_dir / "radial.csv")
    torch.manual_seed(0)
    net = _net(16)
    X = torch.as_tensor(train.X, dtype=torch.float32)
    y = torch.as_tensor(train.y)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        optimizer.step()
    save_file(net.state_dict(), str(folder / "w.safetensors"))
    return folder


def _import(folder: Path, data_dir: Path, weights: Path, out: Path, *extra: str) -> object:
    return run(
        "import", weights, "--arch", f"{folder / 'net.py'}:Net", "--data", data_dir / "radial.csv",
        "--val", data_dir / "radial-test.csv", "--test", data_dir / "radial-test.csv",
        "--epochs", "30", "--lr", "0.05", "--optimizer", "sgd", "-o", out, "--device", "cpu",
        *extra,
    )  # fmt: skip


def test_imported_weights_predict_as_they_did_and_go_through_every_command(
    elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    result = _import(elsewhere, data_dir, elsewhere / "w.safetensors", model, "--json")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    net = _net(16)
    net.load_state_dict(load_file(str(elsewhere / "w.safetensors")))
    test = load_dataset(data_dir / "radial-test.csv")
    with torch.no_grad():
        own = (net(torch.as_tensor(test.X, dtype=torch.float32)).argmax(1).numpy() == test.y).mean()
    assert run_json("eval", "-m", model)["accuracy"] == pytest.approx(own)
    info = run_json("info", model)
    assert info["recipe"]["optimizer"] == "sgd" and info["recipe"]["standardize"] is False
    assert info["provenance"][0]["op"] == "import" and info["rows"]["trained"] == 160
    digest = hashlib.sha256((elsewhere / "w.safetensors").read_bytes()).hexdigest()
    assert info["provenance"][0]["weights_sha256"] == digest  # the bytes the tensors came from
    rows = (data_dir / "radial.csv").read_text().splitlines()[1:9]
    (tmp_path / "ids.txt").write_text("".join(r.split(",", 1)[0] + "\n" for r in rows))
    for method in ("puma", "retrain"):
        out = run_json(
            "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--method", method,
            "-o", tmp_path / f"{method}.safetensors", "--device", "cpu",
        )  # fmt: skip
        assert out["removed"] == 8
    retrained = run_json("info", tmp_path / "retrain.safetensors")
    assert retrained["recipe"]["standardize"] is False  # the declared recipe, re-run as such
    # Read by a person: the figures are the imported model's, each operation one line.
    shown = run("info", tmp_path / "puma.safetensors")
    text = " ".join(shown.stdout.split())
    assert shown.exit_code == 0 and "metrics as imported train: accuracy" in text
    # the weights' path may be folded over lines (a deep temporary folder): read unfolded
    assert "1. import of " in text and "w.safetensors(sha256" in "".join(text.split())
    assert "2. " in text and " remove (puma, " in text
    assert ": 8 trained rows of 8 marked ids" in text
    assert "{'op'" not in text


def _tamper(folder: Path, change: object) -> Path:
    state = load_file(str(folder / "w.safetensors"))
    changed = change(state)  # type: ignore[operator]
    path = folder / "bad.safetensors"
    if isinstance(changed, bytes):
        path.write_bytes(changed)
    else:
        save_file(changed, str(path))
    return path


BAD_WEIGHTS = {
    "another width": (
        lambda s: _net(8).state_dict(),
        "tensor 'hidden.weight' is 8x2, but",
    ),
    "a tensor missing": (
        lambda s: {k: v for k, v in s.items() if k != "out.bias"},
        "lacks tensor 'out.bias'",
    ),
    "a stray tensor": (lambda s: {**s, "extra": torch.zeros(1)}, "holds tensor 'extra'"),
    "NaN weights": (
        lambda s: {**s, "out.weight": s["out.weight"] * float("nan")},
        "'out.weight' holds NaN or inf",
    ),
    "a pickle": (lambda s: pickle.dumps({"w": [1.0]}), "is a pickle or torch.save file"),
    "truncated": (
        lambda s: save_bytes(s)[:-10],
        "is not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_weights_that_do_not_fit_are_refused_by_name(
    case: str, elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    change, message = BAD_WEIGHTS[case]
    (tmp_path / "w.safetensors").write_bytes((elsewhere / "w.safetensors").read_bytes())
    bad = _tamper(tmp_path, change)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = _import(elsewhere, data_dir, bad, tmp_path / "m.safetensors")
    assert_clean_error(result, message)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("prefix", ["module.", "model.", "backbone.model."])
def test_a_wrapper_prefix_is_taken_off(
    prefix: str, elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    """DDP's `module.`, a Lightning module's `model.` (the network held as self.model),
    any name every tensor starts with (it was refused, "lacks tensor 'hidden.weight'")."""
    state = load_file(str(elsewhere / "w.safetensors"))
    weights = tmp_path / "wrapped.safetensors"
    save_file({prefix + k: v for k, v in state.items()}, str(weights))
    model = tmp_path / "m.safetensors"
    result = _import(elsewhere, data_dir, weights, model)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    run_json("export", model, "-o", tmp_path / "plain.safetensors")
    plain = load_file(str(tmp_path / "plain.safetensors"))
    assert plain.keys() == state.keys() and all(torch.equal(plain[k], state[k]) for k in state)


def test_a_lightning_checkpoint_is_refused_with_the_way_to_its_weights(
    elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A Lightning .ckpt (a torch.save pickle, the network's tensors under 'state_dict'
    named model.<name>) is never unpickled; the error says how to write its weights,
    and what it says to write imports."""
    state = load_file(str(elsewhere / "w.safetensors"))
    ckpt = tmp_path / "epoch=9.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, ckpt)
    result = _import(elsewhere, data_dir, ckpt, tmp_path / "m.safetensors")
    assert_clean_error(result, "save_file(torch.load(ckpt)['state_dict'], path)")  # type: ignore[arg-type]
    assert not (tmp_path / "m.safetensors").exists()
    weights = tmp_path / "w.safetensors"
    save_file(torch.load(ckpt)["state_dict"], str(weights))
    result = _import(elsewhere, data_dir, weights, tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]


WRAPPED = NET.replace("self.hidden", "self.net.hidden").replace("self.out", "self.net.out")
WRAPPED = WRAPPED.replace(
    "super().__init__()\n", "super().__init__()\n        self.net = nn.Module()\n"
)


@pytest.mark.parametrize("prefix", ["", "module.", "module._orig_mod.", "model."])
def test_a_network_whose_one_child_is_called_net_keeps_its_names(
    prefix: str, data_dir: Path, tmp_path: Path
) -> None:
    """`net.` is a wrapper's prefix only where the network's own names do not start so
    (it was taken off here, and every tensor was then missing)."""
    (tmp_path / "net.py").write_text(WRAPPED)
    scope: dict[str, object] = {}
    exec(WRAPPED, scope)
    state = scope["Net"](2, 2).state_dict()  # type: ignore[operator]
    assert sorted(state) == [
        "net.hidden.bias",
        "net.hidden.weight",
        "net.out.bias",
        "net.out.weight",
    ]
    weights = tmp_path / "w.safetensors"
    save_file({prefix + k: v for k, v in state.items()}, str(weights))
    model = tmp_path / "m.safetensors"
    result = _import(tmp_path, data_dir, weights, model)
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    back = tmp_path / "back.safetensors"
    run_json("export", model, "-o", back, "--like", weights)
    again = load_file(str(back))  # the file's own names, wrapper and all, given back
    assert again.keys() == {prefix + k for k in state}
    assert all(torch.equal(again[prefix + k], v) for k, v in state.items())


def test_import_refuses_what_it_cannot_wrap(
    elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    result = run(
        "import", elsewhere / "w.safetensors", "--arch", "resnet18", "--data",
        data_dir / "radial.csv", "-o", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert_clean_error(result, "--arch resnet18 needs image data")
    result = _import(elsewhere, data_dir, elsewhere / "w.safetensors", tmp_path / "m.safetensors",
                     "--lr", "0")  # fmt: skip
    assert_clean_error(result, "--lr 0 is out of range")
    assert list(tmp_path.iterdir()) == []
    assert np.isfinite(load_file(str(elsewhere / "w.safetensors"))["out.weight"].numpy()).all()


def test_an_import_without_validation_data_says_how_to_give_it(
    elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    result = run(
        "import", elsewhere / "w.safetensors", "--arch", f"{elsewhere / 'net.py'}:Net",
        "--data", data_dir / "radial.csv", "-o", model,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())  # said at import, before a removal needs it
    assert "Warning: no --val" in said and "import again with --val FILE" in said, said
    (tmp_path / "ids.txt").write_text("0\n2\n")
    result = run("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--arch-file",
                 elsewhere / "net.py")  # fmt: skip
    assert_clean_error(result, "--criterion-data FILE (rows it was not trained on) or import it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "m.safetensors"]


def test_weights_near_chance_on_their_own_rows_get_a_warning(
    elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Weights trained on transformed inputs (here: every feature scaled by 100, as a
    Normalize outside the net would) score about chance on the raw file: said, with the
    fix. The same weights on the data they fit say nothing."""
    good = _import(elsewhere, data_dir, elsewhere / "w.safetensors", tmp_path / "a.safetensors",
                   "--json")  # fmt: skip
    assert json.loads(good.stdout)["warnings"] == []  # type: ignore[attr-defined]
    state = load_file(str(elsewhere / "w.safetensors"))
    save_file({**state, "hidden.weight": state["hidden.weight"] * 100 + 50},
              str(tmp_path / "off.safetensors"))  # fmt: skip
    out = run_json(
        "import", tmp_path / "off.safetensors", "--arch", f"{elsewhere / 'net.py'}:Net",
        "--data", data_dir / "radial.csv", "-o", tmp_path / "b.safetensors",
    )  # fmt: skip
    assert out["train_accuracy"] < 0.7
    warning, no_val = out["warnings"]
    assert no_val.startswith("no --val")
    assert "little better than always answering the largest class" in warning
    assert "--normalize-mean/--normalize-std" in warning and "network's forward" in warning


def test_weights_on_a_one_class_file_are_refused_as_training_is(
    elsewhere: Path, data_dir: Path, tmp_path: Path
) -> None:
    lines = (data_dir / "radial.csv").read_text().splitlines()
    label = lines[0].split(",").index("label")
    one = [lines[0], *(r for r in lines[1:] if r.split(",")[label] == "0")]
    (tmp_path / "one.csv").write_text("\n".join(one) + "\n")
    result = run(
        "import", elsewhere / "w.safetensors", "--arch", f"{elsewhere / 'net.py'}:Net",
        "--data", tmp_path / "one.csv", "-o", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert_clean_error(result, "holds one class only; a classifier needs two or more")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.csv"]
