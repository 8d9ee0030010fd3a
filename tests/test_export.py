"""`puma export`: a model's network back out as a plain safetensors state dict, so that the
weights a removal wrote can be deployed where the original ones were; with `--like`, under
the tensor names (and dtypes) of the file the model was imported from."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run, run_json
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from puma_cli.io.checkpoint import load_checkpoint
from puma_cli.io.datasets import load_dataset

NET = """
from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, 16), nn.ReLU())
        self.head = nn.Linear(16, n_classes)

    def forward(self, x):
        return self.head(self.body(x))
"""


def _user_net() -> nn.Module:
    scope: dict[str, object] = {}
    exec(NET, scope)
    return scope["Net"](2, 2)  # type: ignore[operator]


@pytest.fixture(scope="module")
def imported(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Weights trained by plain PyTorch, saved by DDP (a `module.` prefix) in float16,
    imported behind a declared transform, and a PUMA removal of 5 % of the rows."""
    folder = tmp_path_factory.mktemp("export")
    (folder / "net.py").write_text(NET)
    train = load_dataset(data_dir / "radial.csv")
    torch.manual_seed(0)
    net = _user_net()
    X = (torch.as_tensor(train.X, dtype=torch.float32) - 0.5) / 2.0  # the user's transform
    y = torch.as_tensor(train.y)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(X), y).backward()
        optimizer.step()
    state = {f"module.{k}": v.half() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "w.safetensors"))
    run_json(
        "import", folder / "w.safetensors", "--arch", f"{folder / 'net.py'}:Net",
        "--data", data_dir / "radial.csv", "--val", data_dir / "radial-test.csv",
        "--normalize-mean", "0.5", "--normalize-std", "2",
        "--device", "cpu", "-o", folder / "m.safetensors",
    )  # fmt: skip
    run_json("mark", data_dir / "radial.csv", "--random", "0.05", "-o", folder / "ids.txt")
    run_json(
        "remove", "-m", folder / "m.safetensors", "--marked", folder / "ids.txt",
        "--device", "cpu", "-o", folder / "removed.safetensors",
    )  # fmt: skip
    return folder


