"""Running trial configs as one Ray Tune experiment, shared by the grid and adaptation CLIs.

:func:`start_experiment` checks and starts Ray, prepares the C++ solver loops and records a new experiment; :func:`fit` starts (or restores) the Tuner with the project's conventions: one
grid-search entry per trial config under the key ``"trial"``, TensorBoard runs
with hparams, concise progress lines, two checkpoints kept per trial, one retry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from . import native
from .cli import check_gpus, format_table

__all__ = ["finish", "fit", "print_dry_run", "start_experiment", "check_address", "init_ray", "prepare_native_loops"]


def fit(trainable: Callable, trials: list, *, name: str, storage: Path, resume: bool, resources: dict,
        dirname: Callable, progress_total: int | None = None):
    """Run every trial config with ``trainable`` in ``storage / name``; returns Ray's ResultGrid.

    Arguments:
        trainable: a function trainable of the installed package, reading ``config["trial"]``.
        trials: the JSON-friendly trial configs (a seed group's is a list of per-seed configs).
        name, storage: the experiment is ``storage / name``.
        resume: restore that experiment: finished trials are not rerun, unfinished and
            failed ones continue from their newest checkpoint.
        resources: one trial's request, ``{"cpu": ..., "gpu": ...}``.
        dirname: ``dirname(trial) -> str``, the trial's directory name.
        progress_total: seeds the progress lines count to (default: one per trial config).
    """
    from ray import tune

    from .tune_callbacks import ProgressCallback, TensorBoardCallback

    # Tune warns on every forced state snapshot that checkpoint rotation causes; it is cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray's new console output would point TensorBoard at a driver folder without the trial runs;
    # ProgressCallback reports progress instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(trainable, resources)
    if resume:
        tuner = tune.Tuner.restore(str(Path(storage) / name), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(trial_dirname_creator=dirname, reuse_actors=True),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(storage),
                callbacks=[TensorBoardCallback(), ProgressCallback(progress_total or len(trials))],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=0,
            ),
        )
    return tuner.fit()


def check_address(address: str | None) -> str | None:
    """Fail fast on an unreachable host:port instead of letting Ray retry for minutes."""
    if address in (None, "auto", "local") or address.startswith("ray://"):
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"--address must be host:port, auto or ray://host:port, got {address!r}"
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return None
    except OSError as err:
        return f"no Ray cluster reachable at --address {address} ({err}); start one with `ray start --head` or omit --address for a local Ray"


def init_ray(args) -> str | None:
    import ray

    if ray.is_initialized():
        return None
    # Workers import the same tune_node as this driver (a source checkout included).
    package_root = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    # Worker logs would repeat every checkpoint's path; failures still show (error.txt, progress lines).
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}})
    try:
        if args.address:
            ray.init(address=args.address, **kwargs)
        else:
            ray.init(num_cpus=args.cpus, num_gpus=int(args.gpus) if args.gpus else 0, **kwargs)
    except ConnectionError as err:
        return f"no Ray cluster reachable at --address {args.address}: {err}"
    return None


def prepare_native_loops() -> None:
    """Builds (or loads the cached build of) :mod:`tune_node.native`'s C++ loops here,
    so that trials on this machine load them instead of racing to build them."""
    start = time.perf_counter()
    loops = native.dense_loops()
    seconds = time.perf_counter() - start
    if loops is not None and seconds > 5:
        print(f"built the C++ solver loops in {seconds:.0f} s (cached for later runs)", flush=True)


def print_dry_run(header: str, rows: list[dict], gpus: float) -> int:
    """A dry run's output: ``header``, one row per trial, and whether a GPU request would fail here. Returns 0."""
    print(header)
    print(format_table(rows))
    if gpus > 0:
        try:
            check_gpus(gpus)
        except SystemExit as err:
            print(f"note: a real run would stop here: {str(err).removeprefix('error: ')}")
    return 0


def start_experiment(args, storage: Path, name: str, record_file: str, trials: int, record: Callable[[], dict],
                     announce: Callable[[], str]) -> str | None:
    """Everything between the checked arguments and :func:`fit`; returns an error message or None.

    Refuses to start over an existing experiment without ``args.resume``, fails fast on
    an unreachable ``args.address``, starts or joins Ray, builds or loads the C++ solver loops (:func:`prepare_native_loops`), then writes ``record()`` as
    JSON to ``storage / name / record_file`` (new experiments; ``--resume`` reads it)
    and prints ``announce()``, or announces the resume of its ``trials`` trials.
    """
    experiment_dir = Path(storage) / name
    if not args.resume and (experiment_dir / record_file).exists():
        return f"experiment {name!r} already exists in {storage}; add --resume to continue it or pick another --name"
    problem = check_address(args.address) or init_ray(args)  # Ray starts only for a reachable address
    if problem:
        return problem
    prepare_native_loops()
    if args.resume:
        print(f"resuming {experiment_dir} ({trials} trials; finished ones are not rerun)", flush=True)
    else:
        experiment_dir.mkdir(parents=True, exist_ok=True)
        (experiment_dir / record_file).write_text(json.dumps(record(), indent=1))
        print(announce(), flush=True)
    return None


def finish(experiment_dir: Path, finished: int, total: int, failed: int, cli: str, storage: str, name: str) -> int:
    """The closing lines of an experiment CLI: where TensorBoard reads, and how to resume
    what did not finish. Returns the exit status (1 when trials are missing)."""
    print(f"\nTensorBoard: tensorboard --logdir {experiment_dir}")
    if finished < total:
        print(f"{total - finished} trials did not finish ({failed} failed); continue with: "
              f"python -m {cli} --storage {storage} --name {name} --resume", file=sys.stderr)
        return 1
    return 0
