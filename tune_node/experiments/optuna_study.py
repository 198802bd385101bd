"""The Optuna study of :mod:`tune_node.search`: the cheapest solver-independent setting for a dataset.

For a search space whose solver tables give ranges (``steps = {min = 1, max = 64}``,
``tol = {min = 1e-6, max = 1e-1}``) over one or more methods, Ray Tune's ``OptunaSearch``
samples (method, setting) pairs with a define-by-run space (:class:`StudySpace`); each
Ray trial trains the setting's seeds and is judged by the rule of
:mod:`tune_node.results.critical_step` on its own cross-solver matrix. Objectives:
training NFE per iteration (forward and backward, mean over the seeds; minimised) and,
with ``--objectives nfe,accuracy``, the test accuracy under the train solver (mean over
the seeds; maximised). Solver-independence is Optuna's constraint
(``Trial.set_constraint``: the worst accuracy difference minus the threshold, feasible
at <= 0; a setting without trained seeds is infeasible), so the sampler (TPE or
NSGA-II) learns where the feasible region lies and ``study.best_trials`` is the front of
feasible settings. The sampler's state is Ray's searcher checkpoint: ``--resume``
continues the study after an interrupt (SIGINT included) with what it learnt.

Writes ``study.csv`` (one row per trial: method, setting, NFE, accuracy, worst
difference, feasible), ``cheapest.csv`` (per method: the cheapest feasible setting),
``front.csv`` and ``front.png`` (the Pareto front over all methods).
"""

from __future__ import annotations

import math
from pathlib import Path

__all__ = ["SAMPLERS", "OBJECTIVES", "StudySpace", "make_optuna_searcher", "read_study", "study_table", "cheapest_settings",
           "write_study", "STUDY_CSV", "CHEAPEST_CSV", "FRONT_CSV", "FRONT_PNG"]

SAMPLERS = ("tpe", "nsga2", "random")
OBJECTIVES = ("nfe", "nfe,accuracy")
STUDY_CSV, CHEAPEST_CSV, FRONT_CSV, FRONT_PNG = "study.csv", "cheapest.csv", "front.csv", "front.png"


class StudySpace:
    """The define-by-run space: a method, then its range's setting; returns the Ray trial config
    (``{"trial": [per-seed configs]}``). A class, so that Ray's searcher checkpoint can pickle it."""

    def __init__(self, space, data_root: str, download: bool):
        self.space, self.data_root, self.download = space, data_root, download
        self.ranges = {r.label: r for r in space.ranges}

    def __call__(self, trial) -> dict:
        label = trial.suggest_categorical("method", list(self.ranges))
        r = self.ranges[label]
        if r.key == "steps":
            value = trial.suggest_int(f"{label}_steps", int(r.low), int(r.high), log=True)
        else:
            value = trial.suggest_float(f"{label}_tol", r.low, r.high, log=True)
        unit = self.space.setting_trials(r.setting(value), r.overrides, data_root=self.data_root, download=self.download)
        return {"trial": unit[0] if len(unit) == 1 else unit}


