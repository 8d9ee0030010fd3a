"""Reading and writing datasets and ids files, on the library."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from puma_cli.data.dataset import Dataset, split_rows
from puma_cli.errors import DataError
from puma_cli.io.datasets import load_dataset, save_dataset
from puma_cli.io.ids import read_ids, rows_for_ids, write_ids

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def datasets(draw: st.DrawFn) -> Dataset:
    n = draw(st.integers(1, 12))
    d = draw(st.integers(1, 4))
    X = draw(arrays(np.float64, (n, d), elements=finite))
    y = draw(arrays(np.int64, (n,), elements=st.integers(0, 3)))
    ids = np.array(
        draw(
            st.lists(
                st.from_regex(r"[a-z0-9_]{1,6}", fullmatch=True),
                min_size=n,
                max_size=n,
                unique=True,
            )
        )
    )
    return Dataset(X=X, y=y, ids=ids, feature_names=tuple(f"f{i}" for i in range(d)))


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(dataset=datasets(), suffix=st.sampled_from([".csv", ".npz"]))
def test_csv_and_npz_round_trip_exactly(tmp_path: Path, dataset: Dataset, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    save_dataset(path, dataset)
    back = load_dataset(path)
    np.testing.assert_array_equal(back.X, dataset.X)
    np.testing.assert_array_equal(back.y, dataset.y)
    assert back.ids.tolist() == dataset.ids.tolist()
    assert back.feature_names == dataset.feature_names
    assert back.sha256 is not None and len(back.sha256) == 64


def test_csv_without_id_column_uses_row_numbers(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,label\n1,2,0\n3,4,1\n")
    data = load_dataset(path)
    assert data.ids.tolist() == ["0", "1"]
    assert data.X.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_string_labels_map_to_sorted_classes_and_through_recorded_names(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("x,label\n1,dog\n2,cat\n3,dog\n")
    data = load_dataset(path)
    assert data.class_names == ("cat", "dog")
    assert data.y.tolist() == [1, 0, 1]
    recorded = load_dataset(path, class_names=("dog", "cat", "emu"))
    assert recorded.y.tolist() == [0, 1, 0]
    with pytest.raises(DataError, match="not one of the model's classes"):
        load_dataset(path, class_names=("cat",))


def test_custom_label_and_id_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("key,x,target\nk1,0.5,1\nk2,1.5,0\n")
    data = load_dataset(path, label_col="target", id_col="key")
    assert data.ids.tolist() == ["k1", "k2"]
    assert data.y.tolist() == [1, 0]
    assert data.feature_names == ("x",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x,label\n1,0\nabc,1\n", "line 3, column 'x': 'abc' is not a number"),
        ("x,y\n1,0\n", "no 'label' column"),
        ("x;label\n1,5;0\n", "separates its columns with semicolons"),
        ("x\tlabel\n1\t0\n", "separates its columns with tabs"),
        ("x,label\n1,0\nnan,1\n", "NaN or inf"),
        ("x,label\n1,0\ninf,1\n", "NaN or inf"),
        ("x,label\n1,0\n2,1.5\n", "label '1.5' is not a class"),
        ("x,label\n1,0\n2,-1\n", "label '-1' is not a class"),
        ("x,label\n1,0\n2,cat\n", "not a number, but other labels are"),
        ("id,x,label\na,1,0\na,2,1\n", "id 'a' repeats line 2"),
        ("x,label\n1,0\n2\n", "line 3: 1 values, but the header has 2"),
        ("x,label\n", "has a header but no rows"),
        ("", "is empty"),
        ("x,label\n1,0\n,1\n", "column 'x' is empty"),
        ("label\n1\n", "no feature columns"),
    ],
)
def test_malformed_csv_is_a_data_error_naming_the_place(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_dataset(path)


def test_npz_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.array([[1.0], [2.0]]), y=np.array([0, 1], dtype=object))
    with pytest.raises(DataError, match="pickled objects"):
        load_dataset(path)


def _write_idx(path: Path, array: np.ndarray, dtype_code: int) -> None:
    header = bytes([0, 0, dtype_code, array.ndim])
    header += b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    path.write_bytes(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


@pytest.mark.parametrize("gz", [False, True])
def test_idx_images_pair_with_their_labels(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 6), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0], dtype=np.uint8)
    img, lab = tmp_path / "t10k-images-idx3-ubyte", tmp_path / "t10k-labels-idx1-ubyte"
    _write_idx(img, images, 0x08)
    _write_idx(lab, labels, 0x08)
    if gz:
        for p in (img, lab):
            p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes()))
        img = img.with_name(img.name + ".gz")
    data = load_dataset(img)
    assert data.X.shape == (5, 1, 4, 6)
    np.testing.assert_array_equal(data.X[:, 0], images)
    assert data.y.tolist() == labels.tolist()


def test_truncated_idx_is_refused(tmp_path: Path) -> None:
    img, lab = tmp_path / "x-images-idx3-ubyte", tmp_path / "x-labels-idx1-ubyte"
    _write_idx(img, np.zeros((3, 2, 2), dtype=np.uint8), 0x08)
    _write_idx(lab, np.zeros(3, dtype=np.uint8), 0x08)
    img.write_bytes(img.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        load_dataset(img)


def test_ids_file_skips_comments_and_blanks_and_keeps_order(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    write_ids(path, ["7", "3"], comment="made by a test")
    path.write_text(path.read_text() + "\n  # note\n9 # trailing\n3\n")
    assert read_ids(path) == ["7", "3", "9"]


def test_rows_for_unknown_ids_name_them(tmp_path: Path) -> None:
    data = Dataset(
        X=np.zeros((3, 1)),
        y=np.array([0, 1, 0]),
        ids=np.array(["0", "1", "2"]),
        feature_names=("x",),
        path=tmp_path / "d.csv",
    )
    assert rows_for_ids(data, ["2", "0"], "ids.txt").tolist() == [2, 0]
    with pytest.raises(DataError, match=r"'x9'.*row numbers 0\.\.2"):
        rows_for_ids(data, ["1", "x9"], "ids.txt")


def test_split_rows_is_stratified_disjoint_and_seeded() -> None:
    y = np.array([0] * 50 + [1] * 30)
    kept, held = split_rows(y, 0.2, seed=3)
    assert np.intersect1d(kept, held).size == 0
    assert kept.size + held.size == 80
    assert (y[held] == 0).sum() == 10 and (y[held] == 1).sum() == 6
    again, _ = split_rows(y, 0.2, seed=3)
    np.testing.assert_array_equal(kept, again)


SAMPLES = sorted((Path(__file__).resolve().parent.parent / "sample_data").glob("*.csv"))
CSV_EDGES = {
    "spaces, CRLF, a BOM": "\ufeffid , x , label\r\nr1, 1.5 ,0\r\nr2,-2e-3, 1\r\n",
    "bare CR": "x,label\r1,0\r2,1\r",
    "no final newline": "x,y2,label\n1,2,a\n3,4,b",
    "class names, one row": "x,label\n0.25,cat\n",
    "underscores in numbers": "x,label\n1_000,0\n2,1\n",
    "quoted cells": 'id,x,label\n"a,1",1,0\n"b",2,1\n',
    "a blank line": "x,label\n1,0\n\n2,1\n",
    "a line of commas": "x,label\n1,0\n,\n2,1\n",
    "a row too long": "x,label\n1,0\n2,1,3\n",
    "a row too short": "x,z,label\n1,2,0\n2,1\n",
    "a repeated id late": "id,x,label\n"
    + "".join(f"r{i},{i},{i % 2}\n" for i in range(50))
    + "r7,1,0\n",
    "a bad label late": "x,label\n" + "1,0\n" * 40 + "2,1.5\n",
    "nan": "x,label\n1,0\nnan,1\n",
    "a huge number": "x,label\n1e400,0\n2,1\n",
    "hex": "x,label\n0x10,0\n2,1\n",
    "label between features": "a,label,b\n1,0,2\n3,1,4\n",
}


CSV_LEFT_TO_THE_CSV_MODULE = {
    "underscores in numbers",  # numpy's parser refuses 1_000, Python's float takes it
    "quoted cells",
    "a blank line",
    "a line of commas",
    "a row too long",
    "a row too short",
    "hex",
}


def _both_readers(path: Path, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """What load_dataset makes of `path` with numpy's plain reader, and with the csv
    module alone: a Dataset's arrays, or the error's message."""
    import puma_cli.io.csv_table as csv_table

    outcomes: list[object] = []
    for plain in (True, False):
        if not plain:
            monkeypatch.setattr(csv_table, "plain_table", lambda *a: None)
        try:
            d = load_dataset(path)
        except DataError as exc:
            outcomes.append(str(exc))
            continue
        outcomes.append((d.X.tolist(), d.X.dtype, d.y.tolist(), d.ids.tolist(),
                         d.feature_names, d.class_names))  # fmt: skip
    return outcomes


@pytest.mark.parametrize("name", sorted(CSV_EDGES) + [p.name for p in SAMPLES])
def test_the_plain_csv_reader_reads_what_the_csv_module_reads(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """numpy's C parser takes the common file (several times faster); every file, plain or
    not, reads to the same arrays or the same error as through the csv module alone."""
    path = tmp_path / "d.csv"
    if name in CSV_EDGES:
        path.write_bytes(CSV_EDGES[name].encode())
    else:
        path.write_bytes((SAMPLES[[p.name for p in SAMPLES].index(name)]).read_bytes())
    from puma_cli.io.csv_table import plain_table

    text = path.read_bytes().decode("utf-8-sig")
    taken = plain_table(text, "label", "id") is not None
    assert taken == (name not in CSV_LEFT_TO_THE_CSV_MODULE)
    plain, module = _both_readers(path, monkeypatch)
    assert plain == module


def test_ids_with_a_hash_and_files_with_a_byte_order_mark_read_back(tmp_path: Path) -> None:
    path = tmp_path / "ids.txt"
    write_ids(path, ["img#3", "cat/photo#1.png", "7"])
    assert read_ids(path) == ["img#3", "cat/photo#1.png", "7"]
    path.write_bytes(b"\xef\xbb\xbf3\r\n9\t# why\r\n#4\r\n")  # Windows Notepad's UTF-8
    assert read_ids(path) == ["3", "9"]


@pytest.mark.parametrize("ident", ["x #", "two\nlines"])
def test_mark_refuses_an_id_no_ids_file_can_hold(ident: str, tmp_path: Path) -> None:
    from conftest import assert_clean_error, run

    data = tmp_path / "d.csv"
    rows = "".join(f'"{ident}{i}",{i},{i % 2}\n' for i in range(12))  # every id such
    data.write_text("id,x,label\n" + rows)
    result = run("mark", data, "--random", "0.5", "-o", tmp_path / "ids.txt")
    assert_clean_error(result, "cannot be written to an ids file")
    assert not (tmp_path / "ids.txt").exists()


def test_a_recorded_file_is_hashed_once_when_loaded(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its sha256 is checked against the record, and the dataset carries that digest:
    a 5,000-image folder's sha256 took 0.7 s, taken twice before."""
    import puma_cli.io.atomic as atomic
    from puma_cli.io.checkpoint import load_checkpoint
    from puma_cli.io.recorded import load_recorded_dataset

    checkpoint = load_checkpoint(model_file)
    hashed: list[Path] = []
    real = atomic.sha256_file

    def counted(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    for module in ("puma_cli.io.atomic", "puma_cli.io.datasets", "puma_cli.io.recorded"):
        monkeypatch.setattr(f"{module}.sha256_file", counted)
    dataset = load_recorded_dataset(checkpoint, "train")
    assert [p.name for p in hashed] == ["radial.csv"]
    assert dataset.sha256 == checkpoint.data["train"].sha256
