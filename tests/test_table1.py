import sys
import types

import pandas as pd
import pytest

from analysis.table1 import CRITICAL_COLUMNS, SEARCH_COLUMNS, build_table1, grid_costs, main, search_costs, to_markdown

TEST_SETTINGS = ({"test_method": "euler", "factor": 1.0}, {"test_method": "midpoint", "factor": 1.0}, {"test_method": "rk4", "factor": 2.0})


def grid_table() -> pd.DataFrame:
    """A hand-made grid: Sphere2 Euler at 64 and 128 steps and RK4 at 8, CIFAR10 Euler at 16; two seeds each."""
    rows = []
    for dataset, method, steps, wall in (("sphere2", "euler", 64, 100.0), ("sphere2", "euler", 128, 200.0),
                                         ("sphere2", "rk4", 8, 50.0), ("cifar10", "euler", 16, 1000.0)):
        for seed in (0, 1):
            trial = f"{dataset}-{method}-{steps}-{seed}"
            for test in TEST_SETTINGS:
                rows.append({
                    "experiment": "grid", "trial_id": trial, "dataset": dataset, "train_method": method,
                    "train_steps": steps, "train_tol": None, "gradient": "backprop", "seed": seed, "iterations": 10,
                    "lr": 1e-4, "train_accuracy": 0.9, "test_accuracy": 0.9, "nfe_per_iteration": steps,
                    "nfe_forward_per_iteration": steps, "total_nfe_forward": 10 * steps, "total_nfe_backward": 10 * steps,
                    "wall_time": wall + seed, "checkpoint": "", "test_steps": steps, "test_tol": None, "accuracy": 0.9,
                    "nfe": steps, "is_train_solver": test["test_method"] == method, **test,
                })
    return pd.DataFrame(rows)


def adaptation_table() -> pd.DataFrame:
    rows = []
    for i, (dataset, test_method, acc, nfe, wall) in enumerate((
            ("sphere2", "midpoint", 0.98, 100.0, 30.0), ("sphere2", "midpoint", 0.99, 101.0, 31.0),
            ("sphere2", "midpoint", 1.00, 100.5, 32.0), ("sphere2", "rk4", 0.97, 90.0, 40.0),
            ("cifar10", "midpoint", 0.55, 21.9, 500.0), ("mnist", "midpoint", 0.9, 10.0, 5.0))):
        rows.append({
            "experiment": "adapt", "trial_id": f"a{i}", "dataset": dataset, "mode": "step", "train_method": "euler",
            "test_method": test_method, "seed": i, "iterations": 10, "test_accuracy": acc, "nfe_per_iteration": nfe,
            "train_nfe_forward": 900 + 10 * i, "train_nfe_backward": 900, "check_nfe": 100 + i, "total_nfe": 1900 + i,
            "wall_time": wall, "final_steps": 100, "final_tol": None,
        })
    return pd.DataFrame(rows)


def critical(grid: pd.DataFrame) -> pd.DataFrame:
    """A stand-in for the grid's critical-step analysis: fixed answers for the groups of ``grid``."""
    answers = {
        ("sphere2", "euler"): (128, 65, 129, 0.987, 0.010, 5, 0),
        ("sphere2", "rk4"): (8, 17, 33, 0.99, 0.001, 2, 0),
        ("cifar10", "euler"): (16, 17, 33, 0.547, 0.003, 4, 1),
    }
    groups = grid[["dataset", "train_method", "gradient"]].drop_duplicates().itertuples(index=False)
    return pd.DataFrame([dict(zip(CRITICAL_COLUMNS, (g.dataset, g.train_method, g.gradient, answers[(g.dataset, g.train_method)][0], None,
                                                     *answers[(g.dataset, g.train_method)][1:]))) for g in groups])


def test_grid_costs_count_each_trial_once():
    costs = grid_costs(grid_table()).set_index(["dataset", "train_method"])
    assert costs.loc[("sphere2", "euler"), "grid_trials"] == 4
    assert costs.loc[("sphere2", "euler"), "grid_total_nfe"] == 2 * 2 * 10 * (64 + 128)
    assert costs.loc[("sphere2", "euler"), "grid_wall_time"] == 100 + 101 + 200 + 201
    assert costs.loc[("cifar10", "euler"), "grid_total_nfe"] == 2 * 2 * 10 * 16


