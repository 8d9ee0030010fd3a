"""How fast, and in how much memory, puma reads data at the field's standard size.

    python benchmarks/data_loading.py [--n 50000] [--folder-n 50000] [--csv-n 200000]

Writes a synthetic 50,000 x 3 x 32 x 32 uint8 set (CIFAR's shape) as an uncompressed NPZ
(`np.savez`), a compressed one, and a folder of PNGs (`root/<class>/<image>.png`,
--folder-n images), and a table of --csv-n rows x 30 features as a CSV twice: plain (read
by numpy's C parser) and with quoted ids (read by the csv module); then loads each with
`puma_cli.io.datasets.load_dataset` in a fresh process and reports the wall time (sha256 of
the file included), the resident memory the load added and the process's peak resident
size (imports included: the same for every load where the load itself stays below it).
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
import json, resource, sys, time
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
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "load_mb": after - before, "peak_mb": peak, "before_mb": before,
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
    parser.add_argument("--folder-n", type=int, default=50_000)
    parser.add_argument("--csv-n", type=int, default=200_000)
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
        table_rows = rng.normal(size=(args.csv_n, 30))
        body = [",".join(f"{v:.6g}" for v in row) for row in table_rows]
        header = "id," + ",".join(f"f{j}" for j in range(30)) + ",label\n"
        for name, quote in (("plain.csv", ""), ("quoted.csv", '"')):
            lines = (f"{quote}r{i}{quote},{b},{i % 3}\n" for i, b in enumerate(body))
            (folder / name).write_text(header + "".join(lines))
        cases = [
            ("NPZ, np.savez (memory-mapped)", folder / "stored.npz", args.n),
            ("NPZ, np.savez_compressed (read)", folder / "compressed.npz", args.n),
            ("folder of PNGs", images, args.folder_n),
            ("CSV, 30 features (numpy's parser)", folder / "plain.csv", args.csv_n),
            ("CSV, 30 features, quoted ids (csv module)", folder / "quoted.csv", args.csv_n),
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
            f"{r['peak_mb']:.0f}",
            "yes" if r["mapped"] else "no",
        )
        for r in rows
    ]
    text = "\n".join(
        [
            "# Loading data: 3 x 32 x 32 uint8 images (CIFAR's shape), and a table as CSV",
            "",
            f"Command: {invocation(__file__)}. One fresh process per load; the time includes the "
            "file's sha256; memory is the resident size the load added (a memory map's pages count "
            "only once rows are used) and the process's peak resident size (importing puma's "
            "modules included, which sets a floor that a small load stays under).",
            "",
            table(
                [
                    "data",
                    "rows",
                    "file MB",
                    "load s",
                    "added resident MB",
                    "process peak MB",
                    "memory-mapped",
                ],
                lines,
            ),
            "",
        ]
    )
    write_results(args.out, text, rows)


if __name__ == "__main__":
    main()
