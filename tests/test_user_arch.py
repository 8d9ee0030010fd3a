"""Your own architecture (--arch FILE.py:Class), the built-in ResNet-18 and DenseNet, and
BatchNorm/dropout models: trained, removed from, attacked and evaluated through the CLI;
a user file is imported only as recorded."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_clean_error, rewrite_tensor, run, run_json
from torch import nn

from puma_cli.engine.derivatives import InfluenceModel, tensor_slots
from puma_cli.io.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "sample_data" / "digits-train.npz"
DIGITS_TEST = ROOT / "sample_data" / "digits-test.npz"

NET = '''
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """A tabular net with BatchNorm and dropout, to exercise eval-mode derivatives."""

    def __init__(self, in_features, n_classes, width=16):
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(width, n_classes),
        )

    def forward(self, x):
        return self.body(x)
'''


def _remove_each(
    model: Path, tmp_path: Path, curvatures: tuple[str, ...], *extra: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`remove` of tmp_path/ids.txt with each curvature in turn, to r-<curvature>.safetensors:
    (curvature, its report), one removal at a time."""
    for curvature in curvatures:
        yield curvature, run_json(
            "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature", curvature,
            "-o", tmp_path / f"r-{curvature}.safetensors", *extra,
        )  # fmt: skip


@pytest.fixture
def arch(tmp_path: Path) -> Path:
    path = tmp_path / "mynet.py"
    path.write_text(NET)
    return path


def _train(data_dir: Path, arch: Path, out: Path, *extra: str) -> dict:
    return run_json(
        "train", data_dir / "radial.csv", "--test", data_dir / "radial-test.csv",
        "--arch", f"{arch}:Net", "--arch-args", '{"width": 12}', "-o", out,
        "--epochs", "100", "--device", "cpu", *extra,
    )  # fmt: skip


def test_a_user_architecture_goes_through_every_command(
    data_dir: Path, arch: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    trained = _train(data_dir, arch, model)
    assert trained["test_accuracy"] > 0.7
    info = run_json("info", model)
    source = info["architecture"]["source"]
    assert source["path"] == str(arch.resolve()) and source["class"] == "Net"
    assert len(source["sha256"]) == 64 and info["architecture"]["args"] == {"width": 12}
    assert info["n_parameters"] == 2 * 12 + 12 + 2 * 12 + 12 * 2 + 2  # linear, bn, linear
    # the built-in nets' settings (mlp's hidden widths, cnn's channels) shape no user net
    for unused in ("hidden", "activation", "channels"):
        assert unused not in info["architecture"] and unused not in info["recipe"], unused
    shown = run("info", model).stdout
    assert "hidden" not in shown and "channels" not in shown and "Net" in shown
    rows = (data_dir / "radial.csv").read_text().splitlines()[1:5]
    (tmp_path / "ids.txt").write_text("".join(row.split(",", 1)[0] + "\n" for row in rows))
    for method in ("puma", "retrain", "ssd"):
        out = run_json(
            "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--method", method,
            "-o", tmp_path / f"{method}.safetensors", "--device", "cpu",
        )  # fmt: skip
        assert out["removed"] == 4 and out["test_accuracy_after"] is not None
    attack = run_json(
        "attack", "-m", tmp_path / "puma.safetensors", "--targets", tmp_path / "ids.txt"
    )
    assert 0 <= attack["auc"] <= 1
    assert run_json("eval", "-m", tmp_path / "retrain.safetensors")["n"] == 40


def _user_model(data_dir: Path, tmp_path: Path, source: str, marked: int) -> Path:
    """`source` trained as Net on radial.csv, and its first `marked` rows in ids.txt."""
    arch = tmp_path / "net.py"
    arch.write_text(source)
    model = tmp_path / "m.safetensors"
    _train(data_dir, arch, model)
    rows = (data_dir / "radial.csv").read_text().splitlines()[1 : 1 + marked]
    (tmp_path / "ids.txt").write_text("".join(row.split(",", 1)[0] + "\n" for row in rows))
    return model


UNCOVERED_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes, width=6):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.out = nn.Linear(2 * width, n_classes)

    def forward(self, x):
        h = self.norm(torch.tanh(self.inp(x)))
        return self.out(torch.relu(self.conv(h.unsqueeze(1))).flatten(1))
"""


def test_the_report_names_the_layers_kfac_leaves_out(data_dir: Path, tmp_path: Path) -> None:
    model = _user_model(data_dir, tmp_path, UNCOVERED_NET, 4)
    out = run_json(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature", "kfac",
        "-o", tmp_path / "r.safetensors", "--device", "cpu",
    )  # fmt: skip
    # LayerNorm(12): weight and bias; the Conv1d is fitted as a Conv2d (`engine/conv1d.py`).
    assert out["parameters"]["uncovered_layers"] == {"LayerNorm": 24}
    assert out["parameters"]["uncovered_parameters"] == 24
    (note,) = [w for w in out["warnings"] if "outside the Linear, Conv1d and Conv2d" in w]
    assert "(LayerNorm 24)" in note and "--curvature ggn" in note


RAW_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes, width=6):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(width, in_features))
        self.w2 = nn.Parameter(torch.randn(n_classes, width) / width**0.5)

    def forward(self, x):
        return nn.functional.linear(torch.tanh(nn.functional.linear(x, self.w1)), self.w2)
"""


def test_auto_takes_the_ggn_where_kfac_has_no_layer_to_fit(data_dir: Path, tmp_path: Path) -> None:
    """Weights held as bare Parameters: no Linear or Conv2d for K-FAC. Past the exact
    Hessian's size `auto` took kfac and failed with an error about an option never given."""
    arch = tmp_path / "net.py"
    arch.write_text(RAW_NET)
    model = tmp_path / "m.safetensors"
    trained = run_json(
        "train", data_dir / "radial.csv", "--arch", f"{arch}:Net", "--arch-args",
        '{"width": 40000}', "-o", model, "--epochs", "2", "--device", "cpu",
    )  # fmt: skip
    assert trained["n_parameters"] * trained["n_train"] > 10_000_000  # past exact's share
    rows = (data_dir / "radial.csv").read_text().splitlines()[1:5]
    (tmp_path / "ids.txt").write_text("".join(row.split(",", 1)[0] + "\n" for row in rows))
    out = run_json(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "-o", tmp_path / "r.safetensors",
        "--device", "cpu", "--eta", "1",
    )  # fmt: skip
    assert out["parameters"]["curvature"] == "ggn"
    (note,) = [w for w in out["warnings"] if "--curvature auto" in w]
    assert "no Linear or Conv2d layer" in note
    asked = run(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "-o", tmp_path / "k.safetensors",
        "--device", "cpu", "--curvature", "kfac",
    )  # fmt: skip
    assert_clean_error(asked, "use --curvature ggn or exact")  # asked for: refused, as before
    assert not (tmp_path / "k.safetensors").exists()


EVEN_SAME_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], 4, 4, padding="same")  # pads 1 before, 2 after
        self.head = nn.Linear(4, n_classes)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))
"""


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own
def test_ekfac_names_a_convolution_it_cannot_unfold(tmp_path: Path) -> None:
    """padding='same' with an even kernel pads unequally: curvlinops' EK-FAC raised
    NotImplementedError through a traceback. K-FAC (reduce) fits such a layer."""
    arch = tmp_path / "net.py"
    arch.write_text(EVEN_SAME_NET)
    model = tmp_path / "m.safetensors"
    run_json("train", DIGITS, "--arch", f"{arch}:Net", "-o", model, "--epochs", "1")
    with np.load(DIGITS) as digits:
        (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in digits["ids"][:5]))
    refused = run(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature", "ekfac",
        "-o", tmp_path / "e.safetensors",
    )  # fmt: skip
    assert_clean_error(refused, "layer 'net.conv'")  # the checkpoint's name for it
    assert "--curvature kfac" in refused.stderr and "padding='same'" in refused.stderr
    assert not (tmp_path / "e.safetensors").exists()
    kfac = run_json(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature", "kfac",
        "-o", tmp_path / "k.safetensors", "--eta", "1",
    )  # fmt: skip
    assert kfac["parameters"]["uncovered_parameters"] == 0


FROZEN_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"A fixed random body (as a pretrained one would be) and a head that trains.\"\"\"

    def __init__(self, in_features, n_classes, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh())
        self.body.requires_grad_(False)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.head(self.body(x))
"""


