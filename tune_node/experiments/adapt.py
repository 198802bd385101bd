"""Step and tolerance adaptation as Ray Tune trials, one per seed: ``python -m tune_node.adapt``.

Trains each seed with the paper's adaptation (Algorithm 2: step size of Euler or
Midpoint; Algorithm 3: tolerance of Fehlberg21 or Dopri54), taking the dataset and
training hyper-parameters from a search space, writes
``<storage>/<name>/adaptation.csv`` (one row per seed) and
``adaptation_history.csv`` (one row per check), and prints accuracy and NFE per
iteration with the checks' share of the cost. Examples::

    python -m tune_node.adapt --quick                          # laptop: Sphere2, Euler/Midpoint, 2 seeds
    python -m tune_node.adapt --space sphere2_fixed --train-solver euler --test-solver rk4 --gpus 1
    python -m tune_node.adapt --space sphere2_adaptive --mode tolerance --train-solver fehlberg2
    python -m tune_node.adapt --name adapt_quick_euler_midpoint --resume   # after a crash

Every check of the arguments runs before Ray starts; ``--dry-run`` prints the
trials and their resource requests and starts nothing. Locking and exit status as
for the grid (:mod:`tune_node.grid`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..cli.common import UsageError, gpu_trials_at_once
from ..cli.options import ADAPT_DEFAULTS, ADAPT_MODES, STEP_CHOICES, adapt_parser, training_overrides
from ..ode.solvers import METHODS
from ..train.adaptation import STEP_TEST_METHODS, TOLERANCE_TEST_METHODS, StepAdaptation, ToleranceAdaptation
from ..train.training import TrainConfig
from .experiment import command_line, experiment_cli, print_dry_run, start_experiment
from .experiment_folder import ADAPT_FILE, check_new, open_existing, open_new
from .grid import check_arguments, data_problem, resumed_experiment
from .search_space import SearchSpace, SearchSpaceError, load_space
from .storage import open_storage
from .trial import Adaptation, Trial
from .tune_callbacks import trial_label

__all__ = ["main", "run_adaptation", "build_parser", "resolve_solvers", "ADAPT_FILE"]

# ADAPT_FILE (adapt.json, what the experiment was started with) lives in experiment_folder, beside GRID_FILE.
MODES = ADAPT_MODES
DEFAULTS = ADAPT_DEFAULTS


def build_parser() -> argparse.ArgumentParser:
    """The grid's options (space, seeds, training keys, resources, output; no seed groups: a trial
    is one seed) plus the adaptation's (:func:`tune_node.cli.options.adapt_parser`, built without torch or Ray)."""
    return adapt_parser()


def resolve_solvers(mode: str | None, train: str | None, test: str | None) -> tuple[str, str, str]:
    """``(mode, train method, test method)`` from the options, defaults filled in.

    The adaptable methods and their test methods are the registry's
    (``STEP_TEST_METHODS``, ``TOLERANCE_TEST_METHODS``); the default train method is
    the first of the mode, the default test method
    :func:`~tune_node.solvers.default_test_method`.

    Raises ValueError naming the bad value and what is allowed: an unknown solver, a
    train solver the mode cannot adapt, a test solver not more accurate than the train
    solver or not paired with it in the paper (Appendix C).
    """
    from ..ode.solvers import default_test_method

    step, tolerance = " or ".join(STEP_TEST_METHODS), " or ".join(TOLERANCE_TEST_METHODS)
    adaptable = {**{m: "step" for m in STEP_TEST_METHODS}, **{m: "tolerance" for m in TOLERANCE_TEST_METHODS}}
    train = train or next(iter(TOLERANCE_TEST_METHODS if mode == "tolerance" else STEP_TEST_METHODS))
    if train not in METHODS:
        raise ValueError(f"unknown --train-solver {train!r}; allowed: {', '.join(STEP_TEST_METHODS)} (step mode), "
                         f"{', '.join(TOLERANCE_TEST_METHODS)} (tolerance mode)")
    if train not in adaptable:
        raise ValueError(f"--train-solver {train} cannot be adapted; step mode trains {step}, tolerance mode {tolerance}")
    if mode is not None and mode != adaptable[train]:
        kind = "fixed-step" if adaptable[train] == "step" else "adaptive"
        raise ValueError(f"--mode {mode} does not fit --train-solver {train} ({kind}): step mode adapts {step}, "
                         f"tolerance mode {tolerance}; use --mode {adaptable[train]}")
    mode = adaptable[train]
    allowed = (STEP_TEST_METHODS if mode == "step" else TOLERANCE_TEST_METHODS)[train]
    test = test or default_test_method(train)
    if test not in METHODS:
        raise ValueError(f"unknown --test-solver {test!r}; allowed for --train-solver {train}: {', '.join(allowed)}")
    if test not in allowed:
        if METHODS[test].order <= METHODS[train].order and mode == "step":
            why = f"is not more accurate than --train-solver {train} (order {METHODS[test].order} <= {METHODS[train].order})"
        else:
            why = f"is not a test solver for --train-solver {train} in {mode} mode"
        raise ValueError(f"--test-solver {test} {why}; allowed: {', '.join(allowed)}")
    return mode, train, test


