"""Running trial configs as one Ray Tune experiment, shared by the grid and adaptation CLIs.

:func:`start_experiment` checks and starts Ray, prepares the C++ solver loops and records a new experiment;
:func:`fit` starts (or restores) the Tuner with the project's conventions: one
grid-search entry per trial config under the key ``"trial"``, TensorBoard runs
with hparams, concise progress lines, two checkpoints kept per trial, one retry.
:func:`experiment_cli` wraps a CLI's ``main``: the exit-status convention (2: refused before
any work, one ``error:`` line; 1: trials did not finish) and the release of the experiment
folder it held (:mod:`tune_node.experiment_folder`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import math
import os
import shlex
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

from ..cli.common import (
    LOGICAL_GPUS_ENV,
    UsageError,
    check_cluster_resources,
    check_gpus,
    fail,
    format_table,
    gpu_trials_at_once,
    logical_gpus,
)
from ..fast import native
from .experiment_folder import ExperimentFolder, ExperimentFolderError, experiment_kind, open_folders
from .storage import Storage, StorageError, open_storage

__all__ = ["finish", "fit", "print_dry_run", "start_experiment", "check_address", "init_ray", "prepare_native_loops",
           "experiment_cli", "ray_address", "fail", "command_line", "check_cluster_options", "ray_noise_filtered", "RAY_NOTICES",
           "partial_label", "demo_note", "DEMO_SPACES", "cluster_problem", "gpu_share_line"]


def fit(trainable: Callable, trials: list, *, name: str, storage: Storage | Path, resume: bool, resources: dict,
        dirname: Callable, progress_total: int | None = None, search_alg=None, stop=None, max_concurrent: int = 0,
        num_samples: int = -1):
    """Run every trial config with ``trainable`` in ``storage / name``; returns Ray's ResultGrid.

    Arguments:
        trainable: a function trainable of the installed package, reading ``config["trial"]``.
        trials: the JSON-friendly trial configs (a seed group's is a list of per-seed configs).
        name, storage: the experiment is ``storage / name``; ``storage`` a folder or a
            :class:`~tune_node.experiments.storage.Storage` (a URI's: Ray Tune writes to the URI,
            and once the trials are done its local copy is brought up to date from there).
        resume: restore that experiment: finished trials are not rerun, unfinished and
            failed ones continue from their newest checkpoint.
        resources: one trial's request, ``{"cpu": ..., "gpu": ...}``.
        dirname: ``dirname(trial) -> str``, the trial's directory name.
        progress_total: seeds the progress lines count to (default: one per trial config).
        search_alg, stop, max_concurrent, num_samples: a Ray Tune ``Searcher`` that suggests the
            trial configs instead of ``trials`` (which is then ignored), ``num_samples`` of them
            or (-1) until it says it is finished; a ``Stopper``; the most trials at once (0: as
            resources allow). A restored experiment restores its searcher's state.
    """
    from ray import tune

    if not resume and not trials and search_alg is None:
        raise ValueError("no trial configs: an experiment needs at least one trial")  # Tune would fail mid-start

    # Tune warns on every forced state snapshot that checkpoint rotation causes; it is cheap here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Ray's new console output would point TensorBoard at a driver folder without the trial runs;
    # ProgressCallback reports progress instead.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trainable = tune.with_resources(trainable, resources)
    storage = storage if isinstance(storage, Storage) else open_storage(storage)
    with ray_noise_filtered():
        grid = _tuner(tune, trainable, trials, name=name, storage=storage, resume=resume, dirname=dirname,
                      progress_total=progress_total, search_alg=search_alg, stop=stop, max_concurrent=max_concurrent,
                      num_samples=num_samples).fit()
    try:
        storage.pull(name)
    except StorageError as err:
        raise StorageError(f"{err}; the trials are done and their results on {storage.where(name)}: once it can be reached, "
                           f"python -m tune_node.results {shlex.quote(storage.where(name))} builds the tables") from None
    return grid


def _tuner(tune, trainable, trials, *, name, storage, resume, dirname, progress_total, search_alg, stop, max_concurrent,
           num_samples):
    from .progress import ProgressCallback
    from .tune_callbacks import ProgressCSVCallback, TensorBoardCallback

    if resume:
        tuner = tune.Tuner.restore(trainable=trainable, resume_unfinished=True, resume_errored=True, **storage.restore_arguments(name))
    else:
        searched = dict(search_alg=search_alg, num_samples=num_samples) if search_alg is not None else {}
        tuner = tune.Tuner(
            trainable,
            param_space={} if search_alg is not None else {"trial": tune.grid_search(trials)},
            tune_config=tune.TuneConfig(trial_dirname_creator=dirname, reuse_actors=True, max_concurrent_trials=max_concurrent,
                                        **searched),
            run_config=tune.RunConfig(
                name=name,
                **storage.ray_arguments(),
                stop=stop,
                callbacks=[TensorBoardCallback(), ProgressCSVCallback(),
                           ProgressCallback(progress_total or len(trials), plan=trials if search_alg is None else None)],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                # Remote storage gets the trials' logs from the driver's staging folder at Ray's syncs:
                # every 30 s (Ray: 300), so a killed driver loses little of them.
                **({"sync_config": tune.SyncConfig(sync_period=30)} if storage.remote else {}),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=0,
            ),
        )
    return tuner


class _DropRayNotice(logging.Filter):
    """Drops the records of one Ray logger whose message ``drop(message)`` picks; every other record passes."""

    def __init__(self, drop: Callable[[str], bool]):
        super().__init__()
        self.drop = drop

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.drop(record.getMessage())
        except Exception:  # a record that cannot be read is shown as Ray wrote it
            return True


def _restore_hint(message: str) -> bool:
    # Tune's "Experiment has been interrupted ... Resume experiment with: Tuner.restore(...)": this
    # project resumes with its CLI's --resume, which finish() prints.
    return "Resume experiment with: " in message or "Resume training with: " in message


def _unreported_trials(message: str) -> bool:
    # ResultGrid reads every trial's result.json or progress.csv; a trial that has not reported yet
    # (pending when the run was interrupted) has neither, a FileNotFoundError. Other failures show.
    lines = message.splitlines()
    return lines[0].startswith("Failed to fetch metrics for ") and all(": FileNotFoundError(" in line for line in lines[1:])


def _token_auth_enabled(message: str) -> bool:
    # Ray turns token authentication on for a new local cluster and says so on every start; the
    # opposite notice (authentication disabled: anyone on the network may run code) still shows.
    return message.startswith("Token authentication is enabled for this Ray cluster")


#: Ray's notices that contradict or confuse this project's output: (logger, which messages).
RAY_NOTICES = (
    ("ray.tune.tune", _restore_hint),
    ("ray.tune.analysis.experiment_analysis", _unreported_trials),
    ("ray._private.authentication.authentication_token_setup", _token_auth_enabled),
)


@contextlib.contextmanager
def ray_noise_filtered():
    """Within: Ray's notices of :data:`RAY_NOTICES` are dropped (their loggers' other records, warnings
    and errors included, pass); the filters go again on exit."""
    filters = [(logging.getLogger(name), _DropRayNotice(drop)) for name, drop in RAY_NOTICES]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def ray_address(args) -> tuple[str, str]:
    """``(address, source)``: the Ray this run uses and where that came from.

    ``--address`` when given (source ``"--address"``); else ``RAY_ADDRESS`` when set and
    not empty (``"RAY_ADDRESS"``: joining the cluster it names, as Ray itself would);
    else ``"local"`` (``"local"``): a new local Ray, never one found in Ray's temp folder,
    which ``ray.init()`` without an address would join (``ray start``'s cluster).
    """
    if args.address:
        return args.address, "--address"
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env:
        return env, "RAY_ADDRESS"
    return "local", "local"


def check_cluster_options(args) -> str | None:
    """Options that only size a local Ray, refused when this run joins a cluster."""
    address, source = ray_address(args)
    if address != "local" and args.cpus is not None:
        where = f"RAY_ADDRESS={address}" if source == "RAY_ADDRESS" else f"--address {address}"
        hint = "; or unset RAY_ADDRESS to start a local Ray" if source == "RAY_ADDRESS" else ""
        return (f"--cpus sizes a local Ray only, but this run joins the Ray cluster at {where}: drop --cpus "
                f"(the cluster's CPUs are used; --cpus-per-trial sets a trial's share){hint}")
    return None


def check_address(address: str | None, source: str = "--address") -> str | None:
    """Fail fast on an unreachable host:port instead of letting Ray retry for minutes."""
    if address in (None, "auto", "local") or address.startswith("ray://"):
        return None
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"{source} must be host:port, auto or ray://host:port, got {address!r}"
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            return None
    except OSError as err:
        fix = "unset RAY_ADDRESS for a local Ray" if source == "RAY_ADDRESS" else "omit --address for a local Ray"
        return f"no Ray cluster reachable at {source} {address} ({err}); start one with `ray start --head` or {fix}"


def init_ray(args) -> str | None:
    """Start a local Ray or join the cluster of :func:`ray_address` (saying so when RAY_ADDRESS
    chose it); returns an error message or None. A Ray already running in this process is used as is."""
    import ray

    if ray.is_initialized():
        return None
    # Workers import the same tune_node as this driver (a source checkout included).
    package_root = str(Path(__file__).resolve().parents[2])  # the folder holding tune_node/
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    # Worker logs would repeat every checkpoint's path; failures still show (error.txt, progress lines).
    from ..ode.integrate import ADAPTIVE_SOLVER_ENV, adaptive_solver

    # A cluster's workers do not inherit this driver's environment; the driver's choices rule theirs
    # (the driver plans seed groups by the adaptive solver the workers will use).
    env_vars = {"PYTHONPATH": pythonpath, ADAPTIVE_SOLVER_ENV: adaptive_solver()}
    if logical_gpus():
        env_vars[LOGICAL_GPUS_ENV] = "1"
    kwargs = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                  runtime_env={"env_vars": env_vars})
    address, source = ray_address(args)
    try:
        if address == "local":
            # Ray counts whole GPUs per node: a fractional --gpus gets the next whole number, and fit's
            # max_concurrent (gpu_trials_at_once) keeps the trials within --gpus.
            with ray_noise_filtered():
                ray.init(address="local", num_cpus=args.cpus, num_gpus=math.ceil(args.gpus - 1e-9) if args.gpus > 0 else 0,
                         **kwargs)
        else:
            if source == "RAY_ADDRESS":
                print(f"joining the Ray cluster at {address} (RAY_ADDRESS is set; unset it to start a local Ray)", flush=True)
            with ray_noise_filtered():
                ray.init(address=address, **kwargs)
    except ConnectionError as err:
        return f"no Ray cluster reachable at {source} {address}: {err}"
    return None


def prepare_native_loops(out=print) -> None:
    """Builds (or loads the cached builds of) the C++ solver loops here (:mod:`tune_node.native`'s
    fixed-step loops, :mod:`tune_node.fast.adaptive_native`'s adaptive ones), so that trials on this
    machine load them instead of racing to build them. A build (once per machine and torch version)
    is announced before it starts, with its usual duration, and its end with the time it took."""
    from ..fast import adaptive_native

    builds = [(load, seconds) for pending, load, seconds in ((native.build_pending(), native.dense_loops, native.BUILD_SECONDS),
                                                             (adaptive_native.build_pending(), adaptive_native.adaptive_loops,
                                                              adaptive_native.BUILD_SECONDS)) if pending]
    if builds:
        out(f"building the C++ solver loops (once per machine and torch version; about {sum(s for _, s in builds)} s "
            f"on 2 CPU cores; TUNE_NODE_NATIVE=0 skips it) ...", flush=True)
        start = time.perf_counter()
        if all([load() is not None for load, _ in builds]):
            out(f"built the C++ solver loops in {time.perf_counter() - start:.0f} s (cached for later runs)", flush=True)
    native.dense_loops()  # loads the cached builds, or is disabled: no news
    adaptive_native.adaptive_loops()


def print_dry_run(header: str, rows: list[dict], gpus: float, gpus_per_trial: float | None = None, args=None) -> int:
    """A dry run's output: ``header``, one row per trial, and with ``gpus`` > 0 each trial's GPU share,
    how many trials share a GPU and run at once, and whether CUDA is missing here. Returns 0."""
    print(header)
    print(format_table(rows))
    if gpus > 0:
        if gpus_per_trial is not None:
            print(gpu_share_line(gpus, gpus_per_trial))
        print(_cuda_note(gpus, args))
    return 0


def gpu_share_line(gpus: float, per_trial: float) -> str:
    """``"0.25 GPU per trial: 4 trials per GPU, 16 at once on --gpus 4"`` (or a whole-GPU trial's line)."""
    at_once = gpu_trials_at_once(gpus, per_trial)
    if per_trial >= 1:
        whole = " (whole GPUs of one node)" if per_trial > 1 else ""
        return f"{per_trial:g} GPU per trial{whole}: {at_once} at once on --gpus {gpus:g}"
    per_gpu = math.floor(1 / per_trial + 1e-9)
    idle = 1 - per_gpu * per_trial
    rest = f" ({idle:.2g} of each GPU stays idle: Ray places a share on one GPU)" if idle > 1e-6 else ""
    return f"{per_trial:g} GPU per trial: {per_gpu} trials per GPU, {at_once} at once on --gpus {gpus:g}{rest}"


def _cuda_note(gpus: float, args) -> str:
    """What a dry run knows of the GPUs: this machine's CUDA, and for a joined cluster that its GPUs are checked on joining."""
    import torch

    address, source = ray_address(args) if args is not None else ("local", "local")
    if address != "local":
        cuda = "available" if torch.cuda.is_available() else "not available"
        return (f"note: the GPUs of the Ray cluster at {source} {address} are checked when the run joins it (this machine's "
                f"CUDA, {cuda}, does not matter; each trial needs CUDA on its node)")
    if logical_gpus() and not torch.cuda.is_available():
        return (f"note: CUDA is not available on this machine; {LOGICAL_GPUS_ENV}=1: Ray's GPUs are logical and "
                f"trials given one train on CPU")
    try:
        check_gpus(gpus)  # what a real local run would refuse
    except UsageError as err:
        return f"note: a real run would stop here: {err}"
    return f"CUDA: {torch.cuda.device_count()} GPU(s) on this machine"


def cluster_problem(args, where: str | None = None) -> str | None:
    """Why the running Ray, named ``where`` in the message (default: from :func:`ray_address`), can never meet
    one trial's request (:func:`~tune_node.cli.common.check_cluster_resources` on ``ray.nodes()``), or None:
    asked after Ray starts or is joined, before any trial."""
    import ray

    address, source = ray_address(args)
    where = where or ("the local Ray" if address == "local" else f"the Ray cluster at {source} {address}")
    gpus = getattr(args, "gpus", 0) or 0
    try:
        check_cluster_resources(ray.nodes(), gpus=gpus, gpus_per_trial=getattr(args, "gpus_per_trial", 0.25),
                                cpus_per_trial=getattr(args, "cpus_per_trial", 1), where=where)
    except UsageError as err:
        return str(err)
    return None


def start_experiment(args, folder: ExperimentFolder, trials: int, record: Callable[[], dict],
                     announce: Callable[[], str]) -> str | None:
    """Everything between the held experiment folder and :func:`fit`; returns an error message or None.

    Fails fast on an unreachable Ray address (``--address`` or ``RAY_ADDRESS``), builds or
    loads the C++ solver loops (:func:`prepare_native_loops`), starts or joins Ray
    (:func:`init_ray`), refuses a trial request its nodes can never meet (:func:`cluster_problem`: ``--gpus``
    without GPUs, a GPU or CPU share larger than any node's), then, for a new experiment, writes ``record()``
    as its record (:meth:`ExperimentFolder.write_record`; ``--resume`` reads it) and prints
    ``announce()``, or announces the resume of its ``trials`` trials. Should anything fail
    before the record is written, closing the folder (:func:`experiment_cli` does) removes
    what the run made of it.
    """
    address, source = ray_address(args)
    problem = check_address(address, source)
    if problem:
        return problem
    # Before Ray: a build is announced at once, and has the CPUs to itself.
    prepare_native_loops()
    import ray

    # A Ray this process already runs (the Python API after ray.init) is used as is, and asked as a cluster is.
    where = None
    if ray.is_initialized() and address == "local":
        where = f"the Ray this process is connected to ({ray.get_runtime_context().gcs_address})"
    problem = init_ray(args) or cluster_problem(args, where)  # Ray starts only for a reachable address
    if problem:
        return problem
    if folder.new:
        folder.write_record(record())
        print(announce(), flush=True)
    else:
        folder.mark_started()
        print(f"resuming {folder.path} ({trials} trials; finished ones are not rerun)", flush=True)
    return None


def command_line(module: str, argv: list[str] | None) -> str:
    """How this run was started, as a shell line (for the lock's holder record): ``python -m module args``."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def experiment_cli(main: Callable) -> Callable:
    """Wrap an experiment CLI's ``main(argv) -> int``.

    A :class:`~tune_node.cli.UsageError` or
    :class:`~tune_node.experiment_folder.ExperimentFolderError` escaping ``main`` becomes
    exit status 2 with one ``error:`` line. Whatever way ``main`` ends (returned,
    raised, interrupted), every experiment folder it opened is closed: its lock
    released, and a new experiment whose record was not written removed.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        before = open_folders()
        try:
            return main(argv)
        except (UsageError, ExperimentFolderError, StorageError) as err:
            return fail(err)
        finally:
            for folder in open_folders():
                if folder not in before:
                    folder.close()

    return wrapper


def run_from_python(parser: argparse.ArgumentParser, run: Callable, space, options: dict, cli: str):
    """An experiment CLI's work called from Python: the ``run(args, argv) -> (status, table)``
    of ``cli`` with ``space`` and ``options`` (keywords named as the options' destinations,
    ``cpus_per_trial=2``), read by ``parser`` as the command line would be, so values are
    converted and checked the same way. Returns the table; folders opened are closed as
    :func:`experiment_cli` closes them. Raises TypeError naming an unknown option, and the
    run's UsageError or ExperimentFolderError (both ValueErrors) as they are.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(set(options) - set(actions) | ({"space"} & set(options)))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)} of {cli}; allowed: "
                        f"{', '.join(sorted(d for d in actions if d not in ('help', 'space')))}")
    argv = []
    for dest, value in options.items():
        action = actions[dest]
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            if value is not None:
                argv.append(flag if value else f"--no-{flag[2:]}")
        elif action.nargs == 0:  # store_true
            if value:
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction) and isinstance(value, dict):  # set={"batch_size": 64}
            for key, item in value.items():
                argv += [flag, f"{key}={item}"]
        elif value is not None:
            argv += [flag, str(value)]
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint):
            args = parser.parse_args(argv)
    except SystemExit:  # argparse's "usage: ... error: ..." becomes the exception's message
        why = complaint.getvalue().strip().splitlines()[-1:] or ["invalid options"]
        raise UsageError(f"{why[0].split('error: ', 1)[-1]} (options {options!r})") from None
    args.space = space
    before = open_folders()
    try:
        status, table = run(args, argv)
    finally:
        for folder in open_folders():
            if folder not in before:
                folder.close()
    if status == 1:
        warnings.warn(f"{cli}: some seeds did not finish (see the lines above); the table holds the finished ones, and "
                      f"resume=True continues the rest", RuntimeWarning, stacklevel=3)
    return table


def _failed_seeds(results) -> tuple[int, int]:
    """``(seeds, Ray trials)`` of the failed Ray trials in a ResultGrid; a seed group counts all its seeds."""
    from .trainable import trial_seeds

    seeds = trials = 0
    for i in range(len(results)):
        result = results[i]
        if result.error is not None:
            trials += 1
            try:
                seeds += len(trial_seeds(result.config))
            except (KeyError, TypeError, AttributeError):
                seeds += 1
    return seeds, trials


#: The shipped demo spaces, trained far shorter than the paper's studies, and the study to run instead.
DEMO_SPACES = {"quick": "sphere2_fixed", "tiny": "sphere2_fixed"}


def partial_label(finished: int, total: int, unit: str = "seeds") -> str:
    """``" -- PARTIAL: 3 of 22 seeds finished"`` for a summary heading when some are missing, else ``""``."""
    return f" -- PARTIAL: {finished} of {total} {unit} finished" if finished < total else ""


def demo_note(space_name, trials: list, shows: str = "critical steps and accuracies") -> str | None:
    """The caveat under a summary of a demo space (:data:`DEMO_SPACES`): its models are under-trained,
    so the summary's ``shows`` illustrate the method, not the paper's numbers. None for any other space."""
    name = getattr(space_name, "name", space_name)
    if name not in DEMO_SPACES or not trials:
        return None
    first = trials[0][0] if isinstance(trials[0], list) else trials[0]
    return (f"note: {name!r} is a demo: each model trains {first['iterations']} iterations at lr {first['lr']:g} (the paper: "
            f"10000 at lr 1e-4), so its models are under-trained and the {shows} above show how the "
            f"method works, not the paper's numbers; for those: --space {DEMO_SPACES[name]}")


def finish(experiment_dir: Path, finished: int, total: int, failed, cli: str, storage: Storage | str | Path, name: str,
           missing: str | None = None) -> int:
    """The closing lines of an experiment CLI: where TensorBoard reads, and what to do about
    seeds that did not finish. Returns the exit status: 0, or 1 when seeds are missing. With a
    URI's storage, tune-node's files of the experiment (its tables) go up to the URI first.

    Arguments:
        finished, total: seeds finished and planned.
        failed: the run's ResultGrid (its failed Ray trials are counted in seeds and in
            trials).
        cli, storage, name: the module and ``--storage``/``--name`` of the resume command
            (``storage`` printed absolute, a URI as given).
        missing: what did not finish, when it is no count of seeds (``"the search did not finish"``);
            default ``"<total - finished> of <total> seeds did not finish"``.
    """
    storage = storage if isinstance(storage, Storage) else open_storage(storage)
    try:
        storage.push(name)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
    copy = f" (the local copy of {storage.where(name)})" if storage.remote else ""
    print(f"\nTensorBoard: tensorboard --logdir {experiment_dir}{copy}")
    if finished >= total:
        return 0
    seeds, trials = _failed_seeds(failed)
    failed_part = f"{seeds} seeds in {trials} failed Ray trials" if trials else "no Ray trial failed"
    missing = f"{missing or f'{total - finished} of {total} seeds did not finish'} ({failed_part})"
    if experiment_kind(experiment_dir) in (None, "unknown"):
        print(f"{missing}; the experiment folder {experiment_dir} is gone (or lost its record) since the run started, "
              f"so nothing is left to resume: start the experiment again (the same command without --resume)", file=sys.stderr)
    else:
        print(f"{missing}; continue with: python -m {cli} --storage {shlex.quote(storage.text)} --name {name} --resume",
              file=sys.stderr)
    return 1