def test_frozen_parameters_are_counted_where_a_model_is_made_and_shown(
    data_dir: Path, tmp_path: Path
) -> None:
    """train, import and info say how many of the parameters are frozen (a model's count
    held them all, and remove's count only the trainable ones); a net with none says null."""
    arch = tmp_path / "net.py"
    arch.write_text(FROZEN_NET)
    model = tmp_path / "m.safetensors"
    trained = _train(data_dir, arch, model)
    assert trained["n_parameters"] == 2 * 12 + 12 + 12 * 2 + 2  # body and head, width 12
    assert trained["frozen_parameters"] == 2 * 12 + 12  # the body
    assert run_json("info", model)["frozen_parameters"] == 36
    table = run("info", model)
    assert table.exit_code == 0 and "62 (36 frozen)" in table.stdout, table.stdout
    weights = tmp_path / "w.safetensors"
    run_json("export", model, "-o", weights)
    again = run_json(
        "import", weights, "--arch", f"{arch}:Net", "--arch-args", '{"width": 12}',
        "--data", data_dir / "radial.csv", "-o", tmp_path / "i.safetensors", "--epochs", "1",
    )  # fmt: skip
    assert again["frozen_parameters"] == 36
    shown = run("train", data_dir / "radial.csv", "-o", tmp_path / "plain.safetensors",
                "--epochs", "2")  # fmt: skip
    rows = [line.split()[0] for line in shown.stdout.splitlines() if line.strip()]
    assert shown.exit_code == 0 and "n_parameters" in rows
    assert "frozen_parameters" not in rows  # a row only where some are
    plain = run_json("info", tmp_path / "plain.safetensors")
    assert plain["frozen_parameters"] == 0
    assert "frozen)" not in run("info", tmp_path / "plain.safetensors").stdout


def test_frozen_parameters_stay_where_training_left_them(data_dir: Path, tmp_path: Path) -> None:
    model = _user_model(data_dir, tmp_path, FROZEN_NET, 8)
    before = load_checkpoint(model).model.state_dict()
    for method, curvature in (("puma", "exact"), ("puma", "kfac"), ("ssd", "auto")):
        out_path = tmp_path / f"{method}-{curvature}.safetensors"
        out = run_json(
            "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--method", method,
            "--curvature", curvature, "-o", out_path, "--eta", "4", "--device", "cpu",
        )  # fmt: skip
        after = load_checkpoint(out_path).model.state_dict()
        body = [k for k in before if ".body." in k]
        assert len(body) == 2  # the body's weight and bias
        for key in body:  # retraining never moves them either
            assert torch.equal(after[key], before[key]), (method, curvature, key)
        if method == "puma":
            assert out["parameters"]["frozen_parameters"] == 2 * 12 + 12  # --arch-args width 12
            assert not all(torch.equal(after[k], before[k]) for k in before if ".head." in k)
        else:
            assert out["parameters"]["parameters"] == 12 * 2 + 2  # SSD looks at the head only


def test_batchnorm_trains_when_a_batch_would_hold_one_row(
    data_dir: Path, arch: Path, tmp_path: Path
) -> None:
    """BatchNorm cannot normalise one row in training mode (torch raises): a last batch of
    one row joins the batch before it (144 trained rows in batches of 13), and a baseline
    that trains on one marked row alone runs its norm layers on their running statistics
    for that batch."""
    model = tmp_path / "m.safetensors"
    # 4 epochs: what is tested is that every batch runs, not what the model learns.
    assert _train(data_dir, arch, model, "--batch-size", "13", "--epochs", "4")["n_train"] == 144
    (tmp_path / "one.txt").write_text(
        (data_dir / "radial.csv").read_text().splitlines()[1].split(",", 1)[0] + "\n"
    )
    for method in ("retrain", "finetune", "neggrad", "random-labels", "salun", "scrub"):
        out = run_json(
            "remove", "-m", model, "--marked", tmp_path / "one.txt", "--method", method,
            "-o", tmp_path / f"{method}.safetensors", "--device", "cpu",
        )  # fmt: skip
        assert out["removed"] == 1, method
    shadows = run_json(
        "attack", "-m", tmp_path / "retrain.safetensors", "--targets", tmp_path / "one.txt",
        "--attack", "lira", "--shadows", "8",
    )  # fmt: skip
    assert 0 <= shadows["auc"] <= 1


def test_derivatives_are_taken_in_eval_mode(data_dir: Path, arch: Path, tmp_path: Path) -> None:
    """BatchNorm uses its running statistics and dropout is off: the engine's logits are
    the deployed model's, and the same on every call."""
    model = tmp_path / "m.safetensors"
    _train(data_dir, arch, model)
    checkpoint = load_checkpoint(model)
    X = torch.randn(7, 2, dtype=torch.float64)
    engine = InfluenceModel(checkpoint.model, X, torch.zeros(7, dtype=torch.long))
    deployed = checkpoint.model.double().eval()(X)
    for _ in range(2):
        assert torch.allclose(engine.logits(engine.theta, X), deployed)


FACTORY = (
    NET.replace("class Net(", "class _Net(")
    + '''

def make_net(in_features, n_classes, width=16):
    """A function that builds the network, as kuangliu's ResNet18() does."""
    return _Net(in_features, n_classes, width)


def TwoClass():
    """No arguments at all: the class count is its own (kuangliu's num_classes=10)."""
    return _Net(2, 2, 8)
'''
)


def test_a_function_that_builds_the_network_serves_as_the_class(
    data_dir: Path, tmp_path: Path
) -> None:
    arch = tmp_path / "factory.py"
    arch.write_text(FACTORY)
    model = tmp_path / "m.safetensors"
    trained = run_json(
        "train", data_dir / "radial.csv", "--test", data_dir / "radial-test.csv",
        "--arch", f"{arch}:make_net", "--arch-args", '{"width": 12}', "-o", model,
        "--epochs", "100", "--device", "cpu",
    )  # fmt: skip
    assert trained["test_accuracy"] > 0.7
    assert trained["n_parameters"] == 2 * 12 + 12 + 2 * 12 + 12 * 2 + 2  # width 12, built
    assert run_json("info", model)["architecture"]["source"]["class"] == "make_net"
    ids = (data_dir / "radial.csv").read_text().splitlines()[1:6]
    (tmp_path / "ids.txt").write_text("".join(row.split(",")[0] + "\n" for row in ids))
    out = run_json(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "-o", tmp_path / "r.safetensors"
    )
    assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
    assert run_json("eval", "-m", tmp_path / "r.safetensors")["n"] == 40
    bare = tmp_path / "bare.safetensors"
    run_json("train", data_dir / "radial.csv", "--arch", f"{arch}:TwoClass", "-o", bare)
    assert run_json("info", bare)["architecture"]["args"] == {}


LAZY = NET.replace("nn.Linear(in_features, width)", "nn.LazyLinear(width)").replace(
    "nn.Linear(width, n_classes)", "nn.LazyLinear(n_classes)"
)