def _sampler(name: str, seed: int | None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the search prints its own lines
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
    return optuna.samplers.RandomSampler(seed=seed)


def trial_verdict(experiment_dir, trial_id: str, threshold: float, margin: float = 0.1) -> dict | None:
    """The rule's row (:func:`~tune_node.results.solver_independence`) for the Ray trial ``trial_id``
    from the results on disk, or None when it left no final results."""
    from ..results import collect, solver_independence

    table = collect(experiment_dir)
    mine = table[table["trial_id"].astype(str).str.match(rf"^{trial_id}(_seed\d+)?$")]
    if not len(mine):
        return None
    row = solver_independence(mine, threshold, margin).to_dict("records")[0]
    row["nfe_per_iteration"] = float(mine.drop_duplicates("trial_id")["nfe_per_iteration"].mean())
    return row


def make_optuna_searcher(space, experiment_dir: Path, *, sampler: str, objectives: str, threshold: float, seed: int | None,
                         data_root: str, download: bool):
    """Ray Tune's ``OptunaSearch`` over :class:`StudySpace`, told each trial's objectives and constraint
    from the results on disk (the same rule as the grid's analysis)."""
    from ray.tune.search.optuna import OptunaSearch

    class _Search(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            pass  # the objectives exist only once a trial is judged: nothing to report on the way (no pruning)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            row = None if error or trial_id not in self._ot_trials else trial_verdict(self.experiment_dir, trial_id, self.threshold)
            if row is not None:
                if not row["seeds"]:  # no seed trained: nothing is known to be solver-independent
                    excess = 1.0
                elif math.isnan(row["max_difference"]):  # no test setting of smaller error: independent by the rule
                    excess = -self.threshold
                else:
                    excess = row["max_difference"] - self.threshold
                accuracy = row["accuracy_mean"] if row["seeds"] else 0.0
                self._ot_trials[trial_id].set_constraint("solver_dependence", excess)
                self._ot_trials[trial_id].set_user_attr("accuracy", float(accuracy))
                result = {**(result or {}), "objective_nfe": row["nfe_per_iteration"], "objective_accuracy": float(accuracy)}
            super().on_trial_complete(trial_id, result if row is not None else None, error=error or row is None)

    metric = ["objective_nfe"] + (["objective_accuracy"] if objectives == "nfe,accuracy" else [])
    mode = ["min"] + (["max"] if objectives == "nfe,accuracy" else [])
    search = _Search(space=StudySpace(space, data_root, download), metric=metric if len(metric) > 1 else metric[0],
                     mode=mode if len(mode) > 1 else mode[0], sampler=_sampler(sampler, seed))
    search.experiment_dir, search.threshold = str(experiment_dir), threshold
    return search


def read_study(experiment_dir):
    """The study's searcher as Ray's last searcher checkpoint in ``experiment_dir`` left it."""
    from ray.tune.search.optuna import OptunaSearch

    search = OptunaSearch()
    search.restore_from_dir(str(experiment_dir))
    return search


def study_table(search) -> "pd.DataFrame":  # noqa: F821
    """One row per finished Optuna trial: method, setting, objectives, constraint, feasible, Pareto-optimal."""
    import optuna
    import pandas as pd

    study = search._ot_study
    front = {t.number for t in study.best_trials} if len(study.directions) > 1 else set()
    ray_ids = {t.number: rid for rid, t in search._ot_trials.items()}
    rows = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        label = t.params["method"]
        key = next(k for k in t.params if k != "method")
        constraint = t.constraints.get("solver_dependence", math.nan)
        rows.append({
            "number": t.number, "ray_trial": ray_ids.get(t.number), "method": label, "setting": key.rsplit("_", 1)[1],
            "value": t.params[key], "nfe_per_iteration": t.values[0],
            "accuracy": t.user_attrs.get("accuracy"),
            "max_difference": constraint + search.threshold, "feasible": constraint <= 0,
        })
    table = pd.DataFrame(rows)
    if len(table):
        if not front:  # one objective: the front is the cheapest feasible setting
            feasible = table[table.feasible]
            front = set(feasible.nsmallest(1, "nfe_per_iteration")["number"]) if len(feasible) else set()
        table["pareto"] = table["number"].isin(front)
    return table


def cheapest_settings(table) -> "pd.DataFrame":  # noqa: F821
    """Per method, its cheapest feasible (solver-independent) trial."""
    feasible = table[table["feasible"]] if len(table) else table
    if not len(feasible):
        return feasible
    return feasible.sort_values(["nfe_per_iteration", "value"]).groupby("method", as_index=False).head(1).sort_values("nfe_per_iteration")


def write_study(search, experiment_dir: Path):
    """study.csv, cheapest.csv, front.csv and front.png in ``experiment_dir``; returns (table, cheapest)."""
    experiment_dir = Path(experiment_dir)
    table = study_table(search)
    cheapest = cheapest_settings(table)
    table.to_csv(experiment_dir / STUDY_CSV, index=False)
    cheapest.to_csv(experiment_dir / CHEAPEST_CSV, index=False)
    if len(table):
        table[table["pareto"]].to_csv(experiment_dir / FRONT_CSV, index=False)
        _plot_front(table, experiment_dir / FRONT_PNG)
    return table, cheapest


def _plot_front(table, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = "accuracy"
    fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
    markers = "osD^vP*X"
    colours = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9"]  # Okabe-Ito: colour-blind safe
    for i, (method, rows) in enumerate(table.groupby("method")):
        style = dict(marker=markers[i % len(markers)], color=colours[i % len(colours)])
        ok, bad = rows[rows.feasible], rows[~rows.feasible]
        ax.scatter(ok["nfe_per_iteration"], ok[y], label=f"{method} (solver-independent)", **style)
        ax.scatter(bad["nfe_per_iteration"], bad[y], facecolors="none", edgecolors=style["color"], marker=style["marker"],
                   label=f"{method} (dependent)", alpha=0.7)
    front = table[table.pareto].sort_values("nfe_per_iteration")
    ax.plot(front["nfe_per_iteration"], front[y], color="black", lw=1, ls="--", label="front", zorder=0)
    ax.set_xscale("log")
    ax.set_xlabel("training NFE per iteration (forward + backward)")
    ax.set_ylabel("test accuracy (train solver, mean over seeds)")
    ax.legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=150)
    plt.close(fig)
