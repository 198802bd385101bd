"""The critical-step search: its decisions (pure), its checks, and real Ray runs on tiny spaces."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tune_node.experiments.ladder import Ladder, bisect
from tune_node.results import collect, critical_steps
from tune_node.search import DECISIONS_CSV, SUMMARY_CSV, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def run_ladder(ladder: Ladder, independent) -> list[float]:
    """Train what the ladder needs, one rung at a time, with verdicts ``independent(value)``; the order trained."""
    order = []
    while ladder.state().phase != "done":
        needed, speculative = ladder.wanted()
        value = (needed or speculative)[0]
        order.append(value)
        ladder.record(value, independent(value))
    return order


@pytest.mark.parametrize("critical", [3, 5, 16, 37, 64, 100])
def test_the_climb_and_bisection_find_a_monotone_ladder_s_critical_step(critical):
    ladder = Ladder([1, 2, 4, 8, 16, 32, 64, 128, 256], adaptive=False, confirm=2, refine=1.25)
    order = run_ladder(ladder, lambda v: v >= critical)
    state = ladder.state()
    assert state.status == "found"
    assert state.dependent < critical <= state.critical  # the bracket holds the true critical step
    assert state.critical / state.dependent <= 1.25 or state.critical - state.dependent == 1
    assert len(order) == len(set(order))  # no setting trained twice
    # The climb goes no further than the rung above the first independent one.
    first_independent = min(r for r in ladder.rungs if r >= critical)
    assert max(order) == ladder.rungs[ladder.rungs.index(first_independent) + 1]


def test_confirm_sets_how_many_independent_rungs_stop_the_climb():
    for confirm in (1, 2, 3):
        ladder = Ladder([1, 2, 4, 8, 16, 32], adaptive=False, confirm=confirm, refine=float("inf"))
        order = run_ladder(ladder, lambda v: v >= 4)
        assert order == [1, 2, 4, 8, 16][:2 + confirm]
        assert (ladder.state().dependent, ladder.state().critical) == (2, 4)


def test_a_non_monotone_ladder_is_reported_and_the_climb_goes_on():
    ladder = Ladder([1, 2, 4, 8, 16], adaptive=False, confirm=2, refine=float("inf"))
    verdicts = {1: False, 2: True, 4: False, 8: True, 16: True}
    run_ladder(ladder, verdicts.get)
    state = ladder.state()
    assert (state.status, state.dependent, state.critical) == ("found", 4, 8)
    assert state.non_monotone == ["2 steps independent but 4 steps dependent"]


def test_the_ladder_s_ends():
    coarsest = Ladder([1, 2, 4], adaptive=False)
    run_ladder(coarsest, lambda v: True)
    assert (coarsest.state().status, coarsest.state().critical) == ("coarsest", 1)
    none = Ladder([1, 2, 4], adaptive=False)
    assert run_ladder(none, lambda v: False) == [1, 2, 4]
    assert none.state().status == "none"
    unconfirmed = Ladder([1, 2, 4], adaptive=False, confirm=2)
    run_ladder(unconfirmed, lambda v: v >= 4)
    assert (unconfirmed.state().status, unconfirmed.state().critical) == ("unconfirmed", 4)


def test_rungs_beyond_the_confirming_ones_become_useless():
    ladder = Ladder([1, 2, 4, 8, 16], adaptive=False, confirm=2, refine=float("inf"))
    assert ladder.wanted() == ([1, 2], [4, 8, 16])  # needed, then speculative
    ladder.record(2, False)
    assert ladder.useful(16)
    assert ladder.useful(1)  # coarser than the candidate: it finishes, showing whether the ladder is monotone
    ladder.record(4, True)
    ladder.record(8, True)  # confirmed: 4 steps
    assert not ladder.useful(16)
    assert ladder.wanted() == ([], [])


def test_parallel_refinement_fills_the_widest_gap_and_keeps_points_inside_the_bracket():
    ladder = Ladder([16, 32, 64, 128], adaptive=False, confirm=2, refine=1.25)
    for value, independent in ((16, False), (32, False), (64, True)):
        ladder.record(value, independent)
    # 128 is still needed; the bracket's first bisection is the best speculative rung, ahead of nothing finer.
    assert ladder.wanted() == ([128], [45])
    ladder.record(45, False)
    assert ladder.wanted(running=[128]) == ([128], [54])
    ladder.record(128, True)  # confirmed: refine 45 - 64
    assert ladder.wanted(running=[54]) == ([], [])  # 54 leaves both gaps within 1.25: wait for it
    assert ladder.useful(54) and not ladder.useful(256)
    ladder.record(54, True)
    assert ladder.state().status == "found" and (ladder.state().dependent, ladder.state().critical) == (45, 54)


def test_tolerance_ladders_climb_from_large_to_small_and_bisect_in_log():
    ladder = Ladder([1e-2, 1e-3, 1e-4, 1e-5, 1e-6], adaptive=True, confirm=2, refine=1.25)
    order = run_ladder(ladder, lambda tol: tol <= 2e-4)
    assert order[:4] == [1e-2, 1e-3, 1e-4, 1e-5]
    state = ladder.state()
    assert state.dependent > 2e-4 >= state.critical and state.dependent / state.critical <= 1.25


def test_bisect_takes_whole_steps_between_the_ends():
    assert bisect(32, 64, adaptive=False) == 45
    assert bisect(2, 4, adaptive=False) == 3
    assert bisect(3, 4, adaptive=False) is None
    assert bisect(1e-3, 1e-5, adaptive=True) == pytest.approx(1e-4)


@pytest.mark.parametrize("args, expected", [
    (["--refine", "1"], "--refine must be a ratio > 1"),
    (["--refine", "nan"], "--refine must be a ratio > 1"),
    (["--confirm", "0"], "--confirm must be an integer >= 1"),
    (["--space", "tiny"], "sphere2/rk4/backprop: a search needs at least 2 rungs"),
    (["--sampler", "cmaes"], "unknown --sampler 'cmaes'; allowed: tpe, nsga2, random"),
    (["--space", "quick", "--sampler", "tpe"], "--sampler configure an Optuna study, for spaces with ranges"),
    (["--space", "sphere2_cheapest", "--refine", "1.5"], "--refine configure a ladder search; this space gives ranges"),
    (["--space", "sphere2_cheapest", "--samples", "0"], "--samples must be an integer >= 1"),
])
def test_bad_input_fails_before_ray_starts(args, expected, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tune_node.search", *args, "--storage", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and proc.stderr.startswith("error:")
    assert "Ray" not in proc.stdout and not list(tmp_path.iterdir())  # nothing started, nothing written


def write_space(path: Path, steps, seeds="[1]", iterations=100) -> Path:
    path.write_text(f"""description = "test ladder"
