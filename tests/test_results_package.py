"""tune_node.results as a package: Ray-free imports, the rule in the library, chance from the data."""

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_critical_step import by_independence, fixed, make_results

import analysis.critical_step
import tune_node.results
from tune_node.evaluation import test_matrix
from tune_node.results import COLUMNS, collect, critical_steps, read_results, trial_table, write_results
from tune_node.solvers import SolverSetting

REPO = Path(__file__).resolve().parent.parent
RAY_FREE = ["tune_node.results", "analysis.critical_step", "analysis.table1", "analysis.figures", "analysis.crossing",
            "analysis.examples"]


@pytest.mark.parametrize("module", RAY_FREE)
def test_import_pulls_in_no_ray(module):
    # A fresh interpreter: in this one another test may have imported Ray already.
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing {module} imports Ray: {done.stdout.strip()}"


def test_no_library_module_imports_analysis():
    offenders = []
    for path in sorted((REPO / "tune_node").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names if n.split(".")[0] == "analysis"]
    assert not offenders


def test_moved_names_stay_importable_where_they_were():
    from tune_node import experiment_folder, trainable

    assert (trainable.CHECKPOINT_FILE, trainable.FINAL_FILE) == (experiment_folder.CHECKPOINT_FILE, experiment_folder.FINAL_FILE)
    assert (experiment_folder.CHECKPOINT_FILE, experiment_folder.FINAL_FILE) == ("checkpoint.pt", "final.json")
    for name in ["CHANCE", "SUMMARY_COLUMNS", "chance_accuracy", "trial_table", "qualifying_tests", "solver_independence",
                 "critical_steps", "display_rows"]:
        assert getattr(analysis.critical_step, name) is getattr(tune_node.results, name)


def test_columns_keep_their_positions_and_end_with_chance():
    assert COLUMNS[-1] == "chance_accuracy"
    assert COLUMNS.index("diverged_reason") == 27 and COLUMNS.index("is_train_solver") == 24 and COLUMNS[0] == "experiment"


def test_cli_help_states_the_rule_from_the_library(capsys):
    with pytest.raises(SystemExit):
        analysis.critical_step.main(["--help"])
    out = capsys.readouterr().out
    assert "Seeds that did not train are excluded" in out and "chance_accuracy" in out and "1/classes" in out and "Critical setting" in out


