"""`puma compare`: every method on one request beside retraining, and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import FAST, assert_clean_error, run, run_json

from puma_cli.errors import PumaError
from puma_cli.io.checkpoint import load_checkpoint
from puma_cli.jobs.compare import DEFAULT_METHODS


@pytest.fixture(scope="module")
def work(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compare")
    data, test = data_dir / "radial.csv", data_dir / "radial-test.csv"
    run_json("mark", data, "--class", "1", "-o", folder / "ids.txt")
    run_json("train", data, "--test", test, "-o", folder / "model.safetensors", *FAST)
    run_json("train", data, "--test", test, "-o", folder / "sisa.safetensors", "--shards", "3",
             *FAST)  # fmt: skip
    return folder


def _compare(work: Path, out: Path, *args: str | Path, model: str = "model") -> dict:
    return run_json("compare", "-m", work / f"{model}.safetensors", "--marked", work / "ids.txt",
                    "--out-dir", out, "--device", "cpu", *args)  # fmt: skip


def test_every_method_that_applies_runs_beside_retraining(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = _compare(work, out, "--plot", tmp_path / "cmp.png")
    names = [r["method"] for r in report["methods"]]
    expected = [m for m in DEFAULT_METHODS if m not in ("sisa", "amnesiac")]
    assert names == ["original", "retrain", *expected]
    assert any("sisa, amnesiac" in note for note in report["notes"])
    by = {r["method"]: r for r in report["methods"]}
    assert by["retrain"]["time_ratio"] == 1.0 and by["retrain"]["kl_marked"] == 0.0
    assert by["original"]["seconds"] is None and by["original"]["output"] is None
    for name in ["retrain", *expected]:
        row = by[name]
        assert row["refused"] is None, row
        assert Path(row["output"]) == out / f"{name}.safetensors"
        entry = load_checkpoint(out / f"{name}.safetensors").provenance[-1]
        assert entry["method"] == name  # a checkpoint like `remove` writes
        assert row["time_ratio"] == pytest.approx(row["seconds"] / report["retrain_seconds"])
        assert 0 <= row["test_accuracy"] <= 1 and row["kl_marked"] >= 0
        assert 0 <= row["loss_auc"] <= 1 and row["lira_auc"] is None
    assert report["noise_floor_kl_marked"] >= 0 and report["noise_floor_kl_test"] >= 0
    assert report["n_marked"] > 0
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The original keeps its loss on the marked rows; retraining raised it.
    assert by["retrain"]["marked_loss"] > by["original"]["marked_loss"]


def test_named_methods_and_lira(work: Path, tmp_path: Path) -> None:
    report = _compare(work, tmp_path / "o", "--methods", "finetune, puma", "--shadows", "2")
    assert [r["method"] for r in report["methods"]] == ["original", "retrain", "finetune", "puma"]
    assert all(0 <= r["lira_auc"] <= 1 for r in report["methods"])
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "finetune.safetensors", "puma.safetensors", "retrain.safetensors",
    ]  # fmt: skip
    assert list(work.glob("puma-shadows-*.safetensors"))  # beside the model, for `attack`


def test_a_sisa_ensemble_compares_what_applies_to_it(work: Path, tmp_path: Path) -> None:
    report = _compare(work, tmp_path / "o", model="sisa")
    assert [r["method"] for r in report["methods"]] == ["original", "retrain", "sisa"]


def test_a_method_that_refuses_is_reported_not_fatal(
    work: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from puma_cli.unlearn import puma

    def refuse(*args: object, **kwargs: object) -> None:
        raise PumaError("no step keeps the model's performance")

    monkeypatch.setattr(puma, "choose_scale", refuse)
    report = _compare(work, tmp_path / "o", "--methods", "puma,finetune")
    by = {r["method"]: r for r in report["methods"]}
    assert "no step keeps" in by["puma"]["refused"] and by["puma"]["output"] is None
    assert by["finetune"]["refused"] is None
    assert not (tmp_path / "o" / "puma.safetensors").exists()


def test_the_table_says_what_each_column_is(work: Path, tmp_path: Path) -> None:
    result = run("compare", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
                 "--out-dir", tmp_path / "o", "--methods", "influence")  # fmt: skip
    assert result.exit_code == 0, result.output
    for fragment in ("retrain", "influence", "seed to seed", "KL from the retrained model"):
        assert fragment in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "puma,forget-it"], "'forget-it' is not a method"),
        (["--methods", "sisa"], "sisa needs a SISA ensemble"),
        (["--methods", "amnesiac"], "amnesiac needs the updates recorded at training"),
        (["--shadows", "1"], "--shadows 1 is out of range"),
        (["--audit", "--shadows", "4"], "--shadows 4 is out of range"),
        (["--seed", "-1"], "--seed -1 is out of range"),
    ],
)
def test_bad_requests_are_refused_before_any_work(
    work: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("compare", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
                 "--out-dir", tmp_path / "o", *args)  # fmt: skip
    assert_clean_error(result, message)
    assert list(tmp_path.iterdir()) == []


def test_an_out_dir_with_files_needs_overwrite(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    args = ["compare", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
            "--out-dir", out, "--methods", "influence"]  # fmt: skip
    assert_clean_error(run(*args), "already holds files")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    result = run(*args, "--overwrite", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["out_dir"] == str(out)
    assert (out / "notes.txt").read_text() == "mine\n"  # only its own files are replaced
    file_out = tmp_path / "file"
    file_out.write_text("x")
    result = run("compare", "-m", work / "model.safetensors", "--marked", work / "ids.txt",
                 "--out-dir", file_out)  # fmt: skip
    assert_clean_error(result, "is a file")


def test_missing_inputs_are_clean_errors(work: Path, tmp_path: Path) -> None:
    result = run("compare", "-m", tmp_path / "none.safetensors", "--marked", work / "ids.txt",
                 "--out-dir", tmp_path / "o")  # fmt: skip
    assert_clean_error(result, "none.safetensors")
    (tmp_path / "empty.txt").write_text("")
    result = run("compare", "-m", work / "model.safetensors", "--marked", tmp_path / "empty.txt",
                 "--out-dir", tmp_path / "o")  # fmt: skip
    assert_clean_error(result, "names no ids")
    assert not (tmp_path / "o").exists()


def test_audit_runs_u_lira_on_each_method(work: Path, tmp_path: Path) -> None:
    report = _compare(work, tmp_path / "o", "--methods", "influence", "--audit", "--shadows", "8")
    by = {r["method"]: r for r in report["methods"]}
    assert report["audit_shadows"] == 8
    assert by["original"]["ulira_accuracy"] is None  # nothing was removed from it
    for name in ("retrain", "influence"):
        assert 0 <= by[name]["ulira_accuracy"] <= 1 and 0 <= by[name]["forgetting_score"] <= 1
    assert len(list((tmp_path / "o").glob("puma-ulira-*.safetensors"))) == 2
