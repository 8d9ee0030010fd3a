"""Progress: the engine tells its caller of every long phase (factor fitting, scores, each
solve); the console draws them on a terminal and stays silent otherwise and under --json."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from conftest import run
from rich.console import Console

from puma_cli import console
from puma_cli.jobs.remove import remove
from puma_cli.unlearn import RemovalOptions


def _workspace(model_file: Path, data_dir: Path, tmp_path: Path) -> Path:
    shutil.copy(model_file, tmp_path / "m.safetensors")
    rows = (data_dir / "radial.csv").read_text().splitlines()[1:9]
    (tmp_path / "ids.txt").write_text("".join(r.split(",", 1)[0] + "\n" for r in rows))
    return tmp_path


FIGURES = {"figures before", "figures after"}  # the job's, around any method


@pytest.mark.parametrize(("curvature", "expected"), [
    ("exact", {"held-out gradient", "solve", "scores", "gradients"}),
    ("kfac", {"fitting kfac factors", "held-out gradient", "scores", "gradients"}),
    ("ekfac", {"fitting ekfac factors", "held-out gradient", "scores", "gradients"}),
])  # fmt: skip
def test_the_engine_reports_its_phases(
    curvature: str, expected: set[str], model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Every pass over rows a removal makes is told: the factors batch by batch, grad C,
    the solve, the scores, the patch's gradients, and each step size the guard looks at,
    chunk by chunk; each ends complete, also a look a failure settled early."""
    folder = _workspace(model_file, data_dir, tmp_path)
    seen: list[tuple[str, int, int]] = []
    out = remove(
        folder / "m.safetensors",
        folder / "ids.txt",
        folder / "r.safetensors",
        options=RemovalOptions(curvature=curvature),
        phases=lambda phase, done, total: seen.append((phase, done, total)),
    )
    phases = {phase for phase, _, _ in seen}
    looks = {p for p in phases if p.startswith("guard: eta ")}
    assert phases == expected | looks | FIGURES
    # the step sizes looked at: up to the one kept and the first that failed past it
    kept = out.parameters["eta_scale"]
    assert f"guard: eta {kept:g}/N" in looks and f"guard: eta {2 * kept:g}/N" in looks
    assert all(0 <= done <= total for _, done, total in seen)
    for phase in phases:  # each phase ends complete
        done, total = next((d, t) for p, d, t in reversed(seen) if p == phase)
        assert done == total
    if curvature != "exact":  # batch by batch (EK-FAC: two passes), not only begun and done
        fitting = [(d, t) for p, d, t in seen if p.startswith("fitting")]
        assert len(fitting) > 2 and fitting[-1][1] > 1


