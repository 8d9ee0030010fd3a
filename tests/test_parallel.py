"""`torchrun` with 2 CPU processes under gloo against one process: the same model, the
same report, files written once; and the refusals (a command or method that does not
split, more processes than work), each said once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json
from safetensors.torch import load_file

from puma_cli import parallel
from puma_cli.engine import factor_fitting, factor_layers


def torchrun(
    folder: Path, processes: int, *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(processes), "-m", "puma_cli", *map(str, args)]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def puma_errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    """puma's own `Error:` lines (torchrun adds its own report of the failed processes)."""
    assert "puma_cli/" not in result.stderr, result.stderr  # no traceback from puma's code
    return [line for line in result.stderr.splitlines() if line.startswith("Error: ")]


def _one_and_two_processes(
    folder: Path, model: Path, curvature: str
) -> tuple[dict[str, torch.Tensor], ...]:
    """The model marked.txt's removal writes in one process and in two (step 1, no
    caches), and the model before it."""
    common = ["remove", "-m", model, "--marked", "marked.txt", "--curvature", curvature]
    common += ["--eta", "1", "--no-cache", "--device", "cpu", "--json"]
    for processes in (1, 2):
        result = torchrun(folder, processes, *common, "-o", f"{processes}.safetensors")
        assert result.returncode == 0, result.stderr
    return tuple(load_file(p) for p in (folder / "1.safetensors", folder / "2.safetensors", model))


