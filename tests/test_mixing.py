"""`--mixup` and `--cutmix`: each batch's rows mixed with partner rows of the batch, the
loss weighted likewise; recorded, so that retraining re-runs them, and said by removal,
whose engine differentiates each row's own loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_clean_error, assert_recipe_setting, run, run_json

from puma_cli.models.augment import mix_batch

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "sample_data" / "digits-train.npz"


def test_mixup_blends_each_row_with_its_partner() -> None:
    X = torch.randn(32, 5)
    kept = X.clone()
    mixed, partner, lam = mix_batch(X, 0.4, 0.0, torch.Generator().manual_seed(0))
    assert 0 < lam < 1
    assert sorted(partner.tolist()) == list(range(32))  # a permutation of the batch
    assert torch.allclose(mixed, lam * X + (1 - lam) * X[partner])
    assert torch.equal(X, kept)  # the batch itself is never written


def test_cutmix_pastes_a_box_and_lam_is_the_share_left() -> None:
    X = torch.arange(16, dtype=torch.float32)[:, None, None, None].expand(16, 2, 10, 10)
    X = X.contiguous()  # row i holds i everywhere: where a pixel came from is its value
    for seed in range(20):
        mixed, partner, lam = mix_batch(X, 0.0, 1.0, torch.Generator().manual_seed(seed))
        for i in range(16):
            own = mixed[i] == i
            pasted = mixed[i] == partner[i]
            assert bool((own | pasted).all())
            if int(partner[i]) != i:
                assert float(own[0].float().mean()) == pytest.approx(lam)
                rows, cols = (~own[0]).nonzero(as_tuple=True)
                if rows.numel():  # one box, every channel alike
                    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
                    assert int(box) == rows.numel()
                    assert torch.equal(own[0], own[1])


def test_mixing_is_seeded_and_both_take_turns() -> None:
    X = torch.rand(8, 1, 6, 6)
    a = mix_batch(X, 0.3, 1.0, torch.Generator().manual_seed(5))
    b = mix_batch(X, 0.3, 1.0, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    kinds = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        mixed, partner, lam = mix_batch(X, 0.3, 1.0, generator)
        blended = torch.allclose(mixed, lam * X + (1 - lam) * X[partner])
        kinds.add("mixup" if blended else "cutmix")
    assert kinds == {"mixup", "cutmix"}


def test_mixup_is_recorded_and_re_run_by_retraining(data_dir: Path, tmp_path: Path) -> None:
    model = assert_recipe_setting(data_dir / "radial.csv", tmp_path, "--mixup", "0.2", "mixup")
    out = run_json(
        "remove", "-m", model, "--marked", tmp_path / "ids.txt", "-o", tmp_path / "p.safetensors"
    )
    assert any("trained with mixup (alpha 0.2)" in w for w in out["warnings"]), out["warnings"]
    plain = run_json(
        "remove", "-m", tmp_path / "plain.safetensors", "--marked", tmp_path / "ids.txt",
        "-o", tmp_path / "q.safetensors",
    )  # fmt: skip
    assert not any("mixup" in w for w in plain["warnings"])


def test_cutmix_is_recorded_and_re_run_by_retraining(tmp_path: Path) -> None:
    assert_recipe_setting(DIGITS, tmp_path, "--cutmix", "1.0", "cutmix")


def test_import_declares_the_mixing(tmp_path: Path) -> None:
    trained = tmp_path / "m.safetensors"
    run_json("train", DIGITS, "--hidden", "8", "--epochs", "1", "-o", trained)
    weights = tmp_path / "w.safetensors"
    run_json("export", trained, "-o", weights)
    model = tmp_path / "i.safetensors"
    run_json(
        "import", weights, "--data", DIGITS, "--hidden", "8", "--mixup", "0.2", "--cutmix",
        "1.0", "-o", model,
    )  # fmt: skip
    recipe = run_json("info", model)["recipe"]
    assert recipe["mixup"] == 0.2 and recipe["cutmix"] == 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--mixup", "-0.1"], "--mixup -0.1 is out of range"),
        (["--cutmix", "nan"], "--cutmix nan"),
    ],
)
def test_a_bad_alpha_is_one_clear_error(
    flags: list[str], message: str, data_dir: Path, tmp_path: Path
) -> None:
    result = run("train", data_dir / "radial.csv", "-o", tmp_path / "m.safetensors", *flags)
    assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []


def test_cutmix_on_rows_that_are_not_images_is_refused(data_dir: Path, tmp_path: Path) -> None:
    result = run(
        "train", data_dir / "radial.csv", "-o", tmp_path / "m.safetensors", "--cutmix", "1"
    )
    assert_clean_error(result, "--cutmix pastes a box of one image (n, C, H, W) over another")
    assert "give --mixup" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_mixup_of_whole_numbers_taken_as_they_are_is_warned(tmp_path: Path) -> None:
    """Token ids (whole numbers, --no-standardize) blended by mixup are no ids, and a net
    that casts them reads other tokens: train says so. Standardised rows, or the same
    recipe without mixup, say nothing of it."""
    import numpy as np

    rng = np.random.default_rng(0)
    data = tmp_path / "tokens.npz"
    y = rng.integers(0, 3, 120)
    np.savez(data, X=rng.integers(0, 40, (120, 6)), y=y)
    (tmp_path / "bag.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Module):\n"
        "    def __init__(self, n_classes):\n        super().__init__()\n"
        "        self.embedding = nn.Embedding(40, 4)\n"
        "        self.head = nn.Linear(4, n_classes)\n\n"
        "    def forward(self, x):\n        return self.head(self.embedding(x.long()).mean(1))\n"
    )
    common = ["--arch", f"{tmp_path / 'bag.py'}:Net", "--epochs", "2", "--no-standardize"]
    mixed = run_json("train", data, "-o", tmp_path / "a.safetensors", *common, "--mixup", "0.4")
    said = [w for w in mixed["warnings"] if w.startswith("--mixup blends")]
    assert len(said) == 1 and "whole numbers" in said[0] and "without --mixup" in said[0]
    plain = run_json("train", data, "-o", tmp_path / "b.safetensors", *common)
    assert not [w for w in plain["warnings"] if "--mixup" in w]
    floats = tmp_path / "floats.npz"
    np.savez(floats, X=rng.normal(size=(120, 6)), y=y)
    values = run_json("train", floats, "-o", tmp_path / "c.safetensors", "--epochs", "2",
                      "--no-standardize", "--mixup", "0.4")  # fmt: skip
    assert not [w for w in values["warnings"] if "--mixup" in w]
