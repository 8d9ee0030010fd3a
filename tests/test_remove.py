"""`puma remove` through the command line: methods, chaining, cache, and every refusal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, assert_clean_error, run, run_json

from puma_cli.io.checkpoint import ROLE_TRAINED, ROLE_VALIDATION, load_checkpoint

KEYS = {
    "method",
    "removed",
    "seconds",
    "output",
    "eta",
    "predicted_criterion_change",
    "criterion_before",
    "criterion_after",
}


@pytest.fixture()
def workspace(data_dir: Path, model_file: Path, tmp_path: Path) -> Path:
    """A copy of the model (so caches and outputs land in tmp_path) and a k-means marking."""
    shutil.copy(model_file, tmp_path / "m.safetensors")
    run_json("mark", data_dir / "radial.csv", "--class", "1", "-o", tmp_path / "ids.txt")
    return tmp_path


@pytest.mark.parametrize("method", ["puma", "influence", "retrain"])
def test_each_method_removes_and_records_provenance(workspace: Path, method: str) -> None:
    out = run_json(
        "remove",
        "--model",
        workspace / "m.safetensors",
        "--marked",
        workspace / "ids.txt",
        "--method",
        method,
        "--device",
        "cpu",
    )
    assert set(out) >= KEYS
    assert out["method"] == method and out["removed"] > 0
    written = workspace / "m.removed.safetensors"
    assert Path(out["output"]) == written and written.exists()
    info = run_json("info", written)
    entry = info["provenance"][-1]
    assert entry["op"] == "remove" and entry["method"] == method
    assert entry["removed"] == out["removed"] and len(entry["ids_sha256"]) == 64
    ids = [i for i in (workspace / "ids.txt").read_text().split() if not i.startswith("#")]
    assert not any(f'"{i}"' in str(entry) for i in ids[:3])  # never the raw ids
    assert info["rows"]["removed"] == out["removed"]  # validation rows marked: withdrawn
    assert info["rows"]["withdrawn"] == out["skipped"]["validation"]
    if method != "retrain":
        assert out["marked_loss_after"] > out["marked_loss_before"]
        assert np.isfinite(out["predicted_criterion_change"])


def test_puma_holds_the_criterion_better_than_influence(workspace: Path) -> None:
    common = [
        "--model",
        workspace / "m.safetensors",
        "--marked",
        workspace / "ids.txt",
        "--eta",
        "4",
    ]
    puma = run_json("remove", *common, "-o", workspace / "p.safetensors")
    influence = run_json(
        "remove", *common, "--method", "influence", "-o", workspace / "i.safetensors"
    )
    # PUMA's reweighting cancels the first-order change of C (up to the solver's tolerance).
    assert abs(influence["predicted_criterion_change"]) > 100 * abs(
        puma["predicted_criterion_change"]
    )
    assert puma["parameters"]["upweighted"] > 0 and influence["parameters"]["upweighted"] == 0


def test_second_request_uses_the_cache_and_no_cache_writes_none(workspace: Path) -> None:
    first = run_json(
        "remove",
        "-m",
        workspace / "m.safetensors",
        "--marked",
        workspace / "ids.txt",
        "-o",
        workspace / "a.safetensors",
    )
    assert not first["cached"] and (workspace / "m.influence.safetensors").exists()
    second = run_json(
        "remove",
        "-m",
        workspace / "m.safetensors",
        "--marked",
        workspace / "ids.txt",
        "-o",
        workspace / "b.safetensors",
    )
    assert second["cached"]
    a, b = (run_json("eval", "-m", workspace / f"{x}.safetensors", "--on", "test") for x in "ab")
    assert a == {**b, "model": a["model"]}
    (workspace / "m.influence.safetensors").write_bytes(b"garbage")  # damaged: rebuilt, not fatal
    third = run_json(
        "remove",
        "-m",
        workspace / "m.safetensors",
        "--marked",
        workspace / "ids.txt",
        "-o",
        workspace / "c.safetensors",
        "--no-cache",
    )
    assert not third["cached"]
    assert (workspace / "m.influence.safetensors").read_bytes() == b"garbage"


def test_a_second_removal_works_on_what_remains(workspace: Path, data_dir: Path) -> None:
    first = run_json("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt")
    result = run(
        "remove", "-m", workspace / "m.removed.safetensors", "--marked", workspace / "ids.txt"
    )
    assert_clean_error(result, "removed earlier")
    run_json("mark", data_dir / "radial.csv", "--class", "0", "-o", workspace / "more.txt")
    second = run_json(
        "remove", "-m", workspace / "m.removed.safetensors", "--marked", workspace / "more.txt"
    )
    info = run_json("info", second["output"])
    assert [p["method"] for p in info["provenance"]] == ["puma", "puma"]
    assert info["rows"]["removed"] >= first["removed"] + second["removed"]


def test_eval_on_train_with_ids_evaluates_removed_rows(workspace: Path, data_dir: Path) -> None:
    """`eval --on train --ids` after a removal: the marked rows are no longer trained on,
    but they are in the recorded training file, which is where a user looks for them; the
    same figures as `--data` with the file itself. Without --ids: the trained rows only."""
    out = run_json("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt")
    removed, ids = workspace / "m.removed.safetensors", workspace / "ids.txt"
    on_train = run_json("eval", "-m", removed, "--on", "train", "--ids", ids)
    on_file = run_json("eval", "-m", removed, "--data", data_dir / "radial.csv", "--ids", ids)
    assert on_train["n"] == on_file["n"] == out["removed"]
    assert on_train["loss"] == pytest.approx(on_file["loss"])
    assert on_train["loss"] == pytest.approx(out["marked_loss_after"], rel=1e-4)
    trained = run_json("eval", "-m", removed, "--on", "train")
    before = run_json("eval", "-m", workspace / "m.safetensors", "--on", "train")
    assert trained["n"] == before["n"] - out["removed"]
    (workspace / "bogus.txt").write_text("no-such-id\n")
    assert_clean_error(
        run("eval", "-m", removed, "--on", "train", "--ids", workspace / "bogus.txt"),
        "not in",
    )


@pytest.mark.parametrize("solver", ["exact", "lissa"])
def test_other_solvers_agree_with_cg(workspace: Path, solver: str) -> None:
    common = [
        "-m",
        workspace / "m.safetensors",
        "--marked",
        workspace / "ids.txt",
        "--eta",
        "1",
        "--no-cache",
        "--method",
        "influence",
    ]
    cg = run_json("remove", *common, "-o", workspace / "cg.safetensors")
    other = run_json("remove", *common, "--solver", solver, "-o", workspace / "o.safetensors")
    assert other["parameters"]["solver"] == solver
    change_cg, change = cg["predicted_criterion_change"], other["predicted_criterion_change"]
    assert change == pytest.approx(change_cg, rel=0.05, abs=1e-7)


def test_total_marking_is_refused(data_dir: Path, workspace: Path) -> None:
    ids = [line.split(",")[0] for line in (data_dir / "radial.csv").read_text().splitlines()[1:]]
    (workspace / "all.txt").write_text("\n".join(ids) + "\n")
    result = run("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "all.txt")
    assert_clean_error(result, "marks every one of the")
    assert not (workspace / "m.removed.safetensors").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [("ghost\n", "1 id(s) are not in"), ("# none\n", "names no ids")],
)
def test_bad_ids_files(workspace: Path, content: str, message: str) -> None:
    (workspace / "bad.txt").write_text(content)
    result = run("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "bad.txt")
    assert_clean_error(result, message)
    assert not (workspace / "m.removed.safetensors").exists()


def test_no_held_out_data_is_a_clear_error(data_dir: Path, workspace: Path) -> None:
    run_json(
        "train",
        data_dir / "radial.csv",
        "-o",
        workspace / "nv.safetensors",
        "--val-frac",
        "0",
        *FAST,
    )
    result = run("remove", "-m", workspace / "nv.safetensors", "--marked", workspace / "ids.txt")
    assert_clean_error(result, "pass --criterion-data FILE")
    out = run_json(
        "remove",
        "-m",
        workspace / "nv.safetensors",
        "--marked",
        workspace / "ids.txt",
        "--criterion-data",
        data_dir / "radial-test.csv",
    )
    assert out["removed"] > 0


def test_a_marking_that_withdraws_every_validation_row_says_so(
    data_dir: Path, workspace: Path
) -> None:
    """Marked validation rows leave the criterion: where that leaves none, the error says the
    marking (or an earlier removal) took them, not that the model never had any."""
    model = load_checkpoint(workspace / "m.safetensors")
    ids = (data_dir / "radial.csv").read_text().splitlines()[1:]
    held = [ids[i].split(",", 1)[0] for i in np.flatnonzero(model.roles == ROLE_VALIDATION)]
    trained = ids[int(np.flatnonzero(model.roles == ROLE_TRAINED)[0])].split(",", 1)[0]
    (workspace / "held.txt").write_text("\n".join([*held, trained]) + "\n")
    result = run("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "held.txt")
    assert_clean_error(result, f"this marking withdraws all {len(held)} validation rows")
    assert "--criterion-data FILE" in result.stderr and "retrain" not in result.stderr
    assert not (workspace / "m.removed.safetensors").exists()
    out = run_json(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "held.txt",
        "--criterion-data", data_dir / "radial-test.csv", "-o", workspace / "w.safetensors",
    )  # fmt: skip
    assert out["removed"] == 1 and out["skipped"]["validation"] == len(held)
    again = run("remove", "-m", workspace / "w.safetensors", "--marked", workspace / "ids.txt")
    assert_clean_error(again, f"earlier removals withdrew all {len(held)} validation rows")
    second = ids[int(np.flatnonzero(model.roles == ROLE_TRAINED)[1])].split(",", 1)[0]
    (workspace / "half.txt").write_text("\n".join([*held[::2], second]) + "\n")  # then the rest
    run_json("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "half.txt",
             "-o", workspace / "h.safetensors")  # fmt: skip
    (workspace / "rest.txt").write_text("\n".join([*held[1::2], trained]) + "\n")
    both = run("remove", "-m", workspace / "h.safetensors", "--marked", workspace / "rest.txt")
    assert_clean_error(both, "this marking and earlier removals withdraw all")


def test_changed_training_data_is_refused(data_dir: Path, workspace: Path) -> None:
    shutil.copy(data_dir / "radial.csv", workspace / "d.csv")
    run_json("train", workspace / "d.csv", "-o", workspace / "d.safetensors", *FAST)
    with open(workspace / "d.csv", "a") as handle:
        handle.write("1000,0.5,0.5,1\n")
    result = run("remove", "-m", workspace / "d.safetensors", "--marked", workspace / "ids.txt")
    assert_clean_error(result, "has changed since")


def test_existing_output_and_bad_model(workspace: Path) -> None:
    (workspace / "m.removed.safetensors").write_text("keep")
    result = run("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt")
    assert_clean_error(result, "already exists")
    assert (workspace / "m.removed.safetensors").read_text() == "keep"
    (workspace / "cut.safetensors").write_bytes((workspace / "m.safetensors").read_bytes()[:100])
    assert_clean_error(
        run("remove", "-m", workspace / "cut.safetensors", "--marked", workspace / "ids.txt"),
        "truncated or damaged",
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--eta", "fast"],
        ["--method", "magic"],
        ["--solver", "newton"],
    ],
)
def test_usage_errors_exit_2(workspace: Path, args: list[str]) -> None:
    result = run(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt", *args
    )
    assert result.exit_code == 2, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eta", "-1"], "--eta -1 is out of range; give a number > 0"),
        (["--eta", "inf"], "--eta inf is out of range"),
        (["--lambda-cap", "0"], "--lambda-cap 0 is out of range; give a number > 0"),
        (["--damping", "inf"], "--damping inf is out of range; give a number > 0"),
        (["--damping", "nan"], "--damping nan is out of range"),
        (["--max-accuracy-drop", "nan"], "--max-accuracy-drop nan is out of range"),
        (["--max-accuracy-drop", "-1"], "give a number in [0, 100]"),
        (["--upweight-sample", "-3"], "--upweight-sample -3 is out of range; give a number >= 0"),
        (["--alpha", "0", "--method", "ssd"], "--alpha 0 is out of range"),
        (["--seed", "-1"], "--seed -1 is out of range; give a number in [0, 4294967295]"),
        (["--seed", str(2**40)], "--seed 1099511627776 is out of range"),
    ],
)
def test_out_of_range_numbers_are_refused_up_front(
    workspace: Path, args: list[str], message: str
) -> None:
    before = sorted(p.name for p in workspace.iterdir())
    result = run(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt", *args
    )
    assert_clean_error(result, message)
    assert sorted(p.name for p in workspace.iterdir()) == before


def test_a_patch_with_nan_is_never_written(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from puma_cli.engine.solvers import Solve
    from puma_cli.unlearn import puma as puma_module

    real = puma_module.solve

    def poisoned(engine, b, *args, **kwargs):  # type: ignore[no-untyped-def]
        solved = real(engine, b, *args, **kwargs)
        return Solve(torch.full_like(solved.x, float("nan")), solved.damping, 1, 0.0)

    monkeypatch.setattr(puma_module, "solve", poisoned)
    result = run(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt", "--no-cache"
    )
    assert_clean_error(result, "NaN")
    assert not (workspace / "m.removed.safetensors").exists()


def test_inputs_are_untouched_by_remove(workspace: Path, data_dir: Path) -> None:
    before = {
        p: p.read_bytes()
        for p in (workspace / "m.safetensors", workspace / "ids.txt", data_dir / "radial.csv")
    }
    run_json("remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt")
    assert {p: p.read_bytes() for p in before} == before


def test_upweight_sample_limits_the_reweighted_points(workspace: Path) -> None:
    out = run_json(
        "remove",
        "-m",
        workspace / "m.safetensors",
        "--marked",
        workspace / "ids.txt",
        "--upweight-sample",
        "10",
        "--eta",
        "1",
    )
    assert 0 < out["parameters"]["upweighted"] <= 10


def test_a_validation_file_recorded_at_training_is_the_criterion(
    data_dir: Path, workspace: Path
) -> None:
    run_json("make-data", "radial", "-o", workspace / "v.csv", "--n", "60", "--seed", "9")
    run_json(
        "train",
        data_dir / "radial.csv",
        "--val",
        workspace / "v.csv",
        "-o",
        workspace / "mv.safetensors",
        *FAST,
    )
    info = run_json("info", workspace / "mv.safetensors")
    assert info["data"]["val"]["n"] == 60 and info["rows"]["validation"] == 0
    assert run_json("eval", "-m", workspace / "mv.safetensors", "--on", "val")["n"] == 60
    out = run_json("remove", "-m", workspace / "mv.safetensors", "--marked", workspace / "ids.txt")
    assert out["skipped"]["validation"] == 0
    assert out["criterion_before"] == pytest.approx(info["metrics"]["val"]["loss"], abs=1e-5)


def test_a_patch_no_step_size_makes_safe_is_refused_not_written(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from puma_cli.unlearn import puma as puma_method
    from puma_cli.unlearn import step_length

    step_norms = []

    def never_safe(request, engine, spectrum, x, *rest):  # type: ignore[no-untyped-def]
        step_norms.append(float(x.norm()))
        raise puma_method.NoSafeStep(step_length.SMALLEST_SCALE)

    monkeypatch.setattr(puma_method, "choose_scale", never_safe)
    result = run(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt",
        "-o", workspace / "r.safetensors", "--no-cache",
    )  # fmt: skip
    assert_clean_error(result, "no step keeps the model's performance")
    assert "damping raised up to 1e+06" in result.output
    assert not (workspace / "r.safetensors").exists()
    # Levenberg-Marquardt: 100 times the damping each time, up to 1e6 x lambda_max
    # (CG may raise it tenfold on the way), each try a shorter step
    assert 4 <= len(step_norms) <= 5 and step_norms == sorted(step_norms, reverse=True)


def test_a_patch_that_breaks_the_model_is_retried_with_more_damping(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from puma_cli.unlearn import puma as puma_method
    from puma_cli.unlearn import step_length

    real, tries = puma_method.choose_scale, []

    def first_unsafe(*args):  # type: ignore[no-untyped-def]
        tries.append(1)
        if len(tries) == 1:
            raise puma_method.NoSafeStep(step_length.SMALLEST_SCALE)
        return real(*args)

    plain = run_json(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt",
        "-o", workspace / "plain.safetensors", "--no-cache",
    )  # fmt: skip
    assert not any("damping was raised" in w for w in plain["warnings"])
    raised = 100 * plain["parameters"]["damping"]  # (CG may have raised 0.01 already)
    monkeypatch.setattr(puma_method, "choose_scale", first_unsafe)
    out = run_json(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt",
        "-o", workspace / "r.safetensors",
    )  # fmt: skip
    assert len(tries) == 2 and out["parameters"]["damping"] == pytest.approx(raised)
    assert any(f"damping was raised to {raised:g}" in w for w in out["warnings"])
    info = run_json("info", workspace / "r.safetensors")
    assert info["provenance"][-1]["parameters"]["damping"] == pytest.approx(raised)
    # the cache keeps the raised damping under the requested one: the next request
    # starts there and needs no retry
    tries.clear()
    monkeypatch.setattr(puma_method, "choose_scale", lambda *a: tries.append(1) or real(*a))
    again = run_json(
        "remove", "-m", workspace / "m.safetensors", "--marked", workspace / "ids.txt",
        "-o", workspace / "r2.safetensors",
    )  # fmt: skip
    assert len(tries) == 1 and again["cached"]
    assert again["parameters"]["damping"] == pytest.approx(raised)


def test_a_whole_class_kept_after_its_removal_is_said_with_what_forgets_it(
    tmp_path: Path,
) -> None:
    """Every trained row of digit 3 marked, validation on other rows of 3: PUMA holds the
    held-out accuracy, digit 3's included, so the removed model still predicts it; a
    warning names the class and the methods that forget it. Retraining, which cannot
    predict the class, says nothing of it; neither does a marking short of the class."""
    digits = Path(__file__).resolve().parent.parent / "sample_data"
    model = tmp_path / "d.safetensors"
    run_json("train", digits / "digits-train.npz", "--val", digits / "digits-test.npz",
             "-o", model, "--epochs", "20", "--device", "cpu")  # fmt: skip
    with np.load(digits / "digits-train.npz") as data:
        threes = [str(i) for i, y in zip(data["ids"], data["y"], strict=True) if y == 3]
        others = [str(i) for i, y in zip(data["ids"], data["y"], strict=True) if y in (0, 1, 7)]
        is_three = data["y"] == 3
        np.savez(tmp_path / "t.npz", X=data["X"][is_three], y=data["y"][is_three],
                 ids=data["ids"][is_three])  # fmt: skip
    (tmp_path / "three.txt").write_text("\n".join(threes))
    (tmp_path / "most.txt").write_text("\n".join(threes[:-1]))

    def said(marked: str, method: str) -> list[str]:
        out = run_json("remove", "-m", model, "--marked", tmp_path / marked, "--method", method,
                       "-o", tmp_path / f"{marked}-{method}.st", "--device", "cpu")  # fmt: skip
        return [w for w in out["warnings"] if "every trained row of class 3" in w]

    (warning,) = said("three.txt", "puma")
    assert "PUMA keeps held-out performance" in warning and "--method scrub" in warning
    assert said("three.txt", "retrain") == []
    assert said("most.txt", "puma") == []
    # The class beside rows of other classes, which a retrained model still predicts: the
    # figure is the class's own rows' (it was every marked row's, so retraining, which
    # predicts none of the threes, was said to keep the class).
    (tmp_path / "more.txt").write_text("\n".join(threes + others[::2]))  # half of 0, 1, 7
    assert len(others[::2]) > 1.4 * len(threes)
    assert said("more.txt", "retrain") == []
    (warning,) = said("more.txt", "puma")
    kept = float(warning.split("still classifies ")[1].split("%")[0]) / 100
    marked = run_json("eval", "-m", tmp_path / "more.txt-puma.st", "--data", tmp_path / "t.npz")
    assert kept == pytest.approx(marked["accuracy"], abs=1e-3)
