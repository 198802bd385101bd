"""The critical-step rule on hand-made results tables (no training)."""

import math

import pandas as pd
import pytest

from analysis.critical_step import SUMMARY_COLUMNS, critical_steps, main, qualifying_tests, solver_independence
from tune_node.evaluation import test_matrix
from tune_node.results import COLUMNS
from tune_node.solvers import SolverSetting

GOOD, BAD, IGNORED = 0.95, 0.50, 0.30


def make_results(settings, seeds=(0, 1, 2), train_acc=lambda s, seed: 0.97, acc=None):
    """A results table with the real test matrix of each setting.

    ``acc(setting, seed, test_setting, qualifies)`` gives each row's accuracy.
    """
    rows = []
    for setting in settings:
        for seed in seeds:
            tid = f"{setting.method}-{setting.steps or setting.tol}-{seed}"
            steps = setting.steps or 10
            for case in test_matrix(setting):
                t = case.setting
                is_train = t.method == setting.method and case.factor == 1.0
                rows.append({
                    "experiment": "hand", "trial_id": tid, "dataset": "sphere2", "train_method": setting.method,
                    "train_steps": setting.steps, "train_tol": setting.tol, "gradient": setting.gradient, "seed": seed,
                    "iterations": 100, "lr": 1e-3, "train_accuracy": train_acc(setting, seed), "test_accuracy": None,
                    "nfe_per_iteration": 2.0 * steps, "nfe_forward_per_iteration": float(steps),
                    "total_nfe_forward": 100 * steps, "total_nfe_backward": 100 * steps, "wall_time": 1.0, "checkpoint": "x",
                    "test_method": t.method, "test_steps": t.steps, "test_tol": t.tol, "factor": case.factor,
                    "accuracy": None, "nfe": steps, "is_train_solver": is_train,
                })
    table = pd.DataFrame(rows, columns=COLUMNS)
    table["qualifies"] = qualifying_tests(table).values
    table["accuracy"] = [acc(r) for r in table.itertuples()]
    table["test_accuracy"] = table["accuracy"].where(table["is_train_solver"]).groupby(table["trial_id"]).transform("max")
    return table.drop(columns="qualifies")


def fixed(method, steps):
    return [SolverSetting.fixed(method, s) for s in steps]


def by_independence(independent_steps):
    """Rows: the train solver GOOD; qualifying tests GOOD where independent, BAD elsewhere;
    non-qualifying (coarser) tests IGNORED, which must never matter."""
    def acc(r):
        if r.is_train_solver:
            return GOOD
        if not r.qualifies:
            return IGNORED
        return GOOD if r.train_steps in independent_steps else BAD
    return acc


def test_qualifying_tests_follow_error_order():
    table = make_results(fixed("euler", [4]), seeds=(0,), acc=lambda r: GOOD)
    q = dict(zip(zip(table.test_method, table.test_steps), qualifying_tests(table)))
    # Euler at 4 steps (h^1 = 1/4): coarser Euler does not qualify, finer Euler and any Midpoint/RK4 >= 2 steps do.
    assert q[("euler", 2)] is False and q[("euler", 3)] is False and q[("euler", 4)] is False  # the last is the train solver
    assert q[("euler", 6)] and q[("euler", 8)] and q[("midpoint", 2)] and q[("rk4", 2)]
    tol = make_results([SolverSetting.adaptive("fehlberg2", 1e-3)], seeds=(0,), acc=lambda r: GOOD)
    qt = dict(zip(zip(tol.test_method, tol.factor), qualifying_tests(tol)))
    assert qt[("fehlberg2", 0.1)] and qt[("dopri5", 0.1)] and qt[("dopri5", 1.0)]
    assert not qt[("fehlberg2", 10.0)] and not qt[("dopri5", 10.0)] and not qt[("fehlberg2", 1.0)]


def test_clear_critical_step():
    table = make_results(fixed("euler", [1, 2, 4, 8, 16]), acc=by_independence({8, 16}))
    s = critical_steps(table)
    assert list(s.columns) == SUMMARY_COLUMNS and len(s) == 1
    row = s.iloc[0]
    assert row.status == "found" and row.critical_steps == 8 and math.isnan(row.critical_tol)
    assert (row.nfe_dependent, row.nfe_critical) == (4.0, 8.0)
    assert row.accuracy_mean == pytest.approx(GOOD) and row.accuracy_std == pytest.approx(0.0)
    assert (row.seeds, row.excluded_seeds, row.excluded_trials) == (3, 0, 0)


def test_no_critical_step_when_every_setting_is_solver_dependent():
    row = critical_steps(make_results(fixed("rk4", [1, 2, 4]), acc=by_independence(set()))).iloc[0]
    assert row.status == "none" and pd.isna(row.critical_steps) and math.isnan(row.accuracy_mean)


def test_every_setting_independent_reports_coarsest():
    row = critical_steps(make_results(fixed("rk4", [2, 4]), acc=by_independence({2, 4}))).iloc[0]
    assert row.status == "coarsest" and row.critical_steps == 2 and math.isnan(row.nfe_dependent)


def test_non_monotone_takes_the_coarsest_setting_with_only_independent_finer_ones():
    table = make_results(fixed("euler", [1, 2, 4, 8, 16, 32]), acc=by_independence({4, 16, 32}))
    row = critical_steps(table).iloc[0]
    assert row.critical_steps == 16 and (row.nfe_dependent, row.nfe_critical) == (8.0, 16.0)
    independent = solver_independence(table).set_index("train_steps")["independent"]
    assert independent.to_dict() == {1: False, 2: False, 4: True, 8: False, 16: True, 32: True}


