"""The fine-tuning baselines behind `puma remove --method`: finetune, neggrad (NegGrad+),
random-labels, salun (SalUn) and scrub (SCRUB): through the CLI, seeded, recorded, and
their refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json

from puma_cli.io.checkpoint import ROLE_REMOVED, ROLE_TRAINED, load_checkpoint
from puma_cli.io.datasets import load_dataset
from puma_cli.io.ids import write_ids
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
        for mode in ("step", "match", "none", "repair")
    }
    assert by["step"]["eta_scale"] >= by["none"]["eta_scale"]
    assert by["step"]["eta_scale"] >= by["match"]["eta_scale"]  # match stops where step may not
    assert by["repair"]["parameters"]["repair_epochs"] == 4
    for mode, report in by.items():
        assert report["parameters"]["forget"] == mode
        entry = load_checkpoint(tmp_path / f"{mode}.safetensors").provenance[-1]
        assert entry["options"]["forget"] == mode
    default = _remove(work, tmp_path / "default.safetensors")
    assert default["parameters"]["forget"] == "step"
    assert run("remove", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
               "--forget", "maybe").exit_code == 2  # fmt: skip


def _gap(report: dict) -> float:
    """The marked rows' loss over the held-out rows' (both after the removal)."""
    return report["marked_loss_after"] - report["criterion_after"]


def test_match_keeps_the_step_nearest_the_held_out_loss(
    work: Path, data_dir: Path, tmp_path: Path
) -> None:
    """On a random marking, --forget match keeps, of the last grid step whose marked loss is
    below the held-out loss and the first at or above it, the nearer: checked against the
    two steps given as --eta."""
    ids = tmp_path / "random.txt"
    run_json("mark", data_dir / "radial.csv", "--random", "0.1", "-o", ids)

    def at(*args: str) -> dict:
        return run_json("remove", "-m", work / "model.safetensors", "--marked", ids,
                        "-o", tmp_path / "o.safetensors", "--overwrite", "--device", "cpu",
                        *args)  # fmt: skip

    match, step = at("--forget", "match"), at()
    scale = match["parameters"]["eta_scale"]
    assert match["marked_loss_after"] > match["marked_loss_before"]  # it removed something
    assert scale < step["parameters"]["eta_scale"]  # step goes on past the held-out loss
    below, above = (scale, 2 * scale) if _gap(match) < 0 else (scale / 2, scale)
    low, high = at("--eta", f"{below:g}"), at("--eta", f"{above:g}")
    assert _gap(low) < 0 <= _gap(high)
    assert abs(_gap(match)) == pytest.approx(min(abs(_gap(low)), abs(_gap(high))))
    assert abs(_gap(match)) < abs(_gap(step))


def _train_losses(work: Path, data_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The work model's training rows (positions), their losses, and the data's ids."""
    model = load_checkpoint(work / "model.safetensors")
    train = load_dataset(data_dir / "radial.csv")
    trained = np.flatnonzero(model.roles == ROLE_TRAINED)
    with torch.no_grad():
        logits = model.model(torch.as_tensor(train.X[trained], dtype=torch.float32))
    losses = torch.nn.functional.cross_entropy(
        logits.double(), torch.as_tensor(train.y[trained]), reduction="none"
    )
    return trained, losses.numpy(), train.ids


def test_match_crossing_below_the_shortest_step_keeps_that_step(
    work: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Marked rows whose loss sits just under the held-out loss cross it at the guard's
    shortest step already: that step is kept, and the damping is not raised (as it is when
    the guard itself breaks there)."""
    from puma_cli.unlearn import step_length

    trained, losses, ids = _train_losses(work, data_dir)
    held = run_json("remove", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
                    "-o", tmp_path / "x.safetensors", "--method", "retrain",
                    "--device", "cpu")["criterion_before"]  # fmt: skip
    order = np.argsort(losses)
    means = np.array([losses[order[i : i + 20]].mean() for i in range(len(order) - 20)])
    start = int(np.argmax(np.where(means < held, means, -np.inf)))  # the nearest under
    marked = tmp_path / "near.txt"
    write_ids(marked, ids[trained[order[start : start + 20]]])

    def at(*args: str) -> dict:
        return run_json("remove", "-m", work / "model.safetensors", "--marked", marked,
                        "-o", tmp_path / "o.safetensors", "--overwrite", "--device", "cpu",
                        *args)  # fmt: skip

    crossing = next(s for s in (0.125, 0.25, 0.5) if _gap(at("--eta", str(s))) > 1e-4)
    monkeypatch.setattr(step_length, "SMALLEST_SCALE", crossing)
    report = at("--forget", "match")
    assert report["marked_loss_before"] < report["criterion_before"]
    assert report["parameters"]["eta_scale"] == crossing
    assert not any("damping was raised" in w for w in report["warnings"])


def test_match_says_when_the_marked_rows_score_above_held_out_already(
    work: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Rows the model gets wrong (mislabelled ones, say) have a loss above the held-out
    rows' before any removal: match has nothing to aim at, says so and steps as step."""
    trained, losses, all_ids = _train_losses(work, data_dir)
    ids = tmp_path / "worst.txt"
    write_ids(ids, all_ids[trained[np.argsort(-losses)[:8]]])
    args = ["-m", work / "model.safetensors", "--marked", ids, "--device", "cpu"]
    match = run_json("remove", *args, "-o", tmp_path / "m.safetensors", "--forget", "match")
    step = run_json("remove", *args, "-o", tmp_path / "s.safetensors")
    assert match["marked_loss_before"] > match["criterion_before"]
    assert sum("--forget match: the marked rows' loss" in w for w in match["warnings"]) == 1
    assert match["parameters"]["eta_scale"] == step["parameters"]["eta_scale"]
    assert not any("--forget match" in w for w in step["warnings"])
