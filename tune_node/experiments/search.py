"""The critical-step search: the grid's answer for a fraction of its cost: ``python -m tune_node.search``.

For each (dataset, train method, gradient) of a search space, the space's step counts
(or tolerances) are a ladder. A Ray Tune search trains one trial per rung (all seeds of
the setting, a seed group where they stack) from coarse to fine, judges each trained
rung by the rule of :mod:`tune_node.results.critical_step` (the same threshold and seed
exclusion as the grid's analysis) and stops climbing once ``--confirm`` consecutive rungs
are solver-independent: the first of them is the critical step. Then it bisects the
bracket in log h (any whole number of steps) until its ratio is at most ``--refine``.
:mod:`tune_node.experiments.ladder` holds the decisions, and the assumption they rest on
(monotone solver-independence beyond the confirmed rungs) with its risk. Examples::

    python -m tune_node.search --quick
    python -m tune_node.search --space sphere2_fixed --confirm 2 --refine 1.25
    python -m tune_node.search --space sphere2_fixed --name sphere2_fixed_search --resume   # after a crash

Parallel by design: a slot the needed rungs leave free trains the rung the search may
need next (speculative); a rung whose verdict can no longer change the answer is
stopped at its next report, so rungs beyond the confirming ones are never trained to the
end. Slots: the CPUs (or GPUs) of the Ray cluster over one trial's request.

The experiment folder ``<storage>/<name>/`` holds ``results.csv`` (the grid's tidy table,
rows of the rungs trained to the end, so every analysis reads it),
``decisions.csv`` (one row per rung: setting, seeds, verdict, why the search went on or
stopped), ``search_summary.csv`` (per group: bracket, its accuracy, training NFE and
wall time spent, stopped rungs) and a TensorBoard run ``search/`` with each group's
bracket over the decisions. ``--resume`` continues a killed search from its decisions:
finished rungs are not trained again. Exit status: 0 done, 1 rungs did not finish,
2 refused before any work (one ``error:`` line on stderr).
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from pathlib import Path

from ..cli.common import UsageError, format_table, gpu_trials_at_once
from ..cli.options import DEFAULT_CONFIRM, DEFAULT_REFINE, search_parser, training_overrides
from ..ode.solvers import METHODS
from .experiment import command_line, experiment_cli, print_dry_run, start_experiment
from .experiment_folder import SEARCH_FILE, check_new, open_existing, open_new
from .grid import check_arguments, data_problem, default_name, resumed_experiment
from .ladder import Ladder
from .optuna_study import OBJECTIVES, SAMPLERS
from .search_space import SearchSpaceError, load_space
from .storage import is_uri, open_storage
from .tune_callbacks import group_label

__all__ = ["main", "run_search", "build_parser", "search_groups", "make_searcher", "DECISIONS_CSV", "SUMMARY_CSV",
           "SUMMARY_COLUMNS", "DECISION_COLUMNS"]

DECISIONS_CSV = "decisions.csv"
SUMMARY_CSV = "search_summary.csv"
DECISION_COLUMNS = ["decision", "elapsed_s", "group", "setting", "seeds", "role", "verdict", "worst_test", "max_difference",
                    "accuracy_mean", "trial_id", "train_nfe", "phase", "bracket", "why"]
SUMMARY_COLUMNS = ["dataset", "train_method", "gradient", "status", "dependent_steps", "critical_steps", "dependent_tol",
                   "critical_tol", "bracket_ratio", "accuracy_mean", "accuracy_std", "seeds", "rungs_trained", "rungs_stopped",
                   "train_nfe", "wall_time", "non_monotone"]


def build_parser():
    """The search's command line (:func:`tune_node.cli.options.search_parser`, built without torch or Ray)."""
    return search_parser()


def _group_key(trial: dict) -> str:
    return f"{trial['dataset']}/{trial['method']}/{trial['gradient']}"