def test_seed_that_did_not_train_is_excluded_and_counted():
    # Seed 2 at 8 steps stayed at chance (train accuracy 0.5) and falls apart under finer solvers.
    untrained = lambda s, seed: 0.5 if (s.steps == 8 and seed == 2) else 0.97

    def acc(r):
        if r.train_steps == 8 and r.seed == 2:
            return 0.5 if r.is_train_solver else 0.1
        return by_independence({8, 16})(r)

    table = make_results(fixed("euler", [4, 8, 16]), train_acc=untrained, acc=acc)
    row = critical_steps(table).iloc[0]
    assert row.critical_steps == 8 and (row.seeds, row.excluded_seeds, row.excluded_trials) == (2, 1, 1)
    assert row.accuracy_mean == pytest.approx(GOOD)
    # Counted as trained (margin 0: threshold = chance), the seed makes 8 steps solver-dependent.
    assert critical_steps(table, margin=0.0).iloc[0].critical_steps == 16


def test_adaptive_critical_tolerance_and_groups_kept_apart():
    tols = [1e-1, 1e-2, 1e-3, 1e-4]
    adaptive = make_results([SolverSetting.adaptive("fehlberg2", t) for t in tols],
                            acc=lambda r: GOOD if r.is_train_solver or not r.qualifies or r.train_tol <= 1e-3 else BAD)
    table = pd.concat([adaptive, make_results(fixed("rk4", [1, 2]), acc=by_independence({2}))], ignore_index=True)
    s = critical_steps(table).set_index("train_method")
    assert s.loc["fehlberg2", "critical_tol"] == pytest.approx(1e-3) and pd.isna(s.loc["fehlberg2", "critical_steps"])
    assert s.loc["rk4", "critical_steps"] == 2


def test_threshold_decides():
    near = lambda r: GOOD if r.is_train_solver or not r.qualifies else GOOD - 0.08
    table = make_results(fixed("euler", [1, 2]), acc=near)
    assert critical_steps(table, threshold=0.1).iloc[0].critical_steps == 1
    assert critical_steps(table, threshold=0.05).iloc[0].status == "none"


def test_cli_reads_csv(tmp_path, capsys):
    path = tmp_path / "results.csv"
    make_results(fixed("euler", [1, 2, 4, 8, 16]), acc=by_independence({8, 16})).to_csv(path, index=False)
    assert main([str(path), "--settings"]) == 0
    out = capsys.readouterr().out
    assert "8 steps" in out and "4-8" in out and "95.0 +- 0.0 %" in out  # critical, NFE pair, accuracy
    assert "independent" in out  # the per-setting table
    assert main([str(tmp_path / "missing.csv")]) == 2


def test_cli_reads_a_study_run_in_parts(tmp_path, capsys):
    # One tolerance ladder split into a coarse and a fine experiment: the rule needs both.
    acc = lambda r: GOOD if r.is_train_solver or not r.qualifies or r.train_tol <= 1e-3 else BAD
    coarse = make_results([SolverSetting.adaptive("fehlberg2", t) for t in (1e-1, 1e-2)], acc=acc)
    fine = make_results([SolverSetting.adaptive("fehlberg2", t) for t in (1e-3, 1e-4)], acc=acc)
    (tmp_path / "coarse").mkdir()
    (tmp_path / "fine").mkdir()
    coarse.to_csv(tmp_path / "coarse" / "results.csv", index=False)
    fine.to_csv(tmp_path / "fine" / "results.csv", index=False)
    summary = tmp_path / "summary.csv"
    assert main([str(tmp_path / "coarse"), str(tmp_path / "fine"), "--csv", str(summary)]) == 0
    both = pd.read_csv(summary).iloc[0]
    assert both.critical_tol == pytest.approx(1e-3) and both.status == "found"
    assert main([str(tmp_path / "fine"), "--csv", str(summary)]) == 0
    assert pd.read_csv(summary).iloc[0].status == "coarsest"  # the fine part alone cannot see where models fail

    # A training in two parts would be counted twice: refused, naming it and both parts.
    fine.to_csv(tmp_path / "coarse" / "results.csv", index=False)
    assert main([str(tmp_path / "coarse"), str(tmp_path / "fine")]) == 2
    err = capsys.readouterr().err
    assert "the results overlap: the training dataset=sphere2, train_method=fehlberg2" in err
    assert str(tmp_path / "coarse") in err and str(tmp_path / "fine") in err


def test_parts_overlap_found_whatever_type_the_columns_were_read_as(tmp_path):
    from tune_node.results import combine_parts

    fixed_only = make_results(fixed("euler", [8]), acc=by_independence({8}))
    mixed = pd.concat([fixed_only, make_results([SolverSetting.adaptive("fehlberg2", 1e-3)], acc=lambda r: GOOD)], ignore_index=True)
    fixed_only.to_csv(tmp_path / "fixed.csv", index=False)
    mixed.to_csv(tmp_path / "mixed.csv", index=False)
    fixed_only, mixed = pd.read_csv(tmp_path / "fixed.csv"), pd.read_csv(tmp_path / "mixed.csv")
    # Read back, train_steps is 8 in the fixed-step-only table and 8.0 beside the adaptive trials' NaN.
    assert fixed_only["train_steps"].dtype == int and mixed["train_steps"].dtype == float
    with pytest.raises(ValueError, match="train_steps=8.0, .* has rows in both 'fixed' and 'mixed'"):
        combine_parts([("fixed", fixed_only), ("mixed", mixed)])
    with pytest.raises(ValueError, match="no results given"):
        combine_parts([])
