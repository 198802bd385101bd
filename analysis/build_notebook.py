"""Writes ``analysis/critical_step.ipynb`` from the cells below (outputs empty).

Edit the cells here and run ``python -m analysis.build_notebook``, so the notebook's
source stays reviewable as Python.
"""

from __future__ import annotations

from pathlib import Path

import nbformat

NOTEBOOK = Path(__file__).with_name("critical_step.ipynb")

CELLS = [
    ("markdown", """# Critical step size of a grid experiment

Points at the results folder of `python -m tune_node.grid` (the folder holding `results.csv`) and shows
the critical-step table, Table 1 when adaptation runs are present, and the figures.

Set `RESULTS_DIR` below, or the environment variable `TUNE_NODE_RESULTS` before starting Jupyter
(`TUNE_NODE_ADAPTATION`: folder of an adaptation run; `TUNE_NODE_FIGURES`: where figures are saved)."""),
    ("code", """import os
from pathlib import Path

RESULTS_DIR = Path(os.environ.get("TUNE_NODE_RESULTS", "results"))
ADAPTATION_DIR = Path(os.environ.get("TUNE_NODE_ADAPTATION", RESULTS_DIR))
FIGURES_DIR = Path(os.environ.get("TUNE_NODE_FIGURES", RESULTS_DIR / "figures"))"""),
    ("code", """import pandas as pd
from IPython.display import Image, Markdown, display

from analysis import figures


def show(fig, name):
    \"\"\"Display a figure inline and save it under FIGURES_DIR.\"\"\"
    display(Image(data=figures.png_bytes(fig)))
    figures.save_figure(fig, FIGURES_DIR, name)


results = figures.load_results(RESULTS_DIR)
trials = results.drop_duplicates("trial_id")
print(f"{len(trials)} trials, {len(results)} test rows from {RESULTS_DIR}")
display(trials.groupby(["dataset", "train_method", "gradient"], dropna=False)
        .agg(trials=("trial_id", "count"), seeds=("seed", "nunique"),
             train_accuracy=("train_accuracy", "mean"), test_accuracy=("test_accuracy", "mean")))"""),
    ("markdown", """## Critical step

The rule is in `analysis.critical_step`'s docstring: a training setting is solver-independent when every
test solver of equal or smaller error keeps accuracy within 0.1 of the train solver's; the critical setting
is the coarsest from which all finer ones are solver-independent."""),
    ("code", """try:
    from analysis import critical_step
except ImportError:
    critical_step = None
critical = None
if critical_step is None or not hasattr(critical_step, "critical_steps"):
    print("analysis.critical_step (critical_steps) is not available here: no critical-step table")
else:
    summary = critical_step.critical_steps(results)
    display(summary)
    critical = figures.critical_from_summary(summary)"""),
    ("markdown", "## Table 1: grid search against adaptation"),
    ("code", """adaptation_csv = sorted(ADAPTATION_DIR.rglob("adaptation.csv")) if ADAPTATION_DIR.is_dir() else []
try:
    from analysis import table1
except ImportError:
    table1 = None
if not adaptation_csv:
    print(f"no adaptation.csv under {ADAPTATION_DIR}: run python -m tune_node.adapt for Table 1")
elif table1 is None:
    print("analysis.table1 is not available here: no Table 1")
else:
    adapt = pd.concat([pd.read_csv(p) for p in adaptation_csv], ignore_index=True)
    try:
        table = table1.build_table1(results, adapt, table1.load_critical_fn(table1.DEFAULT_CRITICAL_FN))
        display(Markdown(table1.to_markdown(table)))
    except ValueError as err:
        print(f"Table 1 could not be built: {err}")"""),
    ("markdown", "## Accuracy against the test solver (Figure 4)"),
    ("code", """for adaptive, name in ((False, "accuracy_vs_steps"), (True, "accuracy_vs_tolerance")):
    fig = figures.accuracy_figure(results, adaptive=adaptive, critical=critical)
    if fig is None:
        print(f"{name}: no {'adaptive' if adaptive else 'fixed-step'} trials in the results")
        continue
    show(fig, name)"""),
    ("markdown", "## Adaptation over training (Figure 5)"),
    ("code", """history = figures.load_adaptation_history(ADAPTATION_DIR)
if history is None:
    print(f"no adaptation_history.csv under {ADAPTATION_DIR}")
else:
    fig = figures.adaptation_figure(history)
    show(fig, "adaptation")"""),
    ("markdown", """## Phase-space trajectories and decision regions (Figures 1 and 2)

For 2-D models: paths of test points under the train solver and a finer solver, and the classifier's
decision regions over the ODE block's outputs. Crossing paths of different classes mean the model relies
on its solver, not on an ODE."""),
    ("code", """chosen = figures.trajectory_trials(results)
if not chosen:
    print("no fixed-step trials on 2-D data (sphere2) in the results")
for trial in chosen:
    if not Path(trial.checkpoint).is_file():
        print(f"{trial.trial_id}: checkpoint {trial.checkpoint} is missing")
        continue
    fig = figures.trajectory_figure(trial.checkpoint)
    show(fig, f"trajectories_{trial.trial_id}")
if chosen:
    crossing = figures.crossing_table(results)
    display(crossing.groupby(["train_method", "train_steps"]).crossing.agg(["mean", "std", "count"]))
    fig = figures.crossing_vs_steps_figure(crossing)
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