def test_python_m_tune_node_results_runs(tmp_path):
    done = subprocess.run([sys.executable, "-m", "tune_node.results", str(tmp_path / "absent")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "does not exist" in done.stderr


# --- chance_accuracy in the results table --------------------------------------------------

def write_final(root: Path, trial: str, dataset: str, seed: int = 0, steps: int = 2, train_accuracy: float = 0.9,
                **extra) -> Path:
    """A trial's final.json in the grid trainable's layout; ``extra`` adds top-level keys (``chance_accuracy``)."""
    rows = [{"test_method": c.setting.method, "test_steps": c.setting.steps, "test_tol": None, "factor": c.factor,
             "accuracy": train_accuracy, "nfe": 10, "is_train_solver": c.setting.method == "euler" and c.factor == 1.0}
            for c in test_matrix(SolverSetting.fixed("euler", steps))]
    config = {"experiment": "x", "dataset": dataset, "method": "euler", "steps": steps, "tol": None, "gradient": "backprop",
              "seed": seed, "lr": 1e-3}
    final = {"trial_id": trial, "config": config, "train_accuracy": train_accuracy, "test_accuracy": train_accuracy,
             "iterations": 100, "total_nfe_forward": 400, "total_nfe_backward": 400, "wall_time": 1.0,
             "cross_solver": rows, "status": "trained", "diverged": None, **extra}
    path = root / trial / "checkpoint_000001" / "final.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(final))
    (path.parent / "checkpoint.pt").write_bytes(b"")
    return path


def test_chance_column_from_final_json_else_by_dataset_name(tmp_path):
    write_final(tmp_path, "new", "crescents:load", chance_accuracy=0.55)
    write_final(tmp_path, "old", "sphere2")  # from before chance_accuracy was recorded
    write_final(tmp_path, "mnist_new", "mnist", chance_accuracy=0.1124)  # the data's share beats the name's 0.1
    write_final(tmp_path, "unknown", "crescents:other")
    table = collect(tmp_path)
    assert list(table.columns) == COLUMNS and table["chance_accuracy"].dtype == "float64"
    chance = table.drop_duplicates("trial_id").set_index("trial_id")["chance_accuracy"]
    assert chance["new"] == 0.55 and chance["old"] == 0.5 and chance["mnist_new"] == 0.1124 and math.isnan(chance["unknown"])


@pytest.mark.parametrize("bad", ["half", 1.5, 0])
def test_a_chance_that_is_no_share_makes_the_trial_unreadable(tmp_path, bad):
    write_final(tmp_path, "good", "sphere2", chance_accuracy=0.5)
    path = write_final(tmp_path, "bad", "sphere2", chance_accuracy=bad)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        table = collect(tmp_path)
    assert set(table["trial_id"]) == {"good"} and table.attrs["unreadable"] == [str(path)]


# --- the rule's chance ------------------------------------------------------------------

def own_dataset(table: pd.DataFrame, chance) -> pd.DataFrame:
    """``table`` as if trained on a dataset the built-in table does not know, with ``chance`` per row."""
    return table.assign(dataset="crescents:load", chance_accuracy=chance)


def test_rule_uses_the_chance_column_for_a_dataset_it_does_not_know():
    # Seed 2 at 8 steps reaches 0.75: trained against chance 0.5, not against this dataset's 0.7 (+ margin 0.1).
    table = make_results(fixed("euler", [4, 8, 16]), train_acc=lambda s, seed: 0.75 if (s.steps, seed) == (8, 2) else 0.97,
                         acc=by_independence({8, 16}))
    row = critical_steps(own_dataset(table, 0.7)).iloc[0]
    assert row.dataset == "crescents:load" and row.critical_steps == 8
    assert (row.seeds, row.excluded_seeds, row.excluded_trials) == (2, 1, 1)
    assert critical_steps(own_dataset(table, 0.5)).iloc[0].excluded_trials == 0
    trials = trial_table(own_dataset(table, 0.7))
    assert (trials["chance_accuracy"] == 0.7).all() and trials["trained"].sum() == len(trials) - 1


def test_rule_falls_back_to_the_name_per_trial():
    table = make_results(fixed("euler", [2, 4]), acc=by_independence({2, 4}))
    chance = table["trial_id"].map(lambda t: math.nan if t.endswith("-0") else 0.6)
    trials = trial_table(table.assign(chance_accuracy=chance)).set_index("trial_id")
    assert trials.loc["euler-2-0", "chance_accuracy"] == 0.5 and trials.loc["euler-2-1", "chance_accuracy"] == 0.6
    # A table without the column (before it existed) is judged by the name alone.
    assert (trial_table(table.drop(columns="chance_accuracy"))["chance_accuracy"] == 0.5).all()


@pytest.mark.parametrize("column", ["absent", "empty"])
def test_unknown_chance_is_a_clear_error(column):
    table = make_results(fixed("euler", [2]), acc=by_independence({2})).assign(dataset="crescents:load")
    table = table.drop(columns="chance_accuracy") if column == "absent" else table.assign(chance_accuracy=math.nan)
    with pytest.raises(ValueError, match=r"dataset 'crescents:load'.*lacks chance_accuracy"):
        critical_steps(table)


def test_diverged_trials_need_no_chance():
    table = make_results(fixed("euler", [2, 4]), acc=by_independence({2, 4}))
    table = table.assign(dataset="crescents:load", chance_accuracy=0.5, status="trained")
    diverged = table["train_steps"].eq(4)
    table.loc[diverged, "status"], table.loc[diverged, "chance_accuracy"] = "diverged", math.nan
    row = critical_steps(table).iloc[0]
    assert row.diverged_trials == 3 and row.status == "none" and row.undetermined == "4 steps (3 diverged)"


def test_critical_step_from_the_table_alone_for_an_own_dataset(tmp_path, capsys):
    (tmp_path / "grid.json").write_text(json.dumps({"trials": [{}] * 4}))
    for steps in (2, 4):
        for seed in (0, 1):
            write_final(tmp_path, f"t{steps}{seed}", "crescents:load", seed=seed, steps=steps, chance_accuracy=0.6)
    _, csv = write_results(tmp_path)
    row = critical_steps(read_results(csv)).iloc[0]  # read back from the CSV: nothing but the table
    assert row.dataset == "crescents:load" and row.status == "coarsest" and row.critical_steps == 2 and row.seeds == 2
    assert analysis.critical_step.main([str(csv)]) == 0 and "2 steps" in capsys.readouterr().out
    pd.read_csv(csv).drop(columns="chance_accuracy").to_csv(csv, index=False)
    assert analysis.critical_step.main([str(csv)]) == 2
    assert "'crescents:load'" in capsys.readouterr().err
