"""The grid experiment that locates the critical step size: ``python -m tune_node.grid``.

Trains every (solver setting, seed) of a search space, evaluates each trained
model with the paper's test solvers, writes the tidy
results table ``<storage>/<name>/results.csv`` and prints the critical step (or
tolerance) per dataset, train method and gradient mode. Examples::

    python -m tune_node.grid --quick                       # laptop: small Sphere2 grid, local Ray
    python -m tune_node.grid --space sphere2_fixed --gpus 4 --gpus-per-trial 0.25
    python -m tune_node.grid --space my_study.toml --address auto --seeds 0,1,2
    python -m tune_node.grid --space sphere2_fixed --name sphere2_fixed --resume   # after a crash

A Ray Tune trial trains one seed, or, where it pays (on a sphere of up to
:data:`~tune_node.fast.dense.DENSE_MAX_DIM` dimensions: fixed-step backprop, and adaptive
backprop and adjoint with per-seed step control; fixed-step backprop of a user's model
without buffers: :func:`~tune_node.seed_groups.stack_for`), a *seed group*:
the seeds of one setting trained as one batched model
(:func:`~tune_node.seed_groups.train_seed_group`), with results, checkpoints and
TensorBoard runs still per seed (``--no-seed-groups``: one seed per trial). Trials
start in order of decreasing estimated cost, so the longest do not start last.

Every check of the arguments runs before Ray starts (the command line itself before torch and
Ray load: :mod:`tune_node.cli.options`); ``--dry-run`` prints the trials, their seeds and
resource requests and an estimated wall time (:mod:`tune_node.cli.estimate`), and starts nothing. A run holds its
experiment folder's lock from before Ray starts to its end
(:mod:`tune_node.experiment_folder`). Exit status: 0 done, 1 seeds did not finish,
2 refused before any work (one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..cli.common import UsageError, check_gpus, format_table, gpu_trials_at_once
from ..cli.options import grid_parser, training_overrides
from ..data.datasets import SPHERE_DIMS, check_data_available
from ..ode.solvers import METHODS
from ..train.seed_groups import groupable
from .experiment import check_cluster_options, command_line, experiment_cli, print_dry_run, start_experiment
from .experiment_folder import GRID_FILE, check_existing, check_new, open_existing, open_new, storage_problem
from .search_space import SearchSpace, SearchSpaceError, load_space, train_config_from_trial
from .storage import Storage, open_storage
from .trainable import trial_seeds
from .tune_callbacks import group_label

__all__ = ["main", "run_grid", "build_parser", "plan_trials", "estimated_nfe", "GRID_FILE"]

# GRID_FILE (grid.json, what the experiment was started with) lives in experiment_folder, beside ADAPT_FILE.


def build_parser(prog: str = "python -m tune_node.grid", description: str | None = None, *,
                 seed_groups: bool = True) -> argparse.ArgumentParser:
    """The grid's command line (:func:`tune_node.cli.options.grid_parser`, built without torch or Ray)."""
    return grid_parser(prog, description, seed_groups=seed_groups)


def _check_resources(args) -> str | None:
    if not (math.isfinite(args.cpus_per_trial) and args.cpus_per_trial > 0):
        return f"--cpus-per-trial must be a finite number > 0, got {args.cpus_per_trial:g}"
    if args.cpus is not None and args.cpus < 1:
        return f"--cpus must be >= 1, got {args.cpus}"
    if args.cpus is not None and args.cpus_per_trial > args.cpus:
        return f"--cpus-per-trial {args.cpus_per_trial:g} exceeds --cpus {args.cpus}: no trial could start"
    if args.gpus > 0:
        g = args.gpus_per_trial
        if not (0 < g <= 1 or (math.isfinite(g) and g > 0 and float(g).is_integer())):
            return f"--gpus-per-trial must be a fraction in (0, 1] or a whole number, got {g:g}"
        if g > args.gpus:
            return f"--gpus-per-trial {g:g} exceeds --gpus {args.gpus:g}: no trial could start"
    return None