def _adaptation_settings(args, space_defaults: dict | None = None) -> dict:
    """The adaptation part of every trial config, validated by building a controller (ValueError if bad).

    Each value is the command line's, else the search space's ``[adaptation]`` table's
    (``space_defaults``), else :data:`DEFAULTS`.
    """
    space_defaults = space_defaults or {}

    def option(name):
        value = getattr(args, name)
        return space_defaults.get(name) if value is None else value

    mode, train, test = resolve_solvers(option("mode"), option("train_solver"), option("test_solver"))
    if mode == "step" and option("initial_tol") is not None:
        raise ValueError(f"--initial-tol is the starting tolerance of tolerance mode; step mode ({train}) starts from "
                         f"one step and takes no tolerance: drop --initial-tol, or use --mode tolerance")
    step_only = [f"--{k.replace('_', '-')}" for k in STEP_CHOICES if option(k) is not None]
    if mode == "tolerance" and step_only:
        raise ValueError(f"{', '.join(step_only)} configure step mode; tolerance mode ({train}) takes none: drop them, "
                         f"or use --mode step")
    given = {k: option(k) for k in (*DEFAULTS, *STEP_CHOICES)}
    s = {**DEFAULTS, **STEP_CHOICES, **{k: v for k, v in given.items() if v is not None}, "mode": mode, "method": train,
         "test_method": test}
    common = {"test_method": test, "k": s["k"], "threshold": s["threshold"], "gradient": s["gradient"]}
    if mode == "step":
        StepAdaptation(train, 1.0, **common)
        _check_step_choices(s)
    else:
        ToleranceAdaptation(train, s["initial_tol"], **common)
    return s


def _check_step_choices(s: dict) -> None:
    size = s["check_size"]
    if size is not None and not (isinstance(size, int) and not isinstance(size, bool) and size >= 1):
        raise ValueError(f"--check-size must be an integer >= 1 (training points every check uses), got {size!r}")
    rtol, atol = s["initial_rtol"], s["initial_atol"]
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ValueError(f"--initial-rtol must be a finite number >= 0, got {rtol!r}")
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol > 0):
        raise ValueError(f"--initial-atol must be a finite number > 0, got {atol!r}")


def adaptation_trials(space, settings: dict, name: str, data_root: str, download: bool) -> list[dict]:
    """One JSON-friendly trial config per seed of ``space``: its dataset and training, ``settings``' adaptation."""
    keys = ("mode", "method", "test_method", "k", "threshold", "initial_tol", "gradient", *STEP_CHOICES)
    adaptation = Adaptation(**{k: settings[k] for k in keys})
    trials = []
    for seed in space.seeds:
        config = TrainConfig(dataset=space.dataset, solver=adaptation.starting_setting(), seed=seed, data_root=data_root,
                             download=download, model=space.model, code_dir=space.code_dir, **space.training)
        trials.append(Trial.of(name, config, adaptation).to_dict())
    return trials


def _trial_dirname(trial) -> str:
    """An adaptation trial's directory and TensorBoard run name: ``euler_midpoint_step_seed0``
    (train and test method, mode, seed: unique in an adaptation)."""
    from .tune_callbacks import run_name

    return run_name([trial.config["trial"]])


@experiment_cli
def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv), argv)[0]


def run_adaptation(space="quick", **options):
    """Run step or tolerance adaptation from Python; the same work as ``python -m tune_node.adapt``.

    Arguments:
        space: the search space giving dataset and training (its ``[[solvers]]`` unused):
            a shipped name, a TOML file's path, or a :class:`~tune_node.search_space.SearchSpace`.
        options: the CLI's options as keywords, dashes as underscores (``train_solver="euler"``,
            ``test_solver="midpoint"``, ``mode=...``, ``k=50``, ``threshold=0.1``, ``seeds=...``,
            ``storage=...``, ``name=...``, ``resume=True``, ...).

    Returns the per-seed table (``adaptation.csv``: :data:`~tune_node.adaptation_results.SUMMARY_COLUMNS`);
    the per-check history is ``adaptation_history.csv`` beside it. Seeds that did not finish:
    a RuntimeWarning. Raises :class:`~tune_node.cli.UsageError` (a ValueError) for bad input,
    before any work, and TypeError for an unknown option.
    """
    from .experiment import run_from_python

    return run_from_python(build_parser(), _run, space, options, "tune_node.adapt")


