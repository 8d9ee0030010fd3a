"""`--augment` and `--lr-schedule`: the CIFAR recipe's random flips and crops and its
cosine schedule, recorded in the model so that retraining re-runs them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, run, run_json
from safetensors.torch import save_file

from puma_cli.cli import options
from puma_cli.io.checkpoint import load_checkpoint, save_checkpoint
from puma_cli.models.augment import (
    AUGMENTS,
    LR_SCHEDULES,
    augment_batch,
    crop_padding,
    lr_scheduler,
)

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "sample_data" / "digits-train.npz"


def test_a_flip_mirrors_some_rows_and_leaves_the_others() -> None:
    X = torch.arange(64 * 2 * 4 * 6, dtype=torch.float32).reshape(64, 2, 4, 6)
    kept = X.clone()
    out = augment_batch(X, "flip", torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(out[i], X[i].flip(2))) for i in range(64)]
    same = [bool(torch.equal(out[i], X[i])) for i in range(64)]
    assert all(f != s for f, s in zip(flipped, same, strict=True))  # one or the other
    assert 16 < sum(flipped) < 48
    assert torch.equal(X, kept)  # the batch itself is never written


def test_a_crop_shifts_each_image_within_its_padding() -> None:
    X = torch.zeros(200, 3, 32, 32)
    X[:, :, 16, 10] = torch.tensor([1.0, 2.0, 3.0])  # one pixel, far from the edges
    out = augment_batch(X, "crop", torch.Generator().manual_seed(1))
    assert out.shape == X.shape
    shifts = set()
    for i in range(200):
        where = (out[i, 0] == 1).nonzero().tolist()
        assert len(where) == 1 and torch.equal(out[i].sum((1, 2)), X[i].sum((1, 2)))
        (r, c) = where[0]
        assert out[i, 1, r, c] == 2 and out[i, 2, r, c] == 3  # channels move together
        shifts.add((r - 16, c - 10))
    assert {dy for dy, _ in shifts} == set(range(-4, 5)) == {dx for _, dx in shifts}


def test_a_crop_pads_with_zeros_and_is_seeded() -> None:
    X = torch.ones(50, 1, 8, 8)
    a = augment_batch(X, "flip-crop", torch.Generator().manual_seed(3))
    b = augment_batch(X, "flip-crop", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert float(a.min()) == 0.0 and float(a.max()) == 1.0  # a shifted edge is padding
    assert int((a == 0).any(dim=(1, 2, 3)).sum()) > 25  # most rows moved
    assert augment_batch(X, "none", torch.Generator()) is X


def test_the_command_line_offers_every_augmentation_and_schedule() -> None:
    assert [a.value for a in options.Augment] == list(AUGMENTS)
    assert [s.value for s in options.LrSchedule] == list(LR_SCHEDULES)


def test_the_crop_padding_is_an_eighth_of_the_side() -> None:
    assert [crop_padding(s) for s in (32, 28, 64, 8, 2)] == [4, 4, 8, 1, 1]


def test_cosine_anneals_to_zero_over_the_epochs() -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = lr_scheduler(optimizer, "cosine", 4)
    assert schedule is not None
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # an epoch's steps, then the schedule's
        schedule.step()
    assert rates == pytest.approx([0.1, 0.1 * (1 + 2**-0.5) / 2, 0.05, 0.1 * (1 - 2**-0.5) / 2])
    assert lr_scheduler(optimizer, "constant", 4) is None


@pytest.mark.parametrize(
    ("epochs", "expected"),
    [(8, [1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01]), (182, [1] * 91 + [0.1] * 45 + [0.01] * 46)],
)
def test_step_divides_by_ten_after_half_and_three_quarters(
    epochs: int, expected: list[float]
) -> None:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = lr_scheduler(optimizer, "step", epochs)
    assert schedule is not None
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates == pytest.approx([0.1 * r for r in expected])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


def _train(out: Path, *extra: str) -> dict[str, object]:
    return run_json(
        "train", DIGITS, "--arch", "cnn", "--hidden", "16", "--epochs", "2", "--lr", "0.01",
        "--optimizer", "sgd", "-o", out, "--json", *extra,
    )  # fmt: skip


def test_the_recipe_is_recorded_and_retraining_re_runs_it(tmp_path: Path) -> None:
    recipe = ("--augment", "flip-crop", "--lr-schedule", "cosine")
    _train(tmp_path / "a.safetensors", *recipe)
    _train(tmp_path / "b.safetensors", *recipe)
    _train(tmp_path / "plain.safetensors")
    a, b, plain = (_weights(tmp_path / f"{n}.safetensors") for n in ("a", "b", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same bytes
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    info = run_json("info", tmp_path / "a.safetensors", "--json")
    assert info["recipe"]["augment"] == "flip-crop"
    assert info["recipe"]["lr_schedule"] == "cosine"
    (tmp_path / "ids.txt").write_text("0\n1\n2\n")
    run_json(
        "remove", "-m", tmp_path / "a.safetensors", "--marked", tmp_path / "ids.txt",
        "--method", "retrain", "-o", tmp_path / "rt.safetensors", "--json",
    )  # fmt: skip
    again = run_json("info", tmp_path / "rt.safetensors", "--json")
    assert again["recipe"]["augment"] == "flip-crop"
    assert again["recipe"]["lr_schedule"] == "cosine"


def test_cosine_leaves_the_first_epoch_at_the_full_rate(tmp_path: Path) -> None:
    _train(tmp_path / "c.safetensors", "--lr-schedule", "cosine", "--epochs", "1")
    _train(tmp_path / "k.safetensors", "--epochs", "1")
    _train(tmp_path / "c2.safetensors", "--lr-schedule", "cosine")
    _train(tmp_path / "k2.safetensors")
    c, k = _weights(tmp_path / "c.safetensors"), _weights(tmp_path / "k.safetensors")
    assert all(torch.equal(c[name], k[name]) for name in c)
    c2, k2 = _weights(tmp_path / "c2.safetensors"), _weights(tmp_path / "k2.safetensors")
    assert not all(torch.equal(c2[name], k2[name]) for name in c2)


def test_augmenting_rows_that_are_not_images_is_refused(data_dir: Path, tmp_path: Path) -> None:
    result = run(
        "train", data_dir / "radial.csv", "--augment", "crop", "-o", tmp_path / "m.safetensors"
    )
    assert_clean_error(result, "--augment crop flips and crops images (n, C, H, W)")
    weights = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(weights))
    result = run(
        "import", weights, "--data", data_dir / "radial.csv", "--augment", "flip",
        "-o", tmp_path / "m.safetensors",
    )  # fmt: skip
    assert_clean_error(result, "--augment flip flips and crops images")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    result = run("train", DIGITS, "--augment", "rotate", "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 2


@pytest.mark.parametrize("method", ["finetune", "scrub"])
def test_the_fine_tuning_baselines_tune_on_the_recipes_augmented_batches(
    method: str, tmp_path: Path
) -> None:
    """Two checkpoints alike but for the recorded --augment: the baseline's result differs
    between them (it tunes on augmented batches), and repeats itself on each (seeded)."""
    _train(tmp_path / "aug.safetensors", "--augment", "flip-crop", "--epochs", "1")
    augmented = load_checkpoint(tmp_path / "aug.safetensors")
    plain = replace(augmented, recipe={**augmented.recipe, "augment": "none"})
    save_checkpoint(tmp_path / "plain.safetensors", plain, False)
    (tmp_path / "ids.txt").write_text("0\n1\n2\n3\n")
    out = {}
    for name in ("aug", "aug-again", "plain"):
        model = tmp_path / f"{name.removesuffix('-again')}.safetensors"
        run_json(
            "remove", "-m", model, "--marked", tmp_path / "ids.txt", "--method", method,
            "--epochs", "1", "-o", tmp_path / f"{name}-{method}.safetensors", "--json",
        )  # fmt: skip
        out[name] = _weights(tmp_path / f"{name}-{method}.safetensors")
    assert all(torch.equal(out["aug"][k], out["aug-again"][k]) for k in out["aug"])
    assert not all(torch.equal(out["aug"][k], out["plain"][k]) for k in out["aug"])


def test_sisa_shards_train_and_unlearn_with_the_recipe(tmp_path: Path) -> None:
    for name, extra in (("aug", ["--augment", "flip"]), ("plain", [])):
        _train(tmp_path / f"{name}.safetensors", "--shards", "2", "--epochs", "1", *extra)
    aug, plain = _weights(tmp_path / "aug.safetensors"), _weights(tmp_path / "plain.safetensors")
    assert not all(torch.equal(aug[k], plain[k]) for k in aug)  # the shards were augmented
    (tmp_path / "ids.txt").write_text("1\n")
    report = run_json(
        "remove", "-m", tmp_path / "aug.safetensors", "--marked", tmp_path / "ids.txt",
        "--method", "sisa", "-o", tmp_path / "u.safetensors", "--json",
    )  # fmt: skip
    assert report["removed"] == 1
    assert run_json("info", tmp_path / "u.safetensors", "--json")["recipe"]["augment"] == "flip"