def search_groups(trials: list[dict], confirm: int, refine: float) -> dict[str, dict]:
    """The search's groups from a space's per-seed trial configs: key ``dataset/method/gradient`` ->
    ``{"ladder": Ladder, "rungs": {value: [per-seed configs]}}``. Raises ValueError for a group
    with fewer than two rungs, naming it."""
    groups: dict[str, dict] = {}
    for t in trials:
        group = groups.setdefault(_group_key(t), {"adaptive": t["tol"] is not None, "rungs": {}})
        value = float(t["tol"] if t["tol"] is not None else t["steps"])
        group["rungs"].setdefault(value, []).append(t)
    for key, group in groups.items():
        try:
            group["ladder"] = Ladder(group["rungs"], adaptive=group["adaptive"], confirm=confirm, refine=refine)
        except ValueError as err:
            raise ValueError(f"{key}: {err}; a search climbs a ladder of step counts (or tolerances): give "
                             f"[[solvers]] at least two values, or run python -m tune_node.grid") from None
    return groups


def _rung_configs(group: dict, value: float) -> list[dict]:
    """The per-seed trial configs of ``value``: the space's, or for a refinement point a copy
    of its nearest coarser rung's with the setting replaced."""
    if value in group["rungs"]:
        return group["rungs"][value]
    ladder = group["ladder"]
    coarser = [r for r in ladder.rungs if ladder.fineness(r) < ladder.fineness(value)] or ladder.rungs[:1]
    key = "tol" if group["adaptive"] else "steps"
    return [{**t, key: value if group["adaptive"] else int(value)} for t in group["rungs"][coarser[-1]]]


def _spent_nfe(result: dict | None) -> float:
    """Training NFE of a Ray trial's result so far, over its seeds (nested or as Tune flattens them)."""
    if not result:
        return 0.0
    if "seeds" in result:
        return float(sum(m.get("total_nfe", 0) for m in result["seeds"].values()))
    flat = [v for k, v in result.items() if k.startswith("seeds/") and k.endswith("/total_nfe")]
    return float(sum(flat)) if flat else float(result.get("total_nfe", 0))


def _cost(group: dict, value: float) -> float:
    if group["adaptive"]:
        return -math.log(value)
    method = next(iter(group["rungs"].values()))[0]["method"]
    return value * METHODS[method].stages_per_step


