"""Rows of the adaptation results tables, from a finished training run and its controller.

``adaptation.csv`` has one row per trial (:func:`summary_row`),
``adaptation_history.csv`` one row per check (:func:`history_rows`); both are read
by :mod:`analysis.table1`. Whatever runs the trials (a Ray trainable, a script)
only writes these rows. :func:`write_tables` collects them from the trials of
``python -m tune_node.adapt``; :func:`describe` is that CLI's closing summary.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd

from ..train.training import TrainResult

__all__ = ["SUMMARY_COLUMNS", "HISTORY_COLUMNS", "SUMMARY_CSV", "HISTORY_CSV", "NFE_LABEL",
           "summary_row", "history_rows", "collect", "write_tables",
           "per_seed_rows", "describe"]

SUMMARY_COLUMNS = (
    "experiment", "trial_id", "dataset", "mode", "train_method", "test_method", "gradient", "seed", "iterations",
    "test_accuracy", "nfe_per_iteration", "train_nfe_forward", "train_nfe_backward", "check_nfe", "total_nfe",
    "wall_time", "final_steps", "final_tol", "status", "diverged_iteration", "diverged_reason",
)
HISTORY_COLUMNS = (
    "trial_id", "seed", "iteration", "step_size", "tol", "steps", "test_steps", "test_tol", "train_solver_accuracy",
    "test_solver_accuracy", "proposed", "accepted", "candidate_accuracy", "check_nfe", "test_accuracy",
)


def summary_row(result: TrainResult, controller, experiment: str, trial_id: str) -> dict:
    """One ``adaptation.csv`` row for a finished run.

    ``nfe_per_iteration`` is the paper's Table 1 number: forward evaluations of the
    training passes plus every evaluation the checks spent (the starting step
    included), divided by the iterations. ``total_nfe`` adds the backward
    evaluations: the run's whole cost in function evaluations.
    """
    s = result.setting
    return {
        "experiment": experiment,
        "trial_id": trial_id,
        "dataset": result.config.dataset,
        "mode": controller.mode,
        "train_method": controller.method,
        "test_method": controller.test_method,
        "gradient": s.gradient,
        "seed": result.config.seed,
        "iterations": result.iterations,
        "test_accuracy": result.test_accuracy,
        "nfe_per_iteration": result.forward_nfe_per_iteration,
        "train_nfe_forward": result.total_nfe_forward,
        "train_nfe_backward": result.total_nfe_backward,
        "check_nfe": result.check_nfe,
        "total_nfe": result.total_nfe_forward + result.total_nfe_backward + result.check_nfe,
        "wall_time": result.wall_time,
        "final_steps": s.steps,
        "final_tol": s.tol,
        # "diverged": the loss stopped being finite at diverged_iteration; accuracies are NaN.
        "status": "trained" if result.diverged is None else "diverged",
        "diverged_iteration": None if result.diverged is None else result.diverged.iteration,
        "diverged_reason": None if result.diverged is None else result.diverged.reason,
    }


def history_rows(result: TrainResult, controller, trial_id: str) -> list[dict]:
    """One ``adaptation_history.csv`` row per check of ``controller``.

    ``test_accuracy`` is the whole test set's accuracy when training reported one
    at the check's iteration (``TrainConfig.test_every``), NaN otherwise.
    """
    tested = {h["iteration"]: h["test_accuracy"] for h in result.history if h.get("test_accuracy") is not None}
    rows = []
    for check in controller.history:
        row = {"trial_id": trial_id, "seed": result.config.seed, **check.to_dict()}
        row["test_accuracy"] = tested.get(check.iteration, math.nan)
        rows.append({c: row[c] for c in HISTORY_COLUMNS})
    return rows


SUMMARY_CSV = "adaptation.csv"
HISTORY_CSV = "adaptation_history.csv"
#: The one name of ``nfe_per_iteration`` (the paper's Table 1 number) in the summary, its table and the progress lines.
NFE_LABEL = "NFE per iteration"


def collect(experiment_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The summary and history tables of every finished trial of an adaptation experiment.

    Reads the ``final.json`` each finished trial of :mod:`tune_node.adapt_trainable`
    leaves in its newest final checkpoint; unfinished trials have no rows, so this
    works on an interrupted experiment too, and an unreadable ``final.json`` is
    skipped with a warning naming it. Columns are :data:`SUMMARY_COLUMNS` and
    :data:`HISTORY_COLUMNS`; rows sorted by seed (and iteration).
    """
    from .table import _final_files

    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise FileNotFoundError(f"experiment directory {str(experiment_dir)!r} does not exist")
    summaries, histories = [], []
    for path in _final_files(experiment_dir):
        try:
            final = json.loads(path.read_text())
            summary, history = dict(final["summary"]), list(final["history"])
        except (OSError, ValueError, KeyError, TypeError) as err:  # one bad file costs only its trial
            warnings.warn(f"skipped the unreadable {path} ({type(err).__name__}: {err}); that trial has no rows",
                          RuntimeWarning, stacklevel=2)
            continue
        summaries.append(summary)
        histories += history
    summary = pd.DataFrame(summaries, columns=list(SUMMARY_COLUMNS)).sort_values(["seed"], kind="stable")
    history = pd.DataFrame(histories, columns=list(HISTORY_COLUMNS)).sort_values(["seed", "iteration"], kind="stable")
    return summary.reset_index(drop=True), history.reset_index(drop=True)