def test_like_the_original_gives_its_names_dtypes_and_the_removed_values(
    imported: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "deploy.safetensors"
    report = run_json(
        "export", imported / "removed.safetensors", "-o", out,
        "--like", imported / "w.safetensors",
    )  # fmt: skip
    original = load_file(imported / "w.safetensors")
    exported = load_file(out)
    assert exported.keys() == original.keys()  # module.body.0.weight, ...: the file's own
    assert all(exported[k].dtype == torch.float16 for k in exported)
    removed = load_checkpoint(imported / "removed.safetensors").model.net.state_dict()
    for key, value in exported.items():
        ours = removed[key.removeprefix("module.")]
        torch.testing.assert_close(value, ours.half())
    assert any(not torch.equal(exported[k], original[k]) for k in original)  # the removal
    assert report["tensors"] == len(original) and report["removals"] == 1
    assert report["inputs"] == {"divisor": 1.0, "mean": [0.5], "std": [2.0]}
    # The user's own class loads them and computes the removed model's logits.
    net = _user_net()
    net.load_state_dict({k.removeprefix("module."): v.float() for k, v in exported.items()})
    train = load_dataset(data_dir / "radial.csv")
    X = torch.as_tensor(train.X[:20], dtype=torch.float32)
    model = load_checkpoint(imported / "removed.safetensors").model
    with torch.no_grad():
        torch.testing.assert_close(net((X - 0.5) / 2.0), model(X), atol=2e-2, rtol=1e-2)
    with safe_open(str(out), "pt") as handle:
        record = json.loads(handle.metadata()["puma_export"])
    assert record["removals"][0]["method"] == "puma"
    assert record["inputs"] == report["inputs"]


def test_the_deployed_file_cannot_tell_whose_rows_were_removed(
    imported: Path, tmp_path: Path
) -> None:
    """The checkpoint keeps each removal's sha256 of its ids and its marked rows' losses
    for the owner's audit; the file deployed does not: a hash of one guessable id (an
    e-mail address, a user number) confirms a guess, and one row's loss is its own."""
    out = tmp_path / "deploy.safetensors"
    run_json("export", imported / "removed.safetensors", "-o", out)
    kept = run_json("info", imported / "removed.safetensors")["provenance"]
    kept_removal = next(entry for entry in kept if entry["op"] == "remove")
    assert "ids_sha256" in kept_removal and "marked_loss_after" in kept_removal["metrics"]
    with safe_open(str(out), "pt") as handle:
        record = json.loads(handle.metadata()["puma_export"])
    for entries in (record["removals"], record["provenance"]):
        removal = next(entry for entry in entries if entry["op"] == "remove")
        assert "ids_sha256" not in removal
        assert not [key for key in removal["metrics"] if key.startswith("marked_")]
        assert removal["removed"] == kept_removal["removed"]  # the count stays
        assert removal["metrics"]["criterion_after"] == kept_removal["metrics"]["criterion_after"]
    # `info` reads the deployed file as what it is, from its record alone.
    described = run_json("info", out)
    assert described["format"] == "puma-export" and described["provenance"] == record["provenance"]
    assert described["model"] == str(imported / "removed.safetensors")
    assert described["tensors"] == len(load_file(out))
    assert described["n_values"] == sum(t.numel() for t in load_file(out).values())
    shown = " ".join(run("info", out).stdout.split())
    assert "written by puma export: a network's state dict to deploy" in shown
    assert "2. " in shown and " remove (puma, " in shown and "marked loss" not in shown


def test_without_like_the_networks_own_names_load_into_its_class(
    imported: Path, tmp_path: Path
) -> None:
    out = tmp_path / "plain.safetensors"
    run_json("export", imported / "removed.safetensors", "-o", out)
    net = _user_net()
    net.load_state_dict(load_file(out))  # strict: every name, nothing else
    removed = load_checkpoint(imported / "removed.safetensors").model.net
    for (name, a), b in zip(net.state_dict().items(), removed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_model_puma_standardised_says_what_its_network_expects(
    model_file: Path, tmp_path: Path
) -> None:
    report = run_json("export", model_file, "-o", tmp_path / "w.safetensors")
    assert report["inputs"]["divisor"] == 1.0 and len(report["inputs"]["mean"]) == 2
    assert any("(x - mean) / std" in w for w in report["warnings"])


def test_an_exported_network_is_named_as_such_and_imports_behind_its_transform(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    """A deployed file given where a checkpoint goes is not called damaged: the error says
    what it is and which checkpoint it came from. Imported again, it is put behind the
    standardisation it was exported expecting (recorded in its metadata), and predicts as
    the model did; a transform declared instead is used, with a warning that it differs."""
    out = tmp_path / "w.safetensors"
    run_json("export", model_file, "-o", out)
    for command in (["eval", "-m", out], ["remove", "-m", out, "--marked", out]):
        assert_clean_error(run(*command), f"not a puma checkpoint: give the checkpoint it was "
                           f"exported from ({model_file})")  # fmt: skip
    back = tmp_path / "back.safetensors"
    report = run_json(
        "import", out, "--arch", "mlp", "--data", data_dir / "radial.csv",
        "--val", data_dir / "radial-test.csv", "-o", back,
    )  # fmt: skip
    assert report["inputs_from"] == f"{out} (puma export's inputs)" and not report["warnings"]
    test = data_dir / "radial-test.csv"
    before = run_json("eval", "-m", model_file, "--data", test)
    after = run_json("eval", "-m", back, "--data", test)
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
    assert len(run_json("info", back)["recipe"]["normalize_mean"]) == 2
    shown = " ".join(run("info", back).stdout.split())
    assert "transform its puma_export metadata records" in shown
    declared = run_json(
        "import", out, "--arch", "mlp", "--data", data_dir / "radial.csv",
        "--normalize-mean", "0", "--normalize-std", "2", "-o", tmp_path / "d.safetensors",
        "--test", data_dir / "radial.csv",
    )  # fmt: skip
    assert declared["inputs_from"] is None
    assert any("the declared one differs from it" in w for w in declared["warnings"])
    assert any("(--test) repeat a row the model is trained on" in w for w in declared["warnings"])


def test_a_deployed_file_whose_record_is_damaged_is_refused(tmp_path: Path) -> None:
    """`info` reads a deployed file's record, which may come from anywhere."""
    path = tmp_path / "d.safetensors"
    record = json.dumps({"model": "m.safetensors", "provenance": [1, 2]})
    save_file({"w": torch.zeros(3)}, path, metadata={"format": "pt", "puma_export": record})
    assert_clean_error(run("info", path), "whose 'provenance' is not as `puma export` writes it")
    # A record cannot pass itself off as another kind of file.
    record = json.dumps({"model": "m.safetensors", "format": "puma-checkpoint"})
    save_file({"w": torch.zeros(3)}, path, metadata={"format": "pt", "puma_export": record})
    assert run_json("info", path)["format"] == "puma-export"
    assert run("info", path).exit_code == 0


def test_a_plain_state_dict_is_not_called_damaged(tmp_path: Path) -> None:
    """safetensors.torch and the Hugging Face libraries save {"format": "pt"} metadata,
    which is no JSON: such a file was said to be truncated or damaged."""
    path = tmp_path / "hf.safetensors"
    save_file({"weight": torch.zeros(3)}, path, metadata={"format": "pt"})
    assert_clean_error(run("eval", "-m", path), "not a puma checkpoint (no puma metadata): wrap")


def test_tied_layers_are_written_under_each_name(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "tied.py").write_text(
        "from torch import nn\n\n\nclass Tied(nn.Module):\n"
        "    def __init__(self, in_features, n_classes):\n"
        "        super().__init__()\n"
        "        self.a = nn.Linear(in_features, in_features)\n"
        "        self.b = nn.Linear(in_features, in_features)\n"
        "        self.b.weight = self.a.weight\n"
        "        self.out = nn.Linear(in_features, n_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.out(self.b(self.a(x).relu()).relu())\n"
    )
    model = tmp_path / "m.safetensors"
    run_json(
        "train", data_dir / "radial.csv", "--arch", f"{tmp_path / 'tied.py'}:Tied",
        "--epochs", "2", "--device", "cpu", "-o", model,
    )  # fmt: skip
    run_json("export", model, "-o", tmp_path / "w.safetensors")
    exported = load_file(tmp_path / "w.safetensors")
    assert torch.equal(exported["a.weight"], exported["b.weight"])


def test_refusals_write_nothing(
    imported: Path, data_dir: Path, model_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "w.safetensors"
    removed = imported / "removed.safetensors"
    # A file of another network's names or shapes.
    other = tmp_path / "other.safetensors"
    save_file({"module.body.0.weight": torch.zeros(3, 3)}, str(other))
    assert_clean_error(run("export", removed, "-o", out, "--like", other), "other.safetensors")
    save_file({"elsewhere.weight": torch.zeros(2, 2)}, str(other))
    assert_clean_error(run("export", removed, "-o", out, "--like", other), "'elsewhere.weight'")
    save_file({"module.head.bias": torch.zeros(2)}, str(other))  # names too few of them
    assert_clean_error(run("export", removed, "-o", out, "--like", other), "lacks tensor")
    # A pickle given as --like, an output that is an input or exists, a SISA ensemble.
    pickled = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, pickled)
    assert_clean_error(run("export", removed, "-o", out, "--like", pickled), "pickle")
    assert_clean_error(run("export", removed, "-o", removed, "--overwrite"), "input")
    out.write_bytes(b"keep")
    assert_clean_error(run("export", removed, "-o", out), "--overwrite")
    assert out.read_bytes() == b"keep"
    out.unlink()
    shards = tmp_path / "sisa.safetensors"
    run_json("train", data_dir / "radial.csv", "--shards", "2", "--epochs", "2", "-o", shards)
    assert_clean_error(run("export", shards, "-o", out, "--like", other), "SISA ensemble")
    assert_clean_error(run("export", tmp_path / "missing.safetensors", "-o", out), "missing")
    assert not out.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_sisa_ensemble_exports_its_voting_shards_and_how_they_vote(
    data_dir: Path, tmp_path: Path
) -> None:
    """Each shard still voting under `shard<k>.`, with its own input transform and the
    aggregate in the metadata: enough to predict as the ensemble does. A shard a removal
    emptied is left out."""
    model = tmp_path / "sisa.safetensors"
    run_json("train", data_dir / "radial.csv", "--shards", "3", "--epochs", "3", "-o", model)
    checkpoint = load_checkpoint(model)
    data = load_dataset(data_dir / "radial.csv")
    shard = checkpoint.extra["sisa.shard"].numpy()
    ids = tmp_path / "shard1.txt"
    ids.write_text("\n".join(data.ids[shard == 1]) + "\n")
    removed = tmp_path / "removed.safetensors"
    run_json("remove", "-m", model, "--marked", ids, "--method", "sisa", "-o", removed)
    out = tmp_path / "deploy.safetensors"
    said = run("export", removed, "-o", tmp_path / "read.safetensors")  # the table a person reads
    assert said.exit_code == 0 and "one transform a shard" in said.stdout, said.output
    report = run_json("export", removed, "-o", out)
    assert report["ensemble"]["members"] == ["shard0", "shard2"]
    assert any("shard 1" in w and "left out" in w for w in report["warnings"])
    assert any("mean of their softmax" in w for w in report["warnings"])
    exported = load_file(out)
    assert {name.split(".", 1)[0] for name in exported} == {"shard0", "shard2"}
    with safe_open(str(out), "pt") as handle:
        record = json.loads(handle.metadata()["puma_export"])
    assert record["ensemble"] == report["ensemble"]
    assert record["inputs"].keys() == {"shard0", "shard2"}
    # Predict from the file alone, as its metadata says, and get the ensemble's output.
    ensemble = load_checkpoint(removed).model
    X = torch.as_tensor(data.X[:30], dtype=torch.float32)
    probs = []
    for prefix in record["ensemble"]["members"]:
        net = copy.deepcopy(ensemble.members[0].net)  # the architecture; weights from the file
        for p in net.parameters():
            p.data.zero_()
        mine = {k: v for k, v in exported.items() if k.startswith(f"{prefix}.")}
        net.load_state_dict({k.removeprefix(f"{prefix}."): v for k, v in mine.items()})
        inputs = record["inputs"][prefix]
        mean, std = torch.tensor(inputs["mean"]), torch.tensor(inputs["std"])
        with torch.no_grad():
            probs.append(torch.softmax(net((X / inputs["divisor"] - mean) / std), dim=1))
    with torch.no_grad():
        expected = torch.softmax(ensemble(X), dim=1)
    torch.testing.assert_close(sum(probs) / len(probs), expected, atol=1e-5, rtol=1e-4)
    # One network a shard is no network import can wrap: refused, naming the checkpoint.
    refused = run("import", out, "--arch", "mlp", "--data", data_dir / "radial.csv",
                  "-o", tmp_path / "i.safetensors")  # fmt: skip
    assert_clean_error(refused, "is a SISA ensemble written by `puma export`")
    assert not (tmp_path / "i.safetensors").exists()
