"""Faults that must lose or corrupt no result: diverged training, unreadable trial files,
results written where they do not belong, TensorBoard and progress.csv across driver kills."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from analysis.critical_step import critical_steps, display_rows
from tune_node.datasets import load_dataset
from tune_node.results import COLUMNS, RESULTS_CSV, NotAnExperimentError, collect, write_results
from tune_node.results import main as results_main
from tune_node.seed_groups import train_seed_group
from tune_node.solvers import SolverSetting
from tune_node.training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


# --- diverged training -------------------------------------------------------------------

@pytest.mark.parametrize("lr", [float("inf"), 1e6])
def test_a_diverging_run_stops_and_says_where_and_why(lr):
    torch.set_num_threads(1)
    config = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 4), seed=0, iterations=50, lr=3e-3, report_every=10)
    config.lr = lr  # TrainConfig refuses an infinite lr; train() must still cope with one that slips through
    reports = []
    result = train(config, on_report=lambda p, s: reports.append(p.iteration))
    assert result.diverged is not None
    assert result.diverged.reason in ("loss is nan", "loss is inf")
    assert 2 <= result.diverged.iteration < 50 and result.iterations == result.diverged.iteration - 1
    assert math.isnan(result.test_accuracy) and math.isnan(result.train_accuracy)
    assert all(it < result.diverged.iteration for it in reports)  # nothing reported past the divergence
    rows = result.cross_solver_table()
    assert len(rows) == 15 and all(math.isnan(r["accuracy"]) for r in rows)  # the test matrix, not evaluated


def test_a_diverging_seed_in_a_group_leaves_the_others_untouched():
    torch.set_num_threads(1)
    configs = [TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("rk4", 4), seed=s, iterations=30, lr=3e-3, report_every=10)
               for s in (0, 1)]
    clean = train_seed_group(configs, data=[load_dataset("sphere2", s) for s in (0, 1)])
    data = [load_dataset("sphere2", s) for s in (0, 1)]
    data[1].x_train[:] = float("nan")  # seed 1's loss is NaN from its first iteration
    broken = train_seed_group(configs, data=data)
    assert clean[1].diverged is None and broken[0].diverged is None
    assert broken[1].diverged.iteration == 1 and broken[1].total_nfe_forward == 0
    for a, b in zip(clean[0].model.state_dict().values(), broken[0].model.state_dict().values()):
        assert torch.equal(a, b)
    assert broken[0].test_accuracy == clean[0].test_accuracy


def _final(tmp: Path, trial: str, steps: int, seed: int, train_accuracy: float, diverged: dict | None = None) -> Path:
    """A trial's final.json as the grid trainable writes it (accuracy per test row: ``train_accuracy``)."""
    from tune_node.evaluation import test_matrix

    setting = SolverSetting.fixed("euler", steps)
    rows = [{"test_method": c.setting.method, "test_steps": c.setting.steps, "test_tol": None, "factor": c.factor,
             "accuracy": float("nan") if diverged else train_accuracy, "nfe": 0 if diverged else 10,
             "is_train_solver": c.setting.method == "euler" and c.factor == 1.0} for c in test_matrix(setting)]
    config = {"experiment": "x", "dataset": "sphere2", "method": "euler", "steps": steps, "tol": None, "gradient": "backprop",
              "seed": seed, "lr": 1e-3}
    final = {"trial_id": trial, "config": config, "train_accuracy": float("nan") if diverged else train_accuracy,
             "test_accuracy": float("nan") if diverged else train_accuracy, "iterations": 99 if diverged else 100,
             "total_nfe_forward": 400, "total_nfe_backward": 400, "wall_time": 1.0, "cross_solver": rows,
             "status": "diverged" if diverged else "trained", "diverged": diverged}
    path = tmp / trial / "checkpoint_000001" / "final.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(final))
    if not diverged:
        (path.parent / "checkpoint.pt").write_bytes(b"")
    return path