def _needs_local_cuda(args) -> bool:
    """Whether this run's GPUs are this machine's CUDA: a Ray of its own started here (no address), or
    a Ray already running in this process (used as is) that has no GPUs. One with GPUs (a cluster, or
    ``ray.init(num_gpus=...)``) is asked instead once the run starts."""
    from .experiment import ray_address

    if ray_address(args)[0] != "local":
        return False
    ray = sys.modules.get("ray")  # never imported here: the checks run before Ray loads
    if ray is None or not hasattr(ray, "is_initialized") or not ray.is_initialized():
        return True
    return not ray.cluster_resources().get("GPU", 0) > 0


def check_arguments(args) -> str | None:
    """The first checks of an experiment CLI (grid, adaptation); returns the first problem or None.

    --quick against --space, the overrides' ranges, the GPU request (where this machine's CUDA serves it,
    :func:`_needs_local_cuda`: a machine without CUDA, or with fewer GPUs, refuses one, unless ``--dry-run``;
    a joined cluster is asked once Ray runs, :func:`~tune_node.experiments.experiment.cluster_problem`),
    resources, options a joined Ray cluster cannot take (:func:`~tune_node.experiment.check_cluster_options`), and
    a --storage that cannot hold experiments (:func:`~tune_node.experiment_folder.storage_problem`: a URI
    pyarrow cannot open or reach).
    """
    if args.quick and args.space not in (None, "quick"):
        return f"--quick means --space quick; drop one of --quick and --space {args.space}"
    for option in ("iterations", "report_every"):
        value = getattr(args, option)
        if value is not None and value < 1:
            return f"--{option.replace('_', '-')} must be an integer >= 1, got {value}"
    try:
        check_gpus(args.gpus, need_cuda=not args.dry_run and _needs_local_cuda(args))  # a dry run only notes a missing CUDA
    except UsageError as err:
        return str(err)
    return _check_resources(args) or check_cluster_options(args) or _adaptive_solver_problem() or storage_problem(args.storage)


def _adaptive_solver_problem() -> str | None:
    from ..ode.integrate import adaptive_solver

    try:
        adaptive_solver()
    except ValueError as err:
        return f"{err} (the solver of adaptive backprop solves of the sphere fields)"
    return None


def _threshold_problem(threshold: float) -> str | None:
    if not 0 < threshold < 1:  # also refuses nan
        return (f"--threshold must be in (0, 1): the accuracy drop that makes a setting solver-dependent "
                f"(default 0.1), got {threshold:g}")
    return None


def space_problem(given: str | None, saved: dict, name: str) -> str | None:
    """Why ``--space given`` does not fit the ``--resume`` of experiment ``name`` recorded as ``saved``
    (None if it does: not given, or the same space by name or by path)."""
    if given is None:
        return None
    try:
        space = load_space(given)
    except SearchSpaceError as err:
        return str(err)
    saved_file = saved.get("space_file")
    if saved_file and Path(saved_file).is_file():
        if Path(space.path).resolve() == Path(saved_file).resolve():
            return None
    elif space.name == saved.get("space"):  # the recorded file moved: the name is all there is to compare
        return None
    return (f"--space {given} is not the space experiment {name!r} was started with ({saved.get('space')!r}, file "
            f"{saved_file}); --resume continues an experiment with its recorded trials: drop --space, or start a new "
            f"experiment under another --name")


def data_problem(trials: list[dict]) -> str | None:
    """Whether the data of every trial can be loaded here (:func:`~tune_node.datasets.check_data_available`),
    and a user's loader and model give what they must (:func:`~tune_node.user_study.check_user_study`,
    on the first trial of each dataset and model; grid and adaptation trials alike)."""
    from ..train.user_study import check_user_study

    needed = dict.fromkeys((t.get("dataset"), t.get("data_root", "data"), bool(t.get("download"))) for t in trials)
    for dataset, root, download in needed:
        try:
            check_data_available(dataset, root, download)
        except (FileNotFoundError, ImportError, ValueError) as err:
            return str(err)
    first = {}
    for t in trials:
        first.setdefault((t.get("dataset"), t.get("model"), t.get("batch_size"), t.get("method"), t.get("gradient")), t)
    for t in first.values():
        try:
            check_user_study(train_config_from_trial(t))
        except (ImportError, TypeError, ValueError) as err:
            return str(err)
        except Exception as err:  # the user's own code failed: an input error, shown as one line
            return f"dataset {t.get('dataset')!r} with model {t.get('model')!r} fails before training: {type(err).__name__}: {err}"
    return None


