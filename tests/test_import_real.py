"""`puma import` of state dicts as real training code saves them: torch.compile's
`_orig_mod.` prefix (under DDP's `module.` too), tied layers that
`safetensors.torch.save_model` writes once, BatchNorm without its step counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run, run_json
from safetensors.torch import save_file, save_model
from torch import nn

from puma_cli.io.datasets import load_dataset

TIED = """
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes, width=8):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.norm = nn.BatchNorm1d(width)
        self.mix = nn.Linear(width, width)
        self.again = self.mix  # one layer under two names, applied twice
        self.out = nn.Linear(width, n_classes)

    def forward(self, x):
        h = self.norm(self.inp(x)).relu()
        return self.out(self.again(self.mix(h).relu()).relu())
"""


@pytest.fixture(scope="module")
def trained(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    folder = tmp_path_factory.mktemp("tied")
    (folder / "net.py").write_text(TIED)
    scope: dict[str, object] = {}
    exec(TIED, scope)
    torch.manual_seed(0)
    net = scope["Net"](2, 2)  # type: ignore[operator]
    train = load_dataset(data_dir / "radial.csv")
    X, y = torch.as_tensor(train.X, dtype=torch.float32), torch.as_tensor(train.y)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        optimizer.step()
    return folder, net.eval()


def _import(folder: Path, data_dir: Path, weights: Path, out: Path) -> object:
    return run(
        "import", weights, "--arch", f"{folder / 'net.py'}:Net", "--data", data_dir / "radial.csv",
        "--val", data_dir / "radial-test.csv", "-o", out, "--device", "cpu", "--json",
    )  # fmt: skip


def _accuracy(net: nn.Module, data_dir: Path) -> float:
    test = load_dataset(data_dir / "radial-test.csv")
    with torch.no_grad():
        guess = net(torch.as_tensor(test.X, dtype=torch.float32)).argmax(1).numpy()
    return float((guess == test.y).mean())


def test_save_model_of_a_tied_net_imports_and_predicts_as_it_did(
    trained: tuple[Path, nn.Module], data_dir: Path, tmp_path: Path
) -> None:
    folder, net = trained
    save_model(net, str(tmp_path / "w.safetensors"))  # writes the tied layer once
    result = _import(folder, data_dir, tmp_path / "w.safetensors", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    evaluated = run_json("eval", "-m", tmp_path / "m.safetensors", "--data",
                         data_dir / "radial-test.csv")  # fmt: skip
    assert evaluated["accuracy"] == pytest.approx(_accuracy(net, data_dir))


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod."])
def test_a_compiled_nets_prefix_is_taken_off(
    prefix: str, trained: tuple[Path, nn.Module], data_dir: Path, tmp_path: Path
) -> None:
    folder, net = trained
    state = {f"{prefix}{k}": v.clone() for k, v in net.state_dict().items()}
    state.pop(f"{prefix}norm.num_batches_tracked")  # some exporters keep only floats
    save_file(state, str(tmp_path / "w.safetensors"))
    result = _import(folder, data_dir, tmp_path / "w.safetensors", tmp_path / "m.safetensors")
    assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    evaluated = run_json("eval", "-m", tmp_path / "m.safetensors", "--data",
                         data_dir / "radial-test.csv")  # fmt: skip
    assert evaluated["accuracy"] == pytest.approx(_accuracy(net, data_dir))


def test_a_tied_tensor_that_differs_from_its_twin_is_refused(
    trained: tuple[Path, nn.Module], data_dir: Path, tmp_path: Path
) -> None:
    folder, net = trained
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["again.weight"] = state["again.weight"] + 1.0
    save_file(state, str(tmp_path / "w.safetensors"))
    result = _import(folder, data_dir, tmp_path / "w.safetensors", tmp_path / "m.safetensors")
    assert_clean_error(result, "'again.weight' and 'mix.weight' are one tensor in")
    assert not (tmp_path / "m.safetensors").exists()
