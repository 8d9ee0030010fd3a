"""How fast, and in how much memory, puma reads image data at the field's standard size.

    python benchmarks/data_loading.py [--n 50000] [--folder-n 5000]

Writes a synthetic 50,000 x 3 x 32 x 32 uint8 set (CIFAR's shape) as an uncompressed NPZ
(`np.savez`), a compressed one, and a folder of PNGs (`root/<class>/<image>.png`,
--folder-n images), then loads each with `puma_cli.io.datasets.load_dataset` in a fresh
process and reports the wall time (sha256 of the file included) and the process's peak
resident memory above a bare interpreter with numpy loaded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import RESULTS, ROOT, invocation, table, write_results

PROBE = """
import json, sys, time
from pathlib import Path
import numpy as np
from puma_cli.io.datasets import load_dataset

def resident_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")

before = resident_mb()
started = time.perf_counter()
dataset = load_dataset(Path(sys.argv[1]))
seconds = time.perf_counter() - started
after = resident_mb()
print(json.dumps({"seconds": seconds, "load_mb": after - before,
                  "shape": list(dataset.X.shape), "dtype": str(dataset.X.dtype),
                  "mapped": isinstance(dataset.X, np.memmap)}))
"""


def measure(path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True, check=True,
        cwd=ROOT,
    )  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--folder-n", type=int, default=5_000)
    parser.add_argument("--out", type=Path, default=RESULTS / "data_loading.md")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    X = rng.integers(0, 256, (args.n, 3, 32, 32), dtype=np.uint8)
    y = rng.integers(0, 10, args.n)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.savez(folder / "stored.npz", X=X, y=y)
        np.savez_compressed(folder / "compressed.npz", X=X, y=y)
        from PIL import Image

        images = folder / "images"
        for i in range(args.folder_n):
            label = images / f"class{int(y[i])}"
            label.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.moveaxis(X[i], 0, 2)).save(label / f"{i:05d}.png")
        cases = [
            ("NPZ, np.savez (memory-mapped)", folder / "stored.npz", args.n),
            ("NPZ, np.savez_compressed (read)", folder / "compressed.npz", args.n),
            ("folder of PNGs", images, args.folder_n),
        ]
        for label, path, n in cases:
            size = (
                path.stat().st_size
                if path.is_file()
                else sum(p.stat().st_size for p in path.rglob("*.png"))
            )
            figures = measure(path)
            rows.append({"case": label, "n": n, "file_mb": size / 1e6, **figures})
            print(label, figures, flush=True)
    lines = [
        (
            r["case"],
            f"{r['n']:,}",
            f"{r['file_mb']:.0f}",
            f"{r['seconds']:.2f}",
            f"{r['load_mb']:.0f}",
            "yes" if r["mapped"] else "no",
        )
        for r in rows
    ]
    text = "\n".join(
        [
            "# Loading image data: 3 x 32 x 32 uint8 images (CIFAR's shape)",
            "",
            f"Command: {invocation(__file__)}. One fresh process per load; the time includes the "
            "file's sha256; memory is the resident size the load added (a memory map's pages count "
            "only once rows are used).",
            "",
            table(
                ["data", "images", "file MB", "load s", "added resident MB", "memory-mapped"], lines
            ),
            "",
        ]
    )
    write_results(args.out, text, rows)


if __name__ == "__main__":
    main()