def test_diverged_trials_are_marked_in_the_table_and_named_by_the_critical_step_summary(tmp_path):
    (tmp_path / "grid.json").write_text("{}")
    _final(tmp_path, "a", 2, 0, 0.9)
    _final(tmp_path, "b", 2, 1, 0.9)
    _final(tmp_path, "c", 4, 0, 0.9, diverged={"iteration": 100, "reason": "loss is nan"})
    _final(tmp_path, "d", 4, 1, 0.9, diverged={"iteration": 7, "reason": "loss is inf"})
    table = collect(tmp_path)
    assert list(table.columns) == COLUMNS
    trials = table.drop_duplicates("trial_id").set_index("trial_id")
    assert list(trials.status) == ["trained", "trained", "diverged", "diverged"]
    assert trials.loc["d", "diverged_iteration"] == 7 and trials.loc["d", "diverged_reason"] == "loss is inf"
    assert pd.isna(trials.loc["c", "checkpoint"]) and trials.loc["a", "checkpoint"].endswith("checkpoint.pt")
    summary = critical_steps(table).iloc[0]
    assert summary.diverged_trials == 2 and summary.excluded_trials == 2
    # The finest setting has no trained seed: undetermined, so not independent, and the summary says why.
    assert summary.status == "none" and summary.undetermined == "4 steps (2 diverged)"
    shown = display_rows(critical_steps(table))[0]
    assert shown["excluded"] == "0 (2 in group, 2 diverged)" and shown["undetermined"] == "4 steps (2 diverged)"


# --- results tables ----------------------------------------------------------------------

def test_one_corrupt_final_json_costs_only_its_own_trial(tmp_path, capsys):
    (tmp_path / "grid.json").write_text(json.dumps({"trials": [{}, {}, {}]}))
    _final(tmp_path, "a", 2, 0, 0.9)
    _final(tmp_path, "b", 2, 1, 0.8)
    bad = _final(tmp_path, "c", 4, 0, 0.7)
    bad.write_text(bad.read_text()[:200])  # truncated mid-write
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = collect(tmp_path)
    assert set(table.trial_id) == {"a", "b"} and table.attrs["unreadable"] == [str(bad)]
    assert any(str(bad) in str(w.message) for w in caught)
    assert results_main([str(tmp_path)]) == 1  # the table is written, and the run says it is incomplete
    err = capsys.readouterr().err
    assert str(bad) in err
    assert pd.read_csv(tmp_path / RESULTS_CSV).trial_id.nunique() == 2


def test_results_are_written_only_into_a_grid_experiment(tmp_path, capsys):
    precious = tmp_path / RESULTS_CSV
    precious.write_text("mine,not yours\n1,2\n")
    assert results_main([str(tmp_path)]) == 2
    assert "not a grid experiment" in capsys.readouterr().err
    assert precious.read_text() == "mine,not yours\n1,2\n"
    with pytest.raises(NotAnExperimentError, match="not a grid experiment"):
        write_results(tmp_path)


def test_results_cli_rebuilds_an_adaptation_experiments_tables(tmp_path, capsys):
    from tune_node.adaptation_results import HISTORY_CSV, SUMMARY_COLUMNS, SUMMARY_CSV

    (tmp_path / "adapt.json").write_text("{}")
    summary = {c: None for c in SUMMARY_COLUMNS} | {"trial_id": "t", "seed": 0, "mode": "step", "iterations": 10}
    path = tmp_path / "t" / "checkpoint_000000" / "final.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"summary": summary, "history": []}))
    assert results_main([str(tmp_path)]) == 0
    assert "adaptation experiment: 1 trials finished" in capsys.readouterr().out
    assert pd.read_csv(tmp_path / SUMMARY_CSV).trial_id.tolist() == ["t"] and (tmp_path / HISTORY_CSV).is_file()
    assert not (tmp_path / RESULTS_CSV).exists()


# --- TensorBoard and progress.csv across a driver restart --------------------------------

class _Trial:
    """What the callbacks read of a Ray trial: config, storage path, a local file system (hashable, as Ray's)."""

    def __init__(self, path: Path, config):
        self.config, self.path, self.trial_id = {"trial": config}, str(path), path.name
        self.storage = SimpleNamespace(storage_filesystem=SimpleNamespace(type_name="local"))


_trial = _Trial


