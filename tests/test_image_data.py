"""Image data at scale: NPZ arrays memory-mapped and kept in their dtype, and folders of
images (`root/<class>/<image>`) as datasets, with their bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_clean_error, run, run_json

from puma_cli.io.checkpoint import load_checkpoint
from puma_cli.io.datasets import load_dataset

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "sample_data" / "digits-train.npz"


def test_a_stored_npz_is_memory_mapped_in_its_own_dtype(tmp_path: Path) -> None:
    X = np.random.default_rng(0).integers(0, 255, (64, 3, 8, 8), dtype=np.uint8)
    y = np.arange(64) % 4
    np.savez(tmp_path / "plain.npz", X=X, y=y)
    np.savez_compressed(tmp_path / "packed.npz", X=X, y=y)
    plain = load_dataset(tmp_path / "plain.npz")
    packed = load_dataset(tmp_path / "packed.npz")
    assert isinstance(plain.X, np.memmap) and plain.X.dtype == np.uint8
    assert not isinstance(packed.X, np.memmap) and packed.X.dtype == np.uint8
    np.testing.assert_array_equal(plain.X, X)
    np.testing.assert_array_equal(packed.X, X)
    assert not plain.X.flags.writeable  # the input file can never be written through it


def test_uint8_images_train_to_the_same_weights_as_their_float64_copy(tmp_path: Path) -> None:
    with np.load(DIGITS) as digits:
        arrays = {k: digits[k] for k in digits.files}
    as_bytes = {**arrays, "X": arrays["X"].astype(np.uint8)}
    assert np.array_equal(as_bytes["X"], arrays["X"])  # the digits are whole numbers 0..16
    np.savez(tmp_path / "u8.npz", **as_bytes)
    np.savez(tmp_path / "f64.npz", **{**arrays, "X": arrays["X"].astype(np.float64)})
    for name in ("u8", "f64"):
        run_json("train", tmp_path / f"{name}.npz", "--arch", "cnn", "-o",
                 tmp_path / f"{name}.safetensors", "--epochs", "2", "--device", "cpu")  # fmt: skip
    a, b = (load_checkpoint(tmp_path / f"{n}.safetensors").model for n in ("u8", "f64"))
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert np.array_equal(p.numpy(), q.numpy()), name


def _folder(root: Path, sizes: dict[str, int], size: tuple[int, int] = (8, 8)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for label, count in sizes.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            shade = 40 if label == "cat" else 200
            pixels = np.clip(rng.normal(shade, 20, (*size[::-1], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / label / f"{i:03d}.png")
    return root


def test_a_folder_of_images_goes_through_train_mark_remove_and_eval(tmp_path: Path) -> None:
    train = _folder(tmp_path / "train", {"cat": 12, "dog": 12})
    test = _folder(tmp_path / "test", {"cat": 4, "dog": 4})
    dataset = load_dataset(train)
    assert dataset.X.shape == (24, 3, 8, 8) and dataset.X.dtype == np.uint8
    assert dataset.ids[0] == "cat/000.png" and dataset.class_names == ("cat", "dog")
    model = tmp_path / "m.safetensors"
    trained = run_json("train", train, "--test", test, "--arch", "cnn", "-o", model,
                       "--epochs", "30", "--val-frac", "0", "--device", "cpu")  # fmt: skip
    assert trained["test_accuracy"] == 1.0
    run_json("mark", train, "--random", "0.2", "-o", tmp_path / "ids.txt")
    out = run_json("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--criterion-data",
                   test, "-o", tmp_path / "r.safetensors", "--device", "cpu")  # fmt: skip
    assert out["removed"] == 5
    assert run_json("eval", "-m", tmp_path / "r.safetensors")["n"] == 8
    assert run_json("info", model)["data_status"]["train"] == "ok"
    _folder(tmp_path / "train" / "extra", {"bird": 1})  # the folder changed since training
    assert_clean_error(
        run("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--criterion-data", test),
        "has changed since",
    )


BAD_FOLDERS = {
    "no class folders": "is a folder with no class folders",
    "an empty class folder": "holds no images",
    "an unreadable image": "dog/000.png is not a readable image",
    "images of two sizes": "is 9x8 with 3 channels, but",
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_image_folder_is_one_clear_error(case: str, tmp_path: Path) -> None:
    root = tmp_path / "images"
    if case == "no class folders":
        root.mkdir()
        (root / "loose.png").write_bytes(b"")
    else:
        _folder(root, {"cat": 2, "dog": 2})
    if case == "an empty class folder":
        (root / "fish").mkdir()
    elif case == "an unreadable image":
        (root / "dog" / "000.png").write_bytes(b"not a png")
    elif case == "images of two sizes":
        _folder(tmp_path / "wide", {"x": 1}, size=(9, 8))
        (tmp_path / "wide" / "x" / "000.png").rename(root / "dog" / "009.png")
    result = run("train", root, "-o", tmp_path / "m.safetensors", "--arch", "cnn")
    assert_clean_error(result, BAD_FOLDERS[case])
    assert not (tmp_path / "m.safetensors").exists()