def resumed_experiment(args, storage: Storage, name: str, kind: str) -> tuple[Path, dict, list[dict], str]:
    """``(folder, record, trial configs, space name)`` of the experiment ``--resume`` continues (a URI's
    brought to its local copy first), checked to be of ``kind`` and to fit ``--space`` if given (UsageError otherwise)."""
    storage.pull(name)
    experiment_dir, saved = check_existing(storage, name, kind)
    problem = space_problem(resume_space(args), saved, name)
    if problem:
        raise UsageError(problem)
    return experiment_dir, saved, saved["trials"], saved.get("space", "?")


def resume_space(args) -> str | None:
    """The space ``--resume`` was given, if any (``--quick`` is ``quick``)."""
    return args.space or ("quick" if args.quick else None)


def default_name(space) -> str:
    """The experiment name a grid takes by default: the space's name (a file's stem)."""
    if space is None:
        return "quick"
    if isinstance(space, SearchSpace):
        return space.name
    path = Path(space)
    return path.stem if path.suffix == ".toml" or "/" in space or path.is_file() else space


def _seed_groups_problem(args) -> str | None:
    if args.seeds_per_trial is not None and args.seeds_per_trial < 1:
        return f"--seeds-per-trial must be >= 1, got {args.seeds_per_trial}"
    if args.seeds_per_trial is not None and args.seed_groups is False:
        return "--seeds-per-trial sizes seed groups; drop it or --no-seed-groups"
    return None


def _groupable(trial: dict) -> bool:
    config = train_config_from_trial(trial)
    if config.model is not None:  # a user's model: stacked through torch.func where it can be
        return groupable(config, ())
    if trial["dataset"] not in SPHERE_DIMS:
        return False
    return groupable(config, (1, SPHERE_DIMS[trial["dataset"]]))


def estimated_nfe(unit: list[dict]) -> float:
    """Training function evaluations of one Ray trial (``inf`` when adaptive: unknown
    beforehand), to start the longest trials first."""
    t = unit[0]
    if t["tol"] is not None:
        return float("inf")
    backward = 1 if t["gradient"] == "backprop" else 2  # adjoint: a backward step also takes a vector-Jacobian product
    return (1 + backward) * t["steps"] * METHODS[t["method"]].stages_per_step * t["iterations"] * len(unit)


def plan_trials(trials: list[dict], seed_groups: bool = True, seeds_per_trial: int | None = None) -> list[list[dict]]:
    """The Ray trials of a grid: lists of per-seed trial configs, longest first.

    With ``seed_groups``, the seeds of one setting that :func:`~tune_node.seed_groups.groupable`
    accepts form groups of at most ``seeds_per_trial`` (default: all of them); every
    other seed is a trial of its own. Guarantees: every trial config appears exactly
    once; a group's configs differ only in ``seed``; order: decreasing
    :func:`estimated_nfe` (adaptive first), ties in the search space's order.
    """
    units: list[list[dict]] = []
    open_groups: dict[str, list[dict]] = {}
    for t in trials:
        if not (seed_groups and _groupable(t)):
            units.append([t])
            continue
        key = json.dumps({k: v for k, v in t.items() if k != "seed"}, sort_keys=True)
        group = open_groups.get(key)
        if group is None or (seeds_per_trial is not None and len(group) >= seeds_per_trial):
            group = open_groups[key] = []
            units.append(group)
        group.append(t)
    return sorted(units, key=estimated_nfe, reverse=True)


def _ray_config(unit: list[dict]):
    """The ``trial`` value of a Ray trial config: one seed's dict, or a group's list."""
    return unit[0] if len(unit) == 1 else unit


def _trial_dirname(trial) -> str:
    """A grid trial's directory and TensorBoard run name (:func:`~tune_node.tune_callbacks.run_name`):
    its setting and seeds, unique in a grid."""
    from .tune_callbacks import run_name

    return run_name(trial_seeds(trial.config))