def test_ssd_and_self_influence_report_their_passes(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    """SSD's importances (per-row gradients over every row, then the marked ones) and
    self-influence's dense Hessian (one HVP a column) and per-row gradients are told."""
    from puma_cli.jobs.debug_labels import debug_labels

    folder = _workspace(model_file, data_dir, tmp_path)
    for method, run_it in [
        ("ssd", lambda told: remove(
            folder / "m.safetensors", folder / "ids.txt", folder / "r.safetensors",
            method="ssd", phases=told,
        )),
        ("self-influence", lambda told: debug_labels(
            folder / "m.safetensors", score="self-influence", use_cache=False, phases=told,
        )),
    ]:  # fmt: skip
        seen: list[tuple[str, int, int]] = []
        run_it(lambda phase, done, total, seen=seen: seen.append((phase, done, total)))
        phases = {phase for phase, _, _ in seen}
        wanted = (
            {"importance: every row", "importance: marked rows"}
            if method == "ssd"
            else {"dense Hessian", "per-row gradients"}
        )
        assert wanted <= phases, (method, phases)
        for phase in wanted:
            done, total = next((d, t) for p, d, t in reversed(seen) if p == phase)
            assert done == total > 0
        if method == "self-influence":  # one tick per column of H
            columns = [d for p, d, _ in seen if p == "dense Hessian"]
            assert columns == list(range(1, len(columns) + 1)) and len(columns) > 100


Seen = list[tuple[str, int, int]]


def _ends(seen: Seen, phase: str) -> list[tuple[int, int]]:
    """The (done, total) told of one phase; it grows and ends complete."""
    told = [(d, t) for p, d, t in seen if p == phase]
    assert told, (phase, {p for p, _, _ in seen})
    assert [d for d, _ in told] == sorted({d for d, _ in told}), told  # strictly growing
    assert len({t for _, t in told}) == 1 and told[-1][0] == told[-1][1], told
    return told


def test_the_model_figures_are_told_as_one_pass(
    model_file: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The figures a command measures (remove before and after, train, eval) and the
    attacked model's scores are each one phase over every row they predict, so a large
    set is not minutes of silence."""
    from puma_cli.jobs.attack import SCORING, attack
    from puma_cli.jobs.evaluate import evaluate_model
    from puma_cli.jobs.train import train
    from puma_cli.models.recipe import TrainRecipe

    folder = _workspace(model_file, data_dir, tmp_path)
    seen: Seen = []
    remove(folder / "m.safetensors", folder / "ids.txt", folder / "r.safetensors",
           method="finetune", phases=lambda *told: seen.append(told))  # fmt: skip
    before, after = _ends(seen, "figures before"), _ends(seen, "figures after")
    # the criterion set, the 8 marked rows and the 40 test rows: one batch each here
    assert before == after and len(before) == 3 and before[-1][0] > 48

    seen = []
    report = train(
        data_dir / "radial.csv",
        folder / "t.safetensors",
        TrainRecipe(epochs=2),
        test=data_dir / "radial-test.csv",
        phases=lambda *told: seen.append(told),
    )
    assert _ends(seen, "figures")[-1] == (200, 200)  # 144 trained + 16 validation + 40 test
    assert report.n_train == 144

    seen = []
    evaluate_model(model_file, on="test", phases=lambda *told: seen.append(told))
    assert _ends(seen, "figures") == [(40, 40)]

    seen = []
    attack(model_file, folder / "ids.txt", method="loss", phases=lambda *told: seen.append(told))
    assert _ends(seen, SCORING)[-1] == (192, 192)  # 144 trained, 8 targets, 40 non-members


def test_bars_are_drawn_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    screen = io.StringIO()
    monkeypatch.setattr(
        console, "_stderr", lambda: Console(file=screen, force_terminal=True, width=80)
    )
    with console.phase_progress(enabled=True) as update:
        assert update is not None
        for i in range(1, 4):
            update("scores", i, 3)
        update("solve", 5, 200)
        update("solve", 200, 200)
    assert "scores" in screen.getvalue() and "solve" in screen.getvalue()
    with console.phase_progress(enabled=False) as update:
        assert update is None
    monkeypatch.setattr(console, "_stderr", lambda: Console(file=io.StringIO()))
    with console.phase_progress(enabled=True) as update:
        assert update is None  # not a terminal


def test_epochs_and_phases_share_one_display(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich draws one live display at a time: a command that trains and measures (train,
    remove --method retrain, attack's shadows) draws both on one Progress."""
    screen = io.StringIO()
    monkeypatch.setattr(
        console, "_stderr", lambda: Console(file=screen, force_terminal=True, width=100)
    )
    with console.bars(enabled=True) as shown:
        epochs, phases = shown.epochs("training radial"), shown.phases
        assert epochs is not None and phases is not None
        for epoch in (1, 2):
            epochs(epoch, 2, 0.5 / epoch)
        phases("figures", 100, 200)
        phases("figures", 200, 200)
        phases("figures", 150, 300)  # a second pass of the same name: a bar of its own
        phases("figures", 300, 300)
        shadows = shown.models("shadow models")
        assert shadows is not None
        shadows(3, 4, 0.0)  # attack's shadows: a count of models, no epochs, no loss
    drawn = screen.getvalue()
    assert "training radial" in drawn and "epoch 2/2 loss 0.2500" in drawn
    assert "figures" in drawn and "200/200" in drawn and "300/300" in drawn
    assert shown._bar is not None  # the second pass drew a bar of its own
    assert [task.description for task in shown._bar.tasks].count("figures") == 2
    assert "shadow models" in drawn and "3/4" in drawn and "loss 0.0000" not in drawn
    with console.bars(enabled=False) as shown:
        assert shown.epochs("training") is None and shown.phases is None
        assert shown.models("shadow models") is None


def test_json_output_holds_no_progress(model_file: Path, data_dir: Path, tmp_path: Path) -> None:
    folder = _workspace(model_file, data_dir, tmp_path)
    result = run("remove", "-m", folder / "m.safetensors", "--marked", folder / "ids.txt",
                 "--curvature", "kfac", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") == 1 and result.stdout.startswith("{")
    assert "factors" not in result.stderr
