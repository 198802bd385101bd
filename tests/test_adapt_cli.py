"""The adaptation CLI end to end through real Ray Tune, and Table 1 from a tiny real grid and adaptation run."""

import io
import json
import math
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import pandas as pd
import pytest
import torch
from test_grid import ENV, assert_no_iteration_trained_twice

from analysis.critical_step import critical_steps
from analysis.table1 import build_table1
from analysis.table1 import main as table1_main
from tune_node.adapt import ADAPT_FILE, main
from tune_node.adapt_trainable import controller_for, train_config_from_adapt_trial
from tune_node.adaptation_results import HISTORY_COLUMNS, HISTORY_CSV, SUMMARY_COLUMNS, SUMMARY_CSV
from tune_node.grid import main as grid_main
from tune_node.results import RESULTS_CSV
from tune_node.training import train

# The tiny space: Sphere2, 2 seeds, 20 iterations at lr 3e-3, reports every 10; checks every 5 iterations.
ADAPT_ARGS = ["--space", "tiny", "--k", "5", "--train-solver", "euler", "--test-solver", "midpoint"]


def run_cli(cli, argv) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli(argv)
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def tiny_runs(ray_cluster, tmp_path_factory):
    """A real tiny grid and a real tiny adaptation run, sharing one Ray session."""
    storage = tmp_path_factory.mktemp("runs")
    grid = run_cli(grid_main, ["--space", "tiny", "--storage", str(storage), "--name", "grid"])
    adapt = run_cli(main, ADAPT_ARGS + ["--storage", str(storage), "--name", "adapt"])
    return grid, adapt, storage / "grid", storage / "adapt"


def test_adaptation_tables_match_what_ran(tiny_runs):
    _, (rc, out), _, exp = tiny_runs
    assert rc == 0, out
    summary, history = pd.read_csv(exp / SUMMARY_CSV), pd.read_csv(exp / HISTORY_CSV)
    assert tuple(summary.columns) == SUMMARY_COLUMNS and tuple(history.columns) == HISTORY_COLUMNS
    assert sorted(summary.seed) == [0, 1] and summary.trial_id.nunique() == 2
    assert set(summary.iterations) == {20} and set(summary.dataset) == {"sphere2"}
    assert set(zip(summary["mode"], summary.train_method, summary.test_method)) == {("step", "euler", "midpoint")}
    for r in summary.itertuples():
        checks = history[history.trial_id == r.trial_id]
        assert list(checks.iteration) == [5, 10, 15, 20]  # one check every k = 5 iterations
        # NFE accounting: checks cost their recorded evaluations plus the starting step's two.
        assert r.check_nfe == checks.check_nfe.sum() + 2
        assert r.train_nfe_backward == r.train_nfe_forward  # backprop through Euler
        assert r.total_nfe == r.train_nfe_forward + r.train_nfe_backward + r.check_nfe
        assert r.nfe_per_iteration == pytest.approx((r.train_nfe_forward + r.check_nfe) / 20)
        # Euler trains with ceil(1 / h) steps: forward NFE per iteration lies between the extremes of h.
        steps = [math.ceil(1 / h - 1e-9) for h in checks.step_size]
        assert min(steps) - 1 <= r.train_nfe_forward / 20 <= max(steps) + 1
        last = checks.iloc[-1]
        final_h = last.proposed if last.accepted else last.step_size
        assert r.final_steps == math.ceil(1 / final_h - 1e-9)
        assert len(set(checks.step_size)) > 1 or last.accepted  # the step size moved
        assert 0 <= r.test_accuracy <= 1 and r.wall_time > 0


def test_summary_shows_accuracy_nfe_split_and_locations(tiny_runs):
    _, (_, out), _, exp = tiny_runs
    summary = pd.read_csv(exp / SUMMARY_CSV)
    acc = 100 * summary.test_accuracy
    assert f"test accuracy        {acc.mean():.1f} +- {acc.std():.1f} %" in out
    assert f"NFE per iteration    {summary.nfe_per_iteration.mean():.1f}" in out
    share = 100 * summary.check_nfe.sum() / summary.total_nfe.sum()
    assert f"({share:.1f} % of all" in out
    assert f"final steps          {', '.join(map(str, sorted(summary.final_steps)))}" in out
    assert str(exp / SUMMARY_CSV) in out and f"tensorboard --logdir {exp}" in out and f"python -m analysis.table1 GRID_DIR {exp}" in out
    assert out.count("done ") == 2 and "euler/midpoint step adaptation seed 1" in out


