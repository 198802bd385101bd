import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
from _results_fixture import shared_results
from nbclient import NotebookClient

from analysis import critical_step, figures, tables

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "critical_step.ipynb"
# Every figure of the fixture: accuracy vs steps and vs tolerance, adaptation, 3 trajectory figures, crossing, XOR, Appendix A.
FIGURES = 9


def outputs_of(nb, kind):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if kind(o)]


def read_outputs(nb):
    """(stream text, html, images) of an executed notebook; asserts that no cell failed."""
    assert not outputs_of(nb, lambda o: o.output_type == "error")
    text = "\n".join(o.get("text", "") for o in outputs_of(nb, lambda o: o.output_type == "stream"))
    html = "\n".join(o.data["text/html"] for o in outputs_of(nb, lambda o: "text/html" in o.get("data", {})))
    images = outputs_of(nb, lambda o: "image/png" in o.get("data", {}))
    return text, html, images


def table_cells(html):
    return [re.sub(r"<[^>]+>", "", cell) for cell in re.findall(r"<td[^>]*>(.*?)</td>", html)]


def clean_env():
    """The environment of a user who set nothing: no TUNE_NODE_* variables, no PYTHONPATH."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TUNE_NODE_") and k != "PYTHONPATH"}


def test_notebook_is_the_one_build_notebook_writes():
    from analysis.build_notebook import build

    assert [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells] == [c.source for c in build().cells]


def execute_notebook(results_dir, figures_dir, monkeypatch):
    """Run the notebook headless on ``results_dir`` (through TUNE_NODE_RESULTS, from the repository's
    root); return (notebook, stream text, html, markdown)."""
    monkeypatch.setenv("TUNE_NODE_RESULTS", str(results_dir))
    monkeypatch.setenv("TUNE_NODE_FIGURES", str(figures_dir))
    monkeypatch.delenv("TUNE_NODE_ADAPTATION", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the traceback, if any cell fails.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    text, html, _ = read_outputs(nb)
    markdown = "\n".join(o.data["text/markdown"] for o in outputs_of(nb, lambda o: "text/markdown" in o.get("data", {})))
    return nb, text, html, markdown


def make_project(root: Path, results: Path) -> Path:
    """A project folder as the README's commands leave it: runs/<name>/ of a quick grid (the fixture's
    results; checkpoints stay where results.csv points), an older grid run, an adaptation run beside
    them, and the notebook in analysis/."""
    runs = root / "runs"
    (runs / "older_grid").mkdir(parents=True)
    older = pd.read_csv(results / "results.csv")
    older[older.train_method == "rk4"].to_csv(runs / "older_grid" / "results.csv", index=False)
    os.utime(runs / "older_grid" / "results.csv", (1e9, 1e9))
    (runs / "quick").mkdir()
    shutil.copy(results / "results.csv", runs / "quick" / "results.csv")
    shutil.copytree(results / "adaptation", runs / "adapt_sphere2_euler_midpoint")
    (root / "analysis").mkdir()
    shutil.copy(NOTEBOOK, root / "analysis" / NOTEBOOK.name)
    return root


def test_jupyter_nbconvert_runs_the_notebook_on_the_newest_run(tmp_path_factory, tmp_path):
    """The README's command after only its install: no environment variables, the newest run found."""
    project = make_project(tmp_path / "project", shared_results(tmp_path_factory))
    for package in ("jupyterlab", "nbconvert"):  # what the README's pip install -e ".[dev]" brings
        assert importlib.metadata.version(package)
    jupyter = Path(sys.executable).with_name("jupyter")
    assert jupyter.is_file(), f"{jupyter} missing: the dev extra brings JupyterLab and nbconvert"
    executed = tmp_path / "executed.ipynb"
    command = [str(jupyter), "nbconvert", "--to", "notebook", "--execute", "analysis/critical_step.ipynb", "--output", str(executed)]
    run = subprocess.run(command, cwd=project, env=clean_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    text, html, images = read_outputs(nbformat.read(executed, as_version=4))
    runs = project.resolve() / "runs"
    assert f"results:    {runs / 'quick'}" in text  # the newest grid run, not older_grid
    assert f"adaptation: {runs / 'adapt_sphere2_euler_midpoint'}" in text
    assert "14 trials, " in text  # 7 training settings x 2 seeds
    assert "Concentric spheres 2d, Euler / Midpoint" in html  # Table 1 from the adaptation run beside it
    assert len(images) == FIGURES
    saved = sorted((runs / "quick" / "figures").glob("*.png"))
    assert len(saved) == FIGURES and all(p.stat().st_size > 5000 for p in saved)


def test_notebook_reads_tune_node_results_before_any_run(tmp_path_factory, tmp_path, monkeypatch):
    """TUNE_NODE_RESULTS overrides the newest run; tables read as the CLI prints them."""
    results = shared_results(tmp_path_factory)
    decoy = tmp_path / "decoy" / "runs" / "newer"
    decoy.mkdir(parents=True)
    (decoy / "results.csv").write_text("not,a,grid\n")
    monkeypatch.setenv("TUNE_NODE_RESULTS", str(results))
    monkeypatch.setenv("TUNE_NODE_FIGURES", str(tmp_path / "figures"))
    monkeypatch.delenv("TUNE_NODE_ADAPTATION", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the traceback, if any cell fails.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path / "decoy")}}).execute()
    text, html, images = read_outputs(nb)
    assert f"results:    {results}" in text and "14 trials, " in text
    assert "Table 1 could not be built" not in text and "Concentric spheres 2d" in html  # adaptation below the results
    assert len(images) == FIGURES and len(list((tmp_path / "figures").glob("*.png"))) == FIGURES
    # Formatted tables: accuracies in percent, no NaN, no raw fractions, no index column.
    cells = table_cells(html)
    assert cells and "NaN" not in html and "nan" not in cells
    assert any(re.fullmatch(r"\d+\.\d ± \d+\.\d %", c) for c in cells)
    assert not [c for c in cells if re.fullmatch(r"0\.\d+", c)]
    for caption in ("Trials per train method", "Critical setting per train method", "Per training setting", "Table 1",
                    "paths cross under the train solver"):
        assert caption in html
    # The trajectory figures are of trained seeds where a setting has one.
    chosen = figures.trajectory_trials(figures.load_results(results))
    assert [line for line in text.splitlines() if re.match(r"(euler|rk4), \d+ steps: seed", line)] == [
        f"{t.train_method}, {int(t.train_steps)} steps: seed {t.seed} ({t.trial_id})" for t in chosen]


