"""The fine-tuning baselines behind `puma remove --method`: finetune, neggrad (NegGrad+),
random-labels, salun (SalUn) and scrub (SCRUB): through the CLI, seeded, recorded, and
their refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run, run_json

from puma_cli.io.checkpoint import ROLE_REMOVED, load_checkpoint
from puma_cli.unlearn.finetuning import random_other_labels, saliency_mask

METHODS = ["finetune", "neggrad", "random-labels", "salun", "scrub"]


@pytest.fixture(scope="module")
def work(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A marking (one k-means cluster of class 1), a model of 40 epochs and a SISA one."""
    folder = tmp_path_factory.mktemp("tuning")
    data, test = data_dir / "radial.csv", data_dir / "radial-test.csv"
    run_json("mark", data, "--class", "1", "-o", folder / "ids.txt")
    common = [data, "--test", test, "--epochs", "40", "--device", "cpu"]
    run_json("train", *common, "-o", folder / "model.safetensors")
    run_json("train", *common, "-o", folder / "sisa.safetensors", "--shards", "3")
    return folder


def _remove(work: Path, out: Path, *args: str) -> dict:
    return run_json(
        "remove", "-m", work / "model.safetensors", "--marked", work / "ids.txt", "-o", out,
        "--device", "cpu", *args,
    )  # fmt: skip


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