def test_grid_costs_count_a_seed_groups_wall_time_once():
    # Seeds 0 and 1 of each setting trained together in one Ray trial: the group's time once.
    grid = grid_table()
    grid = grid.assign(trial_id=grid["trial_id"].str.replace(r"-(\d)$", r"_seed\1", regex=True),
                       wall_time=grid["wall_time"].where(grid["seed"] == 0, grid["wall_time"] - 1))
    costs = grid_costs(grid).set_index(["dataset", "train_method"])
    assert costs.loc[("sphere2", "euler"), "grid_trials"] == 4
    assert costs.loc[("sphere2", "euler"), "grid_wall_time"] == 100 + 200
    assert costs.loc[("sphere2", "euler"), "grid_total_nfe"] == 2 * 2 * 10 * (64 + 128)


def test_table1_numbers_from_hand_made_tables():
    table = build_table1(grid_table(), adaptation_table(), critical)
    # RK4 has no adaptation counterpart and MNIST no grid: only matched groups remain.
    assert list(zip(table.dataset, table.test_method)) == [("cifar10", "midpoint"), ("sphere2", "midpoint"), ("sphere2", "rk4")]
    sphere = table[(table.dataset == "sphere2") & (table.test_method == "midpoint")].iloc[0]
    assert sphere.adapt_seeds == 3
    assert sphere.adapt_nfe_per_iteration == pytest.approx(100.5)
    assert sphere.adapt_accuracy_mean == pytest.approx(0.99) and sphere.adapt_accuracy_std == pytest.approx(0.01)
    assert sphere.adapt_total_nfe == 1900 + 1901 + 1902 and sphere.adapt_check_nfe == 100 + 101 + 102
    assert sphere.adapt_wall_time == pytest.approx(93.0)
    assert (sphere.grid_nfe_dependent, sphere.grid_nfe_critical, sphere.grid_accuracy_mean) == (65, 129, 0.987)
    assert sphere.grid_total_nfe == 7680 and sphere.cost_ratio == pytest.approx(7680 / 5703)
    cifar = table[table.dataset == "cifar10"].iloc[0]
    assert cifar.adapt_seeds == 1 and pd.isna(cifar.adapt_accuracy_std) and cifar.grid_excluded_seeds == 1

    md = to_markdown(table).splitlines()
    assert md[0].startswith("| Data set | Solvers (train / test) | Grid NFE | Grid accuracy | Adaptation NFE | Adaptation accuracy")
    assert md[0].count("|") == md[1].count("|") == md[2].count("|")
    assert ("| Concentric spheres 2d | Euler / Midpoint | 65-129 | 98.7 ± 1.0 % | 100.5 | 99.0 ± 1.0 % | 7680 | 5703 | 1.3x "
            "| 10.0 min | 93 s | 5 / 0, 3 |") in md
    assert "| CIFAR10 | Euler / Midpoint | 17-33 | 54.7 ± 0.3 % | 21.9 | 55.0 % | 640 | 1904 | 0.3x | 33.4 min | 8.3 min | 4 / 1, 1 |" in md


def test_adaptation_nfe_training_counts_the_training_passes_only():
    table = build_table1(grid_table(), adaptation_table(), critical, adaptation_nfe="training")
    sphere = table[(table.dataset == "sphere2") & (table.test_method == "midpoint")].iloc[0]
    # Training forward evaluations 900, 910 and 920 over 10 iterations each: the checks are left out.
    assert sphere.adapt_nfe_per_iteration == pytest.approx(91.0)
    assert sphere.adapt_total_nfe == 1900 + 1901 + 1902  # the cost columns count everything either way
    with pytest.raises(ValueError, match="adaptation_nfe must be one of \\['all', 'training'\\], got 'forward'"):
        build_table1(grid_table(), adaptation_table(), critical, adaptation_nfe="forward")
    with pytest.raises(ValueError, match="lacks columns train_nfe_forward"):
        build_table1(grid_table(), adaptation_table().drop(columns=["train_nfe_forward"]), critical, adaptation_nfe="training")


def test_cli_says_what_the_adaptation_nfe_counts(tmp_path, monkeypatch, capsys):
    grid_dir, adapt_dir = write_inputs(tmp_path)
    monkeypatch.setitem(sys.modules, "hand_critical", types.SimpleNamespace(critical=critical))
    args = [str(grid_dir), str(adapt_dir), "--out", str(tmp_path / "out"), "--critical-fn", "hand_critical:critical"]
    assert main(args) == 0
    assert "Adaptation NFE: per iteration, training forward passes and checks." in (tmp_path / "out" / "table1.md").read_text()
    assert main(args + ["--adaptation-nfe", "training"]) == 0
    assert "Adaptation NFE: per iteration, training forward passes only." in (tmp_path / "out" / "table1.md").read_text()
    assert pd.read_csv(tmp_path / "out" / "table1.csv").query("dataset == 'sphere2' and test_method == 'midpoint'") \
        .adapt_nfe_per_iteration.item() == pytest.approx(91.0)


