"""The grid experiment that locates the critical step size: ``python -m tune_node.grid``.

Trains every (solver setting, seed) of a search space as one Ray Tune trial,
evaluates each trained model with the paper's test solvers, writes the tidy
results table ``<storage>/<name>/results.csv`` and prints the critical step (or
tolerance) per dataset, train method and gradient mode. Examples::

    python -m tune_node.grid --quick                       # laptop: small Sphere2 grid, local Ray
    python -m tune_node.grid --space sphere2_fixed --gpus 4 --gpus-per-trial 0.25
    python -m tune_node.grid --space my_study.toml --address auto --seeds 0,1,2
    python -m tune_node.grid --space sphere2_fixed --name sphere2_fixed --resume   # after a crash

Every check of the arguments runs before Ray starts; ``--dry-run`` prints the
trials and their resource requests and starts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli import check_gpus, format_table
from .experiment import print_dry_run, start_experiment
from .search_space import SearchSpaceError, available_spaces, load_space
from .tune_callbacks import trial_label

__all__ = ["main", "build_parser", "GRID_FILE"]

GRID_FILE = "grid.json"  # what the experiment was started with, for --resume and for readers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune_node.grid", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    space = parser.add_argument_group("experiment")
    space.add_argument("--space", default=None, help=f"search space name or TOML file (default: quick); shipped: {', '.join(available_spaces())}")
    space.add_argument("--quick", action="store_true", help="same as --space quick: a small Sphere2 grid for laptops")
    space.add_argument("--seeds", default=None, help="override the seeds: a count (5) or a list (0,1,2)")
    space.add_argument("--iterations", type=int, default=None, help="override training iterations")
    space.add_argument("--lr", type=float, default=None, help="override the learning rate")
    space.add_argument("--report-every", type=int, default=None, help="override iterations between reports/checkpoints")
    space.add_argument("--data-root", default="data", help="folder with torchvision's MNIST/CIFAR10 files")
    space.add_argument("--download", action="store_true", help="let torchvision download missing MNIST/CIFAR10 files")
    res = parser.add_argument_group("resources")
    res.add_argument("--gpus", type=float, default=0, help="GPUs to use in total (0: CPU only)")
    res.add_argument("--gpus-per-trial", type=float, default=0.25, help="GPU share of one trial when --gpus > 0, so small models share cards (default 0.25)")
    res.add_argument("--cpus", type=int, default=None, help="CPUs to use in total on a local Ray (default: all)")
    res.add_argument("--cpus-per-trial", type=float, default=1, help="CPUs of one trial; also its torch threads (default 1)")
    res.add_argument("--address", default=None, help="join a running Ray cluster: host:port or auto (default: start a local Ray)")
    out = parser.add_argument_group("output")
    out.add_argument("--storage", default="runs", help="where experiments are written (default ./runs)")
    out.add_argument("--name", default=None, help="experiment name (default: the space's name)")
    out.add_argument("--resume", action="store_true", help="continue the interrupted experiment --name in --storage")
    out.add_argument("--dry-run", action="store_true", help="print every trial's config and resource request; start nothing")
    out.add_argument("--threshold", type=float, default=0.1, help="accuracy drop that makes a setting solver-dependent (default 0.1)")
    return parser


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _check_resources(args) -> str | None:
    if args.cpus_per_trial <= 0:
        return f"--cpus-per-trial must be > 0, got {args.cpus_per_trial:g}"
    if args.cpus is not None and args.cpus < 1:
        return f"--cpus must be >= 1, got {args.cpus}"
    if args.cpus is not None and args.cpus_per_trial > args.cpus:
        return f"--cpus-per-trial {args.cpus_per_trial:g} exceeds --cpus {args.cpus}: no trial could start"
    if args.gpus > 0:
        g = args.gpus_per_trial
        if not (0 < g <= 1 or float(g).is_integer()):
            return f"--gpus-per-trial must be a fraction in (0, 1] or a whole number, got {g:g}"
        if g > args.gpus:
            return f"--gpus-per-trial {g:g} exceeds --gpus {args.gpus:g}: no trial could start"
    return None


def check_arguments(args) -> str | None:
    """The first checks of an experiment CLI (grid, adaptation): --quick against --space, then resources.

    A GPU request on a machine without CUDA exits at once (unless ``--dry-run``).
    """
    if args.quick and args.space not in (None, "quick"):
        return f"--quick means --space quick; drop one of --quick and --space {args.space}"
    if not args.dry_run:
        check_gpus(args.gpus)  # exits at once, non-zero, when CUDA is missing
    return _check_resources(args)


def _trial_dirname(trial) -> str:
    c = trial.config["trial"]
    setting = f"tol{c['tol']:g}" if c.get("tol") is not None else f"steps{c['steps']}"
    return f"{c['method']}_{setting}_{c['gradient']}_seed{c['seed']}_{trial.trial_id}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = check_arguments(args)
    if problem:
        return _fail(problem)
    storage = Path(args.storage).resolve()

    if args.resume:
        changed = [f"--{k.replace('_', '-')}" for k in ("seeds", "iterations", "lr", "report_every") if getattr(args, k) is not None]
        if changed:
            return _fail(f"--resume continues the experiment as it was started; drop {', '.join(changed)}")
        name = args.name or args.space or "quick"
        experiment_dir = storage / name
        grid_file = experiment_dir / GRID_FILE
        if not grid_file.is_file():
            return _fail(f"nothing to resume: no experiment {name!r} in {storage} (missing {grid_file})")
        saved = json.loads(grid_file.read_text())
        trials, space_name = saved["trials"], saved["space"]
    else:
        try:
            space = load_space(args.space or "quick").with_overrides(
                seeds=args.seeds, iterations=args.iterations, lr=args.lr, report_every=args.report_every)
            trials = space.trials(data_root=str(Path(args.data_root).resolve()), download=args.download)
        except (SearchSpaceError, ValueError) as err:
            return _fail(str(err))
        space_name, name = space.name, args.name or space.name
        experiment_dir = storage / name

    resources = {"cpu": args.cpus_per_trial, "gpu": args.gpus_per_trial if args.gpus > 0 else 0}
    if args.dry_run:
        rows = [{"trial": trial_label(t), "iterations": t["iterations"], "lr": t["lr"], "batch": t["batch_size"],
                 "optimizer": t["optimizer"], "cpu": resources["cpu"], "gpu": resources["gpu"]} for t in trials]
        return print_dry_run(f"{len(trials)} trials of {space_name!r} -> {experiment_dir}; each requests "
                             f"{resources['cpu']:g} CPU and {resources['gpu']:g} GPU", rows, args.gpus)
    problem = start_experiment(
        args, storage, name, GRID_FILE, len(trials),
        record=lambda: {"space": space_name, "space_file": space.path, "trials": trials},
        announce=lambda: f"{len(trials)} trials of {space_name!r} ({space.description}) -> {experiment_dir}; "
                         f"each requests {resources['cpu']:g} CPU, {resources['gpu']:g} GPU")
    if problem:
        return _fail(problem)

    from .experiment import fit
    from .results import write_results
    from .trainable import train_trial

    grid = fit(train_trial, trials, name=name, storage=storage, resume=args.resume, resources=resources, dirname=_trial_dirname)
    table, csv = write_results(experiment_dir)
    finished = table["trial_id"].nunique() if len(table) else 0
    print(f"\n{finished}/{len(trials)} trials finished; results table: {csv}")
    if finished:
        from analysis.critical_step import critical_steps, display_rows

        summary = critical_steps(table, threshold=args.threshold)
        print(f"\ncritical step per train solver (threshold {args.threshold:g}; accuracy: test set, train solver, "
              f"mean +- std over seeds; rule: python -m analysis.critical_step --help):")
        print(format_table(display_rows(summary)))
    print(f"\nTensorBoard: tensorboard --logdir {experiment_dir}")
    if finished < len(trials):
        print(f"{len(trials) - finished} trials did not finish ({len(grid.errors)} failed); "
              f"continue with: python -m tune_node.grid --storage {args.storage} --name {name} --resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