def test_lazy_layers_are_sized_whenever_the_network_is_built(
    data_dir: Path, tmp_path: Path
) -> None:
    """nn.LazyLinear takes its sizes from the first batch: training gave it one, but every
    later command rebuilt the network unsized and failed with a traceback."""
    arch = tmp_path / "lazy.py"
    arch.write_text(LAZY)
    model = tmp_path / "m.safetensors"
    assert _train(data_dir, arch, model)["n_parameters"] == 86  # width 12, sized
    ids = (data_dir / "radial.csv").read_text().splitlines()[1:5]
    (tmp_path / "ids.txt").write_text("".join(row.split(",")[0] + "\n" for row in ids))
    for _, out in _remove_each(model, tmp_path, ("auto", "kfac"), "--device", "cpu"):
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
    assert out["parameters"]["uncovered_layers"] == {"BatchNorm1d": 24}  # both Linears in
    assert run_json("eval", "-m", tmp_path / "r-auto.safetensors")["n"] == 40
    weights = tmp_path / "w.safetensors"
    run_json("export", model, "-o", weights)  # the network's own weights, imported again
    again = run_json(
        "import", weights, "--arch", f"{arch}:Net", "--arch-args", '{"width": 12}',
        "--data", data_dir / "radial.csv", "-o", tmp_path / "i.safetensors",
        "--epochs", "1", "--lr", "0.01", "--optimizer", "adam",
    )  # fmt: skip
    assert again["n_parameters"] == 86


def test_a_lazy_net_whose_forward_reads_values_loads_and_its_shapes_are_checked(
    data_dir: Path, tmp_path: Path
) -> None:
    """A checkpoint's shapes are checked on the meta device, where a forward pass that reads
    a value (`if x.abs().max() > 100`) cannot run: sizing lazy layers there refused such a
    net at every command after `train` ("could not size"), and cost seconds of torch's
    symbolic-shape imports for any lazy net. Their shapes are now checked on the real build."""
    arch = tmp_path / "lazy.py"
    arch.write_text(
        LAZY.replace(
            "return self.body(x)",
            "if x.abs().max() > 100:\n            x = x / 100\n        return self.body(x)",
        )
    )
    model = tmp_path / "m.safetensors"
    assert _train(data_dir, arch, model)["n_parameters"] == 86
    assert run_json("eval", "-m", model)["n"] == 40
    sisa = tmp_path / "sisa.safetensors"
    _train(data_dir, arch, sisa, "--shards", "2", "--slices", "2", "--epochs", "5")
    assert run_json("eval", "-m", sisa)["n"] == 40  # each stored stage's shapes checked
    rewrite_tensor(sisa, "sisa.state.0.0.net.body.0.weight", lambda w: torch.cat([w, w]))
    assert_clean_error(run("eval", "-m", sisa), "tensor sisa.state.0.0.net.body.0.weight is")
    rewrite_tensor(model, "model.net.body.0.weight", lambda w: torch.cat([w, w]))
    assert_clean_error(
        run("eval", "-m", model),
        "tensor model.net.body.0.weight is torch.float32 of shape 24x2, expected torch.float32 "
        "of shape 12x2 for its architecture",
    )


def test_a_net_that_fails_in_float64_is_differentiated_in_float32(
    data_dir: Path, tmp_path: Path
) -> None:
    """puma takes a small model's derivatives in float64; a net whose forward makes its own
    float32 tensors (torch.eye(d) without a dtype) failed there, and the error blamed the
    user's code, which is right in the float32 it was trained in. The engine now falls back
    to float32 and says why; a net that runs in float64 keeps it."""
    arch = tmp_path / "mix.py"
    arch.write_text(
        NET.replace("return self.body(x)", "return self.body(x @ torch.eye(x.shape[1]))")
    )
    model = tmp_path / "m.safetensors"
    _train(data_dir, arch, model)
    ids = (data_dir / "radial.csv").read_text().splitlines()[1:5]
    (tmp_path / "ids.txt").write_text("".join(row.split(",")[0] + "\n" for row in ids))
    for curvature, out in _remove_each(model, tmp_path, ("exact", "kfac")):
        assert out["parameters"]["precision"] == "float32", curvature
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
        note = [w for w in out["warnings"] if "fails in float64" in w]
        assert note and "dtype=x.dtype" in note[0], out["warnings"]
    plain = tmp_path / "plain.py"
    plain.write_text(NET)
    _train(data_dir, plain, model, "--overwrite")
    for _, out in _remove_each(model, tmp_path, ("exact",), "--overwrite"):
        assert out["parameters"]["precision"] == "float64"
        assert not any("float64" in w for w in out["warnings"])


BINARY = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x):
        return self.body(x)
