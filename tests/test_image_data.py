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


def test_a_folder_is_hashed_as_it_is_read_and_a_changed_image_is_caught(tmp_path: Path) -> None:
    """The reader's digest (each image read once, hashed and decoded) is the recorded
    folder's; an image edited in place, readable as before, is a change all the same."""
    from PIL import Image

    from puma_cli.io.image_folder import folder_sha256

    train = _folder(tmp_path / "train", {"cat": 6, "dog": 6})
    assert load_dataset(train).sha256 == folder_sha256(train)
    model = tmp_path / "m.safetensors"
    run_json("train", train, "--arch", "cnn", "-o", model, "--epochs", "2",
             "--val-frac", "0", "--device", "cpu")  # fmt: skip
    assert run_json("eval", "-m", model, "--data", train)["n"] == 12
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(train / "dog" / "003.png")
    assert load_dataset(train).sha256 == folder_sha256(train)
    assert run_json("info", model)["data_status"]["train"] == "changed"
    run_json("mark", train, "--random", "0.2", "-o", tmp_path / "ids.txt")
    assert_clean_error(
        run("remove", "-m", model, "--marked", tmp_path / "ids.txt", "--criterion-data", train),
        "has changed since",
    )


BAD_FOLDERS = {
    "no class folders": "is a folder with no class folders",
    "an empty class folder": "holds no images",
    "an unreadable image": "dog/000.png is not a readable image (no image format Pillow reads)",
    "images of two sizes": "is 9x8, but",
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


def _save(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels)
    (image.convert(mode) if mode else image).save(path)


def test_a_folder_is_read_as_torchvision_reads_it(tmp_path: Path) -> None:
    """Class folders with sub-folders, grey images among colour ones (JPEG sets have
    them), palette and alpha images: what torchvision's ImageFolder takes, puma takes."""
    rng = np.random.default_rng(2)
    colour = rng.integers(0, 255, (4, 8, 8, 3), dtype=np.uint8)
    root = tmp_path / "images"
    _save(root / "cat" / "batch1" / "a.png", colour[0])
    _save(root / "cat" / "batch2" / "b.PNG", colour[1], "L")  # grey, upper-case suffix
    _save(root / "dog" / "c.png", colour[2], "P")  # palette
    _save(root / "dog" / "d.png", np.dstack([colour[3], colour[3][..., :1]]))  # RGBA
    (root / "dog" / ".DS_Store").write_bytes(b"\0\1")  # hidden and not images: skipped
    (root / "dog" / ".hidden").mkdir()
    _save(root / "dog" / ".hidden" / "e.png", colour[0])
    dataset = load_dataset(root)
    assert list(dataset.ids) == ["cat/batch1/a.png", "cat/batch2/b.PNG", "dog/c.png", "dog/d.png"]
    assert list(dataset.y) == [0, 0, 1, 1] and dataset.X.shape == (4, 3, 8, 8)
    np.testing.assert_array_equal(dataset.X[0], np.moveaxis(colour[0], 2, 0))
    grey = dataset.X[1]  # a grey image among colour ones has its one channel three times
    assert np.array_equal(grey[0], grey[1]) and np.array_equal(grey[0], grey[2])
    np.testing.assert_array_equal(dataset.X[3], np.moveaxis(colour[3], 2, 0))  # alpha dropped
    before = load_dataset(root).sha256
    (root / "dog" / ".DS_Store").write_bytes(b"changed by Finder")
    (root / "notes.txt").write_text("not an image")
    assert load_dataset(root).sha256 == before  # only the images read are recorded
    _save(root / "cat" / "batch1" / "a.png", colour[1])
    assert load_dataset(root).sha256 != before


def test_sixteen_bit_images_keep_their_contrast(tmp_path: Path) -> None:
    """A 16-bit PNG (medical, astronomy, depth) converted to 8 bits saturates: every pixel
    above 255 became 255, a white image with nothing in it."""
    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65535, (3, 8, 8), dtype=np.uint16)
    root = tmp_path / "deep"
    for i, pixels in enumerate(deep):
        _save(root / ("a" if i < 2 else "b") / f"{i}.png", pixels)
    _save(root / "b" / "8bit.png", (deep[0] // 257).astype(np.uint8))
    dataset = load_dataset(root)
    assert dataset.X.dtype == np.float32 and dataset.X.shape == (4, 1, 8, 8)
    np.testing.assert_allclose(dataset.X[0, 0], deep[0] / 257.0, rtol=1e-6)
    np.testing.assert_allclose(dataset.X[3, 0], dataset.X[0, 0], atol=1.0)  # one scale: 0..255
    assert float(dataset.X[:3].std()) > 50


def test_a_float_image_is_refused_by_name(tmp_path: Path) -> None:
    _folder(tmp_path / "images", {"cat": 2, "dog": 2})
    _save(tmp_path / "images" / "dog" / "f.tiff", np.ones((8, 8), dtype=np.float32))
    result = run("train", tmp_path / "images", "-o", tmp_path / "m.safetensors")
    assert_clean_error(result, "dog/f.tiff is a floating-point image")
    assert not (tmp_path / "m.safetensors").exists()


def test_an_image_model_is_told_the_image_shape_it_needs(tmp_path: Path) -> None:
    train = _folder(tmp_path / "train", {"cat": 6, "dog": 6})
    model = tmp_path / "m.safetensors"
    run_json("train", train, "-o", model, "--epochs", "1", "--device", "cpu")
    small = _folder(tmp_path / "small", {"cat": 2, "dog": 2}, size=(4, 4))
    result = run("eval", "--model", model, "--data", small)
    assert_clean_error(result, "small holds images of 3x4x4, but")
    assert "images of 3x8x8; resize" in result.output and "px0" not in result.output
    grey = tmp_path / "grey"
    for label in ("cat", "dog"):
        _save(grey / label / "0.png", np.zeros((8, 8), dtype=np.uint8))
    result = run("eval", "--model", model, "--data", grey)
    assert_clean_error(result, "grey holds images of 1x8x8, but")
    assert "convert them to RGB" in result.output


def test_a_link_back_up_the_tree_is_walked_once(tmp_path: Path) -> None:
    root = _folder(tmp_path / "images", {"cat": 2, "dog": 2})
    (root / "cat" / "loop").symlink_to(root / "cat", target_is_directory=True)
    dataset = load_dataset(root)
    assert list(dataset.ids) == ["cat/000.png", "cat/001.png", "dog/000.png", "dog/001.png"]


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_channels_last_images_are_named_as_such(arch: str, tmp_path: Path) -> None:
    """numpy, PIL and TF keep images as (n, H, W, C); the built-in image nets take
    (n, C, H, W). (n, 16, 16, 3) was "needs images of at least 4x4", and (n, 16, 16, 4)
    trained a 16-channel net on 16x4 images without a word."""
    rng = np.random.default_rng(4)
    for channels in (3, 4):
        X = rng.integers(0, 255, (40, 16, 16, channels), dtype=np.uint8)
        np.savez(tmp_path / "hwc.npz", X=X, y=np.arange(40) % 2)
        result = run(
            "train", tmp_path / "hwc.npz", "--arch", arch, "-o", tmp_path / "m.safetensors"
        )
        assert_clean_error(result, "which looks channels-last (n, H, W, C)")
        assert "X.transpose(0, 3, 1, 2)" in result.output
        assert not (tmp_path / "m.safetensors").exists()


def test_a_folder_read_is_told_image_by_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading 50,000 images takes seconds: `mark`, `train` and the commands on a model
    report each folder's read as `reading <folder>/`, in steps, ending complete."""
    from puma_cli.io import image_folder
    from puma_cli.jobs.mark import mark
    from puma_cli.jobs.remove import remove

    monkeypatch.setattr(image_folder, "TOLD_EVERY", 5)
    train = _folder(tmp_path / "train", {"cat": 12, "dog": 12})
    held = _folder(tmp_path / "held", {"cat": 4, "dog": 4})
    seen: list[tuple[str, int, int]] = []

    def told(phase: str, done: int, total: int) -> None:
        seen.append((phase, done, total))

    mark(train, tmp_path / "ids.txt", random_frac=0.2, phases=told)
    assert [s for s in seen if s[0] == "reading train/"] == [
        ("reading train/", k, 24) for k in (5, 10, 15, 20, 24)
    ]
    model = tmp_path / "m.safetensors"
    run_json("train", train, "--arch", "cnn", "-o", model, "--epochs", "2",
             "--val-frac", "0", "--device", "cpu")  # fmt: skip
    seen.clear()
    remove(model, tmp_path / "ids.txt", tmp_path / "r.safetensors", criterion_data=held,
           phases=told)  # fmt: skip
    phases = [p for p, _, _ in seen]
    assert phases.index("reading train/") < phases.index("reading held/")
    assert ("reading held/", 8, 8) in seen


def test_marking_a_folder_at_random_decodes_no_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`mark --random` needs the ids alone: the folder is listed and hashed (the same
    digest a full read takes, for the ids file's note), no image decoded (50,000 CIFAR-size
    PNGs: 13.9 s decoded, most of it decoding)."""
    from puma_cli.io import image_folder

    train = _folder(tmp_path / "train", {"cat": 12, "dog": 12})
    dataset = load_dataset(train)
    run_json("mark", train, "--random", "0.25", "--seed", "3", "-o", tmp_path / "a.txt")

    def no_decoding(*_: object) -> None:
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(image_folder, "_pixels", no_decoding)
    report = run_json("mark", train, "--random", "0.25", "--seed", "3", "-o", tmp_path / "b.txt")
    assert report["count"] == 6 and report["n"] == 24
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    assert f"sha256 {dataset.sha256}" in (tmp_path / "b.txt").read_text()
    # The folder's shape is checked all the same: an empty class folder is refused.
    (train / "bird").mkdir()
    assert_clean_error(
        run("mark", train, "--random", "0.25", "-o", tmp_path / "c.txt"), "holds no images"
    )


@pytest.mark.parametrize("arch", ["cnn", "resnet18"])
def test_grey_images_without_a_channel_axis_are_named_as_such(arch: str, tmp_path: Path) -> None:
    """MNIST as numpy and Keras keep it, (n, 28, 28): a built-in image net was refused
    with "use --arch mlp", which throws the images' shape away; the fix is one axis."""
    X = np.random.default_rng(5).integers(0, 255, (40, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "hw.npz", X=X, y=np.arange(40) % 2)
    result = run("train", tmp_path / "hw.npz", "--arch", arch, "-o", tmp_path / "m.safetensors")
    assert_clean_error(result, "needs image data (n, C, H, W)")
    assert "grey images of 12x12" in result.output and "X[:, None]" in result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_a_keras_style_archive_is_told_how_to_split(tmp_path: Path) -> None:
    """`keras.datasets` archives (mnist.npz) hold x_train, y_train, x_test, y_test; puma
    reads one split a file as X and y, and says how to write them so."""
    X = np.zeros((10, 4, 4), dtype=np.uint8)
    y = np.arange(10) % 2
    np.savez(tmp_path / "mnist.npz", x_train=X, y_train=y, x_test=X, y_test=y)
    result = run("mark", tmp_path / "mnist.npz", "--random", "2", "-o", tmp_path / "ids.txt")
    assert_clean_error(result, "has no array 'X' (arrays: x_train, y_train, x_test, y_test)")
    assert "np.savez('train.npz', X=d['x_train'], y=d['y_train'])" in result.output
    assert not (tmp_path / "ids.txt").exists()