@pytest.fixture
def copy(model_file: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    for name in ("radial.csv", "radial-test.csv"):
        shutil.copy(data_dir / name, tmp_path / name)
    shutil.copy(model_file, tmp_path / "model.safetensors")
    ids = [line.split(",")[0] for line in (data_dir / "radial.csv").read_text().splitlines()[1:]]
    (tmp_path / "marked.txt").write_text("\n".join(ids[:40:3]) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("curvature", "solver"), [("exact", "cg"), ("exact", "exact"), ("ekfac", "cg")]
)
def test_two_processes_remove_what_one_removes(copy: Path, curvature: str, solver: str) -> None:
    common = ["--model", "model.safetensors", "--marked", "marked.txt", "--eta", "1"]
    common += ["--curvature", curvature, "--solver", solver, "--device", "cpu"]
    one = run_json("remove", *common, "-o", "one.safetensors", "--no-cache")
    result = torchrun(copy, 2, "remove", *common, "-o", "two.safetensors", "--json")
    assert result.returncode == 0, result.stderr
    two = json.loads(result.stdout)  # one report: rank 0's
    for key in ("removed", "criterion_after", "marked_loss_after", "test_accuracy_after"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-7), key
    assert two["parameters"]["lambda_max"] == pytest.approx(one["parameters"]["lambda_max"])
    a, b = load_file(copy / "one.safetensors"), load_file(copy / "two.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
        else:
            assert torch.equal(a[name], b[name]), name
    # The caches are written once, by rank 0, and a single process reads them back.
    assert (copy / "model.influence.safetensors").exists()
    assert not list(copy.glob(".*.tmp"))
    again = run_json("remove", *common, "-o", "three.safetensors")
    assert again["cached"] is True


DIGITS = Path(__file__).resolve().parent.parent / "sample_data" / "digits-train.npz"


def test_ekfac_of_a_float32_conv_net_does_not_depend_on_the_split(tmp_path: Path) -> None:
    """EK-FAC refits its eigenvalues in the factors' eigenbasis, which near-equal
    eigenvalues (a convolution's patches) leave turned by rounding: factor sums added in
    float32 in another order moved the patch by 0.3 % (2.2e-5) between one process and
    two. Summed in float64 they are the same; one thread each, as the passes then are."""
    model = tmp_path / "cnn.safetensors"
    run_json(
        "train", DIGITS, "--arch", "cnn", "--hidden", "16", "--epochs", "3", "--lr", "0.01",
        "--optimizer", "sgd", "-o", model, "--device", "cpu",
    )  # fmt: skip
    run_json("mark", DIGITS, "--random", "0.03", "-o", tmp_path / "marked.txt")
    a, b, before = _one_and_two_processes(tmp_path, model, "ekfac")
    for name in a:
        if a[name].is_floating_point():
            moved = float((a[name] - before[name]).abs().max())
            torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-5 * moved)


def test_two_processes_guard_a_float32_removal_as_one_does(
    copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard's figures of a float32 model come from the score pass, whose rows are
    split over the processes and gathered back: two processes choose the step one does."""
    from puma_cli.engine import training_engine

    patch = tmp_path / "float32"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(
        "from puma_cli.engine import training_engine as e\ne.FLOAT64_MAX_PARAMETERS = 0\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(patch), os.environ.get("PYTHONPATH", "")])}
    common = ["--model", "model.safetensors", "--marked", "marked.txt", "--device", "cpu"]
    common += ["--curvature", "kfac", "--no-cache"]
    monkeypatch.setattr(training_engine, "FLOAT64_MAX_PARAMETERS", 0)
    one = run_json("remove", *common, "-o", "one.safetensors")
    result = torchrun(copy, 2, "remove", *common, "-o", "two.safetensors", "--json", env=env)
    assert result.returncode == 0, result.stderr
    two = json.loads(result.stdout)
    assert one["parameters"]["precision"] == two["parameters"]["precision"] == "float32"
    assert two["parameters"]["eta_scale"] == one["parameters"]["eta_scale"]
    assert two["parameters"]["upweighted"] == one["parameters"]["upweighted"]
    a, b = load_file(copy / "one.safetensors"), load_file(copy / "two.safetensors")
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_one_marked_row_splits_over_two_processes(copy: Path) -> None:
    """influence differentiates the marked rows only: one of them leaves a process idle."""
    one_id = (copy / "marked.txt").read_text().split()[0]
    (copy / "one.txt").write_text(one_id + "\n")
    common = ["--model", "model.safetensors", "--marked", "one.txt", "--eta", "1"]
    common += ["--method", "influence", "--curvature", "kfac", "--device", "cpu", "--no-cache"]
    one = run_json("remove", *common, "-o", "one.safetensors")
    result = torchrun(copy, 2, "remove", *common, "-o", "two.safetensors", "--json")
    assert result.returncode == 0, result.stderr
    two = json.loads(result.stdout)
    assert two["removed"] == one["removed"] == 1
    assert two["marked_loss_after"] == pytest.approx(one["marked_loss_after"], rel=1e-4)
    a, b = load_file(copy / "one.safetensors"), load_file(copy / "two.safetensors")
    for name in a:
        if a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_two_processes_train_the_shadows_one_trains(copy: Path) -> None:
    common = ["--model", "model.safetensors", "--targets", "marked.txt", "--attack", "lira"]
    common += ["--shadows", "4", "--device", "cpu"]
    single = copy / "single"
    single.mkdir()
    for name in ("model.safetensors", "marked.txt", "radial.csv", "radial-test.csv"):
        shutil.copy(copy / name, single / name)
    result = torchrun(copy, 2, "attack", *common, "--json")
    os.chdir(single)
    one = run_json("attack", *common)
    assert result.returncode == 0, result.stderr
    two = json.loads(result.stdout)
    assert two["auc"] == pytest.approx(one["auc"], abs=1e-9)
    caches = sorted(copy.glob("puma-shadows-*.safetensors"))
    assert len(caches) == 1
    ours, theirs = load_file(caches[0]), load_file(next(single.glob("puma-shadows-*")))
    torch.testing.assert_close(ours["phi"], theirs["phi"])


@pytest.mark.parametrize(
    ("processes", "args", "message"),
    [
        (2, ["train", "radial.csv", "-o", "t.safetensors"], "`puma train` runs in one"),
        (
            2,
            ["remove", "-m", "model.safetensors", "--marked", "marked.txt", "--method", "retrain"],
            "--method retrain does not split over processes",
        ),
        (
            3,
            [
                "attack",
                "-m",
                "model.safetensors",
                "--targets",
                "marked.txt",
                "--attack",
                "lira",
                "--shadows",
                "2",
            ],
            "give --nproc-per-node at most 2",
        ),
    ],
)
def test_what_does_not_split_is_refused_once(
    copy: Path, processes: int, args: list[str], message: str
) -> None:
    before = sorted(p.name for p in copy.iterdir())
    result = torchrun(copy, processes, *args, "--device", "cpu")
    assert result.returncode == 1
    errors = puma_errors(result)
    assert len(errors) == 1 and message in errors[0], errors
    assert result.stdout == ""
    assert sorted(p.name for p in copy.iterdir()) == before  # nothing written


def test_rank_0_reports_though_it_is_behind_the_others(copy: Path, tmp_path: Path) -> None:
    """Rank 0 a second and a half behind rank 1 (a slow import, a loaded machine): rank 1
    meets the error first, and had it exited at once torchrun would have stopped rank 0
    before it said anything (no `Error:` line at all: seen once in a full test run)."""
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '0':\n    time.sleep(1.5)\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")])}
    result = torchrun(copy, 2, "train", "radial.csv", "-o", "t.safetensors", env=env)
    assert result.returncode == 1
    errors = puma_errors(result)
    assert len(errors) == 1 and "`puma train` runs in one" in errors[0], result.stderr
    assert not (copy / "t.safetensors").exists()


def test_an_error_only_a_follower_meets_is_said_after_the_grace(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process of rank > 0 still running after the grace met an error rank 0 did not (it
    would have been stopped otherwise): it says it then."""
    from puma_cli.cli import base

    waits: list[float] = []
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(base.time, "sleep", waits.append)
    result = run("remove", "-m", copy / "gone.safetensors", "--marked", copy / "marked.txt")
    assert_clean_error(result, "gone.safetensors")
    assert waits == [base.FOLLOWER_GRACE]


def test_a_world_size_that_is_not_a_number_is_an_error(
    copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "two")
    result = run("remove", "-m", copy / "model.safetensors", "--marked", copy / "marked.txt")
    assert result.exit_code == 1
    assert "WORLD_SIZE='two' is not a whole number" in result.stderr


def test_blocks_cover_the_work_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    for world, count in [(2, 7), (3, 3), (4, 10)]:
        monkeypatch.setattr(parallel, "size", lambda world=world: world)
        blocks = []
        for me in range(world):
            monkeypatch.setattr(parallel, "rank", lambda me=me: me)
            blocks.append(parallel.block(count, "rows"))
        assert [i for b in blocks for i in b] == list(range(count))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
    with pytest.raises(parallel.PumaError, match="at most 3"):
        parallel.block(3, "shadow models")  # world 4, rank 3
    # a pass over a few rows (the marked ones) leaves the extra processes idle
    assert parallel.block(3, "rows", idle_ok=True) == range(3, 3)
    monkeypatch.setattr(parallel, "rank", lambda: 0)
    assert parallel.block(3, "rows", idle_ok=True) == range(0, 1)


def test_sampled_kronecker_factors_do_not_depend_on_the_split(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With one sampled label per row (MC), each batch draws from its own seed, so two
    processes' halves, summed by the all-reduce, give the factors one process fits. The
    world of two is simulated: "rank 1" fits its batches and keeps what it would send;
    "rank 0" fits the others and adds them at each all-reduce."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4))
    net = net.double().eval()
    names = [n for n, _ in net.named_parameters()]
    sizes = [p.numel() for p in net.parameters()]
    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    batches = [(X[i : i + 8], y[i : i + 8]) for i in range(0, 40, 8)]
    v = torch.randn(sum(sizes), dtype=torch.float64)

    def fit() -> torch.Tensor:
        curvature = factor_fitting.fit_kronecker("kfac", net, names, sizes, batches, "mc", seed=3)
        return curvature.inverse(v, 0.1)

    whole = fit()
    torch.testing.assert_close(fit(), whole)  # seeded: the same labels every time
    sent: list[torch.Tensor] = []
    monkeypatch.setattr(parallel, "block", lambda count, what: range(2, 5))
    monkeypatch.setattr(parallel, "all_reduce", lambda t: sent.append(t.clone()) or t)
    fit()
    received = iter(sent)
    monkeypatch.setattr(parallel, "block", lambda count, what: range(0, 2))
    monkeypatch.setattr(parallel, "all_reduce", lambda t: t.add_(next(received)))
    torch.testing.assert_close(fit(), whole)
    assert next(received, None) is None  # every factor was summed
    monkeypatch.setattr(parallel, "all_reduce", lambda t: t)
    assert not torch.allclose(fit(), whole)  # the halves alone differ: the sums matter


def test_scores_gather_in_row_order_in_one_process() -> None:
    rows = torch.arange(5.0)
    assert torch.equal(parallel.gather(rows), rows)
    assert np.array_equal(parallel.all_reduce(rows.clone()).numpy(), rows.numpy())


@pytest.mark.parametrize("kind", ["kfac", "ekfac"])
def test_a_wide_layer_s_rows_join_over_processes_as_one_holds_them(
    kind: str, tmp_path: Path
) -> None:
    """K-FAC of a Linear layer far wider than its fitting rows takes its input factor from
    their rows: two processes each hold half of them and join them in batch order, so
    the patch is one process's (weights to float32's rounding of the step). EK-FAC
    refits its eigenvalues in the basis of the joined rows."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(600, 1300)).astype(np.float32)
    np.savez(tmp_path / "wide.npz", X=X, y=(X[:, :3].sum(axis=1) > 0).astype(np.int64))
    model = tmp_path / "m.safetensors"
    run_json("train", tmp_path / "wide.npz", "--hidden", "4", "--epochs", "2", "-o", model,
             "--device", "cpu")  # fmt: skip
    (tmp_path / "marked.txt").write_text("".join(f"{i}\n" for i in range(0, 600, 40)))
    a, b, before = _one_and_two_processes(tmp_path, model, kind)
    assert factor_layers.through_rows(True, 1301, 540, kind)  # 540 rows trained, 60 validation
    first = float(
        (a["model.net.layers.0.weight"] - before["model.net.layers.0.weight"]).abs().max()
    )
    assert first > 0
    for name in a:
        if a[name].is_floating_point():
            moved = float((a[name] - before[name]).abs().max())
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-4 * max(moved, first))