def make_searcher(groups: dict[str, dict], experiment_dir: Path, *, threshold: float, margin: float = 0.1):
    """``(searcher, stopper)``: the search's Ray Tune ``Searcher`` (suggests rungs, judges the
    finished ones, writes the decisions) and a ``Stopper`` that asks it whether a rung in
    training is still useful. Built here so that this module imports without Ray."""
    from ray.tune.search import Searcher
    from ray.tune.stopper import Stopper

    class _Searcher(Searcher):
        def __init__(self):
            super().__init__()
            self.groups, self.experiment_dir = groups, str(experiment_dir)
            self.threshold, self.margin = threshold, margin
            self.running: dict[str, tuple[str, float, str]] = {}  # trial id -> (group, value, role)
            self.to_stop: set[str] = set()
            self.spent: dict[str, tuple[str, float, float]] = {}  # trial id -> (group, NFE, seconds)
            self.stopped: dict[str, int] = {k: 0 for k in groups}
            self.settings: dict[tuple[str, float], dict] = {}  # the rule's row of each trained setting
            self.decisions: list[dict] = []
            self.failures: dict[tuple[str, float], int] = {}
            self.started = time.time()

        # --- what to train -------------------------------------------------------------
        def suggest(self, trial_id: str):
            if all(g["ladder"].state().phase == "done" for g in self.groups.values()):
                return Searcher.FINISHED
            busy = {(g, v) for g, v, _ in self.running.values()}
            options = []
            for key, group in self.groups.items():
                needed, speculative = group["ladder"].wanted(running=[v for g, v in busy if g == key])
                for tier, values in ((0, needed), (1, speculative)):
                    for depth, value in enumerate(values):
                        if (key, value) not in busy:
                            options.append(((tier, depth if tier else 0, _cost(group, value)), key, value, tier))
            if not options:
                return None  # every useful rung is in training: wait for a verdict
            _, key, value, tier = min(options)
            self.running[trial_id] = (key, value, "needed" if tier == 0 else "speculative")
            unit = _rung_configs(self.groups[key], value)
            print(f"[search] start {group_label(unit)} ({self.running[trial_id][2]})", flush=True)
            return {"trial": unit[0] if len(unit) == 1 else unit}

        def should_stop(self, trial_id: str) -> bool:
            if trial_id not in self.running:
                return False
            key, value, _ = self.running[trial_id]
            ladder = self.groups[key]["ladder"]
            # A rung judged already has trained to its end: this is its last report, nothing to stop.
            if value in ladder.verdicts or ladder.useful(value):
                return False
            self.to_stop.add(trial_id)
            return True

        # --- what Tune reports ---------------------------------------------------------
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if trial_id in self.running:
                self.spent[trial_id] = (self.running[trial_id][0], _spent_nfe(result), float(result.get("time_total_s", 0)))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            if trial_id not in self.running:
                return
            self.on_trial_result(trial_id, result or {})
            key, value, role = self.running.pop(trial_id)
            ladder = self.groups[key]["ladder"]
            if trial_id in self.to_stop:
                self.to_stop.discard(trial_id)
                self.stopped[key] += 1
                self._decide(key, value, role, trial_id, "stopped", f"stopped: {ladder.label(value)} can no longer change the answer")
                return
            if error:
                # A trial can fail for reasons of its own (a checkpoint lost to a killed driver): the
                # rung is tried once more as a fresh trial before the group gives up.
                self.failures[(key, value)] = self.failures.get((key, value), 0) + 1
                if self.failures[(key, value)] >= 2:
                    ladder.fail(value)
                why = ("the trial failed (see its error.txt); this group stops" if ladder.failed is not None
                       else "the trial failed (see its error.txt); the rung is trained again as a new trial")
                self._decide(key, value, role, trial_id, "failed", why)
                return
            self._sync()
            if value not in ladder.verdicts:
                ladder.fail(value)
                self._decide(key, value, role, trial_id, "failed", "the trial ended without final results; this group stops")
                return
            row = self.settings[(key, value)]
            verdict = "independent" if ladder.verdicts[value] else ("dependent" if row["seeds"] else "undetermined")
            self._decide(key, value, role, trial_id, verdict, ladder.state().why)

        def _sync(self) -> None:
            """Every trained setting's verdict, from the results table on disk (the rule's own input)."""
            from ..results import collect, solver_independence

            table = collect(self.experiment_dir)
            if not len(table):
                return
            for r in solver_independence(table, self.threshold, self.margin).to_dict("records"):
                key = f"{r['dataset']}/{r['train_method']}/{r['gradient']}"
                if key not in self.groups:
                    continue
                value = float(r["train_tol"] if self.groups[key]["adaptive"] else r["train_steps"])
                self.settings[(key, value)] = r
                self.groups[key]["ladder"].record(value, r["independent"])

        # --- what the researcher sees --------------------------------------------------
        def _decide(self, key: str, value: float, role: str, trial_id: str, verdict: str, why: str) -> None:
            ladder = self.groups[key]["ladder"]
            state = ladder.state()
            row = self.settings.get((key, value), {})
            bracket = "-" if state.critical is None else (
                f"{ladder.label(state.dependent) if state.dependent is not None else '(none)'} - {ladder.label(state.critical)}")
            decision = {
                "decision": len(self.decisions) + 1, "elapsed_s": round(time.time() - self.started, 1), "group": key,
                "setting": ladder.label(value), "seeds": len(_rung_configs(self.groups[key], value)), "role": role,
                "verdict": verdict, "worst_test": row.get("worst_test") or "", "max_difference": row.get("max_difference", ""),
                "accuracy_mean": row.get("accuracy_mean", ""), "trial_id": trial_id,
                "train_nfe": self.spent.get(trial_id, ("", 0.0, 0.0))[1], "phase": state.phase, "bracket": bracket,
                "why": why + (f"; not monotone: {'; '.join(state.non_monotone)}" if state.non_monotone else ""),
            }
            self.decisions.append(decision)
            diff = row.get("max_difference")
            judged = verdict in ("independent", "dependent") and diff is not None and not math.isnan(diff)
            detail = f" (worst {row['worst_test']}: {100 * diff:.1f} points)" if judged else ""
            print(f"[search] {key} {ladder.label(value)}: {verdict}{detail} -> {decision['why']}", flush=True)
            self.write()

        def summary(self) -> list[dict]:
            rows = []
            for key, group in self.groups.items():
                ladder, (dataset, method, gradient) = group["ladder"], key.split("/")
                state = ladder.state()
                fixed = not group["adaptive"]
                critical = self.settings.get((key, state.critical), {}) if state.critical is not None else {}
                spent = [s for s in self.spent.values() if s[0] == key]
                rows.append({
                    "dataset": dataset, "train_method": method, "gradient": gradient, "status": state.status,
                    "dependent_steps": int(state.dependent) if fixed and state.dependent is not None else None,
                    "critical_steps": int(state.critical) if fixed and state.critical is not None else None,
                    "dependent_tol": state.dependent if not fixed else None, "critical_tol": state.critical if not fixed else None,
                    "bracket_ratio": state.ratio, "accuracy_mean": critical.get("accuracy_mean"),
                    "accuracy_std": critical.get("accuracy_std"), "seeds": critical.get("seeds"),
                    "rungs_trained": len(ladder.verdicts), "rungs_stopped": self.stopped[key],
                    "train_nfe": sum(s[1] for s in spent), "wall_time": sum(s[2] for s in spent),
                    "non_monotone": "; ".join(state.non_monotone),
                })
            return rows

        def write(self) -> None:
            """decisions.csv, search_summary.csv and the TensorBoard bracket scalars, rewritten whole."""
            folder = Path(self.experiment_dir)
            for name, columns, rows in ((DECISIONS_CSV, DECISION_COLUMNS, self.decisions),
                                        (SUMMARY_CSV, SUMMARY_COLUMNS, self.summary())):
                tmp = folder / f".{name}.tmp"
                with tmp.open("w", newline="") as f:
                    writer = csv.DictWriter(f, columns)
                    writer.writeheader()
                    writer.writerows(rows)
                tmp.replace(folder / name)
            scalars = {}
            for r in self.summary():
                tag = f"bracket/{r['train_method']}_{r['gradient']}"
                for end in ("dependent", "critical"):
                    v = r[f"{end}_steps"] if r[f"{end}_steps"] is not None else r[f"{end}_tol"]
                    if v is not None:
                        scalars[f"{tag}/{end}"] = float(v)
                scalars[f"nfe/{r['train_method']}_{r['gradient']}_train_nfe"] = float(r["train_nfe"])
            from .tune_callbacks import EventFile

            events = EventFile(folder / "search")
            events.add_scalars(scalars, len(self.decisions))
            events.close()

        # --- Ray's searcher checkpoint (a resumed search continues from its decisions) ---
        def save(self, checkpoint_path: str) -> None:
            import pickle

            with open(checkpoint_path, "wb") as f:
                pickle.dump(self.__dict__.copy(), f)

        def restore(self, checkpoint_path: str) -> None:
            import pickle

            with open(checkpoint_path, "rb") as f:
                self.__dict__.update(pickle.load(f))
            self._sync()  # rungs that ended after the last searcher checkpoint

    class _Stopper(Stopper):
        def __init__(self, searcher):
            self.searcher = searcher

        def __call__(self, trial_id: str, result: dict) -> bool:
            return self.searcher.should_stop(trial_id)

        def stop_all(self) -> bool:
            return False

    searcher = _Searcher()
    return searcher, _Stopper(searcher)


