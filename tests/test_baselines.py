"""The baselines behind `puma remove --method`: amnesiac, sisa and ssd, and their refusals."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run, run_json
from safetensors.torch import load as load_safetensors

from puma_cli.engine import derivatives
from puma_cli.engine.derivatives import InfluenceModel
from puma_cli.io.checkpoint import load_checkpoint, tensor_bytes
from puma_cli.io.datasets import load_dataset
from puma_cli.io.ids import read_ids
from puma_cli.models.architectures import Architecture, Classifier, ShardEnsemble
from puma_cli.models.recipe import TrainRecipe
from puma_cli.models.shards import SisaPlan, _train_shard, train_sisa, unlearn_sisa
from puma_cli.models.training import train_classifier
from puma_cli.unlearn.amnesiac import UpdateRecorder, subtract_batches
from puma_cli.unlearn.ssd import dampen, fisher_diagonal

EPOCHS = ["--epochs", "12", "--device", "cpu"]


@pytest.fixture(scope="module")
def work(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A marking (one k-means cluster of class 1) and three trained models on radial."""
    folder = tmp_path_factory.mktemp("baselines")
    data, test = data_dir / "radial.csv", data_dir / "radial-test.csv"
    run_json("mark", data, "--class", "1", "-o", folder / "ids.txt")
    common = [data, "--test", test, *EPOCHS]
    run_json("train", *common, "-o", folder / "plain.safetensors")
    run_json("train", *common, "-o", folder / "amn.safetensors", "--record-updates")
    run_json(
        "train",
        *common,
        "-o",
        folder / "amn-ordered.safetensors",
        "--record-updates",
        "--group-ids",
        folder / "ids.txt",
    )
    run_json("train", *common, "-o", folder / "sisa.safetensors", "--shards", "4", "--slices", "3")
    return folder


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).model.state_dict()


# --- amnesiac ------------------------------------------------------------------------------