def _search_trial_dirname(trial) -> str:
    """A search trial's directory name: :func:`_trial_dirname` and the search's trial number, as a
    search may train one setting twice (Ray numbers a search's trials from 1, and a resumed
    search goes on counting)."""
    from .tune_callbacks import run_name

    number = str(getattr(trial, "experiment_tag", "") or "").split("_", 1)[0]
    if not number.isdigit():  # no number from Ray: its trial id keeps the name unique
        return f"{run_name(trial_seeds(trial.config))}_{trial.trial_id}"
    return run_name(trial_seeds(trial.config), int(number))


def _plan_line(units: list[list[dict]]) -> str:
    groups = [u for u in units if len(u) > 1]
    if not groups:
        return f"{len(units)} Ray trials of one seed each"
    return f"{len(units)} Ray trials ({sum(map(len, groups))} seeds in {len(groups)} seed groups)"


def _format_nfe(nfe: float) -> str:
    if nfe == float("inf"):
        return "unknown (adaptive)"
    return f"{nfe / 1e6:.3g}M" if nfe >= 1e6 else f"{nfe / 1e3:.3g}k" if nfe >= 1e3 else f"{nfe:.0f}"


@experiment_cli
def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv), argv)[0]


def run_grid(space="quick", **options):
    """Run a grid experiment from Python; the same work as ``python -m tune_node.grid``.

    Arguments:
        space: a search space: a shipped name (``"sphere2_fixed"``), a TOML file's path,
            or a :class:`~tune_node.search_space.SearchSpace`.
        options: the CLI's options as keywords, dashes as underscores (``storage="runs"``,
            ``name=...``, ``seeds=3``, ``iterations=...``, ``lr=...``, ``cpus=...``,
            ``gpus=...``, ``resume=True``, ``seed_groups=False``, ``set={"batch_size": 64}`` (training
            keys, as ``--set``), ...).

    Returns the results table (:data:`tune_node.results.COLUMNS`, one row per trial and
    test setting), also when some seeds did not finish (a RuntimeWarning names how many;
    ``resume=True`` continues them). Raises :class:`~tune_node.cli.UsageError` (a
    ValueError) for bad input, before any work, and TypeError for an unknown option.
    """
    from .experiment import run_from_python

    return run_from_python(build_parser(), _run, space, options, "tune_node.grid")


