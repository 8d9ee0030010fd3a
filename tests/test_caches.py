"""Caches beside a model save time and nothing else: a damaged or wrong one is rebuilt and
reported, one that cannot be written is a warning, a failing run leaves none behind, and
leftovers of a killed run are swept away."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, rewrite_tensor, run, run_json
from safetensors.torch import load_file, save_file

from puma_cli.io import cache as cache_module
from puma_cli.io.atomic import sweep_stale_temporaries


@pytest.fixture
def folder(model_file: Path, data_dir: Path, tmp_path: Path) -> Path:
    shutil.copy(model_file, tmp_path / "m.safetensors")
    (tmp_path / "ids.txt").write_text("0\n2\n5\n")
    return tmp_path


def _remove(folder: Path, out: str) -> dict:
    return run_json(
        "remove", "-m", folder / "m.safetensors", "--marked", folder / "ids.txt",
        "-o", folder / out, "--device", "cpu",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "change", "note"),
    [
        ("v", lambda v: v[:-1].clone(), "does not hold v as a"),
        ("v", lambda v: torch.full_like(v, float("nan")), "holds NaN or inf"),
        ("v", lambda v: v[:, None].clone(), "does not hold v as a"),
        ("grad_c", lambda g: g[:-1].clone(), "does not hold grad_c as a"),
        ("grad_c", lambda g: torch.full_like(g, float("inf")), "holds NaN or inf"),
        ("psi", lambda s: s[:-1].clone(), "does not hold psi as a"),
        ("psi", lambda s: s.float(), "does not hold psi as a"),
        ("psi", lambda s: torch.full_like(s, float("inf")), "holds an infinite value in psi"),
        ("fit0", lambda f: f[:, :1].clone(), "does not hold fit0 as a"),
        ("fit0", lambda f: torch.full_like(f, float("-inf")), "holds an infinite value in fit0"),
    ],
)
def test_a_cache_that_fails_its_check_is_rebuilt_and_said(folder: Path, name, change, note) -> None:  # type: ignore[no-untyped-def]
    first = _remove(folder, "a.safetensors")
    assert not first["cached"] and first["warnings"] == []
    cache = folder / "m.influence.safetensors"
    rewrite_tensor(cache, name, change)
    second = _remove(folder, "b.safetensors")
    assert not second["cached"]
    assert any(note in w and "recomputed it" in w for w in second["warnings"]), second
    a, b = (run_json("eval", "-m", folder / f"{x}.safetensors", "--on", "test") for x in "ab")
    assert a == {**b, "model": a["model"]}  # no NaN reached the model
    assert _remove(folder, "c.safetensors")["cached"]  # the rebuilt cache is good


def test_a_cache_hit_gives_the_cold_result(folder: Path) -> None:
    """v and grad C both come from the cache: the cached removal writes the same model."""
    cold, cached = _remove(folder, "a.safetensors"), _remove(folder, "b.safetensors")
    assert not cold["cached"] and cached["cached"]
    a, b = (load_file(str(folder / f"{x}.safetensors")) for x in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cold["marked_loss_after"] == cached["marked_loss_after"]


def _trained_ids(folder: Path, role: int | None = None) -> list[str]:
    from puma_cli.io.checkpoint import ROLE_TRAINED, load_checkpoint
    from puma_cli.io.recorded import load_recorded_dataset

    checkpoint = load_checkpoint(folder / "m.safetensors", "cpu")
    ids = load_recorded_dataset(checkpoint, "train").ids
    wanted = ROLE_TRAINED if role is None else role
    return [str(ids[i]) for i in np.flatnonzero(checkpoint.roles == wanted)]


def test_markings_that_drop_other_validation_rows_do_not_share_v(folder: Path) -> None:
    """Marked validation rows leave the criterion: two markings that each drop one, but
    not the same one, have criteria of the same size from the same file, and the second
    must not take the first one's v (it would carry the gradient of a row the second
    request deletes)."""
    from puma_cli.io.checkpoint import ROLE_VALIDATION

    trained, held_out = _trained_ids(folder), _trained_ids(folder, ROLE_VALIDATION)
    (folder / "a.txt").write_text(f"{trained[0]}\n{held_out[0]}\n")
    (folder / "b.txt").write_text(f"{trained[0]}\n{held_out[1]}\n")

    def remove(marked: str, out: str, *extra: str) -> dict:
        return run_json(
            "remove", "-m", folder / "m.safetensors", "--marked", folder / marked,
            "-o", folder / out, *extra,
        )  # fmt: skip

    assert remove("a.txt", "a.safetensors")["skipped"]["validation"] == 1
    second = remove("b.txt", "b.safetensors")
    assert not second["cached"]
    remove("b.txt", "c.safetensors", "--no-cache")
    b, c = (load_file(str(folder / f"{x}.safetensors")) for x in "bc")
    assert all(torch.equal(b[k], c[k]) for k in b)
    assert remove("b.txt", "d.safetensors")["cached"]  # the same criterion again: a hit


def _known_scores(folder: Path) -> np.ndarray:
    return ~np.isnan(load_file(str(folder / "m.influence.safetensors"))["psi"].numpy())


def _two_markings(folder: Path, *options: str) -> Callable[..., dict]:
    """a.txt and b.txt, three trained rows each, and `remove(marked, out, *extra)`."""
    trained = _trained_ids(folder)
    (folder / "a.txt").write_text("\n".join(trained[:3]) + "\n")
    (folder / "b.txt").write_text("\n".join(trained[3:6]) + "\n")

    def remove(marked: str, out: str, *extra: str) -> dict:
        return run_json(
            "remove", "-m", folder / "m.safetensors", "--marked", folder / marked,
            "-o", folder / out, *options, *extra,
        )  # fmt: skip

    return remove


def _guard_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of each pass the guard takes of its own for the original model's figures
    (those not known from the cache or the score pass), recorded as removals run."""
    from puma_cli.unlearn import step_length

    guarded: list[int] = []
    real_per_row = step_length.per_row

    def spying(engine, direction, name, rows, compute, cache):  # type: ignore[no-untyped-def]
        def counted(at):  # type: ignore[no-untyped-def]
            guarded.append(len(at))
            return compute(at)

        chosen = counted if name == "fit0" else compute
        return real_per_row(engine, direction, name, rows, chosen, cache)

    monkeypatch.setattr(step_length, "per_row", spying)
    return guarded