"""


def test_a_binary_head_of_one_logit_is_read_as_class_1_against_0(
    data_dir: Path, tmp_path: Path
) -> None:
    """A two-class net with one output, as BCEWithLogitsLoss trains it, was refused
    ("returns (2, 1) ... it must return logits (n, 2)"). Its logit z is now class 1's
    against 0, whose cross-entropy is the binary cross-entropy on z: weights trained with
    BCEWithLogitsLoss import with the same loss and predictions, and train, remove and
    attack like any net."""
    from safetensors.torch import save_file

    arch = tmp_path / "binary.py"
    arch.write_text(BINARY)
    table = np.loadtxt(data_dir / "radial.csv", delimiter=",", skiprows=1)
    header = (data_dir / "radial.csv").read_text().splitlines()[0].split(",")
    X = torch.as_tensor(table[:, [header.index(c) for c in header if c not in ("id", "label")]])
    y = torch.as_tensor(table[:, header.index("label")]).float()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(200):
        loss = F.binary_cross_entropy_with_logits(net(X.float())[:, 0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        z = net(X.float())[:, 0]
    weights = tmp_path / "w.safetensors"
    save_file({f"body.{k}": v for k, v in net.state_dict().items()}, weights)
    imported = run_json(
        "import", weights, "--arch", f"{arch}:Net", "--data", data_dir / "radial.csv",
        "--val", data_dir / "radial-test.csv", "-o", tmp_path / "i.safetensors",
    )  # fmt: skip
    assert imported["train_accuracy"] == pytest.approx(float(((z > 0).float() == y).float().mean()))
    measured = run_json("eval", "-m", tmp_path / "i.safetensors", "--on", "train")
    bce = float(F.binary_cross_entropy_with_logits(z, y))
    assert measured["loss"] == pytest.approx(bce, rel=1e-5)
    model = tmp_path / "m.safetensors"
    assert _train(data_dir, arch, model, "--lr", "0.02")["test_accuracy"] > 0.8
    ids = (data_dir / "radial.csv").read_text().splitlines()[1:5]
    (tmp_path / "ids.txt").write_text("".join(row.split(",")[0] + "\n" for row in ids))
    for curvature, out in _remove_each(model, tmp_path, ("exact", "kfac")):
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6, curvature
    attacked = run_json(
        "attack", "-m", tmp_path / "r-kfac.safetensors", "--targets", tmp_path / "ids.txt"
    )
    assert attacked["n_targets"] == 4
    wrong = tmp_path / "three.py"
    wrong.write_text(BINARY)
    three = tmp_path / "three.csv"
    rows = (data_dir / "radial.csv").read_text().splitlines()
    three.write_text(
        "\n".join([rows[0], *(r[: r.rfind(",")] + f",{i % 3}" for i, r in enumerate(rows[1:]))])
        + "\n"
    )
    assert_clean_error(
        run("train", three, "--arch", f"{wrong}:Net", "-o", tmp_path / "t.safetensors"),
        "returns (2, 1) for a batch of 2; it must return logits (n, 3)",
    )


def test_a_changed_or_moved_file_is_never_imported_silently(
    data_dir: Path, arch: Path, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    _train(data_dir, arch, model)
    original = arch.read_text()
    arch.write_text(original.replace("width=16", "width=17"))
    assert_clean_error(run("eval", "-m", model), "has changed since the model was trained")
    assert_clean_error(run("info", model), "puma never imports another version")
    moved = tmp_path / "elsewhere" / "net.py"
    moved.parent.mkdir()
    moved.write_text(original)
    arch.unlink()
    assert_clean_error(run("eval", "-m", model), "is gone; pass --arch-file FILE.py")
    changed = tmp_path / "changed.py"
    changed.write_text(original + "\n# edited\n")
    assert_clean_error(run("eval", "-m", model, "--arch-file", changed), "is gone")
    assert run_json("eval", "-m", model, "--arch-file", moved)["n"] == 40


BAD_FILES = {
    "missing file": (None, "no such architecture file"),
    "no such class": (
        NET.replace("class Net", "class Other"),
        "defines no class or function 'Net'",
    ),
    "raises on import": ("raise RuntimeError('boom')\n", "raised RuntimeError on import (boom)"),
    # What `import torchvision` raises where its compiled operators were built for another
    # torch (PyPI's torchvision beside a CPU torch from elsewhere): the file is not at fault.
    "a torchvision of another torch build": (
        "raise RuntimeError('operator torchvision::nms does not exist')\n",
        "install torch and torchvision from the same place",
    ),
    "raises on construction": (
        NET.replace("super().__init__()", "raise ValueError('bad width')"),
        "raised ValueError (bad width); fix the class or --arch-args",
    ),
    "wrong number of outputs": (
        NET.replace("nn.Linear(width, n_classes)", "nn.Linear(width, 5)"),
        "returns (2, 5) for a batch of 2; it must return logits (n, 2)",
    ),
    # Probabilities where logits belong: the cross-entropy would take them for logits and
    # the model would learn next to nothing (a softmax net: 0.444 on two classes).
    "returns probabilities": (
        NET.replace("return self.body(x)", "return self.body(x).softmax(dim=1)"),
        "returns probabilities (each row non-negative, summing to 1); return the logits",
    ),
    "fails on the data's shape": (
        NET.replace("nn.Linear(in_features, width)", "nn.Linear(3, width)"),
        "fails on the data's first rows, a batch of shape (2, 2)",
    ),
    "not a module": ("class Net:\n    pass\n", "is not an nn.Module class"),
    "a built network, not its class": (
        NET.replace("class Net(", "class Built(") + "\nNet = Built(2, 2)\n",
        "is a network already built (an nn.Module instance); name its class",
    ),
    "neither a class nor a function": ("Net = 3\n", "is an int, not an nn.Module class"),
    "a function that returns no module": (
        "def Net(n_classes):\n    return [n_classes]\n",
        "Net(n_classes=2) returned list, not an nn.Module; return the network",
    ),
    "a lazy layer that zeros cannot size": (
        NET.replace("nn.Linear(width, n_classes)", "nn.LazyLinear(n_classes)").replace(
            "return self.body(x)", "assert x.any(), 'all zeros'\n        return self.body(x)"
        ),
        "has a LazyLinear layer that a batch of zeros of shape (2, 2) could not size: "
        "AssertionError (all zeros)",
    ),
    "a tensor held as a plain attribute": (
        NET.replace(
            "    def forward", "        self.body[0].mask = torch.ones(2)\n\n    def forward"
        ),
        "holds a tensor in self.body.0.mask that is neither a parameter nor a buffer",
    ),
    "fails on a whole batch": (  # the first-rows check passes two rows
        NET.replace("return self.body(x)", "return self.body(x.view(2, -1))"),
        "raised RuntimeError at",
    ),
    "returns another batch size": (
        NET.replace("return self.body(x)", "return self.body(x.reshape(2, -1)[:, :2])"),
        "the network returned (2, 2) for a batch of",
    ),
    # Logits beside other outputs, as many code bases return them: the way to hand them in.
    "returns logits and features": (
        NET.replace("return self.body(x)", "return self.body(x), x"),
        "returns tuple for a batch of 2; it must return logits (n, 2), one per class (its "
        "first item has that shape): wrap it in a class whose forward returns self.net(x)[0]",
    ),
    "returns a dict of logits": (
        NET.replace("return self.body(x)", "return {'logits': self.body(x)}"),
        'whose forward returns self.net(x)["logits"]',
    ),
    # Trained fine, then every removal failed inside the user's code ("Expected more than
    # 1 value per channel") and blamed it: a row's logits moved with its batch.
    "batch statistics in eval mode": (
        NET.replace("nn.BatchNorm1d(width)", "nn.BatchNorm1d(width, track_running_stats=False)"),
        "logits for a row change with the other rows of its batch: puma takes each row's loss "
        "and gradient on its own, so such a network has no per-row influence to remove; its "
        "BatchNorm1d at body.1 has track_running_stats=False",
    ),
    "random in eval mode": (
        NET.replace(
            "return self.body(x)",
            "return self.body(nn.functional.dropout(x, 0.5, training=True))",
        ),
        "gives other logits on a second pass over the same rows in eval mode",
    ),
    # GoogLeNet's and Inception's auxiliary heads: logits in eval mode, a tuple in
    # training mode (it ended training with a traceback, "'tuple' object has no ndim").
    "a tuple in training mode": (
        NET.replace(
            "return self.body(x)",
            "return (self.body(x), x) if self.training else self.body(x)",
        ),
        "returns tuple in training mode (logits in eval mode): puma trains on the logits alone",
    ),
    "nothing trains": (
        NET.replace("    def forward", "        self.requires_grad_(False)\n\n    def forward"),
        "has no trainable parameters",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_architecture_file_is_one_clear_error(
    case: str, data_dir: Path, tmp_path: Path
) -> None:
    source, message = BAD_FILES[case]
    path = tmp_path / "net.py"
    if source is not None:
        path.write_text(source)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(
        "train", data_dir / "radial.csv", "--arch", f"{path}:Net", "-o", tmp_path / "m.safetensors",
        "--epochs", "1",
    )  # fmt: skip
    assert_clean_error(result, message)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_module_beside_the_file_is_named_in_the_error(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "layers.py").write_text("from torch import nn\nWIDTH = 16\n")
    path = tmp_path / "net.py"
    path.write_text("from layers import WIDTH\n" + NET)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run(
        "train", data_dir / "radial.csv", "--arch", f"{path}:Net", "-o", tmp_path / "m.safetensors",
        "--epochs", "1",
    )  # fmt: skip
    assert_clean_error(result, "No module named 'layers'")
    assert (
        "puma imports net.py alone" in result.output and "not layers.py beside it" in result.output
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_arch_args_must_be_a_json_object(data_dir: Path, tmp_path: Path) -> None:
    for args, message in (("{width: 3}", "is not JSON"), ("[1]", "give a JSON object")):
        result = run(
            "train", data_dir / "radial.csv", "--arch-args", args, "-o", tmp_path / "m.safetensors"
        )
        assert_clean_error(result, message)
    result = run(
        "train", DIGITS, "--arch", "resnet18", "--arch-args", '{"depth": 3}',
        "-o", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert_clean_error(result, "--arch-args for resnet18")
    assert_clean_error(
        run("train", data_dir / "radial.csv", "--arch", "vgg", "-o", tmp_path / "m.safetensors"),
        "choose mlp, cnn, resnet18, densenet or FILE.py:ClassName",
    )


@pytest.mark.parametrize(
    ("name", "args", "parameters"),
    [
        ("resnet18", '{"width": 4}', 44_550),
        ("densenet", '{"growth_rate": 4, "blocks": [1, 1, 1, 1]}', 3_244),
    ],
)
def test_the_built_in_image_networks_train_and_unlearn(
    name: str, args: str, parameters: int, tmp_path: Path
) -> None:
    model = tmp_path / "m.safetensors"
    trained = run_json(
        "train", DIGITS, "--test", DIGITS_TEST, "--arch", name, "--arch-args", args, "-o", model,
        "--epochs", "2", "--device", "cpu",
    )  # fmt: skip
    assert trained["n_parameters"] == parameters
    assert trained["test_accuracy"] > 0.15  # two epochs: above chance (0.1), not converged
    shown = run_json("info", model)
    assert shown["architecture"]["args"] == json.loads(args)
    assert not {"hidden", "activation", "channels", "source"} & set(shown["architecture"])
    with np.load(DIGITS) as digits:
        ids = digits["ids"][:20].tolist()
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    # Their convolutions have no bias: EK-FAC keeps those layers' eigenvalues apart.
    for curvature, out in _remove_each(
        model, tmp_path, ("auto", "kfac", "ekfac"), "--device", "cpu"
    ):
        assert out["removed"] <= 20
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
        if curvature != "auto":
            assert out["parameters"]["curvature"] == curvature
            assert out["parameters"]["uncovered_parameters"] > 0  # BatchNorm's


def test_help_says_that_a_user_file_is_imported() -> None:
    result = run("train", "--help")
    assert "imported" in result.stdout and "code runs" in result.stdout


SEQUENCE_NET = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"A recurrent classifier of (n, T, F) sequences: no layer K-FAC covers but the head.\"\"\"

    def __init__(self, input_shape, n_classes, hidden=8):
        super().__init__()
        self.rnn = nn.GRU(input_shape[-1], hidden, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])
"""