def _run(args, argv: list[str] | None):
    """The grid experiment for parsed ``args``: ``(exit status, results table or None)``."""
    problem = check_arguments(args) or _seed_groups_problem(args) or _threshold_problem(args.threshold)
    if problem:
        raise UsageError(problem)
    overrides = training_overrides(args)
    storage = open_storage(args.storage)

    if args.resume:
        changed = [f"--{k.replace('_', '-')}"
                   for k in ("seeds", "iterations", "lr", "report_every", "set", "seed_groups", "seeds_per_trial")
                   if getattr(args, k) is not None]
        if changed:
            raise UsageError(f"--resume continues the experiment as it was started; drop {', '.join(changed)}")
        name = args.name if args.name is not None else default_name(args.space)
        experiment_dir, saved, trials, space_name = resumed_experiment(args, storage, name, "grid")
        try:
            # Experiments from before seed groups have no "units": one seed per trial.
            units = [[trials[i] for i in unit] for unit in saved.get("units", [[i] for i in range(len(trials))])]
        except (IndexError, TypeError) as err:
            raise UsageError(f"{experiment_dir / GRID_FILE} has malformed 'units' ({err}); the experiment cannot be resumed")
    else:
        try:
            space = load_space(args.space or "quick").with_overrides(seeds=args.seeds, **overrides)
            trials = space.trials(data_root=str(Path(args.data_root).resolve()), download=args.download)
        except (SearchSpaceError, ValueError) as err:
            raise UsageError(str(err))
        if space.ranges:
            raise UsageError(f"search space {space.name!r} ({space.path}) gives ranges (steps = {{min = ..., max = ...}}), "
                             f"which a grid cannot enumerate: run python -m tune_node.search --space {args.space}, an Optuna "
                             f"study, or give lists of values")
        if not trials:
            raise UsageError(f"search space {space.name!r} ({space.path}) gives no trials: each [[solvers]] entry needs "
                         f"at least one step count or tolerance")
        space_name, name = space.name, args.name if args.name is not None else space.name
        storage.pull(name)  # a URI's experiment, as it stands there
        experiment_dir = check_new(storage, name, "grid")
    # Before planning: planning builds a user's model to see whether its seeds stack.
    problem = data_problem(trials)
    if problem:
        raise UsageError(problem)
    if not args.resume:
        units = plan_trials(trials, seed_groups=args.seed_groups is not False, seeds_per_trial=args.seeds_per_trial)

    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial if args.gpus > 0 else 0}
    if args.dry_run:
        from ..cli.estimate import estimate_wall_time, format_duration

        estimate = estimate_wall_time(units, estimated_nfe, args)
        rows = [{"ray trial": group_label(u), "seeds": len(u), "iterations": u[0]["iterations"], "lr": u[0]["lr"],
                 "batch": u[0]["batch_size"], "optimizer": u[0]["optimizer"], "train NFE": _format_nfe(estimated_nfe(u)),
                 "est. time": "-" if s is None else format_duration(s), "cpu": resources["cpu"], "gpu": resources["gpu"]}
                for u, s in zip(units, estimate.per_trial)]
        status = print_dry_run(f"{len(trials)} trials of {space_name!r} -> {experiment_dir}; {_plan_line(units)}; "
                               f"each Ray trial requests {resources['cpu']:g} CPU and {resources['gpu']:g} GPU", rows, args.gpus,
                               args.gpus_per_trial, args)
        print("\n".join(estimate.lines("adaptive methods, whose NFE is unknown before training, or no measured cost per NFE "
                                       "for the dataset or model")))
        return status, None
    # Held from here to the end of main (experiment_cli closes it): a second run on this folder is refused.
    command = command_line("tune_node.grid", argv)
    folder = open_existing(storage, name, "grid", command)[0] if args.resume else open_new(storage, name, "grid", command)
    index = {id(t): i for i, t in enumerate(trials)}
    problem = start_experiment(
        args, folder, len(trials),
        record=lambda: {"space": space_name, "space_file": space.path, "trials": trials,
                        "units": [[index[id(t)] for t in u] for u in units]},
        announce=lambda: f"{len(trials)} trials of {space_name!r} ({space.description}) -> {experiment_dir}; "
                         f"{_plan_line(units)}; each Ray trial requests {resources['cpu']:g} CPU, {resources['gpu']:g} GPU")
    if problem:
        raise UsageError(problem)
    storage.push(name)  # the record: from here the URI alone can resume the experiment

    from ..results import write_results
    from .experiment import finish, fit
    from .trainable import train_trial

    grid = fit(train_trial, [_ray_config(u) for u in units], name=name, storage=storage, resume=args.resume,
               resources=resources, dirname=_trial_dirname, progress_total=len(trials),
               max_concurrent=gpu_trials_at_once(args.gpus, args.gpus_per_trial))  # within --gpus where Ray has more
    table, csv = write_results(experiment_dir)
    finished = table["trial_id"].nunique() if len(table) else 0
    print(f"\n{finished}/{len(trials)} trials finished; results table: {csv}")
    if finished:
        from ..results import critical_steps, display_rows
        from .experiment import demo_note, partial_label

        summary = critical_steps(table, threshold=args.threshold)
        partial = partial_label(finished, len(trials))
        print(f"\ncritical step per train solver{partial} (threshold {args.threshold:g}; accuracy: test set, train solver, "
              f"mean +- std over seeds; rule: python -m analysis.critical_step --help):")
        print(format_table(display_rows(summary)))
        if partial:
            print("settings whose seeds did not finish are judged on fewer seeds or missing: the critical step may move "
                  "once the run is complete")
        note = demo_note(space_name, trials)
        if note:
            print(note)
    return finish(experiment_dir, finished, len(trials), grid, "tune_node.grid", storage, name), table


if __name__ == "__main__":
    sys.exit(main())