def _slots(args) -> int:
    import ray

    resources = ray.cluster_resources()
    slots = math.floor(resources.get("CPU", 1) / args.cpus_per_trial + 1e-9)
    if args.gpus > 0:
        # A local Ray holds --gpus rounded up to whole GPUs: the trials at once stay within --gpus itself.
        slots = min(slots, math.floor(resources.get("GPU", 0) / args.gpus_per_trial + 1e-9),
                    gpu_trials_at_once(args.gpus, args.gpus_per_trial))
    return max(1, slots)


def _search_problem(args) -> str | None:
    if is_uri(args.storage):
        return (f"--storage {args.storage!r} is a URI: a search reads its trials' results while it runs to choose the next "
                f"ones, which it does from a folder; give a folder path (on a cluster, one every node mounts)")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        return f"unknown --sampler {args.sampler!r}; allowed: {', '.join(SAMPLERS)}"
    if args.objectives is not None and args.objectives not in OBJECTIVES:
        return f"--objectives must be one of {', '.join(OBJECTIVES)}, got {args.objectives!r}"
    if args.samples is not None and args.samples < 1:
        return f"--samples must be an integer >= 1, got {args.samples}"
    if args.confirm is not None and args.confirm < 1:
        return f"--confirm must be an integer >= 1 (rungs that confirm the critical step), got {args.confirm}"
    if args.refine is not None and not args.refine > 1:  # also refuses nan
        return f"--refine must be a ratio > 1 (the bracket width refinement stops at; inf: none), got {args.refine:g}"
    return None