def _sequences(path: Path, n: int, seed: int) -> None:
    """(n, 6, 3) series whose first feature drifts by class, ids s0..s{n-1}."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.normal(0, 1, (n, 6, 3)).astype(np.float32)
    X[:, :, 0] += 1.5 * y[:, None]
    np.savez(path, X=X, y=y, ids=np.array([f"s{i}" for i in range(n)]))


def test_sequence_data_goes_through_a_users_recurrent_net(tmp_path: Path) -> None:
    train, test, arch = tmp_path / "seq.npz", tmp_path / "seq-test.npz", tmp_path / "rnn.py"
    _sequences(train, 240, 0)
    _sequences(test, 60, 1)
    arch.write_text(SEQUENCE_NET)
    model = tmp_path / "m.safetensors"
    trained = run_json(
        "train", train, "--test", test, "--arch", f"{arch}:Net", "-o", model,
        "--epochs", "30", "--device", "cpu",
    )  # fmt: skip
    assert trained["test_accuracy"] > 0.6  # chance is 1/3
    assert run_json("info", model)["architecture"]["input_shape"] == [6, 3]
    (tmp_path / "ids.txt").write_text("s0\ns1\ns2\ns3\n")
    for _, out in _remove_each(model, tmp_path, ("auto", "kfac"), "--device", "cpu"):
        assert out["removed"] + out["skipped"]["validation"] == 4
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
    # GRU's three gates of 8: input weights (x 3 features), hidden weights (x 8), 2 biases
    assert out["parameters"]["uncovered_layers"] == {"GRU": 3 * 8 * (3 + 8 + 2)}
    assert run_json("eval", "-m", tmp_path / "r-auto.safetensors")["n"] == 60
    attack = run_json(
        "attack", "-m", tmp_path / "r-auto.safetensors", "--targets", tmp_path / "ids.txt"
    )
    assert 0 <= attack["auc"] <= 1
    # a built-in image network says what the data is and what to use instead
    result = run("train", train, "--arch", "cnn", "-o", tmp_path / "c.safetensors")
    assert_clean_error(result, "--arch cnn needs image data (n, C, H, W)")
    assert "FILE.py:Class" in result.stderr
    assert not (tmp_path / "c.safetensors").exists()


def test_each_kind_of_data_is_standardised_along_its_own_axes() -> None:
    from puma_cli.models.architectures import Architecture, Classifier

    rng = np.random.default_rng(0)
    for shape, stats in [
        ((5,), (5,)),  # a table: each feature
        ((6, 3), (6, 3)),  # sequences (or signals): each position of each feature
        ((2, 4, 4), (2, 1, 1)),  # images: each channel
        ((2, 3, 4, 4), (2, 1, 1, 1)),  # volumes: each channel
    ]:
        X = torch.from_numpy(rng.normal(3, 2, (50, *shape)).astype(np.float32))
        model = Classifier(Architecture("mlp", shape, 2, hidden=(4,)))
        model.fit_standardisation(X)
        assert tuple(model.mean.shape) == stats, shape
        z = (X - model.mean) / model.std
        axes = (0,) if len(stats) < 3 else (0, *range(2, X.ndim))
        assert torch.allclose(z.mean(dim=axes), torch.zeros(stats).squeeze(), atol=1e-5)
        assert torch.allclose(z.std(dim=axes, unbiased=False), torch.ones(()), atol=1e-4)


ATTENTION_NET = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"Attention two ways: PyTorch's encoder layer, and MultiheadAttention called directly.\"\"\"

    def __init__(self, input_shape, n_classes, dim=8):
        super().__init__()
        self.inp = nn.Linear(input_shape[-1], dim)
        self.encoder = nn.TransformerEncoderLayer(
            dim, 2, dim_feedforward=16, dropout=0.1, batch_first=True
        )
        self.attention = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        h = self.encoder(self.inp(x))
        a, _ = self.attention(h, h, h)
        return self.head((h + a).mean(1))
"""


def test_attention_models_take_every_curvature(tmp_path: Path) -> None:
    """PyTorch's fused attention kernels have no forward-mode derivative (the inference
    fast path under no_grad) or no derivative of their backward (SDPA's flash kernel):
    the engine runs attention as composite ops. K-FAC fits both attentions' projections
    (self-attention, called with one tensor three times) and leaves out the LayerNorms."""
    train, test, arch = tmp_path / "seq.npz", tmp_path / "seq-test.npz", tmp_path / "att.py"
    _sequences(train, 240, 0)
    _sequences(test, 60, 1)
    arch.write_text(ATTENTION_NET)
    model = tmp_path / "m.safetensors"
    run_json(
        "train", train, "--test", test, "--arch", f"{arch}:Net", "-o", model,
        "--epochs", "5", "--device", "cpu",
    )  # fmt: skip
    (tmp_path / "ids.txt").write_text("s0\ns1\ns2\ns3\n")
    for curvature, out in _remove_each(
        model, tmp_path, ("exact", "ggn", "kfac", "ekfac"), "--device", "cpu"
    ):
        assert out["parameters"]["curvature"] == curvature
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
    dim = 8
    assert out["parameters"]["uncovered_layers"] == {"LayerNorm": 2 * 2 * dim}
    assert "no_forward_mode" not in out["parameters"]  # composite attention has it
    # the fast path is PyTorch's again once the engine is done (prediction keeps it)
    assert torch.backends.mha.get_fastpath_enabled()


SQUARE_NET = """

class Net(nn.Module):
    \"\"\"A layer, then Square (each test's own autograd.Function), then a layer.\"\"\"

    def __init__(self, in_features, n_classes, width=6):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.out = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.out(Square.apply(self.inp(x)))
"""

NO_DERIVATIVE_NET = (
    """
import torch
import torch.nn.functional as F
from torch import nn


class Twice(torch.autograd.Function):
    \"\"\"2 x, with no backward of its own.\"\"\"

    @staticmethod
    def forward(ctx, x):
        return 2 * x


class Square(torch.autograd.Function):
    \"\"\"x * x, with no jvp, and a backward (through Twice) that has no derivative.\"\"\"

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return Twice.apply(x) * g
"""
    + SQUARE_NET
)


def test_an_op_without_a_forward_mode_derivative_takes_the_reverse_route(
    data_dir: Path, tmp_path: Path
) -> None:
    """A custom autograd.Function with no jvp (and no setup_context, which torch.func
    needs): the scores and the GGN's products take J v by two reverse passes and SSD's
    per-row gradients one backward pass a row; the exact Hessian, whose products need a
    derivative of the Function's backward (Twice has no backward), is one clear error
    that says what to use."""
    model = _user_model(data_dir, tmp_path, NO_DERIVATIVE_NET, 4)
    base = ("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--device", "cpu")
    for curvature in ("kfac", "ggn"):
        out = run_json(*base, "--curvature", curvature, "-o", tmp_path / f"{curvature}.st")
        assert out["parameters"]["curvature"] == curvature
        assert out["marked_loss_after"] > out["marked_loss_before"]
        assert out["parameters"]["no_forward_mode"] == "an operation (a custom autograd.Function?)"
    assert run_json(*base, "--method", "ssd", "-o", tmp_path / "ssd.st")["removed"] > 0
    result = run(*base, "--curvature", "exact", "-o", tmp_path / "exact.st")
    assert_clean_error(result, "which has no derivative of its backward, which the exact")
    assert "(a custom autograd.Function?)" in result.stderr
    assert "use --curvature ggn, kfac or ekfac" in result.stderr
    assert not (tmp_path / "exact.st").exists()


