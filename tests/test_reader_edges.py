"""Reader edges and silent misreadings: odd files get one clear error, columns and classes
are matched by name, never by position alone."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, run, run_json


def _idx(path: Path, array: np.ndarray, code: int) -> None:
    big = array.astype(array.dtype.newbyteorder(">"))
    dims = b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(bytes([0, 0, code, array.ndim]) + dims + big.tobytes())


def _write_bad(kind: str, folder: Path) -> Path:
    """One malformed file of each kind; returns the path to give `train`."""
    zeros = np.zeros((4, 2))
    labels = np.array([0, 1, 0, 1])
    if kind == "cell over the csv field limit":
        (folder / "d.csv").write_text("a,label\n" + "1" * 200_000 + ",0\n2,1\n")
        return folder / "d.csv"
    if kind == "npz ids shorter than y":
        np.savez(folder / "d.npz", X=zeros, y=labels, ids=np.array(["a", "b"]))
    elif kind == "npz class_names shorter than y":
        np.savez(folder / "d.npz", X=zeros, y=np.arange(4), class_names=np.array(["a", "b"]))
    elif kind == "npz with zero features":
        np.savez(folder / "d.npz", X=np.zeros((4, 0)), y=labels)
    elif kind == "npz X of one axis":
        np.savez(folder / "d.npz", X=np.zeros(4), y=labels)
    elif kind == "npz X of seven axes":
        np.savez(folder / "d.npz", X=np.zeros((4, 1, 1, 1, 1, 1, 2)), y=labels)
    elif kind == "npz sequences holding NaN":
        X = np.zeros((4, 3, 3))
        X[2, 1, 2] = np.nan
        np.savez(folder / "d.npz", X=X, y=labels)
    elif kind == "npz arrays named x and y":
        np.savez(folder / "d.npz", x=zeros, y=labels)
    elif kind == "npz feature_names of the wrong length":
        np.savez(folder / "d.npz", X=zeros, y=labels, feature_names=np.array(["q"]))
    else:
        images = folder / "t-images-idx3-ubyte"
        _idx(images, np.zeros((3, 4, 4), dtype=np.uint8), 0x08)
        label_file = folder / "t-labels-idx1-ubyte"
        if kind == "idx float labels":
            _idx(label_file, np.array([0.5, 1.0, 0.0], dtype=np.float32), 0x0D)
        elif kind == "idx negative labels":
            _idx(label_file, np.array([-1, 1, 0], dtype=np.int8), 0x09)
        elif kind == "idx absurd declared size":
            images.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">III", 2**31, 2**31, 2**31))
            _idx(label_file, np.array([0, 1, 0], dtype=np.uint8), 0x08)
        elif kind == "idx header past the end":
            images.write_bytes(bytes([0, 0, 8, 200]))
            _idx(label_file, np.array([0, 1, 0], dtype=np.uint8), 0x08)
        return images
    return folder / "d.npz"


BAD_FILES = {
    "cell over the csv field limit": "line 2: not readable as CSV (field larger than field limit",
    "npz ids shorter than y": "ids has 2 entries but X has 4 rows",
    "npz class_names shorter than y": "class_names has 2 names but y holds label 3",
    "npz with zero features": "no features; give at least one",
    "npz X of one axis": "X has shape (4,); expected (n, d), (n, C, H, W) or (n, ...) with",
    "npz X of seven axes": "X has shape (4, 1, 1, 1, 1, 1, 2); expected (n, d), (n, C, H, W)",
    "npz sequences holding NaN": "id 2, the value at [1, 2] is nan; 1 row(s) hold NaN or inf",
    "npz arrays named x and y": "no array 'X' (arrays: x, y); save the features as X and the",
    "npz feature_names of the wrong length": "feature_names has 1 names for 2 features",
    "idx float labels": "IDX labels must be whole numbers 0..K-1",
    "idx negative labels": "labels are int8 from -1 to 1",
    "idx absurd declared size": "header promises (2147483648, 2147483648, 2147483648)",
    "idx header past the end": "declares 200 dimensions but the file is 4 bytes",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_malformed_files_get_one_clear_error(kind: str, tmp_path: Path) -> None:
    path = _write_bad(kind, tmp_path)
    before = sorted(tmp_path.iterdir())
    result = run("train", path, "-o", tmp_path / "m.safetensors", "--epochs", "1")
    assert_clean_error(result, BAD_FILES[kind])
    assert sorted(tmp_path.iterdir()) == before


def test_bare_cr_line_endings_read_like_lf(data_dir: Path, tmp_path: Path) -> None:
    text = (data_dir / "radial.csv").read_text()
    (tmp_path / "cr.csv").write_bytes(text.replace("\n", "\r").encode())
    (tmp_path / "crlf.csv").write_bytes(text.replace("\n", "\r\n").encode())
    for name in ("cr.csv", "crlf.csv"):
        out = run_json(
            "train", tmp_path / name, "-o", tmp_path / f"{name}.safetensors", "--epochs", "1"
        )
        assert out["n_train"] + out["n_val"] == 160, name


def _rewrite_columns(source: Path, target: Path, order: list[str], rename: dict[str, str]) -> None:
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(target, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([rename.get(c, c) for c in order])
        for row in rows:
            writer.writerow([row[c] for c in order])


def test_swapped_columns_are_matched_by_name(
    data_dir: Path, model_file: Path, tmp_path: Path
) -> None:
    swapped = tmp_path / "swapped.csv"
    _rewrite_columns(data_dir / "radial-test.csv", swapped, ["label", "x1", "id", "x0"], {})
    plain = run_json("eval", "-m", model_file, "--data", data_dir / "radial-test.csv")
    moved = run_json("eval", "-m", model_file, "--data", swapped)
    assert moved["accuracy"] == plain["accuracy"] and moved["loss"] == plain["loss"]
    out = run_json(
        "train", data_dir / "radial.csv", "--test", swapped, "-o", tmp_path / "m.safetensors",
        "--epochs", "30", "--device", "cpu",
    )  # fmt: skip
    again = run_json(
        "train", data_dir / "radial.csv", "--test", data_dir / "radial-test.csv",
        "-o", tmp_path / "n.safetensors", "--epochs", "30", "--device", "cpu",
    )  # fmt: skip
    assert out["test_accuracy"] == again["test_accuracy"]


def test_renamed_columns_are_refused_everywhere(
    data_dir: Path, model_file: Path, tmp_path: Path
) -> None:
    renamed = tmp_path / "renamed.csv"
    _rewrite_columns(
        data_dir / "radial-test.csv", renamed, ["id", "x0", "x1", "label"], {"x1": "height"}
    )
    message = "lacks 'x1'; has unknown 'height'"
    assert_clean_error(run("eval", "-m", model_file, "--data", renamed), message)
    (tmp_path / "ids.txt").write_text("0\n")
    assert_clean_error(
        run("remove", "-m", model_file, "--marked", tmp_path / "ids.txt", "--criterion-data",
            renamed, "-o", tmp_path / "r.safetensors"),
        message,
    )  # fmt: skip
    assert_clean_error(
        run("train", data_dir / "radial.csv", "--test", renamed, "-o", tmp_path / "m.safetensors"),
        "lacks 'x1'; has unknown 'height'",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "renamed.csv"]


def test_class_names_a_model_never_saw_are_refused_not_renumbered(
    data_dir: Path, model_file: Path, tmp_path: Path
) -> None:
    named = tmp_path / "named.csv"
    text = (data_dir / "radial-test.csv").read_text().splitlines()
    rows = [line.rsplit(",", 1) for line in text[1:]]
    named.write_text(
        text[0] + "\n" + "".join(f"{a},{'cat' if b == '0' else 'dog'}\n" for a, b in rows)
    )
    assert_clean_error(
        run("eval", "-m", model_file, "--data", named),
        "its labels are class names ('cat', 'dog'), but",
    )
    pets = tmp_path / "pets.safetensors"
    run_json("train", named, "-o", pets, "--epochs", "2")
    assert_clean_error(
        run("eval", "-m", pets, "--data", data_dir / "radial-test.csv"),
        "its labels are numbers, but",
    )


def test_npz_class_names_in_another_order_are_mapped_by_name(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 2))
    y = (X[:, 0] > 0).astype(np.int64)
    names = np.array(["left", "right"])
    np.savez(
        tmp_path / "train.npz", X=X, y=y, class_names=names, feature_names=np.array(["a", "b"])
    )
    features = np.array(["a", "b"])
    np.savez(tmp_path / "flip.npz", X=X, y=1 - y, class_names=names[::-1], feature_names=features)
    model = tmp_path / "m.safetensors"
    run_json("train", tmp_path / "train.npz", "-o", model, "--epochs", "20")
    same = run_json("eval", "-m", model, "--data", tmp_path / "train.npz")
    flipped = run_json("eval", "-m", model, "--data", tmp_path / "flip.npz")
    assert flipped["accuracy"] == same["accuracy"] and flipped["loss"] == same["loss"]
