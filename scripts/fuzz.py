"""Bad inputs against every command, each checked for puma's promise about files.

    python scripts/fuzz.py                       # every case (a few hundred), a report
    python scripts/fuzz.py --sample 60 --seed 1  # a random sample (what CI runs)

Each case is a command line that must be refused: a malformed, truncated, tampered or
special file (FIFO, /dev/zero, directory) in every place a command reads one, numbers
out of range, outputs that exist or are inputs, broken config files. The promise, per
case: exit code 1; exactly one line on stderr, starting `Error: `; no traceback; nothing
on stdout; no new file in the workspace (hidden temporaries and caches included); every
existing file's sha256 unchanged; and done within --timeout seconds (a hang is a
failure). Cases run in this one process (typer's CliRunner), so a few hundred take
minutes, not the hours that a fresh interpreter per case would.

Exit status 0 when every case keeps the promise, 1 otherwise; --out writes a Markdown
report and the rows beside it as JSON.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import typer.testing  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from puma_cli.cli import app  # noqa: E402

# CliRunner builds the click command from the app on every invoke (about 80 ms, as long as
# a typical case takes); the one app's command is built once.
typer.testing._get_command = functools.cache(typer.testing._get_command)  # type: ignore[attr-defined]

USER_NET = """from torch import nn


class Net(nn.Module):
    def __init__(self, in_features, n_classes):
        super().__init__()
        self.fc = nn.Linear(in_features, n_classes)

    def forward(self, x):
        return self.fc(x)