WARP_NET = """
import torch.nn.functional as F
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"A spatial transformer: grid_sample has no forward-mode derivative in torch 2.13.\"\"\"

    def __init__(self, input_shape, n_classes):
        super().__init__()
        width = input_shape[0] * input_shape[1] * input_shape[2]
        self.where = nn.Linear(width, 6)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        grid = F.affine_grid(self.where(x.flatten(1)).view(-1, 2, 3), x.shape, align_corners=False)
        return self.head(F.grid_sample(x, grid, align_corners=False).flatten(1))
"""


def test_grid_sample_and_recurrent_nets_get_scores_and_self_influence(tmp_path: Path) -> None:
    arch = tmp_path / "warp.py"
    arch.write_text(WARP_NET)
    model = tmp_path / "m.safetensors"
    run_json("train", DIGITS, "--arch", f"{arch}:Net", "-o", model, "--epochs", "3")
    with np.load(DIGITS) as digits:
        ids = digits["ids"][:6].tolist()
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    for _, out in _remove_each(model, tmp_path, ("auto", "kfac")):
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
        assert out["parameters"]["no_forward_mode"] == "grid_sampler_2d"
    # vmap cannot batch a GRU's per-row gradients: self-influence takes them row by row
    train, arch = tmp_path / "seq.npz", tmp_path / "rnn.py"
    _sequences(train, 60, 0)
    arch.write_text(SEQUENCE_NET)
    run_json("train", train, "--arch", f"{arch}:Net", "-o", tmp_path / "g.st", "--epochs", "5")
    ranked = run_json("debug-labels", "-m", tmp_path / "g.st", "--score", "self-influence")
    assert len(ranked["suspects"]) > 0 and ranked["n"] == 54


def test_the_reverse_routes_equal_forward_mode_and_vmap() -> None:
    """J v by two reverse passes, the scores from it and the row-by-row gradients equal
    forward mode and vmap on a model that has both (float64)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    X, y = torch.randn(30, 3).double(), torch.randint(0, 4, (30,))
    engine = InfluenceModel(net, X.numpy(), y.numpy(), chunk_size=7)
    v = torch.randn(engine.n_parameters, dtype=torch.float64)
    forward = engine._logits_jv_forward(v, engine.X)
    reverse = engine._logits_jv_reverse(v, engine.X)
    for a, b in zip(forward, reverse, strict=True):
        assert torch.allclose(a, b, atol=1e-12)
    for a, b in zip(
        engine._scores_forward(v, None, None), engine._scores_reverse(v, None, None), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-12)
    assert torch.allclose(
        engine.per_sample_gradients(), engine._row_by_row(engine.X, engine.y), atol=1e-12
    )
    assert engine.no_forward_mode is None  # nothing sent this model to the reverse route


TOKEN_NET = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"A bag of token embeddings: its input is ids, not values to standardise.\"\"\"

    def __init__(self, input_shape, n_classes, vocab=40, dim=6):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x):
        return self.head(self.embedding(x.long()).mean(1))
"""


def test_token_ids_train_unstandardised_and_unlearn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    tokens = rng.integers(0, 40, (200, 8))
    tokens[:, 0] = 10 * y + rng.integers(0, 3, 200)  # the first token tells the class
    data = tmp_path / "tokens.npz"
    np.savez(data, X=tokens, y=y, ids=np.array([f"t{i}" for i in range(200)]))
    arch = tmp_path / "bag.py"
    arch.write_text(TOKEN_NET)
    model = tmp_path / "m.safetensors"
    args = ("train", data, "--arch", f"{arch}:Net", "-o", model, "--epochs", "40", "--lr", "0.01")
    refused = run(*args)  # standardised ids index outside the embedding
    assert_clean_error(refused, "IndexError (index out of range in self)")
    assert "train with --no-standardize" in refused.stderr and not model.exists()
    uncast = tmp_path / "uncast.py"  # ids handed to the embedding as the float32 puma gives
    uncast.write_text(TOKEN_NET.replace("self.embedding(x.long())", "self.embedding(x)"))
    refused = run("train", data, "--arch", f"{uncast}:Net", "-o", model, "--no-standardize")
    assert_clean_error(refused, "puma hands a network its rows as float32")
    assert "self.embedding(x.long())" in refused.stderr and not model.exists()
    trained = run_json(*args, "--no-standardize")
    assert trained["train_accuracy"] > 0.6  # chance is 1/3
    assert run_json("info", model)["recipe"]["standardize"] is False
    (tmp_path / "ids.txt").write_text("t0\nt1\nt2\n")
    base = ("remove", "-m", model, "--marked", tmp_path / "ids.txt")
    # K-FAC's fit cannot reach the ids (cast to long): it is taken through the weights
    out = run_json(*base, "--curvature", "kfac", "-o", tmp_path / "k.safetensors")
    assert out["parameters"]["uncovered_layers"] == {"Embedding": 40 * 6}
    assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
    retrained = run_json(*base, "--method", "retrain", "-o", tmp_path / "r.safetensors")
    assert retrained["test_accuracy_after"] is None and retrained["removed"] > 0
    assert load_checkpoint(tmp_path / "r.safetensors").model.std.eq(1).all()


def test_the_engine_runs_recurrent_nets_without_cudnn_and_restores_the_flags() -> None:
    """cuDNN's RNN backward refuses eval mode (every derivative is taken in it): for a
    model with a recurrent layer the passes switch cuDNN off, for others they leave it;
    the attention fast path is off inside either way, and both flags come back."""
    from puma_cli.engine.kernels import composite_kernels

    before = torch.backends.cudnn.enabled, torch.backends.mha.get_fastpath_enabled()
    for module, cudnn_inside in [(torch.nn.GRU(3, 4), False), (torch.nn.Linear(3, 4), True)]:
        with composite_kernels(torch.nn.Sequential(module)):
            assert torch.backends.cudnn.enabled is (cudnn_inside and before[0])
            assert not torch.backends.mha.get_fastpath_enabled()
        assert (torch.backends.cudnn.enabled, torch.backends.mha.get_fastpath_enabled()) == before


PARAMETRIZED_NET = """
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm


class Net(nn.Module):
    def __init__(self, in_features, n_classes, width=8):
        super().__init__()
        self.body = weight_norm(nn.Linear(in_features, width))
        self.head = {head}

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))
"""


@pytest.mark.parametrize("head", ["plain", "spectral_norm"])
def test_parametrized_layers_are_left_out_of_kfac(
    head: str, data_dir: Path, tmp_path: Path
) -> None:
    """weight_norm and spectral_norm compute a layer's weight from other parameters, so
    its K-FAC block would not be theirs: the layer is left out and named so; a model of
    such layers alone is one clear error."""
    layer = "nn.Linear(width, n_classes)"
    source = PARAMETRIZED_NET.format(head=layer if head == "plain" else f"spectral_norm({layer})")
    model = _user_model(data_dir, tmp_path, source, 4)
    args = ("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature", "kfac")
    if head == "plain":
        out = run_json(*args, "-o", tmp_path / "r.safetensors")
        # weight_norm's g (12) and v (12 x 2), and the bias (12): width 12 from _train
        assert out["parameters"]["uncovered_layers"] == {"parametrized Linear": 12 + 24 + 12}
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
    else:
        result = run(*args, "-o", tmp_path / "r.safetensors")
        assert_clean_error(result, "none it can fit: each is frozen, parametrized as by")
        assert not (tmp_path / "r.safetensors").exists()
    covered = run_json(*args[:-2], "--curvature", "ggn", "-o", tmp_path / "g.safetensors")
    assert covered["parameters"]["curvature"] == "ggn"  # every parameter, parametrized too


