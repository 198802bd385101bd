"""Writes ``analysis/critical_step.ipynb`` from the cells below (outputs empty).

Edit the cells here and run ``python -m analysis.build_notebook``, so the notebook's
source stays reviewable as Python (``tests/test_notebook.py`` checks the two agree).
"""

from __future__ import annotations

from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("critical_step.ipynb")

CELLS = [
    ("markdown", """# Critical step size of a grid experiment

Shows, for the results of `python -m tune_node.grid` (a folder holding `results.csv`): the trials, the
critical-step table, Table 1 when an adaptation run is present, and the figures.

Which results: by default the newest run under `runs/` (the CLI's `runs/<name>/`), searched in the current
folder and its parents, so this works started from the project's root or from `analysis/`. Set the
environment variable `TUNE_NODE_RESULTS` (before starting Jupyter) or `RESULTS_DIR` below to choose
another. Adaptation run (`python -m tune_node.adapt`): the results folder when it holds `adaptation.csv`,
else, when the results were found as the newest run, the newest run under `runs/` that holds one
(`TUNE_NODE_ADAPTATION` chooses it). Figures are saved to
`RESULTS_DIR/figures` (`TUNE_NODE_FIGURES` overrides)."""),
    ("code", """import os
from pathlib import Path

from analysis import figures


def _env_path(name):
    value = os.environ.get(name)
    return Path(value) if value else None


CHOSEN_RESULTS = _env_path("TUNE_NODE_RESULTS")
RESULTS_DIR = CHOSEN_RESULTS or figures.find_run("results.csv")
if RESULTS_DIR is None:
    raise FileNotFoundError(f"no grid results: no runs/<name>/results.csv in {Path.cwd()} or a folder above it. "
                            "Run python -m tune_node.grid --quick first, or set TUNE_NODE_RESULTS (or RESULTS_DIR here).")
if _env_path("TUNE_NODE_ADAPTATION"):
    ADAPTATION_DIR = _env_path("TUNE_NODE_ADAPTATION")
elif RESULTS_DIR.is_dir() and any(RESULTS_DIR.rglob("adaptation.csv")):
    ADAPTATION_DIR = RESULTS_DIR
elif CHOSEN_RESULTS is None:  # both found the same way: the newest of each kind
    ADAPTATION_DIR = figures.find_run("adaptation.csv")
else:  # a chosen results folder is not paired with whatever adaptation run happens to be newest
    ADAPTATION_DIR = None
FIGURES_DIR = _env_path("TUNE_NODE_FIGURES") or (RESULTS_DIR if RESULTS_DIR.is_dir() else RESULTS_DIR.parent) / "figures"
print(f"results:    {RESULTS_DIR}")
print(f"adaptation: {ADAPTATION_DIR or 'none found'}")
print(f"figures:    {FIGURES_DIR}")"""),
    ("code", """import pandas as pd
from IPython.display import Image, display

from analysis import tables


def show(fig, name):
    \"\"\"Display a figure inline and save it under FIGURES_DIR.\"\"\"
    display(Image(data=figures.png_bytes(fig)))
    figures.save_figure(fig, FIGURES_DIR, name)


results = figures.load_results(RESULTS_DIR)
trials = results.drop_duplicates("trial_id")
print(f"{len(trials)} trials, {len(results)} test rows")
display(tables.html(tables.overview_table(results),
                    "Trials per train method: train and test accuracy under the train solver, mean ± std over trials"))"""),
    ("markdown", """## Critical step

The rule is in `analysis.critical_step`'s docstring (`python -m analysis.critical_step --help`): a seed counts
when its train accuracy is at least chance + 0.1; a training setting is solver-independent when every test
solver of equal or smaller error keeps the mean accuracy within 0.1 (10 percentage points) of the train
solver's; the critical setting is the coarsest from which all finer ones are solver-independent."""),
    ("code", """try:
    from analysis import critical_step
except ImportError:
    critical_step = None
critical = None
if critical_step is None or not hasattr(critical_step, "critical_steps"):
    print("analysis.critical_step (critical_steps) is not available here: no critical-step table")
else:
    summary = critical_step.critical_steps(results)
    display(tables.html(tables.critical_table(critical_step.display_rows(summary)),
                        "Critical setting per train method: critical_steps() as python -m analysis.critical_step prints it"))
    display(tables.html(tables.settings_table(critical_step.solver_independence(results)),
                        "Per training setting: accuracy under the train solver and the worst test solver of smaller error"))
    critical = figures.critical_from_summary(summary)"""),
    ("markdown", "## Table 1: grid search against adaptation"),
    ("code", """adaptation_csv = sorted(ADAPTATION_DIR.rglob("adaptation.csv")) if ADAPTATION_DIR and ADAPTATION_DIR.is_dir() else []
try:
    from analysis import table1
except ImportError:
    table1 = None
if not adaptation_csv:
    print("no adaptation run found (adaptation.csv): run python -m tune_node.adapt for Table 1")
elif table1 is None:
    print("analysis.table1 is not available here: no Table 1")
else:
    adapt = pd.concat([pd.read_csv(p) for p in adaptation_csv], ignore_index=True)
    try:
        table = table1.build_table1(results, adapt, table1.load_critical_fn(table1.DEFAULT_CRITICAL_FN))
    except ValueError as err:
        table = None
        print(f"Table 1 could not be built: {err}")
    if table is not None and table.empty:
        print(f"the adaptation run ({ADAPTATION_DIR}) shares no dataset and train method with the grid: no Table 1")
    elif table is not None:
        display(tables.html(tables.transpose(table1.display_frame(table), key_columns=2, label=" "),
                            "Table 1 (one column per data set and solvers; python -m analysis.table1 writes it as Markdown)"))"""),
    ("markdown", "## Accuracy against the test solver (Figure 4)"),
    ("code", """for adaptive, name in ((False, "accuracy_vs_steps"), (True, "accuracy_vs_tolerance")):
    fig = figures.accuracy_figure(results, adaptive=adaptive, critical=critical)
    if fig is None:
        print(f"{name}: no {'adaptive' if adaptive else 'fixed-step'} trials in the results")
        continue
    show(fig, name)"""),
    ("markdown", "## Adaptation over training (Figure 5)"),
    ("code", """history = figures.load_adaptation_history(ADAPTATION_DIR) if ADAPTATION_DIR else None
if history is None:
    print("no adaptation_history.csv found")
else:
    fig = figures.adaptation_figure(history)
    show(fig, "adaptation")"""),
    ("markdown", """## Phase-space trajectories and decision regions (Figures 1 and 2)

For 2-D models: paths of test points under the train solver and a finer solver, and the classifier's
decision regions over the ODE block's outputs. Crossing paths of different classes mean the model relies
on its solver, not on an ODE. Per train method: the model trained with 2 steps (h = 1/2) and the one
with the most, each at a representative seed (a trained one of median accuracy, not one left at chance)."""),
    ("code", """chosen = figures.trajectory_trials(results)
if not chosen:
    print("no fixed-step trials on 2-D data (sphere2) in the results")
for trial in chosen:
    if not Path(trial.checkpoint).is_file():
        print(f"{trial.trial_id}: checkpoint {trial.checkpoint} is missing")
        continue
    print(f"{trial.train_method}, {int(trial.train_steps)} steps: seed {trial.seed} ({trial.trial_id})")
    fig = figures.trajectory_figure(trial.checkpoint)
    show(fig, f"trajectories_{trial.trial_id}")
if chosen:
    crossing = figures.crossing_table(results)
    display(tables.html(tables.crossing_summary(crossing),
                        "Different-class pairs of test points whose paths cross under the train solver"))
    fig = figures.crossing_vs_steps_figure(crossing)
    if fig is not None:
        show(fig, "crossing_vs_steps")"""),
    ("markdown", """## The paper's hand-made examples (Figure 3, Appendix A)

Independent of the results: the XOR flow under Euler at two step sizes, and the piecewise field of
Appendix A (see `analysis.examples` for the reconstructed equations)."""),
    ("code", """for name, make in (("xor", figures.xor_figure), ("appendix_a", figures.appendix_a_figure)):
    show(make(), name)
print(f"figures saved under {FIGURES_DIR}")"""),
]


def build() -> nbformat.NotebookNode:
    """The notebook object, cells as listed in :data:`CELLS`."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src) for kind, src in CELLS]
    return nb


def main() -> int:
    nbformat.write(build(), NOTEBOOK)
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
