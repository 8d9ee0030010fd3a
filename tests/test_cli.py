"""The command line, end to end through CliRunner: the happy chain and every bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import FAST, assert_clean_error, run, run_json
from safetensors.torch import save_file
from typer.testing import CliRunner

from puma_cli.cli import app

COMMANDS = ["make-data", "train", "mark", "eval", "info"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0
    for option in ("--json", "--seed", "--device", "--config"):
        assert option in result.stdout, (command, option)


def test_the_chain_make_train_mark_eval_info(tmp_path: Path) -> None:
    made = run_json("make-data", "rectangular", "-o", tmp_path / "r.csv", "--test-frac", "0.25")
    assert made["n"] + made["n_test"] == 800 and abs(made["n_test"] - 200) <= 2
    assert made["n_classes"] == 3
    trained = run_json(
        "train",
        tmp_path / "r.csv",
        "--test",
        tmp_path / "r-test.csv",
        "-o",
        tmp_path / "m.safetensors",
        *FAST,
    )
    assert set(trained) >= {"model", "train_accuracy", "test_accuracy", "seconds"}
    assert trained["test_accuracy"] > 0.8
    assert trained["n_train"] + trained["n_val"] == made["n"]
    assert abs(trained["n_val"] - made["n"] / 10) <= 2
    marked = run_json("mark", tmp_path / "r.csv", "--class", "2", "-o", tmp_path / "ids.txt")
    assert 0 < marked["count"] < 200
    ids = (tmp_path / "ids.txt").read_text().split("\n")
    assert ids[0].startswith("# puma mark")
    on_marked = run_json(
        "eval",
        "--model",
        tmp_path / "m.safetensors",
        "--data",
        tmp_path / "r.csv",
        "--ids",
        tmp_path / "ids.txt",
    )
    assert on_marked["n"] == marked["count"]
    assert set(on_marked) >= {"accuracy", "loss", "ece", "n"}
    on_test = run_json("eval", "--model", tmp_path / "m.safetensors")
    assert on_test["n"] == made["n_test"] and on_test["accuracy"] == pytest.approx(
        trained["test_accuracy"], abs=1e-6
    )
    info = run_json("info", tmp_path / "m.safetensors")
    assert info["recipe"]["epochs"] == 30 and info["recipe"]["optimizer"] == "adam"
    assert info["architecture"]["hidden"] == info["recipe"]["hidden"] == [64, 32]
    assert "channels" not in info["architecture"] and "arch_source" not in info["recipe"]
    assert info["data"]["train"]["sha256"] and info["data_status"] == {"train": "ok", "test": "ok"}
    assert info["rows"] == {
        "trained": trained["n_train"],
        "validation": trained["n_val"],
        "removed": 0,
        "withdrawn": 0,
    }
    assert info["provenance"] == []


def test_human_output_goes_to_stdout_without_json(model_file: Path) -> None:
    result = run("info", model_file)
    assert result.exit_code == 0
    assert "recipe" in result.stdout and "provenance" in result.stdout
    text = " ".join(result.stdout.split())
    assert "metrics as trained train: accuracy " in text and "none (as trained)" in text
    assert "name=mlp, input_shape=2, n_classes=2, hidden=64,32" in text
    assert "epochs=30" in text and "trained, " in text and " validation, 0 removed" in text


def test_info_folds_a_long_path_onto_the_next_line_rather_than_cutting_it(tmp_path: Path) -> None:
    """A path or digest wider than the terminal's column is folded, never cut to an
    ellipsis: `info` is where a user reads which files a model records."""
    folder = tmp_path / ("a-folder-name-long-enough-to-overflow-the-column-" * 2) / "data"
    folder.mkdir(parents=True)
    assert run("make-data", "radial", "-o", folder / "r.csv", "--n", "60").exit_code == 0
    model = tmp_path / "m.safetensors"
    assert run("train", folder / "r.csv", "-o", model, "--epochs", "2").exit_code == 0
    result = run("info", model)
    assert result.exit_code == 0, result.output
    assert "\u2026" not in result.stdout and "..." not in result.stdout
    joined = "".join(result.stdout.split())  # the folds and the key column's padding gone
    assert str(folder / "r.csv") in joined


def test_info_says_each_operation_in_a_line_with_its_figures(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The figures recorded at training describe the model as trained; `info` says so, and
    gives each later operation with what it measured before and after, not a dict."""
    ids = tmp_path / "ids.txt"
    rows = (data_dir / "radial.csv").read_text().splitlines()[1:6]
    ids.write_text("".join(r.split(",", 1)[0] + "\n" for r in rows))
    removed = run_json(
        "remove", "-m", model_file, "--marked", ids, "-o", tmp_path / "r.safetensors",
        "--device", "cpu",
    )  # fmt: skip
    result = run("info", tmp_path / "r.safetensors")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "metrics as trained train: accuracy " in text and "; test: accuracy " in text
    before, after = removed["test_accuracy_before"], removed["test_accuracy_after"]
    assert "1. 20" in text and f"remove (puma, {removed['parameters']['curvature']}): " in text
    assert f"{removed['removed']} trained rows of 5 marked ids" in text
    assert f"test accuracy {before:.3f} -> {after:.3f}" in text
    assert "{'op'" not in text and "2. " not in text