ONCE_DIFFERENTIABLE_NET = (
    """
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


class Square(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g
"""
    + SQUARE_NET
)


def test_a_solve_that_does_not_converge_is_said(tmp_path: Path) -> None:
    """A backward marked once_differentiable is differentiated as if it were constant, and
    torch says nothing: the GGN's products come out asymmetric and CG runs out of
    iterations. The report says so, with what to do; a closed-form K-FAC solve does not."""
    data, arch, model = tmp_path / "r.csv", tmp_path / "net.py", tmp_path / "m.safetensors"
    arch.write_text(ONCE_DIFFERENTIABLE_NET)
    run_json("make-data", "radial", "-o", data)
    run_json("train", data, "--arch", f"{arch}:Net", "-o", model, "--epochs", "30")
    rows = data.read_text().splitlines()[1:5]
    (tmp_path / "ids.txt").write_text("".join(row.split(",", 1)[0] + "\n" for row in rows))
    base = ("remove", "-m", model, "--marked", tmp_path / "ids.txt")
    ggn = run_json(*base, "--curvature", "ggn", "-o", tmp_path / "g.safetensors")
    assert ggn["parameters"]["solver_residual"] > 1e-2
    (said,) = [w for w in ggn["warnings"] if "far from converged" in w]
    assert f"after {ggn['parameters']['solver_iterations']} iterations" in said
    assert "raise --damping, or use --curvature kfac" in said
    kfac = run_json(*base, "--curvature", "kfac", "-o", tmp_path / "k.safetensors")
    assert not [w for w in kfac["warnings"] if "far from converged" in w]


TIED_NET = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"Tied two ways: one layer under two names, and one weight in two layers.\"\"\"

    def __init__(self, in_features, n_classes, width=8):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.mix = nn.Linear(width, width)
        self.again = self.mix  # the same layer, held twice
        self.mix2 = nn.Linear(width, width)
        self.mix2.weight = self.mix.weight  # the same weight, another bias
        self.out = nn.Linear(width, n_classes)

    def forward(self, x):
        h = self.inp(x).relu()
        return self.out(self.mix2(self.again(h).relu()).relu())
"""


def test_the_engine_leaves_a_tied_network_as_it_found_it(tmp_path: Path) -> None:
    """torch 2.13's functional_call, tying weights itself, left a layer held under two
    names with the call's tensors in place of its weights (and a removal stopped with a
    deepcopy traceback): the engine gives each place once and its own tying off."""
    (tmp_path / "tied.py").write_text(TIED_NET)
    scope: dict[str, object] = {}
    exec(TIED_NET, scope)
    torch.manual_seed(0)
    net = scope["Net"](3, 2)  # type: ignore[operator]
    slots = tensor_slots(net)
    assert "again.weight" not in slots and slots["mix2.weight"] == "mix.weight"
    X = torch.randn(5, 3, dtype=torch.float64)
    engine = InfluenceModel(net.double(), X, torch.zeros(5, dtype=torch.long), dtype=torch.float64)
    before = {k: v.clone() for k, v in engine.module.state_dict().items()}
    theta = engine.theta.clone().requires_grad_()
    with torch.no_grad():
        expected = engine.module(X)
    torch.testing.assert_close(engine.logits(theta, X), expected)
    shifted = engine.logits(theta + 1.0, X)
    assert not torch.allclose(shifted, expected)
    for name, value in engine.module.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert (
        engine.module.mix.weight.is_leaf and engine.module.mix2.weight is engine.module.mix.weight
    )
    engine.patched_module(torch.zeros_like(engine.theta))  # the copy that stopped removals


def test_a_tied_network_trains_and_takes_every_curvature(data_dir: Path, tmp_path: Path) -> None:
    arch = tmp_path / "tied.py"
    arch.write_text(TIED_NET)
    model = tmp_path / "m.safetensors"
    run_json("train", data_dir / "radial.csv", "--arch", f"{arch}:Net", "-o", model,
             "--epochs", "10", "--device", "cpu")  # fmt: skip
    (tmp_path / "ids.txt").write_text("0\n2\n4\n")
    for curvature, out in _remove_each(
        model, tmp_path, ("exact", "ggn", "kfac", "ekfac"), "--device", "cpu"
    ):
        assert out["removed"] == 3 and out["parameters"]["curvature"] == curvature
    removed = load_checkpoint(tmp_path / "r-kfac.safetensors").model
    inner = removed.net if hasattr(removed, "net") else removed
    assert inner.again is inner.mix and inner.mix2.weight is inner.mix.weight  # still tied
    assert run_json("eval", "-m", tmp_path / "r-kfac.safetensors", "--on", "train")["n"] > 0
    width = 8
    assert out["parameters"]["uncovered_layers"] == {"tied Linear": width * width + 2 * width}


def test_constants_and_hook_computed_weights_are_not_plain_tensors() -> None:
    """Only a tensor no checkpoint saves and .to() leaves behind is refused: a 0-dim
    constant, the old weight_norm's computed weight and the old spectral_norm's
    hook-set one pass."""
    from puma_cli.models.user import _refuse_plain_tensors, construct

    class Net(nn.Module):
        def __init__(self, in_features: int, n_classes: int) -> None:
            super().__init__()
            self.scale = torch.tensor(2.0)
            self.a = nn.utils.weight_norm(nn.Linear(in_features, 4))
            self.b = nn.utils.spectral_norm(nn.Linear(4, n_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) * self.scale)

    with pytest.warns(FutureWarning):  # torch's deprecation of the old weight_norm
        net = construct(Net, {}, (3,), 2, "Net")
    _refuse_plain_tensors(net, "Net")  # raises for a tensor no checkpoint saves
    assert net(torch.zeros(2, 3)).shape == (2, 2)


def test_an_error_outside_user_code_is_not_blamed_on_the_user() -> None:
    from puma_cli.models.user import raised_in_user_code

    with pytest.raises(RuntimeError) as raised:
        torch.zeros(2, 3) @ torch.zeros(2, 3)
    assert raised_in_user_code(raised.value) is None  # no frame in a user's file: puma's


SCALING_NET = """
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    \"\"\"A net that scales its own inputs as it was written for raw pixels (x / 255),
    the way a user's code often normalises inside forward.\"\"\"

    def __init__(self, input_shape, n_classes):
        super().__init__()
        self.head = nn.Linear(int(input_shape[-1]), n_classes)

    def forward(self, x):
        return self.head((x / 255 - 0.5) / 0.25)
"""


def test_a_net_that_learns_nothing_behind_the_standardisation_gets_a_warning(
    tmp_path: Path,
) -> None:
    """Standardised inputs, then divided by 255 in the net's forward, are ~0 for every row:
    the model ends at chance. `train` saves it (it is what was asked) but says so, with the
    fix, --no-standardize, which then learns."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    X = (rng.normal(0, 1, (300, 6)) * 10 + 60 * y[:, None] + 100).astype(np.float32)
    data = tmp_path / "pixels.npz"
    np.savez(data, X=X, y=y)
    arch = tmp_path / "scaling.py"
    arch.write_text(SCALING_NET)
    args = ("train", data, "--arch", f"{arch}:Net", "--epochs", "3", "--lr", "0.01")
    blind = run_json(*args, "-o", tmp_path / "a.safetensors")
    assert blind["train_accuracy"] < 0.65  # two classes of about half the rows each
    (warning,) = blind["warnings"]
    assert "little better than always answering the largest class" in warning
    assert "--no-standardize" in warning
    shown = run(*args, "-o", tmp_path / "b.safetensors")  # the table run: on stderr
    assert shown.exit_code == 0 and "Warning: the trained model" in shown.stderr
    learnt = run_json(*args, "--no-standardize", "-o", tmp_path / "c.safetensors")
    assert learnt["train_accuracy"] > 0.9 and learnt["warnings"] == []