def _steps(run_dir: Path, tag: str = "loss/train") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    return [e.step for e in ea.Scalars(tag)]


def test_tensorboard_steps_are_on_disk_at_once_and_written_once_across_a_restart(tmp_path):
    from tune_node.tune_callbacks import TensorBoardCallback

    config = {"dataset": "sphere2", "method": "euler", "steps": 2, "tol": None, "gradient": "backprop", "seed": 0}
    trial = _trial(tmp_path / "t", config)
    first = TensorBoardCallback()
    first.log_trial_start(trial)
    for it in (10, 20, 30):
        first.log_trial_result(it, trial, {"timesteps_total": it, "loss": 1.0 / it, "nested": {"x": it}, "done": False})
    # No close: a driver killed here must already have every step on disk.
    assert _steps(tmp_path / "t") == [10, 20, 30]
    assert _steps(tmp_path / "t", "other/nested/x") == [10, 20, 30]  # an unknown key keeps its name
    # The restored driver's callback: the trial restarts from its checkpoint at 20 and reports 30 again.
    second = TensorBoardCallback()
    second.log_trial_start(trial)
    for it in (30, 40):
        second.log_trial_result(it, trial, {"timesteps_total": it, "loss": 1.0 / it, "test_accuracy": float("nan")})
    second.log_trial_end(trial)
    assert _steps(tmp_path / "t") == [10, 20, 30, 40]
    third = TensorBoardCallback()  # a finished trial re-reported after another restart adds nothing
    third.log_trial_start(trial)
    third.log_trial_result(40, trial, {"timesteps_total": 40, "loss": 0.025})
    third.log_trial_end(trial)
    assert _steps(tmp_path / "t") == [10, 20, 30, 40]


def test_tensorboard_runs_of_a_seed_group_are_per_seed(tmp_path):
    from tune_node.tune_callbacks import TensorBoardCallback

    configs = [{"dataset": "sphere2", "method": "rk4", "steps": 1, "tol": None, "gradient": "backprop", "seed": s} for s in (3, 4)]
    trial = _trial(tmp_path / "g", configs)
    callback = TensorBoardCallback()
    callback.log_trial_start(trial)
    callback.log_trial_result(1, trial, {"timesteps_total": 10, "seeds": {"3": {"loss": 0.3, "timesteps_total": 10},
                                                                           "4": {"loss": 0.4, "timesteps_total": 10}}})
    assert _steps(tmp_path / "g" / "seed3") == _steps(tmp_path / "g" / "seed4") == [10]


def test_progress_csv_keeps_its_header_and_each_iteration_once_across_a_restart(tmp_path):
    from tune_node.tune_callbacks import ProgressCSVCallback

    trial = _trial(tmp_path / "t", {"seed": 0})
    first = ProgressCSVCallback()
    for it in (10, 20):
        first.log_trial_result(it, trial, {"timesteps_total": it, "loss": 0.5, "config": {"ignored": 1}})
    second = ProgressCSVCallback()  # after a driver kill: the finished trial is re-reported with more keys
    second.log_trial_start(trial)
    second.log_trial_result(20, trial, {"timesteps_total": 20, "loss": 0.5, "test_accuracy": 0.9, "done_training": True})
    second.log_trial_result(30, trial, {"timesteps_total": 30, "loss": 0.4, "test_accuracy": 0.9})
    second.log_trial_end(trial)
    table = pd.read_csv(tmp_path / "t" / "progress.csv")
    assert list(table.columns) == ["timesteps_total", "loss"] and table.timesteps_total.tolist() == [10, 20, 30]


# --- the whole grid, its driver killed at random moments ---------------------------------