def test_make_data_with_flipped_labels_writes_their_ids(tmp_path: Path) -> None:
    out = run_json(
        "make-data", "moons", "-o", tmp_path / "m.csv", "--n", "100", "--flip-labels", "0.1"
    )
    assert out["n_flipped"] == 10
    clean = run_json("make-data", "moons", "-o", tmp_path / "c.csv", "--n", "100")
    assert clean["n"] == 100
    flipped = [
        line
        for line in (tmp_path / "m-flipped.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    noisy = {
        r.split(",")[0]: r.split(",")[-1] for r in (tmp_path / "m.csv").read_text().splitlines()[1:]
    }
    truth = {
        r.split(",")[0]: r.split(",")[-1] for r in (tmp_path / "c.csv").read_text().splitlines()[1:]
    }
    assert len(flipped) == 10
    assert all(noisy[i] != truth[i] for i in flipped)
    assert sum(noisy[i] != truth[i] for i in truth) == 10


def _ids(path: Path) -> set[str]:
    return {line for line in path.read_text().splitlines() if not line.startswith("#")}


def test_a_random_marking_is_not_the_flipped_labels_of_the_same_seed(tmp_path: Path) -> None:
    """Flip 5 % of the labels and mark 5 % at random, each at its default seed: the two
    drew the same rows (one generator, one seed, one draw), so a "random" removal removed
    exactly the mislabelled points. They overlap by chance now (about 1 in 20 of 60)."""
    run_json("make-data", "moons", "-o", tmp_path / "m.csv", "--n", "1200", "--flip-labels", "0.05")
    run_json("mark", tmp_path / "m.csv", "--random", "0.05", "-o", tmp_path / "ids.txt")
    flipped, marked = _ids(tmp_path / "m-flipped.txt"), _ids(tmp_path / "ids.txt")
    assert len(flipped) == len(marked) == 60
    assert len(flipped & marked) < 15  # 3 expected by chance; 60 before


@pytest.mark.parametrize("kind", ["radial", "rectangular", "moons", "spiral"])
def test_make_data_is_deterministic_per_seed(tmp_path: Path, kind: str) -> None:
    run_json("make-data", kind, "-o", tmp_path / "a.csv", "--seed", "3", "--n", "60")
    run_json("make-data", kind, "-o", tmp_path / "b.csv", "--seed", "3", "--n", "60")
    run_json("make-data", kind, "-o", tmp_path / "c.csv", "--seed", "4", "--n", "60")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() != (tmp_path / "c.csv").read_bytes()


def test_same_seed_and_data_give_the_same_checkpoint_bytes(data_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        run_json(
            "train",
            data_dir / "radial.csv",
            "-o",
            tmp_path / f"{name}.safetensors",
            "--epochs",
            "5",
        )
    run_json(
        "train",
        data_dir / "radial.csv",
        "-o",
        tmp_path / "c.safetensors",
        "--epochs",
        "5",
        "--seed",
        "1",
    )
    a = (tmp_path / "a.safetensors").read_bytes()
    assert a == (tmp_path / "b.safetensors").read_bytes()
    assert a != (tmp_path / "c.safetensors").read_bytes()


def test_train_on_images_with_the_cnn(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    X = rng.normal(size=(60, 1, 8, 8)) + y[:, None, None, None]
    np.savez(tmp_path / "img.npz", X=X, y=y)
    out = run_json(
        "train",
        tmp_path / "img.npz",
        "--arch",
        "cnn",
        "-o",
        tmp_path / "c.safetensors",
        "--epochs",
        "20",
    )
    assert out["train_accuracy"] > 0.9
    assert run_json("info", tmp_path / "c.safetensors")["architecture"]["name"] == "cnn"
    assert_clean_error(
        run(
            "train",
            tmp_path / "img.npz",
            "--arch",
            "cnn",
            "-o",
            tmp_path / "x.safetensors",
            "--hidden",
            "4",
            "--epochs",
            "1",
            "--activation",
            "sigmoid",
            "--batch-size",
            "0",
        ),
        "--batch-size 0",
    )


def test_named_labels_are_mapped_and_carried_by_the_model(tmp_path: Path) -> None:
    rows = ["x,y,label"] + [f"{i % 7},{i % 3},{'spam' if i % 2 else 'ham'}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "bad.csv").write_text("x,y,label\n1,1,eggs\n")
    run_json("train", tmp_path / "t.csv", "-o", tmp_path / "m.safetensors", "--epochs", "3")
    assert run_json("info", tmp_path / "m.safetensors")["class_names"] == ["ham", "spam"]
    assert (
        run_json("eval", "-m", tmp_path / "m.safetensors", "--data", tmp_path / "t.csv")["n"] == 40
    )
    result = run("eval", "-m", tmp_path / "m.safetensors", "--data", tmp_path / "bad.csv")
    assert_clean_error(result, "label 'eggs' is not one of the model's classes (ham, spam)")


def test_mark_takes_a_class_by_name_or_number(tmp_path: Path) -> None:
    rows = ["x,y,label"] + [f"{i % 7},{i % 5},{'spam' if i % 2 else 'ham'}" for i in range(40)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    by_name = run_json(
        "mark", tmp_path / "t.csv", "--class", "spam", "--clusters", "3", "-o", tmp_path / "a"
    )
    by_number = run_json(
        "mark", tmp_path / "t.csv", "--class", "1", "--clusters", "3", "-o", tmp_path / "b"
    )
    assert by_name["method"] == "kmeans class spam (1), 3 clusters"
    assert by_number["method"] == "kmeans class 1, 3 clusters"
    ids = [line for line in (tmp_path / "a").read_text().splitlines() if not line.startswith("#")]
    assert ids and all(int(i) % 2 == 1 for i in ids)  # spam rows only
    assert ids == [line for line in (tmp_path / "b").read_text().splitlines() if line[0] != "#"]
    result = run("mark", tmp_path / "t.csv", "--class", "eggs", "-o", tmp_path / "c")
    assert_clean_error(result, "t.csv has no such class (its classes: ham, spam)")
    assert not (tmp_path / "c").exists()


def test_config_file_sets_defaults_and_flags_win(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "puma.yaml"
    config.write_text("seed: 7\ntrain:\n  epochs: 2\n  hidden: [8, 4]\n  batch-size: 16\n")
    run_json("train", data_dir / "radial.csv", "-o", tmp_path / "a.safetensors", "--config", config)
    recipe = run_json("info", tmp_path / "a.safetensors")["recipe"]
    assert recipe == {**recipe, "epochs": 2, "hidden": [8, 4], "batch_size": 16, "seed": 7}
    run_json(
        "train",
        data_dir / "radial.csv",
        "-o",
        tmp_path / "b.safetensors",
        "--config",
        config,
        "--epochs",
        "3",
    )
    assert run_json("info", tmp_path / "b.safetensors")["recipe"]["epochs"] == 3


def test_config_errors_are_clean(data_dir: Path, tmp_path: Path) -> None:
    unknown = tmp_path / "u.yaml"
    unknown.write_text("train:\n  epoch: 3\n")
    result = run(
        "train", data_dir / "radial.csv", "-o", tmp_path / "m.safetensors", "--config", unknown
    )
    assert_clean_error(result, "train has no option 'epoch'")
    broken = tmp_path / "b.yaml"
    broken.write_text("train: [epochs: 3\n")
    assert_clean_error(run("info", "x", "--config", broken), "is not valid YAML")
    assert_clean_error(run("info", "x", "--config", tmp_path / "none.yaml"), "no such config file")
    assert not (tmp_path / "m.safetensors").exists()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run("make-data", "triangles", "-o", tmp_path / "x.csv").exit_code == 2
    assert run("train", tmp_path / "x.csv").exit_code == 2
    assert run("train", tmp_path / "x.csv", "-o", tmp_path / "m", "--hidden", "a,b").exit_code == 2


# --- bad input: exit 1, one Error line, nothing written ----------------------------------

BAD_CSV = {
    "non_numeric": (
        "x0,x1,label\n1,2,0\n3,oops,1\n",
        "line 3, column 'x1': 'oops' is not a number",
    ),
    "missing_label": ("x0,x1,target\n1,2,0\n3,4,1\n", "no 'label' column"),
    "missing_label_comma_names": (
        'id,"weight, kg",target\na,2,0\nb,4,1\n',
        "no 'label' column (columns: id, 'weight, kg', target)",
    ),
    "nan": ("x0,x1,label\n1,2,0\n3,nan,1\n", "NaN or inf"),
    "inf": ("x0,x1,label\n1,-inf,0\n3,4,1\n", "NaN or inf"),
    "fractional_label": ("x0,x1,label\n1,2,0\n3,4,0.5\n", "label '0.5' is not a class"),
    "gap_in_labels": ("x0,x1,label\n1,2,0\n3,4,2\n", "class 1 has no rows"),
    "duplicate_ids": ("id,x0,x1,label\n7,1,2,0\n7,3,4,1\n", "id '7' repeats line 2"),
    "empty": ("", "is empty"),
    "ragged": ("x0,x1,label\n1,2,0\n3,1\n", "line 3: 2 values, but the header has 3"),
    "one_class": ("x0,x1,label\n1,2,0\n3,4,0\n", "one class only"),
}


@pytest.mark.parametrize("case", sorted(BAD_CSV))
def test_train_refuses_malformed_csv(tmp_path: Path, case: str) -> None:
    text, message = BAD_CSV[case]
    (tmp_path / "bad.csv").write_text(text)
    result = run("train", tmp_path / "bad.csv", "-o", tmp_path / "m.safetensors", *FAST)
    assert_clean_error(result, message)
    assert not (tmp_path / "m.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv"]


def test_missing_data_file(tmp_path: Path) -> None:
    result = run("train", tmp_path / "nope.csv", "-o", tmp_path / "m.safetensors")
    assert_clean_error(result, "nope.csv: no such file")


def test_ids_not_in_the_data(data_dir: Path, model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "ids.txt").write_text("0\nghost\n")
    result = run(
        "eval",
        "--model",
        model_file,
        "--data",
        data_dir / "radial.csv",
        "--ids",
        tmp_path / "ids.txt",
    )
    assert_clean_error(result, "1 id(s) are not in")
    assert "'ghost'" in result.stderr
    (tmp_path / "empty.txt").write_text("# nothing\n")
    result = run(
        "eval",
        "--model",
        model_file,
        "--data",
        data_dir / "radial.csv",
        "--ids",
        tmp_path / "empty.txt",
    )
    assert_clean_error(result, "names no ids")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--random", "0.001"], "selects no point"),
        (["--random", "1.0"], "selects all 160 points"),
        (["--all-classes", "--clusters", "1"], "selects all 160 points"),
        (["--class", "4"], "class 4 has no rows"),
        (["--class", "0", "--clusters", "500"], "more than the 80 rows"),
        (["--class", "0", "--random", "0.1"], "choose exactly one marking"),
        ([], "choose exactly one marking"),
    ],
)
def test_mark_refuses_impossible_markings(
    data_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("mark", data_dir / "radial.csv", "-o", tmp_path / "ids.txt", *args)
    assert_clean_error(result, message)
    assert not (tmp_path / "ids.txt").exists()


def test_truncated_checkpoint(model_file: Path, data_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    assert_clean_error(
        run("eval", "--model", bad, "--data", data_dir / "radial.csv"), "truncated or damaged"
    )
    assert_clean_error(run("info", bad), "truncated or damaged")


def test_pickle_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(pickle.dumps({"a": 1}))
    assert_clean_error(run("info", tmp_path / "m.pkl"), "never unpickles")


def test_foreign_safetensors(tmp_path: Path) -> None:
    save_file({"weight": torch.zeros(3)}, tmp_path / "hf.safetensors")
    assert_clean_error(run("info", tmp_path / "hf.safetensors"), "not a puma checkpoint")


WRONG_KIND = {
    "a checkpoint imported as weights": (
        lambda m, d, o: ["import", m, "--arch", "mlp", "--data", d, "-o", o],
        "is a puma checkpoint, not a network's weights: give it to puma's commands as it is",
    ),
    "a checkpoint as --like": (
        lambda m, d, o: ["export", m, "-o", o, "--like", m],
        "is a puma checkpoint, not a network's weights: give --like the weights file",
    ),
    "a checkpoint trained on": (
        lambda m, d, o: ["train", m, "-o", o],
        "is a safetensors file (a model or a network's weights), not data",
    ),
    "a checkpoint as --data": (
        lambda m, d, o: ["eval", "-m", m, "--data", m],
        "is a safetensors file (a model or a network's weights), not data",
    ),
    "the data as the model": (
        lambda m, d, o: ["eval", "-m", d],
        "is a text file (data, ids or code?), not a puma checkpoint",
    ),
    "the data as weights": (
        lambda m, d, o: ["import", d, "--arch", "mlp", "--data", d, "-o", o],
        "is a text file (data, ids or code?), not a network's weights",
    ),
    "the data as the ids": (
        lambda m, d, o: ["remove", "-m", m, "--marked", d, "-o", o],
        "looks like a table (its first line, 'id,x0,x1,label', holds commas)",
    ),
}


@pytest.mark.parametrize("case", sorted(WRONG_KIND))
def test_a_file_of_another_kind_is_named_for_what_it_is(
    model_file: Path, data_dir: Path, tmp_path: Path, case: str
) -> None:
    """A model where data goes, data where ids go, a checkpoint where a network's weights
    go: each refused saying what the file is, not as damaged or as another network."""
    command, message = WRONG_KIND[case]
    out = tmp_path / "out.safetensors"
    assert_clean_error(run(*command(model_file, data_dir / "radial.csv", out)), message)
    assert not out.exists()


def test_held_out_data_that_repeats_trained_rows_is_warned_of(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The training file given again as held-out data (validation, test, the criterion,
    the attack's non-members) is trained on: every use says so, and a real held-out file
    draws no such warning."""
    train, test = data_dir / "radial.csv", data_dir / "radial-test.csv"
    said = "repeat a row the model is trained on, values and label"
    trained = run_json("train", train, "--val", train, "--test", train, "-o",
                       tmp_path / "m.safetensors", *FAST)  # fmt: skip
    assert [w.split(" (")[1].split(")")[0] for w in trained["warnings"] if said in w] == [
        "--val",
        "--test",
    ]
    assert any(w.startswith("160 of the 160 rows") for w in trained["warnings"])
    plain = run_json("train", train, "--test", test, "-o", tmp_path / "p.safetensors", *FAST)
    assert not any(said in w for w in plain["warnings"])
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(r.split(",", 1)[0] + "\n" for r in train.read_text().splitlines()[1:4]))
    removed = run_json("remove", "-m", model_file, "--marked", ids, "--criterion-data", train,
                       "-o", tmp_path / "r.safetensors")  # fmt: skip
    assert any(said in w and "(--criterion-data)" in w for w in removed["warnings"])
    attacked = run_json("attack", "-m", model_file, "--targets", ids, "--nonmembers", train)
    assert any(said in n and "(--nonmembers)" in n for n in attacked["notes"])
    clean = run_json("attack", "-m", model_file, "--targets", ids, "--nonmembers", test)
    assert not any(said in n for n in clean["notes"])


def test_checkpoint_from_another_feature_count(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "wide.csv").write_text("a,b,c,label\n1,2,3,0\n4,5,6,1\n")
    result = run("eval", "--model", model_file, "--data", tmp_path / "wide.csv")
    assert_clean_error(result, "has 3 features but")
    assert "trained on 2" in result.stderr


def test_label_beyond_the_models_classes(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "k.csv").write_text("x0,x1,label\n1,2,0\n4,5,3\n")
    assert_clean_error(run("eval", "--model", model_file, "--data", tmp_path / "k.csv"), "label 3")


def test_changed_training_data_is_refused(data_dir: Path, tmp_path: Path) -> None:
    shutil.copy(data_dir / "radial.csv", tmp_path / "d.csv")
    run_json("train", tmp_path / "d.csv", "-o", tmp_path / "m.safetensors", "--epochs", "2")
    assert run_json("eval", "-m", tmp_path / "m.safetensors", "--on", "train")["n"] == 144
    with open(tmp_path / "d.csv", "a") as handle:
        handle.write("999,0.1,0.2,1\n")
    result = run("eval", "-m", tmp_path / "m.safetensors", "--on", "train")
    assert_clean_error(result, "has changed since")
    assert run_json("info", tmp_path / "m.safetensors")["data_status"]["train"] == "changed"
    (tmp_path / "d.csv").unlink()
    assert_clean_error(run("eval", "-m", tmp_path / "m.safetensors", "--on", "val"), "is missing")


def test_existing_output_needs_overwrite(data_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "ids.txt"
    target.write_text("keep me\n")
    result = run("mark", data_dir / "radial.csv", "--class", "1", "-o", target)
    assert_clean_error(result, "already exists; pass --overwrite")
    assert target.read_text() == "keep me\n"
    run_json("mark", data_dir / "radial.csv", "--class", "1", "-o", target, "--overwrite")
    assert target.read_text().startswith("# puma mark")


def test_make_data_refuses_before_writing_any_of_its_files(tmp_path: Path) -> None:
    (tmp_path / "r-test.csv").write_text("mine\n")
    result = run("make-data", "radial", "-o", tmp_path / "r.csv", "--test-frac", "0.2")
    assert_clean_error(result, "r-test.csv already exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r-test.csv"]


def test_output_may_not_replace_an_input(data_dir: Path, tmp_path: Path) -> None:
    shutil.copy(data_dir / "radial.csv", tmp_path / "d.csv")
    before = (tmp_path / "d.csv").read_bytes()
    result = run(
        "mark", tmp_path / "d.csv", "--class", "1", "-o", tmp_path / "d.csv", "--overwrite"
    )
    assert_clean_error(result, "is also an input")
    assert (tmp_path / "d.csv").read_bytes() == before


def test_inputs_are_never_modified(data_dir: Path, model_file: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (data_dir / "radial.csv", model_file)}
    run_json("eval", "--model", model_file, "--on", "train")
    run_json("mark", data_dir / "radial.csv", "--random", "0.1", "-o", tmp_path / "ids.txt")
    run_json("info", model_file)
    assert {p: p.read_bytes() for p in before} == before


def test_cuda_without_a_gpu_is_a_clean_error(model_file: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_clean_error(run("info", model_file, "--device", "cuda"), "no usable CUDA GPU")
    assert_clean_error(run("info", model_file, "--device", "cuda:1"), "cuda:1: this machine has no")


@pytest.mark.parametrize(
    ("device", "message"),
    [("mps", "choose auto, cpu, cuda or cuda:N"), ("cuda:x", "choose auto, cpu, cuda or cuda:N")],
)
def test_an_unknown_device_is_a_clean_error(model_file: Path, device: str, message: str) -> None:
    assert_clean_error(run("info", model_file, "--device", device), message)


def test_an_indexed_gpu_under_torchrun_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    from puma_cli.devices import resolve_device
    from puma_cli.errors import DeviceError

    with pytest.raises(DeviceError, match="under torchrun: give --device cuda"):
        resolve_device("cuda:0")


def test_json_output_is_one_object_and_nothing_else(model_file: Path) -> None:
    result = run("eval", "--model", model_file, "--json")
    assert result.exit_code == 0
    assert len(result.stdout.strip().splitlines()) == 1
    assert json.loads(result.stdout)["n"] == 40


def test_python_dash_m_runs_the_same_cli() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "puma_cli", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert "make-data" in result.stdout and "remove" in result.stdout


def test_outputs_get_the_usual_file_mode_not_a_private_one(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        run_json("make-data", "radial", "-o", tmp_path / "r.csv", "--n", "50")
    finally:
        os.umask(mask)
    assert (tmp_path / "r.csv").stat().st_mode & 0o777 == 0o644


def test_mixed_precision_training_is_recorded_and_retrains_the_same_way(
    data_dir: Path, model_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "mp.safetensors"
    out = run_json(
        "train", data_dir / "radial.csv", "--test", data_dir / "radial-test.csv",
        "-o", path, "--mixed-precision", *FAST,
    )  # fmt: skip
    plain = run_json("info", model_file)["metrics"]["test"]["accuracy"]
    assert out["test_accuracy"] >= plain - 0.05  # bfloat16 forward passes, same recipe
    assert run_json("info", path)["recipe"]["mixed_precision"] is True
    assert run_json("info", model_file)["recipe"]["mixed_precision"] is False
    from safetensors.torch import load_file

    mixed, reference = load_file(path), load_file(model_file)
    floats = [t.dtype for t in mixed.values() if t.is_floating_point()]
    assert floats and set(floats) == {torch.float32}  # the weights stay float32
    # the same recipe and seed otherwise: the bfloat16 forward passes did change the training
    assert any(not torch.equal(mixed[k], reference[k]) for k in mixed if "net." in k)
    ids = [line.split(",")[0] for line in (data_dir / "radial.csv").read_text().splitlines()[1:]]
    (tmp_path / "ids.txt").write_text("\n".join(ids[:20]) + "\n")
    retrained = tmp_path / "rt.safetensors"
    run_json("remove", "-m", path, "--marked", tmp_path / "ids.txt", "--method", "retrain",
             "-o", retrained, "--device", "cpu")  # fmt: skip
    last = run_json("info", retrained)["provenance"][-1]
    assert last["parameters"]["recipe"]["mixed_precision"] is True


def test_version_names_puma_and_what_a_bug_report_needs_without_loading_torch() -> None:
    import subprocess
    import sys

    probe = (
        "import sys\nfrom puma_cli.cli import app\n"
        "try:\n    app(['--version'])\nexcept SystemExit as e:\n    code = e.code\n"
        "print('torch' in sys.modules, code)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    first, last = done.stdout.strip().splitlines()[0], done.stdout.strip().splitlines()[-1]
    from puma_cli import __version__

    assert first.startswith(f"puma {__version__} (python ") and "torch 2." in first
    assert last == "False 0"


@pytest.mark.parametrize("command", ["remove", "compare"])
def test_help_paragraphs_are_reflowed_not_broken_where_the_source_wraps(command: str) -> None:
    """typer keeps a docstring's single line breaks after its first paragraph, and rich then
    wraps each source line again: an 80-column terminal showed `sisa` alone on a line."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    description = result.stdout.split("Usage:")[1].split("╭")[0].splitlines()[2:]
    paragraphs: list[list[str]] = [[]]
    for line in description:
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    lines = [line for paragraph in paragraphs for line in paragraph[:-1]]
    assert lines, result.stdout  # each command's help has a paragraph wrapped over lines
    assert all(len(line) > 60 for line in lines), description


GPU_FULL = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB "
    "of which 1.19 GiB is free. Including non-PyTorch memory, this process has 77.90 GiB "
    "memory in use.\nOf the allocated memory 76.2 GiB is allocated by PyTorch."
)


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (
            torch.OutOfMemoryError(GPU_FULL),
            "the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
            "has a total capacity of 79.11 GiB of which 1.19 GiB is free); free it",
        ),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 3221225472 bytes. Error code 12"
            ),
            "this machine ran out of memory (3.00 GiB asked for); close other programs",
        ),
        (MemoryError(), "this machine ran out of memory (MemoryError)"),
    ],
)
def test_memory_running_out_is_one_error_line_and_nothing_written(
    model_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    said: str,
) -> None:
    """Memory running out, on the GPU or the machine, is the machine's state, not a bug of
    puma's: one `Error:` line with the allocator's figures and the ways on, no traceback,
    no output; another RuntimeError keeps its traceback."""
    import puma_cli.jobs.remove as remove_job

    def failing(error: Exception) -> Any:
        def evaluate_each(*args: Any, **kwargs: Any) -> Any:
            raise error

        return evaluate_each

    monkeypatch.setattr(remove_job, "evaluate_each", failing(raised))
    (tmp_path / "ids.txt").write_text("0\n2\n")
    out = tmp_path / "removed.safetensors"
    result = run("remove", "-m", model_file, "--marked", tmp_path / "ids.txt", "-o", out)
    assert_clean_error(result, said)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "ids.txt"]
    monkeypatch.setattr(remove_job, "evaluate_each", failing(RuntimeError("a bug of puma's")))
    result = run("remove", "-m", model_file, "--marked", tmp_path / "ids.txt", "-o", out)
    assert isinstance(result.exception, RuntimeError)