def test_critical_table_missing_columns_is_a_clear_error():
    with pytest.raises(ValueError, match="critical-step table lacks columns nfe_dependent, nfe_critical"):
        build_table1(grid_table(), adaptation_table(), lambda g: critical(g).drop(columns=["nfe_dependent", "nfe_critical"]))


def write_inputs(tmp_path):
    grid_dir, adapt_dir = tmp_path / "grid", tmp_path / "adapt"
    grid_dir.mkdir()
    adapt_dir.mkdir()
    grid_table().to_csv(grid_dir / "results.csv", index=False)
    adaptation_table().to_csv(adapt_dir / "adaptation.csv", index=False)
    return grid_dir, adapt_dir


def test_cli_writes_markdown_and_csv(tmp_path, monkeypatch, capsys):
    grid_dir, adapt_dir = write_inputs(tmp_path)
    # --critical-fn imports MODULE:FUNCTION; register the stand-in as such a module.
    monkeypatch.setitem(sys.modules, "hand_critical", types.SimpleNamespace(critical=critical))
    assert main([str(grid_dir), str(adapt_dir), "--out", str(tmp_path / "out"), "--critical-fn", "hand_critical:critical"]) == 0
    printed = capsys.readouterr().out
    csv = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert len(csv) == 3 and csv.loc[csv.dataset == "sphere2", "adapt_seeds"].tolist() == [3, 1]
    assert (tmp_path / "out" / "table1.md").read_text() in printed


def search_table(**cifar) -> pd.DataFrame:
    """A hand-made search summary: Sphere2 Euler bracketed at 32-38 steps, CIFAR10 Euler (overridable) at its coarsest."""
    nan = float("nan")
    rows = [("sphere2", "euler", "backprop", "found", 32, 38, nan, nan, 38 / 32, 0.985, 0.005, 3, 9, 4, 1240, 150.0, False),
            ("cifar10", "euler", "backprop", "coarsest", nan, 1, nan, nan, nan, 0.5, nan, 1, 2, 0, 64, 7300.0, False),
            ("sphere2", "rk4", "backprop", "found", 4, 5, nan, nan, 1.25, 0.99, 0.0, 2, 5, 1, 300, 20.0, True)]
    search = pd.DataFrame(rows, columns=list(SEARCH_COLUMNS))
    for column, value in cifar.items():
        search.loc[search.dataset == "cifar10", column] = value
    return search


def test_table1_with_search_columns():
    table = build_table1(grid_table(), adaptation_table(), critical, search_table())
    plain = build_table1(grid_table(), adaptation_table(), critical)
    # The search adds columns after the existing ones and changes neither rows nor values.
    assert list(table.columns[:len(plain.columns)]) == list(plain.columns)
    pd.testing.assert_frame_equal(table[plain.columns], plain)
    assert list(table.columns[len(plain.columns):]) == [
        "search_status", "search_dependent_steps", "search_critical_steps", "search_dependent_tol", "search_critical_tol",
        "search_bracket_ratio", "search_accuracy_mean", "search_accuracy_std", "search_seeds", "search_total_nfe",
        "search_wall_time", "search_cost_ratio"]
    sphere = table[table.dataset == "sphere2"]
    assert len(sphere) == 2 and (sphere.search_status == "found").all() and (sphere.search_total_nfe == 1240).all()
    assert (sphere.search_dependent_steps == 32).all() and (sphere.search_critical_steps == 38).all()
    assert sphere.search_bracket_ratio.tolist() == pytest.approx([38 / 32] * 2)
    assert sphere.search_cost_ratio.tolist() == pytest.approx([7680 / 1240] * 2)
    cifar = table[table.dataset == "cifar10"].iloc[0]
    assert cifar.search_status == "coarsest" and pd.isna(cifar.search_dependent_steps) and cifar.search_wall_time == 7300.0
    assert cifar.search_cost_ratio == pytest.approx(640 / 64)

    md = to_markdown(table).splitlines()
    assert md[0].endswith("| Grid wall-clock | Adaptation wall-clock | Search bracket | Search accuracy | Search total NFE "
                          "| Grid / search | Search wall-clock | Seeds (grid used / excluded, adaptation) |")
    assert md[0].count("|") == md[1].count("|") == md[2].count("|") == md[3].count("|")
    assert ("| Concentric spheres 2d | Euler / Midpoint | 65-129 | 98.7 ± 1.0 % | 100.5 | 99.0 ± 1.0 % | 7680 | 5703 | 1.3x "
            "| 10.0 min | 93 s | 32-38 steps (1.19x) | 98.5 ± 0.5 % | 1240 | 6.2x | 2.5 min | 5 / 0, 3 |") in md
    assert ("| CIFAR10 | Euler / Midpoint | 17-33 | 54.7 ± 0.3 % | 21.9 | 55.0 % | 640 | 1904 | 0.3x | 33.4 min | 8.3 min "
            "| coarsest: 1 step | 50.0 % | 64 | 10.0x | 2.0 h | 4 / 1, 1 |") in md
    # Without search columns the Markdown is what it always was.
    assert to_markdown(table[plain.columns]) == to_markdown(plain)
    assert "Search" not in to_markdown(plain)