def test_tensorboard_shows_the_adaptation_over_iterations(tiny_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, _, _, exp = tiny_runs
    history = pd.read_csv(exp / HISTORY_CSV)
    runs = sorted(p.parent for p in exp.glob("*/events.out.tfevents.*"))
    assert len(runs) == 2
    for d in runs:
        ea = EventAccumulator(str(d))
        ea.Reload()
        scalars = ea.Tags()["scalars"]
        for tag in ("solver/step_size", "solver/steps", "nfe/forward", "nfe/check", "accuracy/check_train_solver",
                    "accuracy/check_test_solver", "accuracy/test", "final/adaptation_nfe_per_iteration"):
            assert tag in scalars, tag
        final = json.loads(next(d.glob("checkpoint_*/final.json")).read_text())
        checks = history[history.trial_id == final["trial_id"]].set_index("iteration")
        for event in ea.Scalars("solver/step_size"):  # the value after that iteration's check
            check = checks.loc[event.step]
            assert event.value == pytest.approx(check.proposed if check.accepted else check.step_size)
        assert [e.step for e in ea.Scalars("accuracy/check_test_solver")][:2] == [10, 20]
        assert ea.Scalars("accuracy/check_test_solver")[0].value == pytest.approx(checks.loc[10].test_solver_accuracy)
        assert d.name == f"euler_midpoint_step_seed{final['config']['seed']}"  # short, no Ray trial id


def test_table1_from_a_tiny_grid_and_adaptation(tiny_runs, tmp_path):
    (grid_rc, grid_out), _, grid_dir, adapt_dir = tiny_runs
    assert grid_rc == 0, grid_out
    grid, adapt = pd.read_csv(grid_dir / RESULTS_CSV), pd.read_csv(adapt_dir / SUMMARY_CSV)
    table = build_table1(grid, adapt, critical_steps)
    # The adaptation trained Euler against Midpoint; the grid has Euler (and RK4): one row.
    assert list(zip(table.dataset, table.train_method, table.test_method)) == [("sphere2", "euler", "midpoint")]
    row = table.iloc[0]
    euler = grid[grid.train_method == "euler"].drop_duplicates("trial_id")
    assert row.grid_trials == len(euler) == 4  # 1 and 2 steps, 2 seeds
    assert row.grid_total_nfe == (euler.total_nfe_forward + euler.total_nfe_backward).sum()
    # A seed group's seeds carry the group's wall time: it counts once per Ray trial.
    groups = euler.assign(ray_trial=euler.trial_id.str.replace(r"_seed\d+$", "", regex=True)).drop_duplicates("ray_trial")
    assert len(groups) < len(euler)
    assert row.grid_wall_time == pytest.approx(groups.wall_time.sum())
    assert row.adapt_seeds == 2 and row.adapt_total_nfe == adapt.total_nfe.sum()
    assert row.adapt_nfe_per_iteration == pytest.approx(adapt.nfe_per_iteration.mean())
    assert row.adapt_accuracy_mean == pytest.approx(adapt.test_accuracy.mean())
    assert row.cost_ratio == pytest.approx(row.grid_total_nfe / row.adapt_total_nfe)

    assert table1_main([str(grid_dir), str(adapt_dir), "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "table1.md").read_text()
    header, _, line, _, footnote = markdown.splitlines()
    for column in ("Data set", "Grid NFE", "Grid accuracy", "Adaptation NFE", "Adaptation accuracy", "Grid total NFE",
                   "Adaptation total NFE", "Grid wall-clock", "Adaptation wall-clock"):
        assert f"| {column} |" in header
    assert line.startswith("| Concentric spheres 2d | Euler / Midpoint |")
    assert f"| {row.adapt_nfe_per_iteration:.1f} |" in line and f"| {int(row.grid_total_nfe)} |" in line
    assert footnote == "Adaptation NFE: per iteration, training forward passes and checks."
    assert pd.read_csv(tmp_path / "table1.csv").shape[0] == 1


def test_dry_run_lists_one_trial_per_seed_and_starts_nothing(tmp_path, capsys):
    # tiny trains 20 iterations: k must not exceed them (the default 50 would never check)
    argv = ["--space", "tiny", "--seeds", "0,3,4", "--dry-run", "--storage", str(tmp_path), "--mode", "tolerance", "--k", "5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "3 adaptation trials" in out and "1 CPU and 0 GPU" in out
    for seed in (0, 3, 4):
        assert f"fehlberg2/dopri5 tolerance adaptation seed {seed}" in out
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--train-solver", "ralston"], "unknown --train-solver 'ralston'; allowed: euler, midpoint, heun (step mode), fehlberg2, dopri5"),
    (["--train-solver", "rk4"], "--train-solver rk4 cannot be adapted"),
    (["--train-solver", "midpoint", "--test-solver", "euler"], "--test-solver euler is not more accurate than --train-solver midpoint"),
    (["--train-solver", "euler", "--test-solver", "dopri5"], "--test-solver dopri5 is not a test solver for --train-solver euler"),
    (["--mode", "tolerance", "--train-solver", "euler"], "--mode tolerance does not fit --train-solver euler (fixed-step)"),
    (["--mode", "step", "--train-solver", "dopri5"], "--mode step does not fit --train-solver dopri5 (adaptive)"),
    (["--k", "0"], "check interval k must be an integer >= 1, got 0"),
    (["--threshold", "1.5"], "threshold must be an accuracy difference in [0, 1), got 1.5"),
    (["--space", "sphere7"], "unknown search space 'sphere7'"),
    (["--resume", "--name", "never_ran"], "nothing to resume"),
    (["--resume", "--name", "x", "--k", "10"], "drop --k"),
])
def test_bad_input_fails_before_any_work(tmp_path, capsys, argv, message):
    start = time.monotonic()
    assert main(argv + ["--storage", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()) and time.monotonic() - start < 15


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_without_cuda_stops_at_once(tmp_path, capsys):
    assert main(["--gpus", "2", "--storage", str(tmp_path)]) == 2  # an input error: exit status 2, no traceback
    assert "error: --gpus 2 requested, but CUDA is not available" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_interrupted_adaptation_resumes_exactly(ray_cluster, tmp_path):
    """SIGINT a run after its first checkpoints, resume it: the interrupted seed ends as an uninterrupted run."""
    argv = ["--space", "tiny", "--seeds", "0,1", "--iterations", "60", "--report-every", "10", "--k", "10",
            "--storage", str(tmp_path), "--name", "interrupted"]
    exp = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "tune_node.adapt", *argv, "--cpus", "1"],  # one seed at a time
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 180
    while not list(exp.glob("*/checkpoint_000001")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0]
    interrupted = [json.loads((d / "params.json").read_text())["trial"]["seed"] for d in exp.glob("*/")
                   if list(d.glob("checkpoint_*")) and not list(d.glob("checkpoint_*/final.json"))]
    assert interrupted, out  # a seed stopped mid-training, with checkpoints
    rc, out = run_cli(main, ["--storage", str(tmp_path), "--name", "interrupted", "--resume"])
    assert rc == 0, out
    assert_no_iteration_trained_twice(exp)
    summary, history = pd.read_csv(exp / SUMMARY_CSV), pd.read_csv(exp / HISTORY_CSV)
    assert sorted(summary.seed) == [0, 1]

    # The interrupted seed trained in one go, without Ray: same checks, same NFE, same model.
    torch.set_num_threads(1)
    seed = interrupted[0]
    trial = next(t for t in json.loads((exp / ADAPT_FILE).read_text())["trials"] if t["seed"] == seed)
    config, controller = controller_for(trial, train_config_from_adapt_trial(trial))
    result = train(config, controller=controller)
    resumed = summary[summary.seed == seed].iloc[0]
    assert (resumed.train_nfe_forward, resumed.check_nfe, resumed.final_steps) == (
        result.total_nfe_forward, result.check_nfe, result.setting.steps)
    assert resumed.test_accuracy == result.test_accuracy
    checks = history[history.seed == seed]
    assert list(checks.step_size) == [c.step_size for c in controller.history]
    assert list(checks.test_solver_accuracy) == [c.test_solver_accuracy for c in controller.history]


def test_tolerance_trial_config_trains_and_is_summarised(tmp_path):
    """A tolerance-mode trial config as the CLI builds it: Fehlberg21 from 1e-6, Dopri54 checks; its summary."""
    from tune_node.adapt import _adaptation_settings, adaptation_trials, build_parser
    from tune_node.adaptation_results import describe, history_rows, summary_row
    from tune_node.search_space import load_space

    args = build_parser().parse_args(["--mode", "tolerance", "--k", "2", "--initial-tol", "1e-3"])
    space = load_space("tiny").with_overrides(seeds=1, iterations=4, report_every=2)
    (trial,) = adaptation_trials(space, _adaptation_settings(args), "tol", "data", False)
    assert (trial["method"], trial["test_method"], trial["initial_tol"], trial["optimizer"]) == ("fehlberg2", "dopri5", 1e-3, "adam")
    torch.set_num_threads(1)
    config, controller = controller_for(trial, train_config_from_adapt_trial(trial))
    assert config.solver.tol == 1e-3 and config.iterations == 4
    result = train(config, controller=controller)
    summary = pd.DataFrame([summary_row(result, controller, "tol", "t0")])
    history = pd.DataFrame(history_rows(result, controller, "t0"))
    assert list(history.iteration) == [2, 4] and list(history.test_tol) == [c.tol / 5 for c in controller.history]
    text = describe(summary, history)
    assert "fehlberg2 trained, dopri5 tests, tolerance adaptation, 1 seed " in text
    assert f"final tolerance      {result.setting.tol:.3g}" in text and "tol min..max" in text
    assert f"{history.tol.min():.3g}..{history.tol.max():.3g}" in text


def test_run_adaptation_from_python_returns_what_the_cli_writes(tiny_runs, tmp_path):
    from tune_node.adapt import run_adaptation
    from tune_node.cli import UsageError

    _, _, _, exp = tiny_runs
    summary = run_adaptation("tiny", storage=str(tmp_path), name="adapt_api", k=5, train_solver="euler",
                             test_solver="midpoint")  # ADAPT_ARGS as keywords
    cli = pd.read_csv(exp / SUMMARY_CSV)
    same = ["seed", "iterations", "test_accuracy", "nfe_per_iteration", "check_nfe", "final_steps"]
    pd.testing.assert_frame_equal(summary[same].reset_index(drop=True), cli[same].reset_index(drop=True), check_dtype=False)
    with pytest.raises(UsageError, match="--k 0|k must be"):
        run_adaptation("tiny", storage=str(tmp_path), name="bad", k=0)
    with pytest.raises(TypeError, match="unknown option.*colour"):
        run_adaptation("tiny", colour="red")