dataset = "sphere2"
seeds = {seeds}
[training]
iterations = {iterations}
lr = 3e-3
report_every = 5
test_every = 50
[[solvers]]
method = "euler"
steps = {list(steps)}
""")
    return path


def test_a_speculative_rung_beyond_the_confirmed_one_is_stopped_before_its_end(ray_cluster, tmp_path):
    # Threshold 0.99: every trained rung is independent, so 1 step confirms itself (--confirm 1), and the
    # 256-step rung, trained speculatively in the second slot, can no longer change the answer.
    space = write_space(tmp_path / "ladder.toml", [1, 256])
    assert main(["--space", str(space), "--storage", str(tmp_path), "--name", "s", "--confirm", "1", "--threshold", "0.99"]) == 0
    exp = tmp_path / "s"
    decisions = pd.read_csv(exp / DECISIONS_CSV)
    assert list(zip(decisions.setting, decisions.role, decisions.verdict)) == [
        ("1 steps", "needed", "independent"), ("256 steps", "speculative", "stopped")]
    table = collect(exp)
    assert set(table.train_steps) == {1}  # the stopped rung left no final results
    progress = pd.read_csv(next(exp.glob("euler_steps0256_*")) / "progress.csv")
    assert progress["iteration"].max() < 100  # stopped before its end
    summary = pd.read_csv(exp / SUMMARY_CSV)
    assert summary.loc[0, "status"] == "coarsest" and summary.loc[0, "rungs_stopped"] == 1
    assert summary.loc[0, "train_nfe"] > 2 * 100  # the stopped rung's NFE count too
    assert critical_steps(table, threshold=0.99).loc[0, "critical_steps"] == 1


def test_the_search_agrees_with_the_critical_step_rule_and_reports_non_monotone_ladders(ray_cluster, tmp_path, monkeypatch):
    import tune_node.results as results
    import tune_node.results.critical_step as rule_module

    real = results.solver_independence
    scripted = {1: False, 2: True, 4: False, 5: True, 6: True, 7: True, 8: True, 16: True}

    def scripted_verdicts(table, threshold=0.1, margin=0.1):
        rows = real(table, threshold, margin)
        rows["independent"] = rows["train_steps"].map(scripted).astype(bool)
        return rows

    # The search reads verdicts through tune_node.results, the rule's step 4 through its own module: both scripted.
    monkeypatch.setattr(results, "solver_independence", scripted_verdicts)
    monkeypatch.setattr(rule_module, "solver_independence", scripted_verdicts)
    space = write_space(tmp_path / "ladder.toml", [1, 2, 4, 8, 16], iterations=20)
    from tune_node.search import run_search

    # One slot (2 CPUs a trial on the fixture's 2): rungs finish in ladder order, so 2 steps is judged before the
    # answer is known. With two slots a slow 2-step rung (a loaded machine) was stopped as useless, unseen.
    summary = run_search(str(space), storage=str(tmp_path), name="s", refine=1.25, cpus_per_trial=2)
    row = summary.iloc[0]
    assert (row.status, row.dependent_steps, row.critical_steps) == ("found", 4, 5)  # bisected 4-8: 6, then 5
    assert row.non_monotone == "2 steps independent but 4 steps dependent"
    decisions = pd.read_csv(tmp_path / "s" / DECISIONS_CSV)
    assert "not monotone" in decisions["why"].iloc[-1]
    # The rule on the rungs trained, with the same verdicts, gives the same critical step.
    table = collect(tmp_path / "s")
    assert {1, 2, 4, 5, 6, 8, 16} <= set(table.train_steps) <= {1, 2, 4, 5, 6, 7, 8, 16}
    rule = critical_steps(table)
    assert rule.loc[0, "critical_steps"] == row.critical_steps


def test_a_killed_search_resumes_without_retraining_a_finished_rung(ray_cluster, tmp_path):
    space = write_space(tmp_path / "ladder.toml", [1, 2, 4, 8, 16], iterations=200)
    exp = tmp_path / "s"
    cmd = [sys.executable, "-m", "tune_node.search", "--space", str(space), "--storage", str(tmp_path), "--name", "s",
           "--cpus", "2", "--threshold", "0.02", "--refine", "inf"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (exp / DECISIONS_CSV).is_file() and len(pd.read_csv(exp / DECISIONS_CSV)) >= 2:
            break
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)  # SIGKILL can race Ray's checkpoint rotation (see the search's retry of failed rungs)
    proc.communicate(timeout=60)
    finished = {p: p.read_text() for p in exp.glob("*/checkpoint_*/final.json")}
    assert finished
    assert main(["--storage", str(tmp_path), "--name", "s", "--resume"]) == 0
    for path, text in finished.items():
        assert path.read_text() == text  # finished rungs are not trained again
    decisions = pd.read_csv(exp / DECISIONS_CSV)
    trained = decisions[decisions.verdict.isin(["independent", "dependent", "undetermined"])]
    assert trained.setting.is_unique  # no rung judged twice
    dirs = [p.name.split("_")[1] for p in exp.glob("euler_steps*")]
    assert len(dirs) == len(set(dirs))  # one trial per rung, the resumed ones continued
    summary = pd.read_csv(exp / SUMMARY_CSV)
    assert summary.loc[0, "status"] in ("found", "coarsest", "none", "unconfirmed")
    if summary.loc[0, "status"] in ("found", "coarsest"):  # the rule on the rungs trained agrees
        assert critical_steps(collect(exp), threshold=0.02).loc[0, "critical_steps"] == summary.loc[0, "critical_steps"]


def test_the_grid_refuses_a_space_with_ranges(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tune_node.grid", "--space", "sphere2_cheapest", "--storage", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and "gives ranges" in proc.stderr and "tune_node.search" in proc.stderr


def test_the_optuna_study_finds_the_cheapest_independent_setting_per_method_and_resumes_after_sigint(ray_cluster, tmp_path):
    space = tmp_path / "ranges.toml"
    space.write_text("""description = "test ranges"