def write_tables(experiment_dir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(Re)write ``adaptation.csv`` and ``adaptation_history.csv`` in ``experiment_dir``; returns both tables."""
    summary, history = collect(experiment_dir)
    summary.to_csv(Path(experiment_dir) / SUMMARY_CSV, index=False)
    history.to_csv(Path(experiment_dir) / HISTORY_CSV, index=False)
    return summary, history


def per_seed_rows(summary: pd.DataFrame, history: pd.DataFrame) -> list[dict]:
    """One display row per trial: accuracy, NFE per iteration (:func:`summary_row`'s) and its two parts,
    the checks' share of all evaluations, the adapted value's range."""
    rows = []
    for r in summary.itertuples(index=False):
        checks = history[history["trial_id"] == r.trial_id]
        value = checks["step_size"] if r.mode == "step" else checks["tol"]
        iterations = max(1, r.iterations)
        rows.append({
            "seed": r.seed,
            "test acc": r.test_accuracy,
            NFE_LABEL: r.nfe_per_iteration,
            "= training fwd": r.train_nfe_forward / iterations,
            "+ checks": r.check_nfe / iterations,
            "check share": f"{100 * r.check_nfe / max(1, r.total_nfe):.1f} %",
            "final": f"{int(r.final_steps)} steps" if r.mode == "step" else f"tol {r.final_tol:.3g}",
            ("h" if r.mode == "step" else "tol") + " min..max": f"{value.min():.3g}..{value.max():.3g}" if len(value) else "-",
            "checks": len(checks),
            "wall s": r.wall_time,
        })
    return rows


def describe(summary: pd.DataFrame, history: pd.DataFrame, planned: int | None = None) -> str:
    """The adaptation CLI's closing summary: a per-seed table and mean +- std lines per solver pair.

    NFE per iteration (Table 1) counts the forward evaluations of the training passes
    and of the checks (the starting step included), as the paper does; the table splits
    it into those two parts; the check share is the checks' part of all evaluations
    (backward ones included). With ``planned`` seeds of which fewer are in ``summary``,
    each heading says the summary is partial.
    """
    from ..cli.common import format_table

    partial = f" -- PARTIAL: {len(summary)} of {planned} seeds finished" if planned and len(summary) < planned else ""
    lines = []
    for (mode, train, test), group in summary.groupby(["mode", "train_method", "test_method"], sort=True):
        acc, nfe = group["test_accuracy"], group["nfe_per_iteration"]
        iterations = group["iterations"].clip(lower=1)
        final = (sorted(group["final_steps"].astype(int)) if mode == "step" else [f"{t:.3g}" for t in sorted(group["final_tol"])])
        std = lambda s: f"{s.std(ddof=1):.1f}" if len(s) > 1 else "-"  # noqa: E731
        lines += [
            f"\n{train} trained, {test} tests, {mode} adaptation, {len(group)} seed{'s' if len(group) > 1 else ''} "
            f"({group['dataset'].iloc[0]}, "
            f"{int(group['iterations'].iloc[0])} iterations){partial}:",
            f"  test accuracy        {100 * acc.mean():.1f} +- {std(100 * acc)} %",
            f"  {NFE_LABEL:<21}{nfe.mean():.1f} +- {std(nfe)} (Table 1: training forward passes and checks)",
            f"    training passes    {(group['train_nfe_forward'] / iterations).mean():.1f} forward "
            f"(and {(group['train_nfe_backward'] / iterations).mean():.1f} backward, which Table 1 leaves out)",
            f"    checks             {(group['check_nfe'] / iterations).mean():.1f} "
            f"({100 * group['check_nfe'].sum() / max(1, group['total_nfe'].sum()):.1f} % of all "
            f"{group['total_nfe'].sum():.4g} evaluations)",
            f"  {'final steps' if mode == 'step' else 'final tolerance':<21}{', '.join(map(str, final))}",
        ]
    lines += ["", format_table(per_seed_rows(summary, history))]
    return "\n".join(lines)
