"""`puma relink`: once the rows a model removed are deleted from its training file, the
model is pointed at the file as it is, and every later command works on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json

from puma_cli.io.checkpoint import GONE, ROLE_REMOVED, load_checkpoint, save_checkpoint
from puma_cli.io.datasets import load_dataset

FAST = ["--epochs", "5", "--device", "cpu"]


def _without(source: Path, rows: np.ndarray, out: Path) -> Path:
    """`source` with the given rows deleted, every other line as it was."""
    lines = source.read_text().splitlines()
    gone = set((rows + 1).tolist())
    out.write_text("\n".join(line for i, line in enumerate(lines) if i not in gone) + "\n")
    return out


@pytest.fixture(scope="module")
def removed(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on radial, 10 % of its rows removed (some validation rows among
    them), and the file less those rows."""
    folder = tmp_path_factory.mktemp("relink")
    data = data_dir / "radial.csv"
    run_json("train", data, "-o", folder / "m.safetensors", *FAST)
    run_json("mark", data, "--random", "0.1", "--seed", "3", "-o", folder / "u.txt")
    out = run_json(
        "remove", "-m", folder / "m.safetensors", "--marked", folder / "u.txt",
        "-o", folder / "m1.safetensors", "--device", "cpu",
    )  # fmt: skip
    assert out["skipped"]["validation"] > 0
    roles = load_checkpoint(folder / "m1.safetensors").roles
    _without(data, np.flatnonzero(np.isin(roles, GONE)), folder / "now.csv")  # withdrawn too
    return folder


def test_a_model_follows_its_file_once_the_removed_rows_are_deleted(
    removed: Path, data_dir: Path, tmp_path: Path
) -> None:
    model, now = removed / "m1.safetensors", removed / "now.csv"
    # Before: the rows deleted in place end every command, which says the way on.
    (tmp_path / "v.txt").write_text("\n".join(load_dataset(now).ids[:2]) + "\n")
    original = (data_dir / "radial.csv").read_bytes()
    (data_dir / "radial.csv").write_bytes(now.read_bytes())
    try:
        result = run("remove", "-m", model, "--marked", tmp_path / "v.txt", "-o", tmp_path / "x")
        assert_clean_error(result, "puma relink MODEL --data FILE -o OUT")
        assert_clean_error(run("eval", "-m", model, "--on", "train"), "puma relink")
    finally:
        (data_dir / "radial.csv").write_bytes(original)
    relinked = tmp_path / "m2.safetensors"
    report = run_json("relink", model, "--data", now, "-o", relinked)
    before, after = load_checkpoint(model), load_checkpoint(relinked)
    gone = np.isin(before.roles, GONE)
    assert report["dropped"] == int(gone.sum()) > int((before.roles == ROLE_REMOVED).sum())
    assert report["rows"] == len(load_dataset(now)) == after.roles.size
    np.testing.assert_array_equal(after.roles, before.roles[~gone])
    assert after.data["train"] is not None and after.data["train"].path == str(now.resolve())
    assert after.provenance[-1]["op"] == "relink"
    assert all(torch.equal(a, b) for a, b in zip(
        before.model.state_dict().values(), after.model.state_dict().values(), strict=True
    ))  # fmt: skip
    info = run_json("info", relinked)
    assert info["data_status"]["train"] == "ok"
    assert info["rows"]["removed"] == info["rows"]["withdrawn"] == 0
    shown = " ".join(run("info", relinked).stdout.split())
    assert f"relink: to a file of {report['rows']} rows ({report['dropped']} removed" in shown
    # Every later command works on the file as it is: a marking of it, removed, evaluated.
    run_json("mark", now, "--random", "0.05", "--seed", "4", "-o", tmp_path / "w.txt")
    again = run_json(
        "remove", "-m", relinked, "--marked", tmp_path / "w.txt", "-o", tmp_path / "m3.safetensors"
    )
    assert again["removed"] > 0
    assert run_json("eval", "-m", tmp_path / "m3.safetensors", "--on", "train")["n"] > 0
    # And a further relink after that removal, with those rows deleted too.
    later = load_checkpoint(tmp_path / "m3.safetensors").roles
    _without(now, np.flatnonzero(np.isin(later, GONE)), tmp_path / "later.csv")
    run_json("relink", tmp_path / "m3.safetensors", "--data", tmp_path / "later.csv",
             "-o", tmp_path / "m4.safetensors")  # fmt: skip


def test_retraining_after_relink_is_retraining_without_every_removed_row(
    removed: Path, tmp_path: Path
) -> None:
    """The relinked model's file, roles and recipe are the old ones less the deleted rows:
    retraining it without a second marking gives the tensors of retraining the model
    before relink without that marking."""
    model, now = removed / "m1.safetensors", removed / "now.csv"
    relinked = tmp_path / "m2.safetensors"
    run_json("relink", model, "--data", now, "-o", relinked)
    dataset = load_dataset(now)
    (tmp_path / "v.txt").write_text("\n".join(dataset.ids[::9]) + "\n")
    weights = []
    for source in (model, relinked):
        out = run_json(
            "remove", "-m", source, "--marked", tmp_path / "v.txt", "--method", "retrain",
            "-o", tmp_path / f"r-{source.stem}.safetensors",
        )  # fmt: skip
        weights.append(load_checkpoint(Path(out["output"])).model.state_dict())
    a, b = weights
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