@pytest.mark.parametrize("cifar,bracket", [
    ({"status": "none", "critical_steps": float("nan"), "dependent_steps": 1}, "none found"),
    ({"status": "coarsest", "critical_steps": 4}, "coarsest: 4 steps"),
    ({"status": "found", "critical_steps": float("nan"), "dependent_tol": 1e-4, "critical_tol": 5e-5, "bracket_ratio": 2.0},
     "tol 1e-4-5e-5 (2.00x)"),
    ({"status": "unconfirmed", "dependent_steps": 8, "critical_steps": 12, "bracket_ratio": 1.5}, "unconfirmed: 8-12 steps (1.50x)"),
    ({"status": "running", "critical_steps": float("nan")}, "running"),
])
def test_search_bracket_text(cifar, bracket):
    md = to_markdown(build_table1(grid_table(), adaptation_table(), critical, search_table(**cifar)))
    row = next(line for line in md.splitlines() if line.startswith("| CIFAR10"))
    assert row.split(" | ")[11] == bracket


def test_search_group_missing_is_a_dash():
    table = build_table1(grid_table(), adaptation_table(), critical, search_table().query("dataset != 'cifar10'"))
    cifar = table[table.dataset == "cifar10"].iloc[0]
    assert pd.isna(cifar.search_status) and pd.isna(cifar.search_cost_ratio)
    row = next(line for line in to_markdown(table).splitlines() if line.startswith("| CIFAR10"))
    assert row.split(" | ")[11:16] == ["–"] * 5


def test_search_summary_missing_columns_is_a_clear_error():
    with pytest.raises(ValueError, match="search summary lacks columns bracket_ratio, train_nfe"):
        search_costs(search_table().drop(columns=["train_nfe", "bracket_ratio"]))
    with pytest.raises(ValueError, match="search summary lacks columns status"):
        build_table1(grid_table(), adaptation_table(), critical, search_table().drop(columns=["status"]))


def test_cli_with_search(tmp_path, monkeypatch, capsys):
    grid_dir, adapt_dir = write_inputs(tmp_path)
    search_dir = tmp_path / "search"
    search_dir.mkdir()
    search_table().to_csv(search_dir / "search_summary.csv", index=False)
    monkeypatch.setitem(sys.modules, "hand_critical", types.SimpleNamespace(critical=critical))
    args = [str(grid_dir), str(adapt_dir), "--out", str(tmp_path / "out"), "--critical-fn", "hand_critical:critical"]
    assert main(args + ["--search", str(search_dir)]) == 0
    md = (tmp_path / "out" / "table1.md").read_text()
    assert "Search bracket" in md and "| 32-38 steps (1.19x) |" in md and "| coarsest: 1 step |" in md
    csv = pd.read_csv(tmp_path / "out" / "table1.csv")
    assert csv.loc[csv.dataset == "cifar10", "search_status"].tolist() == ["coarsest"]
    assert csv.loc[csv.dataset == "sphere2", "search_cost_ratio"].tolist() == pytest.approx([7680 / 1240] * 2)
    capsys.readouterr()
    assert main(args + ["--search", str(tmp_path / "nowhere")]) == 2
    assert "error: no search summary at" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["missing_grid", "ADAPT"], "no grid results table at"),
    (["GRID", "ADAPT", "--critical-fn", "nocolon"], "critical function must be given as MODULE:FUNCTION, got 'nocolon'"),
    (["GRID", "ADAPT", "--critical-fn", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["GRID", "ADAPT", "--critical-fn", "analysis.table1:nothing"], "analysis.table1 has no function 'nothing'"),
])
def test_cli_errors_are_clear(tmp_path, capsys, args, message):
    grid_dir, adapt_dir = write_inputs(tmp_path)
    args = [str(grid_dir) if a == "GRID" else str(adapt_dir) if a == "ADAPT" else str(tmp_path / a) if a == "missing_grid" else a
            for a in args]
    assert main(args) == 2
    assert message in capsys.readouterr().err
