"""The user study in ``examples/crescents`` (its own data, a time-dependent field) through the CLIs a
researcher runs: the grid and the adaptation on real Ray, then critical step, Table 1 and figures.
Nothing is set but the search-space path: no PYTHONPATH, run from a folder of its own."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
SPACE = ROOT / "examples" / "crescents" / "crescents.toml"


def run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("researcher")
    grid = run("tune_node.grid", "--space", str(SPACE), "--storage", "runs", "--iterations", "100", "--cpus", "2", cwd=cwd)
    adapt = run("tune_node.adapt", "--space", str(SPACE), "--storage", "runs", "--iterations", "100", "--cpus", "2",
                "--train-solver", "euler", "--test-solver", "midpoint", cwd=cwd)
    return cwd, grid, adapt


def test_the_grid_trains_the_user_s_model_on_the_user_s_data(study):
    cwd, grid, _ = study
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    table = pd.read_csv(cwd / "runs" / "crescents" / "results.csv")
    assert set(table["dataset"]) == {"crescents:load"}
    assert table["trial_id"].nunique() == 16  # Euler 1..32 and RK4 1, 2 steps, 2 seeds
    assert (table["chance_accuracy"] == 0.5).all() and (table["status"] == "trained").all()
    assert "critical step per train solver" in grid.stdout and "crescents:load" in grid.stdout


def test_the_adaptation_runs_on_the_same_study(study):
    cwd, _, adapt = study
    assert adapt.returncode == 0, adapt.stdout[-3000:] + adapt.stderr[-3000:]
    summary = pd.read_csv(cwd / "runs" / "adapt_crescents_euler_midpoint" / "adaptation.csv")
    assert len(summary) == 2 and set(summary["dataset"]) == {"crescents:load"}


def test_critical_step_table1_and_figures_read_the_study(study, tmp_path):
    cwd, grid, adapt = study
    assert grid.returncode == adapt.returncode == 0
    critical = run("analysis.critical_step", "runs/crescents", cwd=cwd)
    assert critical.returncode == 0 and "crescents:load" in critical.stdout, critical.stderr
    table1 = run("analysis.table1", "runs/crescents", "runs/adapt_crescents_euler_midpoint", "--out", str(tmp_path / "t1"),
                 cwd=cwd)
    assert table1.returncode == 0, table1.stderr
    assert "crescents:load" in (tmp_path / "t1" / "table1.md").read_text()
    figures = run("analysis.figures", "runs/crescents", "--out", str(tmp_path / "fig"), "--no-svg", cwd=cwd)
    assert figures.returncode == 0, figures.stderr
    assert (tmp_path / "fig" / "accuracy_vs_steps.png").is_file()
    # 2-D data: the paths of the coarsest and finest Euler models, and crossing against steps.
    assert sorted(p.name for p in (tmp_path / "fig").glob("trajectories_crescents-load_euler_*steps_seed0.png")) == [
        "trajectories_crescents-load_euler_2steps_seed0.png", "trajectories_crescents-load_euler_32steps_seed0.png"]
    assert (tmp_path / "fig" / "crossing_vs_steps.png").is_file()


def test_the_notebook_opens_on_the_user_study(study, tmp_path, monkeypatch):
    from test_notebook import execute_notebook

    cwd, grid, _ = study
    assert grid.returncode == 0
    _, text, html, _ = execute_notebook(cwd / "runs" / "crescents", tmp_path, monkeypatch)
    assert "16 trials, " in text and "critical_steps" in html and "crescents:load" in html