@experiment_cli
def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv), argv)[0]


def run_search(space="quick", **options):
    """Run a critical-step search from Python; the same work as ``python -m tune_node.search``.

    ``space`` and ``options`` as for :func:`tune_node.grid.run_grid` (plus ``confirm=``,
    ``refine=``; ``sampler=``, ``samples=``, ``objectives=`` for a study). Returns the search
    summary (:data:`SUMMARY_COLUMNS`, one row per group) as a DataFrame, or for a space with
    ranges the Optuna study's table (``study.csv``); raises :class:`~tune_node.cli.UsageError`
    for bad input, before any work.
    """
    from .experiment import run_from_python

    return run_from_python(build_parser(), _run, space, options, "tune_node.search")


def _run(args, argv: list[str] | None):
    from .grid import _threshold_problem

    problem = check_arguments(args) or _search_problem(args) or _threshold_problem(args.threshold)
    if problem:
        raise UsageError(problem)
    overrides = training_overrides(args)
    storage = open_storage(args.storage)
    name = args.name if args.name is not None else f"{default_name(args.space)}_search"
    if args.resume:
        changed = [f"--{k.replace('_', '-')}" for k in ("seeds", "iterations", "lr", "report_every", "set", "confirm", "refine")
                   if getattr(args, k) is not None]
        if changed:
            raise UsageError(f"--resume continues the search as it was started; drop {', '.join(changed)}")
        experiment_dir, saved, trials, space_name = resumed_experiment(args, storage, name, "search")
        if "study" in saved:
            return _run_study(args, argv, None, saved)
        confirm, refine = saved["confirm"], saved["refine"]
        description = saved.get("description", "")
        args.threshold = saved.get("threshold", args.threshold)  # the restored searcher judges with its own
    else:
        try:
            space = load_space(args.space or "quick").with_overrides(seeds=args.seeds, **overrides)
            trials = space.trials(data_root=str(Path(args.data_root).resolve()), download=args.download)
        except (SearchSpaceError, ValueError) as err:
            raise UsageError(str(err))
        if space.ranges:
            return _run_study(args, argv, space, None)
        study_options = [f"--{k}" for k in ("sampler", "samples", "objectives") if getattr(args, k) is not None]
        if study_options:
            raise UsageError(f"{', '.join(study_options)} configure an Optuna study, for spaces with ranges "
                             f"(steps = {{min = 1, max = 64}}); {space.name!r} gives a ladder of values: drop them")
        confirm = args.confirm if args.confirm is not None else DEFAULT_CONFIRM
        refine = args.refine if args.refine is not None else DEFAULT_REFINE
        space_name, description = space.name, space.description
        experiment_dir = check_new(storage, name, "search")
    try:
        groups = search_groups(trials, confirm, refine)
    except ValueError as err:
        raise UsageError(f"search space {space_name!r}: {err}")
    problem = data_problem(trials)
    if problem:
        raise UsageError(problem)
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial if args.gpus > 0 else 0}
    plan = f"confirm {confirm}, refine to ratio {refine:g}, threshold {args.threshold:g}"
    if args.dry_run:
        rows = [{"group": key, "rungs": ", ".join(g["ladder"].label(v).split()[-2 if g["adaptive"] else 0] for v in g["ladder"].rungs),
                 "seeds": len(next(iter(g["rungs"].values()))), "cpu": resources["cpu"], "gpu": resources["gpu"]}
                for key, g in groups.items()]
        status = print_dry_run(f"critical-step search of {space_name!r} -> {experiment_dir}; {plan}; each rung is one Ray "
                               f"trial of all its seeds", rows, args.gpus, args.gpus_per_trial, args)
        from ..cli.estimate import estimate_wall_time
        from .grid import _groupable, estimated_nfe

        rungs = sorted((g["rungs"][v] for g in groups.values() for v in g["ladder"].rungs), key=estimated_nfe, reverse=True)
        estimate = estimate_wall_time(rungs, estimated_nfe, args, batched=lambda u: len(u) > 1 and _groupable(u[0]))
        print("\n".join(estimate.lines("adaptive methods, whose NFE is unknown before training, or no measured cost per NFE "
                                       "for the dataset or model",
                                       "estimated wall time if every listed rung trained to the end (the search stops "
                                       "most earlier; refinement adds rungs between them)")))
        return status, None
    command = command_line("tune_node.search", argv)
    folder = open_existing(storage, name, "search", command)[0] if args.resume else open_new(storage, name, "search", command)
    problem = start_experiment(
        args, folder, len(trials),
        record=lambda: {"space": space_name, "space_file": space.path, "description": description, "trials": trials,
                        "confirm": confirm, "refine": refine, "threshold": args.threshold},
        announce=lambda: f"critical-step search of {space_name!r} ({description}) -> {experiment_dir}; {len(groups)} groups; {plan}")
    if problem:
        raise UsageError(problem)

    from ..results import write_results
    from .experiment import finish, fit
    from .grid import _search_trial_dirname as _trial_dirname
    from .trainable import train_trial

    searcher, stopper = make_searcher(groups, experiment_dir, threshold=args.threshold)
    start = time.time()
    results = fit(train_trial, [], name=name, storage=storage, resume=args.resume, resources=resources, dirname=_trial_dirname,
                  progress_total=0, search_alg=searcher, stop=stopper, max_concurrent=_slots(args))
    wall = time.time() - start
    table, csv_path = write_results(experiment_dir)
    summary = _final_summary(experiment_dir)
    print(f"\nresults table (rungs trained to the end): {csv_path}; decisions: {experiment_dir / DECISIONS_CSV}")
    running = [r for r in (summary.to_dict("records") if summary is not None else []) if r["status"] == "running"]
    failed = any(results[i].error is not None for i in range(len(results)))
    if summary is not None:
        from .experiment import demo_note, partial_label

        partial = partial_label(len(summary) - len(running), len(summary), "groups") or (" -- PARTIAL: a Ray trial failed"
                                                                                          if failed else "")
        print(f"\ncritical step per train solver{partial} (threshold {args.threshold:g}; {plan}; this run's wall time "
              f"{wall / 60:.1f} min):")
        print(format_table(_display(summary)))
        note = demo_note(space_name, trials)
        if note:
            print(note)
    return finish(experiment_dir, int(not (running or failed)), 1, results, "tune_node.search", storage, name,
                  missing="the search did not finish" + (f": {len(running)} groups still open" if running else "")), summary


