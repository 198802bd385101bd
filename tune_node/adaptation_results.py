"""Rows of the adaptation results tables, from a finished training run and its controller.

``adaptation.csv`` has one row per trial (:func:`summary_row`),
``adaptation_history.csv`` one row per check (:func:`history_rows`); both are read
by :mod:`analysis.table1`. Whatever runs the trials (a Ray trainable, a script)
only writes these rows.
"""

from __future__ import annotations

import math

from .training import TrainResult

__all__ = ["SUMMARY_COLUMNS", "HISTORY_COLUMNS", "summary_row", "history_rows"]

SUMMARY_COLUMNS = (
    "experiment", "trial_id", "dataset", "mode", "train_method", "test_method", "gradient", "seed", "iterations",
    "test_accuracy", "nfe_per_iteration", "train_nfe_forward", "train_nfe_backward", "check_nfe", "total_nfe",
    "wall_time", "final_steps", "final_tol",
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