"""


@dataclass(frozen=True)
class Case:
    group: str
    name: str
    args: tuple[str, ...]


@dataclass
class Outcome:
    group: str
    name: str
    ok: bool
    why: str
    exit_code: int | None
    seconds: float
    error_line: str


class Hang(Exception):
    pass


# --- the workspace: good files, and bad ones made from them -------------------------------


def _write_all(
    folder: Path, pattern: str, made: dict[str, str] | dict[str, str | bytes]
) -> dict[str, Path]:
    """Each content to its own file, named by `pattern` with its number; name -> path."""
    paths = {}
    for i, (name, content) in enumerate(made.items()):
        path = folder / pattern.format(i)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        paths[name] = path
    return paths


def _invoke(*args: str | Path) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise RuntimeError(f"setup failed: {args}: {result.output}")


def build_workspace(folder: Path) -> dict[str, Path]:
    """Sample data, a model that records it (with Amnesiac updates) and the same model with
    five rows removed, ids and a config."""
    w = {name: folder / name for name in ("radial.csv", "radial-test.csv", "m.safetensors")}
    _invoke("make-data", "radial", "-o", w["radial.csv"], "--n", "200", "--test-frac", "0.2")
    _invoke(
        "train", w["radial.csv"], "--test", w["radial-test.csv"], "-o", w["m.safetensors"],
        "--epochs", "5", "--record-updates", "--device", "cpu",
    )  # fmt: skip
    ids = [line.split(",", 1)[0] for line in w["radial.csv"].read_text().splitlines()[1:]]
    w["ids.txt"] = folder / "ids.txt"
    w["ids.txt"].write_text("\n".join(ids[:5]) + "\n")
    w["all-ids.txt"] = folder / "all-ids.txt"
    w["all-ids.txt"].write_text("\n".join(ids) + "\n")
    w["removed.safetensors"] = folder / "removed.safetensors"  # what relink starts from
    _invoke(
        "remove", "-m", w["m.safetensors"], "--marked", w["ids.txt"],
        "-o", w["removed.safetensors"], "--device", "cpu",
    )  # fmt: skip
    w["now.csv"] = folder / "now.csv"  # the training file less those rows
    lines = w["radial.csv"].read_text().splitlines()
    w["now.csv"].write_text("\n".join([lines[0], *lines[6:]]) + "\n")
    w["existing.out"] = folder / "existing.out"
    w["existing.out"].write_text("keep me\n")
    w["folder"] = folder / "a-folder"
    w["folder"].mkdir()
    w["fifo"] = folder / "a-fifo"
    if hasattr(os, "mkfifo"):
        os.mkfifo(w["fifo"])
    return w


def bad_data_files(folder: Path, good: Path) -> dict[str, Path]:
    """Malformed data files, each wrong for any command that reads data."""
    text = good.read_text()
    lines = text.splitlines()
    header, rows = lines[0], lines[1:]
    made: dict[str, str | bytes] = {
        "empty": "",
        "header only": header + "\n",
        "binary junk": bytes(random.Random(0).randrange(256) for _ in range(600)),
        "truncated mid-row": text[: len(text) // 2].rsplit(",", 1)[0] + "\n",
        "NaN cell": "\n".join([header, rows[0].replace(",", ",nan,", 1), *rows[1:]]) + "\n",
        "inf cell": "\n".join([header, rows[0].replace(",", ",inf,", 1), *rows[1:]]) + "\n",
        "word in a feature": "\n".join([header, rows[0].replace(",", ",abc,", 1), *rows[1:]]),
        "empty feature cell": "\n".join([header, ",".join(["0", "", "1", "0"]), *rows[1:]]),
        "no label column": text.replace(",label", ",target", 1),
        "column named twice": text.replace("x1", "x0", 1),
        "repeated id": "\n".join([header, rows[0], rows[0], *rows[1:]]) + "\n",
        "negative label": "\n".join([header, rows[0].rsplit(",", 1)[0] + ",-1", *rows[1:]]),
        "fractional label": "\n".join([header, rows[0].rsplit(",", 1)[0] + ",0.5", *rows[1:]]),
        "named and numbered labels": "\n".join(
            [header, rows[0].rsplit(",", 1)[0] + ",cat", *rows[1:]]
        ),
        "cell over the csv limit": "\n".join(
            [header, rows[0].replace(",", "," + "1" * 140_000, 1), *rows[1:]]
        ),
        "NUL byte": text.replace(",", ",\x00", 1),
        "UTF-16": text.encode("utf-16"),
        "wrong row length": "\n".join([header, rows[0] + ",7", *rows[1:]]),
    }
    paths = _write_all(folder, "bad-data-{:02d}.csv", made)
    arrays: dict[str, dict[str, Any]] = {
        "npz with a pickled array": {
            "X": np.array([{"a": 1}] * 4, dtype=object),
            "y": [0, 1, 0, 1],
        },
        "npz X of 1 dim": {"X": np.zeros(4), "y": [0, 1, 0, 1]},
        "npz X of 7 dims": {"X": np.zeros((4, 1, 1, 1, 1, 2, 2)), "y": [0, 1, 0, 1]},
        "npz NaN in sequences": {
            "X": np.where(np.eye(3)[None] > 0, np.nan, 0.0).repeat(4, 0),
            "y": [0, 1, 0, 1],
        },
        "npz y of another length": {"X": np.zeros((4, 2)), "y": [0, 1]},
        "npz short ids": {"X": np.zeros((4, 2)), "y": [0, 1, 0, 1], "ids": ["a"]},
        "npz zero features": {"X": np.zeros((4, 0)), "y": [0, 1, 0, 1]},
        "npz complex X": {"X": np.zeros((4, 2), dtype=complex), "y": [0, 1, 0, 1]},
        "npz NaN in X": {"X": np.full((4, 2), np.nan), "y": [0, 1, 0, 1]},
        "npz without y": {"X": np.zeros((4, 2))},
    }
    for i, (name, npz) in enumerate(arrays.items()):
        path = folder / f"bad-data-{i:02d}.npz"
        with open(path, "wb") as handle:
            np.savez(handle, **{k: np.asarray(v) for k, v in npz.items()})  # type: ignore[arg-type]
        paths[name] = path
    fake = folder / "bad-data-zip.npz"
    fake.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    paths["PK header, not a zip"] = fake
    return paths


def model_mismatched_files(folder: Path, good: Path) -> dict[str, Path]:
    """Well-formed files that do not fit the model: renamed or extra columns, new classes."""
    text = good.read_text()
    lines = text.splitlines()
    header, rows = lines[0], lines[1:]
    made = {
        "renamed column": text.replace("x1", "height", 1),
        "extra column": "\n".join(
            [header + ",extra", *(row + ",1" for row in rows)]
        ) + "\n",
        "class names the model never saw": "\n".join(
            [header, *(row.rsplit(",", 1)[0] + (",cat" if i % 2 else ",dog")
                       for i, row in enumerate(rows))]
        ) + "\n",
        "a class the model never saw": "\n".join(
            [header, rows[0].rsplit(",", 1)[0] + ",7", *rows[1:]]
        ) + "\n",
    }  # fmt: skip
    return _write_all(folder, "misfit-{:02d}.csv", made)


def bad_ids_files(folder: Path) -> dict[str, Path]:
    made: dict[str, str | bytes] = {
        "empty ids": "",
        "only comments": "# nothing here\n\n",
        "unknown id": "0\nno-such-id\n",
        "binary ids": b"\xff\xfe\x00\x01" * 20,
    }
    return _write_all(folder, "bad-ids-{:02d}.txt", made)


def bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    """Truncated, foreign, pickled and tampered model files."""
    import torch
    from safetensors.torch import load_file, save_file

    raw = good.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + size])["__metadata__"]
    tensors = load_file(str(good))
    made: dict[str, bytes] = {
        "empty model": b"",
        "truncated at 10%": raw[: len(raw) // 10],
        "truncated at 60%": raw[: len(raw) * 6 // 10],
        "truncated by one byte": raw[:-1],
        "random bytes": bytes(random.Random(1).randrange(256) for _ in range(2000)),
        "pickle": pickle.dumps({"weights": [1, 2, 3]}),
        "header length past the end": (10**9).to_bytes(8, "little") + raw[8:100],
    }
    paths: dict[str, Path] = {}
    for i, (name, blob) in enumerate(made.items()):
        path = folder / f"bad-model-{i:02d}.safetensors"
        path.write_bytes(blob)
        paths[name] = path
    zipped = folder / "bad-model-torch.pt"
    torch.save({"w": torch.zeros(2)}, zipped)
    paths["torch.save zip"] = zipped
    # Safetensors state dicts, not checkpoints: as safetensors.torch and Hugging Face save
    # them ({"format": "pt"}, no JSON), and as `puma export` writes a deployed network.
    network = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    for name, extra in (
        ("a state dict saved as torch does", {}),
        ("a network puma export wrote", {"puma_export": json.dumps({"model": str(good)})}),
        ("an export record damaged", {"puma_export": json.dumps({"provenance": "abc"})}),
        ("an export's inputs damaged", {"puma_export": json.dumps({"inputs": {"mean": 3}})}),
    ):
        path = folder / f"bad-model-{len(paths):02d}.safetensors"
        save_file(network, str(path), metadata={"format": "pt", **extra})
        paths[name] = path

    def tampered(name: str, change: Callable[[dict[str, Any], dict[str, Any]], object]) -> None:
        m = {k: json.loads(v) for k, v in meta.items()}
        t = dict(tensors)
        change(m, t)
        path = folder / f"bad-model-{len(paths):02d}.safetensors"
        save_file(t, str(path), metadata={k: json.dumps(v) for k, v in m.items()})
        paths[name] = path

    tampered("no puma metadata", lambda m, t: [m.pop(k) for k in list(m)])
    tampered("format version as text", lambda m, t: m.update(format_version="1"))
    tampered("format from the future", lambda m, t: m.update(format_version=99))
    tampered("recipe a string", lambda m, t: m.update(recipe="adam"))
    tampered("provenance of ints", lambda m, t: m.update(provenance=[1, 2]))
    tampered("architecture unknown", lambda m, t: m["architecture"].update(name="gpt"))
    tampered("hidden width huge", lambda m, t: m["architecture"].update(hidden=[10**8]))
    tampered(
        "shards huge",
        lambda m, t: (m["architecture"].update(shards=10**7), m["recipe"].update(shards=10**7)),
    )
    tampered("class names too few", lambda m, t: m.update(class_names=["a"]))
    tampered("data record missing", lambda m, t: m["data"].pop("train"))
    tampered("sha256 not hex", lambda m, t: m["data"]["train"].update(sha256="zz"))
    tampered("metrics a list", lambda m, t: m.update(metrics=[1]))
    tampered("epochs negative", lambda m, t: m["recipe"].update(epochs=-3))
    tampered("lr NaN", lambda m, t: m["recipe"].update(lr=float("nan")))
    tampered("row roles short", lambda m, t: t.update({"rows.role": t["rows.role"][:-2]}))
    tampered("row roles out of range", lambda m, t: t.update({"rows.role": t["rows.role"] + 7}))
    tampered("weights NaN", lambda m, t: t.update({k: v * float("nan") for k, v in t.items()
                                                    if k.startswith("model.net")}))  # fmt: skip
    tampered("a weight missing", lambda m, t: t.pop(next(k for k in t if k.startswith("model."))))
    tampered(
        "weights of another shape",
        lambda m, t: t.update({k: torch.zeros(3, 3) for k in t if k.endswith("0.weight")}),
    )
    tampered("a stray tensor", lambda m, t: t.update({"model.net.extra": torch.zeros(1)}))
    return paths


def bad_configs(folder: Path) -> dict[str, Path]:
    made = {
        "config not YAML": "seed: [1, 2\n",
        "config a list": "- 1\n- 2\n",
        "config unknown option": "train:\n  epochz: 3\n",
        "config wrong type": "seed: many\n",
        "config seed out of range": "seed: -5\n",
    }
    return _write_all(folder, "bad-config-{:02d}.yaml", made)


# --- the cases ------------------------------------------------------------------------------


def build_cases(folder: Path) -> list[Case]:
    w = build_workspace(folder)
    model, ids, data, test = w["m.safetensors"], w["ids.txt"], w["radial.csv"], w["radial-test.csv"]
    out = folder / "new-output"
    specials = {"a directory": w["folder"], "missing file": folder / "nope.csv"}
    if w["fifo"].exists():
        specials["a FIFO"] = w["fifo"]
    if Path("/dev/zero").exists():
        specials["/dev/zero"] = Path("/dev/zero")
    cases: list[Case] = []

    def add(group: str, name: str, *args: str | Path) -> None:
        cases.append(Case(group, name, tuple(str(a) for a in args)))

    # Data files, in every place a command reads one.
    data_places: dict[str, Callable[[Path], list[str | Path]]] = {
        "train DATA": lambda f: ["train", f, "-o", out, "--epochs", "1"],
        "train --test": lambda f: ["train", data, "--test", f, "-o", out, "--epochs", "1"],
        "train --val": lambda f: ["train", data, "--val", f, "-o", out, "--epochs", "1"],
        "mark DATA": lambda f: ["mark", f, "--random", "0.1", "-o", out],
        "relink --data": lambda f: ["relink", w["removed.safetensors"], "--data", f, "-o", out],
        "eval --data": lambda f: ["eval", "-m", model, "--data", f],
        "remove --criterion-data": lambda f: [
            "remove",
            "-m",
            model,
            "--marked",
            ids,
            "--criterion-data",
            f,
            "-o",
            out,
        ],
        "attack --nonmembers": lambda f: [
            "attack",
            "-m",
            model,
            "--targets",
            ids,
            "--nonmembers",
            f,
        ],
        "calibrate --criterion-data": lambda f: [
            "calibrate",
            "-m",
            model,
            "--criterion-data",
            f,
            "-o",
            out,
        ],
    }
    bad_data = {**bad_data_files(folder, data), **specials}
    for place, make in data_places.items():
        for name, path in bad_data.items():
            add(f"data: {place}", name, *make(path))
    misfits = model_mismatched_files(folder, test)
    for place in ("eval --data", "remove --criterion-data", "attack --nonmembers", "train --test"):
        for name, path in misfits.items():
            add(f"data: {place}", name, *data_places[place](path))

    # Ids files.
    id_places: dict[str, Callable[[Path], list[str | Path]]] = {
        "remove --marked": lambda f: ["remove", "-m", model, "--marked", f, "-o", out],
        "attack --targets": lambda f: ["attack", "-m", model, "--targets", f],
        "eval --ids": lambda f: ["eval", "-m", model, "--data", data, "--ids", f],
        "debug-labels --truth": lambda f: ["debug-labels", "-m", model, "--truth", f],
        "train --group-ids": lambda f: [
            "train",
            data,
            "--record-updates",
            "--group-ids",
            f,
            "-o",
            out,
            "--epochs",
            "1",
        ],
    }
    for place, make in id_places.items():
        for name, path in {**bad_ids_files(folder), **specials}.items():
            add(f"ids: {place}", name, *make(path))
    add("ids: remove --marked", "every trained row", "remove", "-m", model, "--marked",
        w["all-ids.txt"], "-o", out)  # fmt: skip

    # Model files.
    model_places: dict[str, Callable[[Path], list[str | Path]]] = {
        "info": lambda f: ["info", f],
        "eval": lambda f: ["eval", "-m", f, "--on", "test"],
        "remove": lambda f: ["remove", "-m", f, "--marked", ids, "-o", out],
        "attack": lambda f: ["attack", "-m", f, "--targets", ids],
        "debug-labels": lambda f: ["debug-labels", "-m", f],
        "calibrate": lambda f: ["calibrate", "-m", f, "-o", out],
        "export": lambda f: ["export", f, "-o", out],
        "relink": lambda f: ["relink", f, "--data", data, "-o", out],
    }
    models = {**bad_checkpoints(folder, model), **{k: v for k, v in specials.items()}}
    described = {"a network puma export wrote"}  # `info` describes it: no bad input there
    for place, make in model_places.items():
        for name, path in models.items():
            if not (place == "info" and name in described):
                add(f"model: {place}", name, *make(path))

    # Numbers out of range, per command.
    numbers = {
        "make-data": [("--n", "0"), ("--n", "100000000000"), ("--noise", "nan"),
                      ("--noise", "-1"), ("--flip-labels", "1.5"), ("--test-frac", "1"),
                      ("--seed", "-1"), ("--seed", "99999999999")],
        "train": [("--epochs", "0"), ("--lr", "0"), ("--lr", "nan"), ("--batch-size", "0"),
                  ("--weight-decay", "-1"), ("--val-frac", "1.5"), ("--shards", "0"),
                  ("--slices", "0"), ("--hidden", "0,4"), ("--seed", "-2")],
        "mark": [("--clusters", "0"), ("--random", "1.5"), ("--random", "-0.1"),
                 ("--class", "99")],
        "remove": [("--eta", "-1"), ("--eta", "nan"), ("--damping", "0"), ("--damping", "inf"),
                   ("--lambda-cap", "0"), ("--upweight-sample", "-1"),
                   ("--max-accuracy-drop", "nan"), ("--curvature-samples", "-1"),
                   ("--curvature-samples", "100000000000")],
        "attack": [("--shadows", "1"), ("--shadows", "100000")],
        "debug-labels": [("-k", "-1"), ("--damping", "nan")],
        "calibrate": [("--bins", "0"), ("--bins", "10000000"), ("--max-accuracy-drop", "-1"),
                      ("--lambda-cap", "0"), ("-k", "100000")],
        "eval": [("--bins", "0"), ("--on", "elsewhere")],
    }  # fmt: skip
    base: dict[str, list[str | Path]] = {
        "make-data": ["make-data", "radial", "-o", out],
        "train": ["train", data, "-o", out, "--epochs", "1"],
        "mark": ["mark", data, "-o", out],
        "remove": ["remove", "-m", model, "--marked", ids, "-o", out],
        "attack": ["attack", "-m", model, "--targets", ids, "--attack", "lira"],
        "debug-labels": ["debug-labels", "-m", model],
        "calibrate": ["calibrate", "-m", model, "-o", out],
        "eval": ["eval", "-m", model],
    }
    for command, pairs in numbers.items():
        for flag, value in pairs:
            if command == "mark" and flag == "--class":
                add(f"options: {command}", f"{flag} {value}", *base[command], flag, value)
            else:
                extra = ["--random", "0.1"] if command == "mark" and flag == "--clusters" else []
                add(f"options: {command}", f"{flag} {value}", *base[command], *extra, flag, value)

    # Outputs: existing, an input, a directory, in a missing folder.
    # Each writer with the inputs it reads, named or recorded in the model: an output onto
    # any of them is refused even with --overwrite (make-data reads nothing).
    model_inputs = {"the model": model, "the training data": data, "the test data": test}
    writers: dict[str, tuple[Callable[[Path], list[str | Path]], dict[str, Path]]] = {
        "make-data": (lambda o: ["make-data", "radial", "-o", o], {}),
        "train": (
            lambda o: ["train", data, "--test", test, "-o", o, "--epochs", "1"],
            {"the training data": data, "the test data": test},
        ),
        "mark": (lambda o: ["mark", data, "--random", "0.1", "-o", o], {"the data": data}),
        "remove": (lambda o: ["remove", "-m", model, "--marked", ids, "-o", o], model_inputs),
        "attack --plot": (
            lambda o: ["attack", "-m", model, "--targets", ids, "--plot", o],
            model_inputs,
        ),
        "debug-labels -o": (lambda o: ["debug-labels", "-m", model, "-o", o], model_inputs),
        "calibrate": (lambda o: ["calibrate", "-m", model, "-o", o], model_inputs),
        "relink": (
            lambda o: ["relink", w["removed.safetensors"], "--data", w["now.csv"], "-o", o],
            {
                "the model": w["removed.safetensors"],
                "the recorded training data": data,
                "the new training data": w["now.csv"],
            },
        ),
    }
    for command, (make, inputs) in writers.items():
        add(f"outputs: {command}", "exists, no --overwrite", *make(w["existing.out"]))
        add(f"outputs: {command}", "is a directory", *make(w["folder"]))
        add(f"outputs: {command}", "folder missing", *make(folder / "no-such-dir" / "x"))
        if command in ("remove", "attack --plot"):
            add(f"outputs: {command}", "onto its ids", *make(ids), "--overwrite")
        for name, path in inputs.items():
            add(f"outputs: {command}", f"onto {name}", *make(path), "--overwrite")
    sidecar = folder / "m.updates.safetensors"
    add("outputs: remove", "onto the Amnesiac sidecar", "remove", "-m", model, "--marked", ids,
        "--method", "amnesiac", "-o", sidecar, "--overwrite")  # fmt: skip
    add("outputs: debug-labels -o", "onto its --truth", "debug-labels", "-m", model,
        "--truth", ids, "-o", ids, "--overwrite")  # fmt: skip

    # Architecture files and imported weights.
    net = USER_NET
    archs = _write_all(folder, "arch-{:02d}.py", {
        "no such class": net.replace("class Net", "class Other"),
        "raises on import": "raise ImportError('no torch here')\n",
        "raises on construction": net.replace("super().__init__()", "raise TypeError('x')"),
        "wrong number of outputs": net.replace("n_classes)", "n_classes + 3)"),
        "fails on the data's shape": net.replace("(in_features,", "(in_features + 1,"),
        "not a module": "class Net:\n    pass\n",
    })  # fmt: skip
    archs["missing file"] = folder / "no-such-arch.py"
    for name, path in archs.items():
        add("arch: train --arch", name, "train", data, "--arch", f"{path}:Net", "-o", out,
            "--epochs", "1")  # fmt: skip
    for name, args in {"not JSON": "{width: 2}", "not an object": "[1]",
                       "unknown argument": '{"depth": 3}'}.items():  # fmt: skip
        add("arch: train --arch-args", name, "train", data, "--arch", "mlp", "--arch-args",
            args, "-o", out, "--epochs", "1")  # fmt: skip
    import torch
    from safetensors.torch import save_file

    good_weights = {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)}
    weights = {
        "another architecture": {"fc.weight": torch.zeros(3, 2), "fc.bias": torch.zeros(3)},
        "a tensor missing": {"fc.weight": torch.zeros(2, 2)},
        "a stray tensor": {**good_weights, "fc.extra": torch.zeros(1)},
        "NaN weights": {**good_weights, "fc.bias": torch.full((2,), float("nan"))},
    }
    net_file = folder / "arch-good.py"
    net_file.write_text(net)
    for i, (name, tensors) in enumerate(weights.items()):
        path = folder / f"weights-{i:02d}.safetensors"
        save_file(tensors, str(path))
        add("arch: import", name, "import", path, "--arch", f"{net_file}:Net", "--data", data,
            "-o", out)  # fmt: skip
    for name, path in {**{k: v for k, v in models.items() if "truncated" in k or k == "pickle"},
                       **specials}.items():  # fmt: skip
        add("arch: import", f"weights: {name}", "import", path, "--arch", f"{net_file}:Net",
            "--data", data, "-o", out)  # fmt: skip

    # Folders of images.
    from PIL import Image

    folders = {}
    for name in ("an empty class folder", "an unreadable image", "images of two sizes"):
        root = folder / f"images-{len(folders)}"
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / label / "0.png")
        folders[name] = root
    (folders["an empty class folder"] / "c").mkdir()
    (folders["an unreadable image"] / "b" / "0.png").write_bytes(b"not a png")
    Image.new("RGB", (9, 8)).save(folders["images of two sizes"] / "b" / "1.png")
    for name, root in folders.items():
        add("data: train DATA", f"folder: {name}", "train", root, "--arch", "cnn", "-o", out)
        add("data: eval --data", f"folder: {name}", "eval", "-m", model, "--data", root)

    # Config files.
    configs = {**bad_configs(folder), **specials}
    for name, path in configs.items():
        readers: list[list[str | Path]] = [["train", data, "-o", out], ["info", model],
                                            ["eval", "-m", model]]  # fmt: skip
        for reader in readers:
            if name == "config unknown option" and reader[0] != "train":
                continue  # its `train:` section is not theirs to read
            add(f"config: {reader[0]}", name, *reader, "--config", path)
    return cases


# --- running and judging ----------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under `folder`, hidden ones included: its sha256 (regular files) or kind."""
    seen: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            seen[rel] = "link"
        elif path.is_dir():
            seen[rel] = "dir"
        elif path.is_file():
            seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            seen[rel] = "special"
    return seen


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"still running after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def judge(case: Case, folder: Path, pristine: Path, timeout: float) -> Outcome:
    before = snapshot(folder)
    started = time.perf_counter()
    code: int | None = None
    stdout = stderr = ""
    try:
        with deadline(timeout):
            result = CliRunner().invoke(app, list(case.args))
        code = result.exit_code
        stdout, stderr = result.stdout, result.stderr
        if isinstance(result.exception, Hang):  # the runner caught the alarm's exception
            raise result.exception
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            stderr += f"\nTraceback: {type(result.exception).__name__}: {result.exception}"
    except Hang as exc:
        code, stderr = None, f"Traceback: hang: {exc}"
    seconds = time.perf_counter() - started
    after = snapshot(folder)
    lines = [line for line in stderr.splitlines() if line.strip()]
    problems = []
    if "Traceback" in stderr or "Traceback" in stdout:
        problems.append("traceback: " + stderr.strip().splitlines()[-1][:160])
    if code != 1:
        problems.append(f"exit code {code}")
    if len(lines) != 1 or not lines[0].startswith("Error: "):
        problems.append(f"{len(lines)} stderr lines, not one Error: line")
    if stdout.strip():
        problems.append("wrote to stdout")
    new = sorted(set(after) - set(before))
    if new:
        problems.append(f"new files: {', '.join(new[:3])}")
    changed = sorted(k for k in before if k in after and before[k] != after[k])
    if changed or set(before) - set(after):
        problems.append(
            f"inputs changed or gone: {', '.join(changed or sorted(set(before) - set(after)))}"
        )
    if problems:
        restore(folder, pristine, before)
    return Outcome(
        case.group, case.name, not problems, "; ".join(problems), code, round(seconds, 3),
        lines[0][:300] if lines else "",
    )  # fmt: skip