def _run_study(args, argv, space, saved):
    """The Optuna study of a space with ranges (:mod:`tune_node.experiments.optuna_study`):
    ``(exit status, study table or None)``."""
    from .optuna_study import make_optuna_searcher, read_study, write_study

    storage = open_storage(args.storage)
    name = args.name if args.name is not None else f"{default_name(args.space)}_search"
    ladder_options = [f"--{k}" for k in ("confirm", "refine") if getattr(args, k) is not None]
    if ladder_options:
        raise UsageError(f"{', '.join(ladder_options)} configure a ladder search; this space gives ranges (an Optuna study): "
                         f"drop them")
    if saved is None:
        study = {"sampler": args.sampler or "tpe", "samples": args.samples or 24, "objectives": args.objectives or "nfe",
                 "sampler_seed": args.sampler_seed, "threshold": args.threshold}
        experiment_dir = check_new(storage, name, "search")
        probe = space.setting_trials(space.ranges[0].setting(space.ranges[0].low), space.ranges[0].overrides)
        problem = data_problem([t for r in space.ranges for t in space.setting_trials(r.setting(r.low), r.overrides)] or probe)
        if problem:
            raise UsageError(problem)
    else:
        study, experiment_dir = saved["study"], storage.local / name
        if args.sampler or args.samples or args.objectives:
            raise UsageError("--resume continues the study as it was started; drop --sampler, --samples and --objectives")
    plan = (f"Optuna {study['sampler']} sampler, {study['samples']} settings, objectives {study['objectives']}, "
            f"solver-independence (threshold {study['threshold']:g}) as the constraint")
    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial if args.gpus > 0 else 0}
    if args.dry_run:
        rows = [{"method": r.label, r.key: f"{r.low:g} .. {r.high:g} (log)", "seeds": len(space.seeds)} for r in space.ranges]
        status = print_dry_run(f"Optuna study of {space.name!r} -> {experiment_dir}; {plan}", rows, args.gpus, args.gpus_per_trial,
                               args)
        print("estimated wall time: none (the sampler picks the settings, and so their cost, while the study runs)")
        return status, None
    command = command_line("tune_node.search", argv)
    folder = open_existing(storage, name, "search", command)[0] if saved else open_new(storage, name, "search", command)
    problem = start_experiment(
        args, folder, study["samples"],
        record=lambda: {"space": space.name, "space_file": space.path, "description": space.description, "trials": [],
                        "study": study},
        announce=lambda: f"Optuna study of {space.name!r} ({space.description}) -> {experiment_dir}; {plan}")
    if problem:
        raise UsageError(problem)

    from .experiment import finish, fit
    from .grid import _search_trial_dirname as _trial_dirname
    from .trainable import train_trial

    # The objectives are the searcher's, computed from the results on disk: no trial reports them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    search = None
    if saved is None:  # a resumed study restores its searcher, the sampler's state included, from Ray's checkpoint
        search = make_optuna_searcher(space, experiment_dir, sampler=study["sampler"], objectives=study["objectives"],
                                      threshold=study["threshold"], seed=study["sampler_seed"],
                                      data_root=str(Path(args.data_root).resolve()), download=args.download)
    results = fit(train_trial, [], name=name, storage=storage, resume=saved is not None, resources=resources,
                  dirname=_trial_dirname, progress_total=0, search_alg=search, num_samples=study["samples"],
                  max_concurrent=_slots(args))
    from ..results import write_results

    write_results(experiment_dir)
    table, cheapest = write_study(read_study(experiment_dir), experiment_dir)
    print(f"\n{len(table)} settings trained; study: {experiment_dir / 'study.csv'}, front: {experiment_dir / 'front.png'}")
    if len(cheapest):
        print("\ncheapest solver-independent setting per method (training NFE per iteration, forward + backward):")
        print(format_table([{"method": r["method"], "setting": f"{r['setting']} {r['value']:g}",
                             "NFE/iter": f"{r['nfe_per_iteration']:.1f}", "accuracy": f"{100 * r['accuracy']:.1f} %",
                             "worst difference": f"{100 * r['max_difference']:.1f} points"}
                            for r in cheapest.to_dict("records")]))
    complete = len(table) >= study["samples"] and not any(results[i].error is not None for i in range(len(results)))
    return finish(experiment_dir, int(complete), 1, results, "tune_node.search", storage, name,
                  missing=f"the study did not finish: {len(table)} of {study['samples']} settings trained"), table