def test_a_sisa_plan_follows_the_rows(data_dir: Path, tmp_path: Path) -> None:
    data = data_dir / "radial.csv"
    model = tmp_path / "s.safetensors"
    run_json("train", data, "-o", model, *FAST, "--shards", "3", "--slices", "2")
    run_json("mark", data, "--random", "0.1", "-o", tmp_path / "u.txt")
    run_json("remove", "-m", model, "--marked", tmp_path / "u.txt", "--method", "sisa",
             "-o", tmp_path / "s1.safetensors")  # fmt: skip
    before = load_checkpoint(tmp_path / "s1.safetensors")
    kept = ~np.isin(before.roles, GONE)
    now = _without(data, np.flatnonzero(~kept), tmp_path / "now.csv")
    run_json(
        "relink", tmp_path / "s1.safetensors", "--data", now, "-o", tmp_path / "s2.safetensors"
    )
    after = load_checkpoint(tmp_path / "s2.safetensors")
    for name in ("sisa.shard", "sisa.slice"):
        assert torch.equal(after.extra[name], before.extra[name][torch.from_numpy(kept)])
    (tmp_path / "v.txt").write_text("\n".join(load_dataset(now).ids[:3]) + "\n")
    out = run_json("remove", "-m", tmp_path / "s2.safetensors", "--marked", tmp_path / "v.txt",
                   "--method", "sisa", "-o", tmp_path / "s3.safetensors")  # fmt: skip
    assert out["removed"] > 0


def test_a_file_that_is_not_the_recorded_one_less_the_removed_rows_is_refused(
    removed: Path, data_dir: Path, tmp_path: Path
) -> None:
    model, now = removed / "m1.safetensors", removed / "now.csv"
    out = tmp_path / "m2.safetensors"
    lines = now.read_text().splitlines()
    # A removed row still in it (the original file itself), one row too few.
    assert_clean_error(run("relink", model, "--data", data_dir / "radial.csv", "-o", out),
                       "delete exactly the removed rows")  # fmt: skip
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines[:-1]) + "\n")
    assert_clean_error(run("relink", model, "--data", short, "-o", out), "rows from that file")
    # The right count, but a value changed, or two rows swapped.
    changed = tmp_path / "changed.csv"
    cells = lines[5].split(",")
    cells[1] = str(float(cells[1]) + 1e-3)
    changed.write_text("\n".join([*lines[:5], ",".join(cells), *lines[6:]]) + "\n")
    assert_clean_error(run("relink", model, "--data", changed, "-o", out), "a row changed")
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join([*lines[:3], lines[4], lines[3], *lines[5:]]) + "\n")
    assert_clean_error(run("relink", model, "--data", swapped, "-o", out), "rows moved")
    # Columns in another order and other ids are the same rows.
    header = lines[0].split(",")
    order = [header.index(c) for c in ("label", "x1", "x0")]
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("\n".join(
        ",".join(["id", *(line.split(",")[i] for i in order)]) if k == 0
        else ",".join([f"r{k}", *(line.split(",")[i] for i in order)])
        for k, line in enumerate(lines)
    ) + "\n")  # fmt: skip
    assert run_json("relink", model, "--data", renamed, "-o", out)["rows"] == len(lines) - 1
    out.unlink()
    # A model with nothing removed; an existing output; an output that is a recorded file.
    assert_clean_error(
        run("relink", removed / "m.safetensors", "--data", now, "-o", out), "removed no rows"
    )
    out.write_bytes(b"keep")
    assert_clean_error(run("relink", model, "--data", now, "-o", out), "--overwrite")
    assert out.read_bytes() == b"keep"
    out.unlink()
    kept = (data_dir / "radial.csv").read_bytes()  # the file the model records
    assert_clean_error(
        run("relink", model, "--data", now, "-o", data_dir / "radial.csv", "--overwrite"),
        "radial.csv",
    )
    assert (data_dir / "radial.csv").read_bytes() == kept
    assert_clean_error(run("relink", model, "--data", tmp_path / "gone.csv", "-o", out), "gone")
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_removal_made_before_relink_existed_says_how_to_go_on(
    removed: Path, tmp_path: Path
) -> None:
    old = load_checkpoint(removed / "m1.safetensors")
    for entry in old.provenance:
        entry.pop("held_rows_sha256", None)
    save_checkpoint(tmp_path / "old.safetensors", old)
    result = run("relink", tmp_path / "old.safetensors", "--data", removed / "now.csv",
                 "-o", tmp_path / "out.safetensors")  # fmt: skip
    assert_clean_error(result, "make that removal again with this version")
    assert not (tmp_path / "out.safetensors").exists()