def test_tables_are_formatted_for_reading(tmp_path_factory):
    results = figures.load_results(shared_results(tmp_path_factory))
    overview = tables.overview_table(results)
    assert list(overview["train method"]) == ["Euler", "Fehlberg21", "RK4"]
    assert list(overview["trained with"]) == ["1, 2, 4 steps", "tol 0.01, 0.001", "1, 2 steps"]
    assert overview["train accuracy"].str.fullmatch(r"\d+\.\d ± \d+\.\d %").all()
    settings = tables.settings_table(critical_step.solver_independence(results))
    assert len(settings) == 7 and not settings.isna().any().any()
    one_seed = settings[settings["seeds used"].str.startswith("1 of")]
    assert one_seed.accuracy.str.fullmatch(r"\d+\.\d %").all()  # no spread of a single seed
    none_trained = settings[settings["seeds used"].str.startswith("0 of")]
    assert (none_trained.verdict == "no trained seed").all() and (none_trained.accuracy == "-").all()
    critical = tables.critical_table(critical_step.display_rows(critical_step.critical_steps(results)))
    assert set(critical["train method"]) == {"Euler", "Fehlberg21", "RK4"}


def test_table_helpers():
    assert tables.percent(0.823) == "82.3 %" and tables.percent(0.823, 0.0123) == "82.3 ± 1.2 %"
    assert tables.percent(float("nan")) == "-" and tables.percent(None) == "-"
    assert tables.steps_list([1, 2, 4, 8, 16, 32, 64, 128]) == "1, 2, 4, …, 64, 128 steps"
    assert tables.steps_list([1.0]) == "1 step" and tables.steps_list([1e-3, 1e-2], adaptive=True) == "tol 0.01, 0.001"
    frame = pd.DataFrame({"a": [1, 2], "b": [float("nan"), None], "c": ["-", "-"], "d": ["x", "-"]})
    assert list(tables.drop_empty(frame).columns) == ["a", "d"]
    wide = pd.DataFrame({"Data set": ["S2", "S2"], "Solvers": ["Euler / Midpoint", "Euler / RK4"], "NFE": ["32-64", "8-16"]})
    assert tables.transpose(wide, key_columns=2, label=" ").to_dict("records") == [
        {" ": "NFE", "S2, Euler / Midpoint": "32-64", "S2, Euler / RK4": "8-16"}]
    shown = tables.html(pd.DataFrame({"x": [None, "<b>"]}), "caption")
    assert "<td" in shown._repr_html_() and "&lt;b&gt;" in shown._repr_html_() and ">-</td>" in shown._repr_html_()