@pytest.mark.parametrize("method", METHODS)
def test_each_baseline_removes_is_seeded_and_recorded(
    work: Path, tmp_path: Path, method: str
) -> None:
    first = _remove(work, tmp_path / "a.safetensors", "--method", method)
    assert first["method"] == method
    assert first["parameters"]["epochs"] == 4  # a tenth of the recipe's 40
    assert first["parameters"]["lr"] == pytest.approx(1e-3)  # the recipe's
    _remove(work, tmp_path / "b.safetensors", "--method", method)
    a, b = _weights(tmp_path / "a.safetensors"), _weights(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same weights to the bit
    _remove(work, tmp_path / "c.safetensors", "--method", method, "--seed", "7")
    c = _weights(tmp_path / "c.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)  # the seed orders the batches
    original = _weights(work / "model.safetensors")
    assert any(not torch.equal(a[k], original[k]) for k in a)
    checkpoint = load_checkpoint(tmp_path / "a.safetensors")
    entry = checkpoint.provenance[-1]
    assert entry["op"] == "remove" and entry["method"] == method
    assert entry["parameters"]["epochs"] == 4
    assert int((checkpoint.roles == ROLE_REMOVED).sum()) == first["removed"]


def test_epochs_and_lr_are_taken_as_given(work: Path, tmp_path: Path) -> None:
    report = _remove(work, tmp_path / "o.safetensors", "--method", "finetune", "--epochs", "2",
                     "--lr", "0.005")  # fmt: skip
    assert report["parameters"]["epochs"] == 2
    assert report["parameters"]["lr"] == pytest.approx(0.005)


def test_wrong_labels_and_ascent_raise_the_marked_rows_loss(work: Path, tmp_path: Path) -> None:
    """What each method is for, on the marked rows: training on random labels (and SalUn's
    masked version of it) or ascending their loss makes the model fit them worse than
    plain fine-tuning, which only stops fitting them."""
    loss = {
        method: _remove(work, tmp_path / f"{method}.safetensors", "--method", method, *extra)[
            "marked_loss_after"
        ]
        for method, extra in [
            ("finetune", []),
            ("random-labels", []),
            ("salun", []),
            ("neggrad", ["--alpha", "0.9"]),
        ]
    }
    before = _remove(work, tmp_path / "x.safetensors", "--method", "finetune")["marked_loss_before"]
    for method in ("random-labels", "salun", "neggrad"):
        assert loss[method] > loss["finetune"], loss
        assert loss[method] > before, (loss, before)


def test_salun_moves_only_the_weights_its_mask_lets_through(work: Path, tmp_path: Path) -> None:
    report = _remove(work, tmp_path / "s.safetensors", "--method", "salun", "--mask-share", "0.2")
    new, old = _weights(tmp_path / "s.safetensors"), _weights(work / "model.safetensors")
    changed = sum(int((new[k] != old[k]).sum()) for k in new if k.startswith("net."))
    total = sum(old[k].numel() for k in old if k.startswith("net."))
    assert 0 < changed <= report["parameters"]["salient_parameters"]
    assert report["parameters"]["salient_parameters"] == pytest.approx(0.2 * total, abs=2)


def test_random_labels_are_never_the_true_label() -> None:
    y = torch.arange(10).repeat(50) % 4
    other = random_other_labels(y, 4, torch.Generator().manual_seed(0))
    assert not bool((other == y).any())
    assert set(other.tolist()) == {0, 1, 2, 3}


def test_the_saliency_mask_keeps_the_largest_gradients() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    X, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    mask = saliency_mask(net, X, y, 0.25)
    grads = torch.autograd.grad(
        torch.nn.functional.cross_entropy(net(X), y), list(net.parameters())
    )
    inside = torch.cat([g.abs()[m] for g, m in zip(grads, mask, strict=True)])
    outside = torch.cat([g.abs()[~m] for g, m in zip(grads, mask, strict=True)])
    assert inside.numel() == round(0.25 * sum(g.numel() for g in grads))
    assert float(inside.min()) >= float(outside.max())


def test_the_saliency_mask_takes_exactly_its_share_when_gradients_tie() -> None:
    """A fitted model has many exactly-zero gradients: the mask still takes its share, not
    every weight tied at zero (it did, and SalUn became random-labels)."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        net[2].weight.zero_()  # every first-layer gradient is 0
    X, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 1, 0])
    mask = saliency_mask(net, X, y, 0.5)
    total = sum(m.numel() for m in mask)
    assert sum(int(m.sum()) for m in mask) == round(0.5 * total)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "finetune", "--epochs", "0"], "--epochs 0 is out of range"),
        (["--method", "finetune", "--epochs", "-3"], "--epochs -3 is out of range"),
        (["--method", "scrub", "--lr", "0"], "--lr 0 is out of range"),
        (["--method", "salun", "--lr", "-0.1"], "--lr -0.1 is out of range"),
        (["--method", "neggrad", "--alpha", "-0.5"], "--alpha -0.5 is out of range"),
        (["--method", "neggrad", "--alpha", "2"], "give a number in [0, 1]"),
        (["--method", "finetune", "--alpha", "0.5"], "--alpha is for --method ssd and neggrad"),
        (["--method", "salun", "--mask-share", "0"], "--mask-share 0 is out of range"),
        (["--method", "salun", "--mask-share", "1.5"], "--mask-share 1.5 is out of range"),
        (["--method", "neggrad", "--lr", "nan"], "--lr nan is out of range"),
    ],
)
def test_out_of_range_settings_are_refused(
    work: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "o.safetensors"
    result = run("remove", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
                 "-o", out, *args)  # fmt: skip
    assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", METHODS)
def test_a_sisa_ensemble_is_refused_with_what_to_do(
    work: Path, tmp_path: Path, method: str
) -> None:
    result = run("remove", "-m", work / "sisa.safetensors", "--marked", work / "ids.txt",
                 "-o", tmp_path / "o.safetensors", "--method", method)  # fmt: skip
    assert_clean_error(result, "--method sisa")
    assert list(tmp_path.iterdir()) == []


def test_forget_modes_of_puma(work: Path, tmp_path: Path) -> None:
    """step (default) guards by accuracy and may step further than the paper's guard
    (none); repair fine-tunes after the patch; each mode is recorded for an audit."""
    by = {
        mode: _remove(work, tmp_path / f"{mode}.safetensors", "--forget", mode)
        for mode in ("step", "none", "repair")
    }
    assert by["step"]["eta_scale"] >= by["none"]["eta_scale"]
    assert by["repair"]["parameters"]["repair_epochs"] == 4
    for mode, report in by.items():
        assert report["parameters"]["forget"] == mode
        entry = load_checkpoint(tmp_path / f"{mode}.safetensors").provenance[-1]
        assert entry["options"]["forget"] == mode
    default = _remove(work, tmp_path / "default.safetensors")
    assert default["parameters"]["forget"] == "step"
    assert run("remove", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
               "--forget", "maybe").exit_code == 2  # fmt: skip