def test_amnesiac_with_no_marked_batch_returns_the_original_weights() -> None:
    torch.manual_seed(0)
    model = Classifier(Architecture("mlp", (2,), 2, (8,)))
    updates = torch.randn(5, sum(p.numel() for p in model.parameters()))
    batch_rows = np.arange(20).reshape(5, 4)
    same, hit = subtract_batches(model, updates, batch_rows, np.array([100, 101]))
    assert not hit.any()
    for a, b in zip(model.state_dict().values(), same.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_recorded_updates_sum_to_the_whole_training_run(data_dir: Path) -> None:
    """Subtracting every recorded step gives back the initial weights: the record is whole."""
    data = load_dataset(data_dir / "radial.csv")
    recipe = TrainRecipe(hidden=(8,), epochs=3, seed=4)
    recorder = UpdateRecorder(np.arange(len(data)), recipe.batch_size)
    model = train_classifier(data, recipe, 2, on_step=recorder)
    torch.manual_seed(recipe.seed)
    initial = Classifier(model.arch)
    rows = np.arange(len(data))
    tensors = recorder.tensors()
    undone, hit = subtract_batches(model, tensors["updates"], tensors["batch_rows"].numpy(), rows)
    assert hit.all() and hit.size == 3 * math.ceil(len(data) / recipe.batch_size)
    for p, q in zip(undone.net.parameters(), initial.net.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-5)


def test_amnesiac_ordered_removes_one_batch_per_epoch_and_keeps_accuracy(work: Path) -> None:
    out = run_json(
        "remove",
        "-m",
        work / "amn-ordered.safetensors",
        "--marked",
        work / "ids.txt",
        "--method",
        "amnesiac",
        "--device",
        "cpu",
    )
    marked = len(read_ids(work / "ids.txt"))
    assert marked <= 32  # fits one batch, so grouping puts it in one batch per epoch
    assert out["parameters"]["steps_removed"] == 12
    random = run_json(
        "remove",
        "-m",
        work / "amn.safetensors",
        "--marked",
        work / "ids.txt",
        "--method",
        "amnesiac",
        "--device",
        "cpu",
        "-o",
        work / "amn-random.removed.safetensors",
    )
    assert random["parameters"]["steps_removed"] > out["parameters"]["steps_removed"]
    assert out["test_accuracy_after"] >= random["test_accuracy_after"]
    info = run_json("info", work / "amn.safetensors")
    assert info["sidecars"]["updates"]["n"] == random["parameters"]["steps"]


def test_amnesiac_refusals(data_dir: Path, work: Path, tmp_path: Path) -> None:
    args = ["--marked", work / "ids.txt", "--method", "amnesiac", "--device", "cpu"]
    out = tmp_path / "o.safetensors"
    assert_clean_error(
        run("remove", "-m", work / "plain.safetensors", *args, "-o", out), "--record-updates"
    )
    chained = tmp_path / "puma.safetensors"
    run_json("remove", "-m", work / "amn.safetensors", "--marked", work / "ids.txt", "-o", chained)
    other = tmp_path / "other.txt"
    run_json("mark", data_dir / "radial.csv", "--random", "0.1", "-o", other)
    result = run("remove", "-m", chained, "--marked", other, "--method", "amnesiac", "-o", out)
    assert_clean_error(result, "as trained")
    sidecar = work / "amn.updates.safetensors"
    original = sidecar.read_bytes()
    try:
        sidecar.write_bytes(original[:-8] + b"\0" * 8)
        assert_clean_error(
            run("remove", "-m", work / "amn.safetensors", *args, "-o", out), "has changed"
        )
        sidecar.unlink()
        assert_clean_error(
            run("remove", "-m", work / "amn.safetensors", *args, "-o", out), "is missing"
        )
    finally:
        sidecar.write_bytes(original)
    assert not out.exists()


def test_train_option_conflicts(data_dir: Path, work: Path, tmp_path: Path) -> None:
    data = data_dir / "radial.csv"
    out = tmp_path / "m.safetensors"
    assert_clean_error(
        run("train", data, "-o", out, *EPOCHS, "--record-updates", "--shards", "3"),
        "--record-updates",
    )
    assert_clean_error(
        run("train", data, "-o", out, *EPOCHS, "--group-ids", work / "ids.txt"), "--group-ids"
    )
    assert_clean_error(run("train", data, "-o", out, *EPOCHS, "--slices", "20"), "--slices")
    assert not out.exists() and not (tmp_path / "m.updates.safetensors").exists()


def test_an_existing_sidecar_needs_overwrite(data_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "m.updates.safetensors").write_text("keep me")
    result = run(
        "train", data_dir / "radial.csv", "-o", tmp_path / "m.safetensors", *EPOCHS,
        "--record-updates",
    )  # fmt: skip
    assert_clean_error(result, "m.updates.safetensors")
    assert (tmp_path / "m.updates.safetensors").read_text() == "keep me"


def test_a_record_too_large_for_the_machine_is_refused_at_the_first_step(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--record-updates holds steps x parameters floats until training ends: a record
    past half the memory, or past the disk's free space, is refused with its size before
    the rest of training, nothing written. (A ResNet-18 of width 64 trained 20 epochs on
    45,000 images in batches of 128 would record 315 GB.)"""
    import puma_cli.jobs.train as train_job

    out = tmp_path / "m.safetensors"
    args = ["train", data_dir / "radial.csv", "-o", out, *EPOCHS, "--record-updates"]
    steps: list[int] = []
    real_step = UpdateRecorder.__call__

    def counted(self: UpdateRecorder, batch: torch.Tensor, update: torch.Tensor) -> None:
        steps.append(1)
        real_step(self, batch, update)

    monkeypatch.setattr(UpdateRecorder, "__call__", counted)
    monkeypatch.setattr(train_job, "device_memory", lambda device: 200_000)
    assert_clean_error(run(*args), "half of this machine's 0.0 GB of memory")
    assert steps == [1]  # refused at the first step, not after training
    monkeypatch.setattr(train_job, "device_memory", lambda device: 10**12)
    free = shutil.disk_usage(tmp_path)._replace(free=50_000)
    monkeypatch.setattr(train_job.shutil, "disk_usage", lambda path: free)
    result = run(*args)
    assert_clean_error(result, "the 0.0 GB free on the output's disk")
    assert "steps' updates of" in result.stderr and "--batch-size" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_recorded_updates_are_streamed_as_safetensors_writes_them() -> None:
    """The sidecar is written a step at a time, byte for byte the file safetensors
    writes of the stacked tensors (which then never stand in memory)."""
    recorder = UpdateRecorder(np.arange(10, 20), batch_size=3)
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        recorder(
            torch.tensor([step, step + 1])[: 1 + step % 2], torch.randn(7, generator=generator)
        )
    streamed = b"".join(bytes(piece) for piece in recorder.pieces())
    assert streamed == tensor_bytes(recorder.tensors())
    loaded = load_safetensors(streamed)
    assert loaded["updates"].shape == (5, 7) and loaded["batch_rows"][0].tolist() == [10, -1, -1]


# --- sisa ----------------------------------------------------------------------------------


def test_sisa_removal_leaves_untouched_shards_bit_identical(work: Path, tmp_path: Path) -> None:
    ids = read_ids(work / "ids.txt")
    two = tmp_path / "two.txt"
    two.write_text("\n".join(ids[:2]) + "\n")
    out = run_json(
        "remove", "-m", work / "sisa.safetensors", "--marked", two, "--method", "sisa",
        "--device", "cpu", "-o", work / "sisa.removed.safetensors",
    )  # fmt: skip
    retrained = {int(k) for k in out["parameters"]["retrained_from_slice"]}
    assert 1 <= len(retrained) <= 2
    before = load_checkpoint(work / "sisa.safetensors")
    after = load_checkpoint(work / "sisa.removed.safetensors")
    assert isinstance(before.model, ShardEnsemble) and isinstance(after.model, ShardEnsemble)
    for k in range(4):
        old = before.model.members[k].state_dict()
        new = after.model.members[k].state_dict()
        same = all(torch.equal(old[name], new[name]) for name in old)
        assert same == (k not in retrained), k
    plan = SisaPlan.from_tensors(after.extra)
    assert (plan.shard[after.roles == 2] == -1).all()


def test_sisa_resuming_from_a_slice_equals_retraining_the_shard(data_dir: Path) -> None:
    """Exactness: rows of later slices never touched the earlier states."""
    data = load_dataset(data_dir / "radial.csv")
    recipe = TrainRecipe(hidden=(8,), epochs=6, shards=2, slices=3, seed=1)
    sisa = train_sisa(data, recipe, 2)
    k = 0
    late = np.flatnonzero((sisa.plan.shard == k) & (sisa.plan.slice == 2))[:3]
    resumed, plan, restarted = unlearn_sisa(sisa.model, sisa.plan, data, late, recipe)
    assert restarted == {k: 2}
    scratch = ShardEnsemble(sisa.model.arch)
    scratch.load_state_dict(sisa.model.state_dict())
    fresh_plan = SisaPlan(plan.shard.copy(), plan.slice.copy(), {})
    _train_shard(scratch, fresh_plan, k, data, recipe, 0, "cpu", None)
    for a, b in zip(
        resumed.members[k].state_dict().values(),
        scratch.members[k].state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_sisa_ensemble_works_with_eval_info_and_attack(work: Path) -> None:
    info = run_json("info", work / "sisa.safetensors")
    assert info["architecture"]["shards"] == 4 and info["recipe"]["slices"] == 3
    evaluation = run_json("eval", "-m", work / "sisa.safetensors", "--device", "cpu")
    assert evaluation["accuracy"] > 0.8
    attack = run_json(
        "attack", "-m", work / "sisa.safetensors", "--targets", work / "ids.txt", "--device", "cpu"
    )
    assert 0 <= attack["auc"] <= 1


def test_an_emptied_shard_stops_voting(data_dir: Path, work: Path, tmp_path: Path) -> None:
    """Ordered SISA: the marked rows fill one shard of their own; removing them empties it."""
    data = load_dataset(data_dir / "radial.csv")
    model = tmp_path / "s.safetensors"
    run_json(
        "train", data_dir / "radial.csv", "-o", model, *EPOCHS, "--shards", "20",
        "--group-ids", work / "ids.txt",
    )  # fmt: skip
    plan = SisaPlan.from_tensors(load_checkpoint(model).extra)
    marked_ids = read_ids(work / "ids.txt")
    rows = np.flatnonzero(np.isin(data.ids, marked_ids) & (plan.shard >= 0))
    first_shard = np.flatnonzero(plan.shard == plan.shard[rows].min())
    ids = tmp_path / "shard.txt"
    ids.write_text("\n".join(data.ids[first_shard]) + "\n")
    out = run_json("remove", "-m", model, "--marked", ids, "--method", "sisa", "--device", "cpu")
    assert any("no longer vote" in w for w in out["warnings"])
    after = load_checkpoint(tmp_path / "s.removed.safetensors").model
    assert isinstance(after, ShardEnsemble) and int(after.active.sum()) == 19


def test_methods_that_do_not_fit_the_model_say_what_to_do(work: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    for method in ("puma", "influence", "ssd", "amnesiac"):
        result = run(
            "remove", "-m", work / "sisa.safetensors", "--marked", work / "ids.txt",
            "--method", method, "-o", out,
        )  # fmt: skip
        assert_clean_error(result, "--method sisa")
    result = run(
        "remove", "-m", work / "plain.safetensors", "--marked", work / "ids.txt",
        "--method", "sisa", "-o", out,
    )  # fmt: skip
    assert_clean_error(result, "--shards")
    for command in (["debug-labels"], ["calibrate", "-o", out]):
        assert_clean_error(run(*command, "-m", work / "sisa.safetensors"), "SISA ensemble")
    assert not out.exists()


# --- ssd -----------------------------------------------------------------------------------


def test_ssd_rule_leaves_parameters_below_the_threshold_unchanged() -> None:
    theta = torch.tensor([1.0, -2.0, 3.0, 4.0], dtype=torch.float64)
    full = torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    forget = torch.tensor([5.0, 20.0, 10.0, 0.0], dtype=torch.float64)
    new, selected = dampen(theta, full, forget, alpha=10.0, lam=1.0)
    assert selected.tolist() == [False, True, False, False]
    assert new.tolist() == [1.0, -2.0 / 20.0, 3.0, 4.0]


def test_ssd_importance_is_the_mean_squared_per_row_gradient_a_bounded_chunk_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """I = mean over the rows of each per-row gradient squared (against one backward pass
    a row), taken over chunks of at most ROW_GRADIENT_VALUES values: a ResNet-18 of width
    64 held 256 rows of its 11 M-parameter gradients at once, 23 GB in float64."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    X, y = torch.randn(23, 5), torch.randint(0, 3, (23,))
    engine = InfluenceModel(net.eval(), X, y)
    monkeypatch.setattr(derivatives, "ROW_GRADIENT_VALUES", 4 * engine.n_parameters)
    chunks: list[int] = []
    per_row = engine.per_row_gradients

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        for part in per_row(*args, **kwargs):
            chunks.append(int(part.shape[0]))
            yield part

    monkeypatch.setattr(engine, "per_row_gradients", counted)
    rows = torch.tensor([0, 3, 4, 9, 10, 11, 20])
    expected = torch.zeros(engine.n_parameters, dtype=torch.float64)
    for i in rows.tolist():
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(X[i : i + 1]), y[i : i + 1]).backward()
        expected += torch.cat([p.grad.flatten() for p in net.parameters()]).double() ** 2
    got = fisher_diagonal(engine, rows, "importance")
    torch.testing.assert_close(got, expected / len(rows), rtol=1e-5, atol=1e-9)
    assert chunks == [4, 3]  # 7 rows, at most 4 a chunk
    chunks.clear()
    everything = fisher_diagonal(engine, None, "importance")  # every row, not copied
    assert max(chunks) == 4 and sum(chunks) == 23
    torch.testing.assert_close(everything, fisher_diagonal(engine, torch.arange(23), "all"))


def test_ssd_through_the_cli_changes_only_the_parameters_it_reports(work: Path) -> None:
    out = run_json(
        "remove", "-m", work / "plain.safetensors", "--marked", work / "ids.txt",
        "--method", "ssd", "--alpha", "5", "--lambda", "1", "--device", "cpu",
    )  # fmt: skip
    before = _weights(work / "plain.safetensors")
    after = _weights(work / "plain.removed.safetensors")
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    assert out["parameters"]["alpha"] == 5.0
    assert 0 < changed <= out["parameters"]["dampened"]
    bigger = [k for k in before if (after[k].abs() > before[k].abs()).any()]
    assert not bigger  # dampening only ever shrinks a parameter


def test_ssd_says_when_its_threshold_cannot_select_anything(work: Path, data_dir: Path) -> None:
    """Per-row importances bound I_f by I_D / share: a marking of a third of the rows
    cannot pass alpha 10, so SSD changes nothing, and the report says why and what to
    give instead; an alpha below the bound dampens."""
    run_json("mark", data_dir / "radial.csv", "--random", "0.34", "--seed", "3",
             "-o", work / "third.txt", "--overwrite")  # fmt: skip
    base = ["remove", "-m", work / "plain.safetensors", "--marked", work / "third.txt",
            "--method", "ssd", "--device", "cpu", "--overwrite"]  # fmt: skip
    out = run_json(*base, "-o", work / "ssd10.safetensors")
    assert out["parameters"]["dampened"] == 0
    assert out["marked_loss_after"] == out["marked_loss_before"]
    (warning,) = [w for w in out["warnings"] if "SSD dampened no parameter" in w]
    bound = float(warning.split("Give --alpha below ")[1].split(" ")[0])
    assert 2.5 < bound < 3.5 and "and --alpha 10 asks for more" in warning
    lower = run_json(*base, "-o", work / "ssd2.safetensors", "--alpha", "1.5")
    assert lower["parameters"]["dampened"] > 0
    assert not [w for w in lower["warnings"] if "SSD dampened" in w]


@pytest.mark.parametrize("emptied", ["shard", "first slice"])
def test_a_removal_keeps_nothing_of_the_rows_it_empties(
    emptied: str, data_dir: Path, tmp_path: Path
) -> None:
    """Exact unlearning holds for the file, not only for its predictions: two ensembles
    whose training files differ only in the rows of one shard (or of its first slice),
    with those rows removed, are the same tensors. The emptied shard's weights and
    standardisation (its rows' mean and std) were kept though it no longer voted, and so
    was the state after an emptied first slice, trained on those rows alone."""
    source = data_dir / "radial.csv"
    sisa = ["--shards", "3", "--slices", "3", "--seed", "4"]
    first = tmp_path / "a.safetensors"
    run_json("train", source, "-o", first, *EPOCHS, *sisa)
    plan = SisaPlan.from_tensors(load_checkpoint(first).extra)
    data = load_dataset(source)
    held = (plan.shard == 0) & ((plan.slice == 0) if emptied == "first slice" else True)
    rows = np.flatnonzero(held)
    assert rows.size > 0
    changed = _moved(source, rows, tmp_path / "changed.csv")
    second = tmp_path / "b.safetensors"
    run_json("train", changed, "-o", second, *EPOCHS, *sisa)
    ids = tmp_path / "emptied.txt"
    ids.write_text("\n".join(data.ids[rows]) + "\n")
    removed = []
    for model in (first, second):
        out = run_json("remove", "-m", model, "--marked", ids, "--method", "sisa")
        assert any("no longer vote" in w for w in out["warnings"]) == (emptied == "shard")
        removed.append(load_checkpoint(Path(out["output"])))
    assert not _weights(first)["members.0.net.layers.0.weight"].equal(
        _weights(second)["members.0.net.layers.0.weight"]
    )  # the two ensembles did learn different things from those rows
    (a, a_extra), (b, b_extra) = ((r.model.state_dict(), r.extra) for r in removed)
    assert a.keys() == b.keys() and a_extra.keys() == b_extra.keys()
    differ = [name for name in a if not torch.equal(a[name], b[name])]
    differ += [name for name in a_extra if not torch.equal(a_extra[name], b_extra[name])]
    assert not differ, differ


def test_retraining_keeps_nothing_of_the_rows_it_removes(data_dir: Path, tmp_path: Path) -> None:
    """The reference itself: two models whose training files differ only in the marked
    rows (some of them validation rows) are retrained into the same tensors."""
    source = data_dir / "radial.csv"
    data = load_dataset(source)
    rows = np.arange(0, len(data.ids), 3)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(data.ids[rows]) + "\n")
    retrained = []
    for name, file in (("a", source), ("b", _moved(source, rows, tmp_path / "changed.csv"))):
        model = tmp_path / f"{name}.safetensors"
        run_json("train", file, "-o", model, *EPOCHS)
        out = run_json("remove", "-m", model, "--marked", ids, "--method", "retrain")
        assert out["skipped"]["validation"] > 0  # marked validation rows leave the criterion
        retrained.append(_weights(Path(out["output"])))
    a, b = retrained
    assert [name for name in a if not torch.equal(a[name], b[name])] == []


def _moved(source: Path, rows: np.ndarray, out: Path) -> Path:
    """`source` with the features of `rows` moved by 3, every other row as it was."""
    lines = source.read_text().splitlines()
    header = lines[0].split(",")
    features = [i for i, name in enumerate(header) if name not in ("id", "label")]
    for row in rows:
        cells = lines[row + 1].split(",")
        for i in features:
            cells[i] = str(float(cells[i]) + 3.0)
        lines[row + 1] = ",".join(cells)
    out.write_text("\n".join(lines) + "\n")
    return out