def test_a_later_request_scores_only_rows_no_earlier_one_did(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scores v . g_i and the guard's figures of the original model do not depend on
    the marking: a request that marks other points finds those of the rows an earlier one
    computed in the cache, computes only the others, and writes what a request without
    the cache writes."""
    from puma_cli.engine.derivatives import InfluenceModel

    scored: list[int] = []
    original = InfluenceModel.scores_and_figures

    def counting(self, v, X=None, y=None):  # type: ignore[no-untyped-def]
        out = original(self, v, X, y)
        scored.append(int(out[0].shape[0]))
        return out

    monkeypatch.setattr(InfluenceModel, "scores_and_figures", counting)
    remove = _two_markings(folder, "--upweight-sample", "10")

    guarded = _guard_passes(monkeypatch)
    first = remove("a.txt", "a.safetensors")
    assert not first["cached"] and scored == [13]  # 3 marked, 10 candidates
    known = _known_scores(folder)
    assert known.sum() == 13
    n = known.size
    assert guarded == [n - 3]  # every remaining row (fewer than GUARD_ROWS)
    scored.clear()
    guarded.clear()
    second = remove("b.txt", "b.safetensors")
    assert second["cached"]
    assert guarded == [3]  # only the rows the first request marked
    # the new marked rows, and candidates the first sample lacked: at most one per new
    # marked row (each pushes one more row of the seeded order into the sample)
    assert len(scored) == 1 and 0 < scored[0] <= 6
    assert _known_scores(folder).sum() == 13 + scored[0]  # each stored, none twice
    cold = remove("b.txt", "c.safetensors", "--no-cache")
    assert cold["parameters"]["upweighted"] == second["parameters"]["upweighted"]
    b, c = (load_file(str(folder / f"{x}.safetensors")) for x in "bc")
    assert all(torch.allclose(b[k], c[k], rtol=1e-6, atol=1e-9) for k in b)


def test_a_float32_removal_takes_the_guards_figures_from_the_score_pass(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float32 engine's score pass yields the original model's figures on the rows it
    scores: the guard takes a pass of its own only over the rows it checks that were not
    scored, and the model written is the one the guard's own pass gives."""
    from puma_cli.engine import criterion, training_engine

    guarded = _guard_passes(monkeypatch)
    monkeypatch.setattr(training_engine, "FLOAT64_MAX_PARAMETERS", 0)  # this MLP in float32
    remove = _two_markings(folder, "--no-cache")
    shared = remove("a.txt", "a.safetensors")
    assert shared["parameters"]["precision"] == "float32"
    assert guarded == []  # every remaining row was a candidate, and scored
    remaining = len(_trained_ids(folder)) - 3
    sampled = remove("a.txt", "b.safetensors", "--upweight-sample", "10")
    assert guarded == [remaining - 10]  # the checked rows the 10 candidates leave
    guarded.clear()
    monkeypatch.setattr(criterion, "_learn", lambda *args: None)  # the guard's own pass
    own = remove("a.txt", "c.safetensors")
    assert guarded == [remaining]
    assert own["parameters"]["eta_scale"] == shared["parameters"]["eta_scale"]
    a, c = (load_file(str(folder / f"{x}.safetensors")) for x in "ac")
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert sampled["parameters"]["upweight_candidates"] == 10


def test_the_upweighted_rows_gradient_is_kept_beside_v(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PUMA's upweighting is lambda_j = clip(t psi_j, 0, cap): its gradient is t times the
    cached sum of psi_j g_j, less the rows where the two differ. A later request takes a
    backward pass over those and the marked rows only, and writes the model a request
    without the cache writes."""
    from puma_cli.engine.derivatives import InfluenceModel

    passes: list[int] = []  # rows in each weighted gradient (one backward pass each)
    original = InfluenceModel.weighted_gradient

    def counting(self, weights, X=None, y=None):  # type: ignore[no-untyped-def]
        passes.append(int(weights.shape[0]))
        return original(self, weights, X, y)

    monkeypatch.setattr(InfluenceModel, "weighted_gradient", counting)
    remove = _two_markings(folder)

    first = remove("a.txt", "a.safetensors")
    upweighted = first["parameters"]["upweighted"]
    assert upweighted > 20 and len(passes) == 2  # the sum, then the marked and the capped
    assert passes[0] >= upweighted and passes[1] < 10
    tensors = load_file(str(folder / "m.influence.safetensors"))
    (name,) = [k for k in ("sum+", "sum-") if k in tensors]
    assert tensors[name].dtype == torch.float64
    assert int(tensors[name.replace("sum", "in")].sum()) == passes[0]
    passes.clear()
    assert remove("a.txt", "a2.safetensors")["cached"]
    a, a2 = (load_file(str(folder / f"{x}.safetensors")) for x in ("a", "a2"))
    assert all(torch.equal(a[k], a2[k]) for k in a)
    assert passes == [passes[0]] and passes[0] < 10
    passes.clear()
    second = remove("b.txt", "b.safetensors")
    assert second["cached"]
    tensors = load_file(str(folder / "m.influence.safetensors"))
    if "sum+" in tensors and "sum-" in tensors:  # b's target has the other sign: its sum
        other = "in-" if name == "sum+" else "in+"
        assert passes[0] == int(tensors[other].sum())
        passes.pop(0)
    assert len(passes) == 1 and passes[0] < 20  # the marked, the moved and the capped rows
    cold = remove("b.txt", "c.safetensors", "--no-cache")
    assert cold["parameters"]["upweighted"] == second["parameters"]["upweighted"]
    b, c = (load_file(str(folder / f"{x}.safetensors")) for x in "bc")
    assert all(torch.allclose(b[k], c[k], rtol=1e-6, atol=1e-9) for k in b)
    # a damaged sum is rebuilt, with a note, and never reaches a model
    for change, note in (
        (lambda x: x[:-1].clone(), f"does not hold {name} as a"),
        (lambda x: x.float(), f"does not hold {name} as a"),
        (lambda x: torch.full_like(x, float("nan")), f"holds NaN or inf in {name}"),
    ):
        rewrite_tensor(folder / "m.influence.safetensors", name, change)
        again = remove("a.txt", "d.safetensors", "--overwrite")
        assert not again["cached"]
        assert any(note in w and "recomputed it" in w for w in again["warnings"]), again
        d = load_file(str(folder / "d.safetensors"))
        assert all(torch.allclose(a[k], d[k], rtol=1e-6, atol=1e-9) for k in a)


def test_label_debugging_fills_the_scores_removal_reuses(
    folder: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """debug-labels --score puma --full-criterion scores every row along the v removal
    solves (its default criterion, the rows the model agrees with, has a v of its own): a
    removal after it computes no score, and writes the model it writes without the cache."""
    from puma_cli.engine.derivatives import InfluenceModel

    (folder / "ids.txt").write_text("\n".join(_trained_ids(folder)[:3]) + "\n")
    run_json(
        "debug-labels", "-m", folder / "m.safetensors", "-o", folder / "ranked.csv",
        "--full-criterion",
    )  # fmt: skip
    assert _known_scores(folder).all()
    calls: list[int] = []
    monkeypatch.setattr(InfluenceModel, "scores_and_figures", lambda *a, **k: calls.append(1))
    cached = _remove(folder, "a.safetensors")
    assert cached["cached"] and calls == []
    monkeypatch.undo()
    run_json(
        "remove", "-m", folder / "m.safetensors", "--marked", folder / "ids.txt",
        "-o", folder / "b.safetensors", "--no-cache",
    )  # fmt: skip
    a, b = (load_file(str(folder / f"{x}.safetensors")) for x in "ab")
    assert all(torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-9) for k in a)


def test_a_cache_that_cannot_be_written_is_a_warning(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "write_atomically", full_disk)
    out = _remove(folder, "a.safetensors")
    assert (folder / "a.safetensors").exists()
    assert not (folder / "m.influence.safetensors").exists()
    assert any("could not write the cache" in w and "No space left" in w for w in out["warnings"])
    # on a terminal the warning goes to stderr and the table to stdout
    result = run(
        "remove", "-m", folder / "m.safetensors", "--marked", folder / "ids.txt",
        "-o", folder / "b.safetensors", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Warning: could not write the cache" in result.stderr


def test_a_cache_path_taken_by_a_directory_costs_only_time(folder: Path) -> None:
    (folder / "m.influence.safetensors").mkdir()
    out = _remove(folder, "a.safetensors")
    assert (folder / "a.safetensors").exists()
    assert any("is not a regular file" in w for w in out["warnings"])
    assert any("could not write the cache" in w for w in out["warnings"])


def test_a_failing_run_leaves_no_cache_behind(folder: Path) -> None:
    (folder / "truth.txt").write_text("no-such-id\n")  # read only after the solve
    result = run(
        "debug-labels", "-m", folder / "m.safetensors", "--truth", folder / "truth.txt",
        "--device", "cpu",
    )  # fmt: skip
    assert_clean_error(result, "no-such-id")
    assert sorted(p.name for p in folder.iterdir()) == ["ids.txt", "m.safetensors", "truth.txt"]


def test_caches_take_the_umask_mode_like_outputs(folder: Path) -> None:
    old = os.umask(0o022)
    try:
        _remove(folder, "a.safetensors")
    finally:
        os.umask(old)
    for name in ("m.influence.safetensors", "a.safetensors"):
        assert (folder / name).stat().st_mode & 0o777 == 0o644, name


def test_a_damaged_shadow_cache_is_rebuilt(folder: Path, data_dir: Path) -> None:
    args = [
        "attack", "-m", folder / "m.safetensors", "--targets", folder / "ids.txt",
        "--attack", "lira", "--shadows", "2", "--device", "cpu",
    ]  # fmt: skip
    first = run_json(*args)
    (cache,) = folder.glob("puma-shadows-*.safetensors")
    tensors = load_file(str(cache))
    save_file({**tensors, "phi": tensors["phi"][:, :-1].clone()}, str(cache))
    second = run_json(*args)
    assert any("does not hold phi" in n and "recomputed it" in n for n in second["notes"])
    assert second["auc"] == first["auc"]
    assert load_file(str(cache))["phi"].shape == tensors["phi"].shape


def test_a_killed_runs_temporary_files_are_swept(folder: Path) -> None:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = int(done.stdout)
    target = folder / "out.safetensors"
    stale = folder / f".out.safetensors.{dead}.abc123.tmp"
    live = folder / f".out.safetensors.{os.getppid()}.def456.tmp"
    other = folder / ".other.safetensors.1.x.tmp"
    for path in (stale, live, other):
        path.write_bytes(b"partial")
    assert sweep_stale_temporaries(target) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
    stale.write_bytes(b"partial")
    _remove(folder, "out.safetensors")  # any write of the same name sweeps too
    assert not stale.exists() and target.exists()
