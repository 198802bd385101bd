"""The tables the figures are drawn from: the grid's results and the adaptation history
read from disk, the newest run under ``./runs``, the critical settings, and the choice of
trials worth a trajectory figure (a representative trained seed).

Tables only (pandas); nothing here draws or loads a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

__all__ = [
    "RESULT_COLUMNS",
    "HISTORY_COLUMNS",
    "require_columns",
    "load_results",
    "load_adaptation_history",
    "critical_from_summary",
    "critical_from_results",
    "critical_for",
    "RUNS_FOLDER",
    "find_run",
    "representative_seed",
    "trajectory_trials",
]

RUNS_FOLDER = "runs"  # the grid's and adaptation CLIs' default --storage

RESULT_COLUMNS = (
    "trial_id", "dataset", "train_method", "train_steps", "train_tol", "gradient", "seed",
    "checkpoint", "test_method", "test_steps", "test_tol", "factor", "accuracy", "is_train_solver",
)
HISTORY_COLUMNS = ("trial_id", "seed", "iteration", "step_size", "tol", "steps", "check_nfe", "test_accuracy")


def require_columns(df: pd.DataFrame, needed, what: str) -> None:
    """Raise ValueError naming ``what`` and the missing columns unless ``df`` has all of ``needed``."""
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {list(df.columns)}")


def load_results(results_dir: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """The grid's results table under ``results_dir`` (``results.csv``, else
    ``results.parquet``) or the file itself, validated; for a list of them (a study run in
    parts) their rows together, each training in one part only
    (:func:`tune_node.results.combine_parts`)."""
    if not isinstance(results_dir, (str, Path)):
        from tune_node.results import combine_parts

        return combine_parts([(str(part), load_results(part)) for part in results_dir])
    path = Path(results_dir)
    if path.is_dir():
        candidates = [path / "results.csv", path / "results.parquet"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise FileNotFoundError(f"no grid results at {str(path)!r} (expected results.csv or results.parquet written by the grid)")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    require_columns(df, RESULT_COLUMNS, str(path))
    df["is_train_solver"] = df["is_train_solver"].astype(str).str.lower().eq("true")
    return df


def load_adaptation_history(where: str | Path | Sequence[str | Path]) -> pd.DataFrame | None:
    """Every ``adaptation_history.csv`` at or below ``where`` (or each of several places), concatenated;
    None if there is none."""
    places = [Path(where)] if isinstance(where, (str, Path)) else [Path(w) for w in where]
    files = [f for place in places for f in ([place] if place.is_file() else sorted(place.rglob("adaptation_history.csv")))]
    if not files:
        return None
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    require_columns(df, HISTORY_COLUMNS, ", ".join(map(str, files)))
    return df


def find_run(marker: str = "results.csv", start: str | Path = ".", folder: str = RUNS_FOLDER) -> Path | None:
    """The newest run folder holding ``marker``: the nearest ``folder`` (``runs``) in ``start`` or
    one of its parents, then its subfolder whose ``marker`` was written last (or that folder itself
    when it holds ``marker``). None when there is no such folder or no run in it.

    The grid CLI writes ``runs/<name>/results.csv`` (``marker="results.csv"``), the adaptation
    CLI ``runs/<name>/adaptation.csv``. Parents are searched because a Jupyter kernel starts in
    the notebook's folder (``analysis/``), one below the ``runs`` of the project's root.
    """
    here = Path(start).resolve()
    for parent in (here, *here.parents):
        root = parent / folder
        if not root.is_dir():
            continue
        found = [p for p in (root / marker, *root.glob(f"*/{marker}")) if p.is_file()]
        if found:
            return max(found, key=lambda p: (p.stat().st_mtime, str(p))).parent
        return None  # the nearest runs folder is the project's, even when it holds no run yet
    return None


def critical_from_summary(summary: pd.DataFrame) -> dict:
    """The ``critical`` mapping of :func:`analysis.plots.accuracy_figure` from a critical-step summary
    (one row per ``dataset, train_method, gradient`` with ``critical_steps`` and/or
    ``critical_tol``, as ``analysis.critical_step`` reports it); rows without a
    critical setting are left out."""
    require_columns(summary, ("dataset", "train_method", "gradient"), "critical-step summary")
    critical = {}
    for row in summary.to_dict("records"):
        for column in ("critical_steps", "critical_tol"):
            value = row.get(column)
            if value is not None and not pd.isna(value):
                critical[(row["dataset"], row["train_method"], row["gradient"])] = float(value)
    return critical


def critical_from_results(results: pd.DataFrame, log: Callable[[str], object] = print) -> dict | None:
    """The critical settings of ``results`` as :func:`analysis.critical_step.critical_steps`
    finds them, in the form of :func:`critical_from_summary`; None, with a note to ``log``,
    when that module or function is not available."""
    # analysis.critical_step belongs to the grid experiment; figures are drawn without it when absent.
    try:
        from . import critical_step
    except ImportError:
        log("no critical step marked: analysis.critical_step is not available")
        return None
    finder = getattr(critical_step, "critical_steps", None)
    if finder is None:
        log("no critical step marked: analysis.critical_step has no critical_steps()")
        return None
    return critical_from_summary(finder(results))


def critical_for(critical: Mapping | None, dataset: str, method: str, gradient: str) -> float | None:
    """The critical setting of one panel from a ``critical`` mapping, keyed by
    ``(dataset, method, gradient)`` or else ``(dataset, method)``; None when it has none."""
    if not critical:
        return None
    for key in ((dataset, method, gradient), (dataset, method)):
        if key in critical and critical[key] is not None and not pd.isna(critical[key]):
            return float(critical[key])
    return None


def _trained_ids(results: pd.DataFrame, margin: float) -> set | None:
    """Trial ids of trained seeds by the critical-step rule (train accuracy >= chance + margin,
    not diverged); None when the rule cannot judge (no chance accuracy known, or no rule)."""
    try:
        from .critical_step import trial_table
    except ImportError:
        return None
    try:
        trials = trial_table(results, margin)
    except ValueError:  # a user's dataset without chance_accuracy in the table
        return None
    return set(trials.loc[trials["trained"], "trial_id"])


def _seed_accuracy(trials: pd.DataFrame, results: pd.DataFrame) -> pd.Series:
    """Per trial id: test accuracy under its own train solver (else the trial's test_accuracy)."""
    own = results[results.trial_id.isin(trials.trial_id) & results.is_train_solver].groupby("trial_id").accuracy.mean()
    fallback = trials.set_index("trial_id")["test_accuracy"] if "test_accuracy" in trials else pd.Series(dtype=float)
    return own.reindex(trials.trial_id).fillna(fallback.reindex(trials.trial_id)).astype(float)


def representative_seed(trials: pd.DataFrame, results: pd.DataFrame, trained: set | None = None) -> pd.Series:
    """The row of ``trials`` (the trials of one training setting, one row each) to show as its example:
    among the trained seeds (``trained``: their trial ids; None: every seed counts as trained), the one
    whose accuracy under its train solver is nearest the median of theirs (ties: the smaller seed); when
    no seed trained (every one at chance), the most accurate one. Diverged trials are never picked
    while another is left."""
    if "status" in trials:
        alive = trials[trials["status"].astype(str) != "diverged"]
        trials = alive if len(alive) else trials
    accuracy = _seed_accuracy(trials, results).fillna(-1.0).to_numpy()
    order = trials.assign(_acc=accuracy, _seed=trials.seed.to_numpy())
    pool = order[order.trial_id.isin(trained)] if trained is not None else order
    if pool.empty:
        return trials.loc[order.sort_values(["_acc", "_seed"], ascending=[False, True]).index[0]]
    distance = (pool["_acc"] - pool["_acc"].median()).abs().round(9)  # two seeds are equally near their median: the smaller
    best = pool.assign(_distance=distance).sort_values(["_distance", "_seed"]).index[0]
    return trials.loc[best]


def trajectory_trials(results: pd.DataFrame, margin: float = 0.1) -> list:
    """Trials worth a trajectory figure, as result rows: per dataset that may be 2-D (Sphere2,
    or a user's ``"module:function"``, whose shape only its checkpoint tells), fixed train
    method and gradient, the trial trained with 2 steps (the paper's h = 1/2; else the fewest
    steps) and the one trained with the most, each at a representative seed
    (:func:`representative_seed`): a trained one (train accuracy >= chance + ``margin``, the
    critical-step rule) of median accuracy, not one that stayed at chance."""
    maybe_2d = results.dataset.eq("sphere2") | results.dataset.astype(str).str.contains(":", regex=False)
    fixed = results[results.train_steps.notna() & maybe_2d].drop_duplicates("trial_id")
    trained = _trained_ids(results, margin) if len(fixed) else None
    chosen = []
    for _, group in fixed.groupby(["dataset", "train_method", "gradient"]):
        steps = sorted(group.train_steps.unique())
        picks = [2.0 if 2.0 in steps else steps[0], steps[-1]]
        for s in dict.fromkeys(picks):
            chosen.append(representative_seed(group[group.train_steps == s], results, trained))
    return chosen