def _run(args, argv: list[str] | None):
    """The adaptation experiment for parsed ``args``: ``(exit status, per-seed table or None)``."""
    problem = check_arguments(args)
    if problem:
        raise UsageError(problem)
    overrides = training_overrides(args)
    space_defaults = {}
    if args.space is not None or args.quick:
        try:  # the space's [adaptation] table gives the defaults of the adaptation's options
            space_defaults = load_space(args.space or "quick").adaptation
        except SearchSpaceError as err:
            if not args.resume:  # --resume reports a wrong --space below, with what was recorded
                raise UsageError(str(err))
    try:
        settings = _adaptation_settings(args, space_defaults)
    except ValueError as err:
        from_space = [k for k in space_defaults if getattr(args, k) is None]
        raise UsageError(f"{err} (the search space's [adaptation] table set {', '.join(from_space)})" if from_space
                         else str(err))
    storage = open_storage(args.storage)
    space_name = args.space or "quick"
    stem = space_name.name if isinstance(space_name, SearchSpace) else Path(space_name).stem
    name = args.name if args.name is not None else f"adapt_{stem}_{settings['method']}_{settings['test_method']}"

    if args.resume:
        options = ("seeds", "iterations", "lr", "report_every", "set", "mode", "train_solver", "test_solver", "k", "threshold",
                   "initial_tol", "gradient", *STEP_CHOICES)
        changed = [f"--{k.replace('_', '-')}" for k in options if getattr(args, k) is not None]
        if changed:
            raise UsageError(f"--resume continues the experiment as it was started; drop {', '.join(changed)}")
        experiment_dir, _, trials, space_name = resumed_experiment(args, storage, name, "adaptation")
    else:
        try:
            space = load_space(space_name).with_overrides(seeds=args.seeds, **overrides)
            trials = adaptation_trials(space, settings, name, str(Path(args.data_root).resolve()), args.download)
        except (SearchSpaceError, ValueError) as err:
            raise UsageError(str(err))
        if not trials:
            raise UsageError(f"search space {space.name!r} ({space.path}) gives no seeds to adapt")
        too_few = sorted({t["iterations"] for t in trials if t["iterations"] < settings["k"]})
        if too_few:
            given = "" if args.k is not None else (" (from [adaptation])" if "k" in space_defaults else " (the default)")
            raise UsageError(f"--k {settings['k']}{given} exceeds the {too_few[0]} training iterations: no check would ever "
                         f"run; use --k between 1 and {too_few[0]} (or more --iterations)")
        space_name = space.name
        storage.pull(name)  # a URI's experiment, as it stands there
        experiment_dir = check_new(storage, name, "adaptation")
    problem = data_problem(trials)
    if problem:
        raise UsageError(problem)

    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial if args.gpus > 0 else 0}
    if args.dry_run:
        rows = [{"trial": trial_label(t), "iterations": t["iterations"], "lr": t["lr"], "batch": t["batch_size"],
                 "k": t["k"], "threshold": t["threshold"], "cpu": resources["cpu"], "gpu": resources["gpu"]} for t in trials]
        status = print_dry_run(f"{len(trials)} adaptation trials ({space_name!r}) -> {experiment_dir}; each requests "
                               f"{resources['cpu']:g} CPU and {resources['gpu']:g} GPU", rows, args.gpus, args.gpus_per_trial, args)
        print("estimated wall time: none (the adaptation chooses its step size or tolerance, and so its cost, while training)")
        return status, None
    # Held from here to the end of main (experiment_cli closes it): a second run on this folder is refused.
    command = command_line("tune_node.adapt", argv)
    folder = (open_existing(storage, name, "adaptation", command)[0] if args.resume
              else open_new(storage, name, "adaptation", command))
    problem = start_experiment(
        args, folder, len(trials),
        record=lambda: {"space": space_name, "space_file": space.path, "trials": trials},
        announce=lambda: f"{len(trials)} adaptation trials ({trial_label(trials[0]).rsplit(' seed', 1)[0]}, dataset and "
                         f"training of {space_name!r}) -> {experiment_dir}; each requests {resources['cpu']:g} CPU, "
                         f"{resources['gpu']:g} GPU")
    if problem:
        raise UsageError(problem)
    storage.push(name)  # the record: from here the URI alone can resume the experiment

    from ..results.adaptation import HISTORY_CSV, SUMMARY_CSV, describe, write_tables
    from .adapt_trainable import adapt_trial
    from .experiment import finish, fit

    results = fit(adapt_trial, trials, name=name, storage=storage, resume=args.resume, resources=resources, dirname=_trial_dirname,
                  max_concurrent=gpu_trials_at_once(args.gpus, args.gpus_per_trial))  # within --gpus where Ray has more
    summary, history = write_tables(experiment_dir)
    print(f"\n{len(summary)}/{len(trials)} trials finished; results: {experiment_dir / SUMMARY_CSV} (one row per seed), "
          f"{experiment_dir / HISTORY_CSV} (one row per check)")
    if len(summary):
        from .experiment import demo_note

        print(describe(summary, history, planned=len(trials)))
        note = demo_note(space_name, trials, shows="adapted steps, NFE and accuracies")
        if note:
            print(note)
    print(f"Table 1 against a grid: python -m analysis.table1 GRID_DIR {experiment_dir}")
    return finish(experiment_dir, len(summary), len(trials), results, "tune_node.adapt", storage, name), summary


if __name__ == "__main__":
    sys.exit(main())