dataset = "sphere2"
seeds = [1]
[training]
iterations = 100
lr = 3e-3
report_every = 10
test_every = 50
[[solvers]]
method = "euler"
steps = {min = 1, max = 8}
[[solvers]]
method = "rk4"
steps = {min = 1, max = 4}
""")
    exp = tmp_path / "study"
    cmd = [sys.executable, "-m", "tune_node.search", "--space", str(space), "--storage", str(tmp_path), "--name", "study",
           "--cpus", "2", "--samples", "6", "--threshold", "0.5", "--objectives", "nfe,accuracy"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and len(list(exp.glob("*/checkpoint_*/final.json"))) < 2:
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    finished = {p: p.read_text() for p in exp.glob("*/checkpoint_*/final.json")}
    assert 2 <= len(finished) < 6
    assert main(["--storage", str(tmp_path), "--name", "study", "--resume"]) == 0
    for path, text in finished.items():
        assert path.read_text() == text  # finished settings are not trained again
    study = pd.read_csv(exp / "study.csv")
    assert len(study) == 6 and study["ray_trial"].is_unique
    assert len(list(exp.glob("*/checkpoint_*/final.json"))) == 6
    # Each trial's verdict is the rule's on its own rows of the results table.
    table = collect(exp)
    for r in study.itertuples():
        rows = table[table.trial_id == r.ray_trial]
        steps = int(rows.train_steps.iloc[0])
        assert steps == r.value
        assert r.feasible == (critical_steps(rows, threshold=0.5).loc[0, "status"] == "coarsest")
    cheapest = pd.read_csv(exp / "cheapest.csv")
    for r in cheapest.itertuples():
        mine = study[(study.method == r.method) & study.feasible]
        assert r.nfe_per_iteration == mine.nfe_per_iteration.min()
    assert set(cheapest.method) == set(study[study.feasible].method)
    front = pd.read_csv(exp / "front.csv")
    assert len(front) >= 1 and front.feasible.all() and (exp / "front.png").stat().st_size > 0
    for r in front.itertuples():  # nothing feasible is both cheaper and more accurate
        better = study[study.feasible & (study.nfe_per_iteration <= r.nfe_per_iteration) & (study.accuracy >= r.accuracy)
                       & ((study.nfe_per_iteration < r.nfe_per_iteration) | (study.accuracy > r.accuracy))]
        assert better.empty