def test_a_model_that_learns_gets_no_chance_warning(
    data_dir: Path, arch: Path, tmp_path: Path
) -> None:
    trained = _train(data_dir, arch, tmp_path / "m.safetensors")
    assert trained["warnings"] == []


def test_near_chance_is_measured_from_the_largest_class() -> None:
    from puma_cli.quality.evaluation import near_chance

    balanced = np.repeat([0, 1, 2, 3], 25)
    assert near_chance(0.30, balanced, 4) == 0.25  # a quarter: any constant answer
    assert near_chance(0.40, balanced, 4) is None
    skewed = np.array([0] * 99 + [1])  # 99 % one class: a constant scores 0.99
    assert near_chance(0.99, skewed, 2) == 0.99
    assert near_chance(1.0, skewed, 2) is None  # a perfect model is not taken for one
    assert near_chance(0.5, np.zeros(10, dtype=int), 3) == 1.0  # one class: nothing to learn


def test_log_probabilities_are_taken_as_logits(data_dir: Path, tmp_path: Path) -> None:
    """log_softmax's output is logits up to a constant per row (softmax gives back the same
    probabilities): accepted, unlike the probabilities themselves."""
    path = tmp_path / "net.py"
    path.write_text(NET.replace("return self.body(x)", "return self.body(x).log_softmax(dim=1)"))
    trained = run_json(
        "train", data_dir / "radial.csv", "--arch", f"{path}:Net", "-o", tmp_path / "m.safetensors",
        "--epochs", "100",
    )  # fmt: skip
    assert trained["train_accuracy"] > 0.7 and trained["warnings"] == []


COMPILED_NET = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes, width=8):
        super().__init__()
        self.inp = nn.Linear(in_features, width)
        self.body = torch.compile(nn.Sequential(nn.Tanh(), nn.Linear(width, width)))
        self.out = nn.Linear(width, n_classes)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


def Compiled(in_features, n_classes):
    return torch.compile(Net(in_features, n_classes))


@torch.compile(backend="aot_eager")  # its compiled backward runs once
def doubled(h):
    return torch.tanh(h) * 2


class WithCompiledCode(Net):
    def forward(self, x):
        return self.out(doubled(self.inp(x)))
"""


def test_torch_compile_s_wrappers_come_off_and_compiled_code_is_one_error(
    data_dir: Path, tmp_path: Path
) -> None:
    """A network built through torch.compile (itself or a submodule) is trained and
    differentiated as the modules it wraps: a compiled graph has neither derivative the
    exact Hessian and the scores take and hides its layers from K-FAC's hooks (a traceback,
    and 'none it can fit', before). A checkpoint saved under the wrapper's `_orig_mod.`
    names still loads. A function the net's code compiles cannot be unwrapped: one Error."""
    arch = tmp_path / "net.py"
    arch.write_text(COMPILED_NET)
    model = tmp_path / "m.safetensors"
    run_json("train", data_dir / "radial.csv", "--arch", f"{arch}:Compiled", "-o", model,
             "--epochs", "20")  # fmt: skip
    names = set(load_checkpoint(model).model.state_dict())
    assert {"net.inp.weight", "net.body.1.weight"} <= names
    assert not any("_orig_mod" in name for name in names)
    rows = (data_dir / "radial.csv").read_text().splitlines()[1:5]
    (tmp_path / "ids.txt").write_text("".join(row.split(",", 1)[0] + "\n" for row in rows))
    for curvature, out in _remove_each(model, tmp_path, ("exact", "kfac")):
        assert out["removed"] == 4, curvature
    assert out["parameters"]["uncovered_parameters"] == 0  # every Linear seen by the hooks
    from safetensors.torch import load_file, save_file

    with open(model, "rb") as handle:
        meta = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))["__metadata__"]
    wrapped = {  # as torch.compile's wrapper saved them
        name.replace("model.net.", "model.net._orig_mod.").replace(".body.", ".body._orig_mod."): t
        for name, t in load_file(model).items()
    }
    save_file(wrapped, tmp_path / "old.safetensors", metadata=meta)
    assert run_json("eval", "-m", tmp_path / "old.safetensors", "--on", "train")["n"] > 0
    coded = tmp_path / "coded.safetensors"
    run_json("train", data_dir / "radial.csv", "--arch", f"{arch}:WithCompiledCode", "-o", coded,
             "--epochs", "1", "--batch-size", "1000", "--val-frac", "0.25")  # fmt: skip
    refused = run("remove", "-m", coded, "--marked", tmp_path / "ids.txt",
                  "--curvature", "exact", "-o", tmp_path / "c.safetensors")  # fmt: skip
    assert_clean_error(refused, "take torch.compile out of the network's code")
    assert not (tmp_path / "c.safetensors").exists()


def test_a_torchscript_net_removes_and_kfac_says_why_it_sees_no_layer(
    data_dir: Path, tmp_path: Path
) -> None:
    """torch.jit.script's modules are no nn.Linear to K-FAC's hooks (a scripted net cannot
    be unwrapped, as torch.compile's can): K-FAC says so; the other curvatures run it."""
    arch = tmp_path / "net.py"
    arch.write_text(
        "import torch\nfrom torch import nn\n\n\n"
        "def Net(in_features, n_classes, width):\n"
        "    return torch.jit.script(nn.Sequential(nn.Linear(in_features, width), nn.Tanh(), "
        "nn.Linear(width, n_classes)))\n"
    )
    model = _user_model(data_dir, tmp_path, arch.read_text(), 4)
    args = ("remove", "-m", model, "--marked", tmp_path / "ids.txt")
    refused = run(*args, "--curvature", "kfac", "-o", tmp_path / "k.safetensors")
    assert_clean_error(refused, "its layers are TorchScript (torch.jit.script)")
    assert not (tmp_path / "k.safetensors").exists()
    with warnings.catch_warnings(record=True) as caught:  # what would reach stderr
        warnings.simplefilter("always")
        shown = run(*args, "--curvature", "ggn", "-o", tmp_path / "g.safetensors")
    assert shown.exit_code == 0
    assert not [w for w in caught if "not a leaf" in str(w.message)]  # torch's, held back
    out = run_json(*args, "--curvature", "ggn", "-o", tmp_path / "g2.safetensors")
    assert out["removed"] == 4 and out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6


NO_GRAD_NET = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"A fixed feature extractor run under no_grad (its parameters still require grad).\"\"\"

    def __init__(self, in_features, n_classes, width=8):
        super().__init__()
        self.body = nn.Linear(in_features, width)
        self.head = nn.Linear(width, n_classes)

    def forward(self, x):
        with torch.no_grad():
            h = torch.tanh(self.body(x))
        return self.head(h)
"""


def test_a_layer_run_under_no_grad_is_left_out_of_kfac_and_named(
    data_dir: Path, tmp_path: Path
) -> None:
    """Such a layer has no gradient to fit factors with: curvlinops' hook on its output
    raised, reported as an error in the user's code. It is left out (its gradient is 0 in
    every pass, so no curvature moves it), named, cold and cached alike."""
    model = _user_model(data_dir, tmp_path, NO_GRAD_NET, 4)
    body = {"Linear run under no_grad": 2 * 12 + 12}  # width 12 from _train
    for curvature, cached in (("kfac", False), ("kfac", True), ("ekfac", False)):
        out = run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--curvature",
                       curvature, "-o", tmp_path / "r.safetensors", "--overwrite")  # fmt: skip
        assert out["parameters"]["uncovered_layers"] == body, (curvature, cached)
        assert out["parameters"]["curvature_cached"] is cached
        assert out["marked_loss_after"] >= out["marked_loss_before"] - 1e-6
    exact = run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt",
                     "--curvature", "exact", "-o", tmp_path / "e.safetensors")  # fmt: skip
    before, after = load_checkpoint(model).model, load_checkpoint(tmp_path / "e.safetensors").model
    assert exact["removed"] == 4 and torch.equal(before.net.body.weight, after.net.body.weight)