def restore(folder: Path, pristine: Path, before: dict[str, str]) -> None:
    """Put the workspace back as it was, so one broken case cannot spoil the next."""
    for rel in sorted(set(snapshot(folder)) - set(before), reverse=True):
        path = folder / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for rel, digest in before.items():
        path, copy = folder / rel, pristine / rel
        if len(digest) == 64 and copy.is_file():
            current = snapshot(folder).get(rel)
            if current != digest:
                shutil.copy2(copy, path)


def report(outcomes: list[Outcome], seconds: float, invocation: str) -> str:
    broken = [o for o in outcomes if not o.ok]
    groups = Counter(o.group.split(":")[0] for o in outcomes)
    bad_groups = Counter(o.group.split(":")[0] for o in broken)
    lines = [
        "# Bad-input fuzz: puma's promise about files, case by case",
        "",
        f"Command: `{invocation}`. {len(outcomes)} cases in {seconds:.0f} s "
        f"(slowest {max(o.seconds for o in outcomes):.1f} s); "
        f"**{len(outcomes) - len(broken)} kept the promise, {len(broken)} broke it**.",
        "",
        "The promise: exit 1, one `Error:` line on stderr, no traceback, nothing on stdout, "
        "no new file, every existing file unchanged, no hang.",
        "",
        "| class | cases | broken |",
        "|---|---|---|",
        *(f"| {g} | {n} | {bad_groups.get(g, 0)} |" for g, n in sorted(groups.items())),
    ]
    if broken:
        lines += ["", "## Broken", "", "| where | case | what went wrong |", "|---|---|---|"]
        lines += [f"| {o.group} | {o.name} | {o.why} |" for o in broken]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sample", type=int, default=0, help="Run this many random cases.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="Seconds per case.")
    parser.add_argument("--out", type=Path, help="Markdown report (rows beside it as JSON).")
    parser.add_argument("--verbose", action="store_true", help="Print every case.")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="puma-fuzz-") as tmp:
        folder = Path(tmp) / "work"
        folder.mkdir()
        cases = build_cases(folder)
        if args.sample:
            cases = random.Random(args.seed).sample(cases, min(args.sample, len(cases)))
        pristine = Path(tmp) / "pristine"
        shutil.copytree(
            folder, pristine, ignore=lambda d, names: [n for n in names if n == "a-fifo"]
        )
        outcomes = []
        for case in cases:
            outcome = judge(case, folder, pristine, args.timeout)
            outcomes.append(outcome)
            if args.verbose or not outcome.ok:
                mark = "ok " if outcome.ok else "BROKEN"
                print(f"{mark} [{case.group}] {case.name}: {outcome.why or outcome.error_line}",
                      flush=True)  # fmt: skip
    seconds = time.perf_counter() - started
    invocation = " ".join(["python", "scripts/fuzz.py", *sys.argv[1:]])
    text = report(outcomes, seconds, invocation)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        rows = [vars(o) for o in outcomes]
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