def _grid(storage: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tune_node.grid", "--storage", str(storage), "--name", "g", "--cpus", "2", *extra]


def _start_args() -> list[str]:
    return ["--space", "tiny", "--iterations", "200", "--report-every", "20", "--no-seed-groups"]


def _comparable(table: pd.DataFrame) -> pd.DataFrame:
    keys = ["train_method", "train_steps", "seed", "test_method", "test_steps", "factor"]
    return table.drop(columns=["trial_id", "checkpoint", "wall_time"]).sort_values(keys).reset_index(drop=True)


def _finished(exp: Path) -> dict[str, str]:
    return {p.parent.parent.name: p.read_text() for p in sorted(exp.glob("*/checkpoint_*/final.json"))}


@pytest.mark.slow
def test_a_grid_killed_again_and_again_ends_as_an_uninterrupted_one(tmp_path):
    """The driver SIGKILLed three times at random moments (with its Ray), resumed each time:
    the same table as an uninterrupted run, no finished trial trained again, and every
    iteration once in TensorBoard and in progress.csv."""
    reference = subprocess.run(_grid(tmp_path / "ref", *_start_args()), env=ENV, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    exp = tmp_path / "killed" / "g"
    rng = random.Random(12)
    kills = 0
    for attempt in range(3):
        args = ["--resume"] if attempt else _start_args()
        proc = subprocess.Popen(_grid(tmp_path / "killed", *args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.monotonic() + 120
        while not list(exp.glob("*/checkpoint_*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(rng.uniform(0.0, 6.0))  # a random moment once trials are under way
        finished_before = _finished(exp)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
            kills += 1
        proc.wait()
        # A finished trial is never trained again: its final.json stays byte for byte.
        assert {k: v for k, v in _finished(exp).items() if k in finished_before} == finished_before
    assert kills >= 2
    final = subprocess.run(_grid(tmp_path / "killed", "--resume"), env=ENV, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stdout + final.stderr
    pd.testing.assert_frame_equal(_comparable(collect(exp)), _comparable(collect(tmp_path / "ref" / "g")))
    expected = list(range(20, 201, 20))
    trial_dirs = [d for d in exp.iterdir() if d.is_dir() and d.name.startswith(("euler", "rk4"))]
    assert len(trial_dirs) == 6
    for trial_dir in trial_dirs:
        assert _steps(trial_dir) == expected, trial_dir.name
        progress = pd.read_csv(trial_dir / "progress.csv")
        assert progress.timesteps_total.tolist() == expected, trial_dir.name


def test_a_failed_trial_line_points_at_the_storage_copy_of_its_error_file(tmp_path):
    from tune_node.tune_callbacks import ProgressCallback

    lines = []
    trial = _Trial(tmp_path / "exp" / "euler_steps2_seed0_x", {"method": "euler", "steps": 2, "tol": None, "seed": 0})
    trial.local_path = "/tmp/ray/session_x/artifacts/driver_artifacts/euler_steps2_seed0_x"  # Ray's staging folder
    ProgressCallback(1, out=lambda text, flush=True: lines.append(text)).on_trial_error(0, [trial], trial)
    assert lines and lines[0].endswith(f"see {tmp_path / 'exp' / 'euler_steps2_seed0_x' / 'error.txt'}")
    assert "session_x" not in lines[0]


def test_a_final_checkpoint_cut_short_by_a_kill_does_not_count_as_finished(tmp_path):
    """Remote storage uploads a checkpoint file by file: a driver killed in between can leave final.json
    without the model beside it; such a trial is not finished (it trains its last stretch again)."""
    import pyarrow.fs

    from tune_node.experiments.trainable import _complete

    fs = pyarrow.fs.LocalFileSystem()
    cut, whole, diverged = (tmp_path / n for n in ("cut", "whole", "diverged"))
    for folder in (cut, whole, diverged):
        (folder / "seed1").mkdir(parents=True)
    (cut / "final.json").write_text('{"diverged": null}')
    (whole / "final.json").write_text('{"diverged": null}')
    (whole / "checkpoint.pt").write_bytes(b"model")
    (diverged / "final.json").write_text('{"diverged": {"iteration": 3, "reason": "loss is nan"}}')
    assert not _complete(fs, str(cut), ["final.json"])
    assert _complete(fs, str(whole), ["final.json"])
    assert _complete(fs, str(diverged), ["final.json"])
    (whole / "seed1" / "final.json").write_text("{}")
    assert not _complete(fs, str(whole), ["final.json", "seed1/final.json"])
    (whole / "seed1" / "checkpoint.pt").write_bytes(b"model")
    assert _complete(fs, str(whole), ["final.json", "seed1/final.json"])