def _final_summary(experiment_dir: Path):
    import pandas as pd

    path = experiment_dir / SUMMARY_CSV
    return pd.read_csv(path) if path.is_file() else None


def _display(summary) -> list[dict]:
    import pandas as pd

    rows = []
    for r in summary.to_dict("records"):
        unit = "tol" if METHODS[r["train_method"]].adaptive else "steps"
        ends = [r[f"dependent_{unit}"], r[f"critical_{unit}"]]
        text = " - ".join("?" if pd.isna(v) else (f"{int(v)}" if unit == "steps" else f"{v:g}") for v in ends)
        rows.append({
            "group": f"{r['dataset']}/{r['train_method']}/{r['gradient']}", "status": r["status"],
            f"bracket ({unit}: dependent - critical)": text,
            "ratio": "-" if pd.isna(r["bracket_ratio"]) else f"{r['bracket_ratio']:.3g}",
            "accuracy": "-" if pd.isna(r["accuracy_mean"]) else f"{100 * r['accuracy_mean']:.1f} +- {100 * r['accuracy_std']:.1f} %",
            "rungs trained/stopped": f"{r['rungs_trained']}/{r['rungs_stopped']}",
            "train NFE": f"{r['train_nfe'] / 1e6:.3g}M",
            **({"not monotone": r["non_monotone"]} if isinstance(r["non_monotone"], str) else {}),
        })
    return rows


def record_of(experiment_dir: Path) -> dict:
    """The search's record (``search.json``): space, per-seed trials of the ladder, confirm, refine, threshold."""
    return json.loads((Path(experiment_dir) / SEARCH_FILE).read_text())


if __name__ == "__main__":
    sys.exit(main())

