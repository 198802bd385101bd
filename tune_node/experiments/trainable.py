"""The Ray Tune trainable: one trial lifecycle for grid and adaptation trials alike.

:func:`run_trial` trains what a Ray trial config carries: one seed of a grid or of an
adaptation (a :class:`~tune_node.trial.Trial` each), or a grid's *seed group* (several
seeds of one setting, trained as one batched model), through
:func:`tune_node.seed_groups.train_seed_group` or :func:`tune_node.training.train`
(which know nothing of Ray). Each report interval it calls ``tune.report`` with the
scalars TensorBoard shows and a checkpoint directory holding ``checkpoint.pt``; a
restored trial continues from ``tune.get_checkpoint()`` exactly where it stopped (an
adaptation's controller included). After training it evaluates the paper's
cross-solver test matrix and reports once more (the matrix's rows under
``cross_solver``, per seed) with the final checkpoint, whose
directory also holds ``final.json`` (the trial's config, chance level, final numbers
and test-matrix rows; an adaptation's summary and check history) for
:mod:`tune_node.results` and :mod:`tune_node.adaptation_results`. ``train_trial`` and
``adapt_trial`` are its names in the grid and the adaptation.

A trial config is ``{"trial": t}`` (one seed) or ``{"trial": [t0, t1, ...]}`` (a seed
group), each ``t`` a :meth:`~tune_node.trial.Trial.to_dict`. A group keeps
everything per seed: its metrics carry ``seeds: {"<seed>": per-seed metrics}`` and its
checkpoint directories hold one subdirectory per seed (:func:`seed_subdir`) with that
seed's ``checkpoint.pt`` (``train``'s format) and, at the end, its ``final.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import torch
from ray import tune

from ..data.datasets import chance_accuracy
from ..results.adaptation import history_rows, summary_row
from ..train.seed_groups import train_seed_group
from ..train.training import Progress, load_checkpoint, save_checkpoint, train
from .experiment_folder import CHECKPOINT_FILE, FINAL_FILE
from .trial import Trial

__all__ = ["run_trial", "train_trial", "CHECKPOINT_FILE", "FINAL_FILE", "trial_resources", "trial_device", "is_group", "trial_seeds",
           "seed_subdir"]


def is_group(config: dict) -> bool:
    """Whether a Ray trial config carries a seed group (a list of per-seed configs)."""
    return isinstance(config.get("trial"), list)


def trial_seeds(config: dict) -> list[dict]:
    """The per-seed trial configs a Ray trial config carries (one, or a group's)."""
    return list(config["trial"]) if is_group(config) else [config["trial"]]


def seed_subdir(config: dict, seed_trial: dict) -> str:
    """Where a seed's files live inside the trial's checkpoint directories:
    ``""`` for a one-seed trial (as before groups existed), ``"seed<N>"`` in a group."""
    return f"seed{seed_trial['seed']}" if is_group(config) else ""


def trial_resources() -> tuple[float, float]:
    """``(cpus, gpus)`` this trial requested from Ray."""
    try:
        bundle = tune.get_context().get_trial_resources().required_resources
    except Exception:  # outside a Tune session (direct call): one CPU, no GPU
        return 1.0, 0.0
    return float(bundle.get("CPU", 1.0)), float(bundle.get("GPU", 0.0))


def _progress_metrics(p: Progress) -> dict:
    metrics = {
        "timesteps_total": p.iteration,  # TensorBoard's x axis: training iterations
        "iteration": p.iteration,
        "loss": p.loss,
        "train_accuracy": p.train_accuracy,  # the current batch's
        "nfe_forward": p.nfe_forward,
        "nfe_backward": p.nfe_backward,
        "nfe_per_iteration": p.nfe_forward + p.nfe_backward,
        "solver_steps": p.steps,
        "total_nfe": p.total_nfe,
    }
    if p.setting.is_adaptive:
        metrics["tol"] = p.setting.tol
    if p.test_accuracy is not None:
        metrics["test_accuracy"] = p.test_accuracy
    return metrics


def _trial_metrics(config: dict, per_seed: list[dict]) -> dict:
    """What one ``tune.report`` carries: a one-seed trial's metrics as they are; a group's
    per seed under ``seeds``, with the shared iteration (and end flag) on top."""
    if not is_group(config):
        return per_seed[0]
    top = {k: per_seed[0][k] for k in ("timesteps_total", "iteration", "done_training") if k in per_seed[0]}
    return {**top, "seeds": {str(t["seed"]): m for t, m in zip(config["trial"], per_seed)}}


def _report_with_checkpoint(metrics: dict, extra_files: dict | None = None, *, source: Path | None = None,
                            states: dict[str, dict] | None = None) -> None:
    """``tune.report`` with a fresh checkpoint: a copy of ``source``, or ``states`` (seed
    subdirectory -> state, ``""`` for a one-seed trial) saved as ``checkpoint.pt``, plus
    ``extra_files`` (relative path -> text)."""
    with tempfile.TemporaryDirectory(prefix="tune_node_ckpt_") as tmp:
        if source is not None:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        for subdir, s in (states or {}).items():
            save_checkpoint(Path(tmp) / subdir / CHECKPOINT_FILE, s)
        for name, content in (extra_files or {}).items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(content)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _final_checkpoint(final_files: list[str]) -> tune.Checkpoint | None:
    """This trial's newest checkpoint holding every one of ``final_files``, if it finished before.

    Looks in the trial's storage directory, not only at ``tune.get_checkpoint()``: a driver
    stopped right after the trial's last report may have persisted that checkpoint without
    registering it, and the trial must not train its last stretch again.
    """
    try:
        storage = tune.get_context().get_storage()
        fs, trial_path = storage.storage_filesystem, storage.trial_fs_path
        entries = fs.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
        directories = sorted(e.path for e in entries if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_"))
        for directory in reversed(directories):
            infos = fs.get_file_info([f"{directory}/{name}" for name in final_files])
            if all(info.type == pyarrow.fs.FileType.File for info in infos) and _complete(fs, directory, final_files):
                return tune.Checkpoint(path=directory, filesystem=fs)
    except (AttributeError, RuntimeError, OSError):  # no storage context (direct call)
        pass
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if all((Path(directory) / name).is_file() for name in final_files):
                return checkpoint
    return None


def _complete(fs, directory: str, final_files: list[str]) -> bool:
    """Whether every seed's final checkpoint in ``directory`` is whole: its model file beside its
    ``final.json``, or a ``final.json`` that records a divergence (which keeps no model). A driver killed
    while a checkpoint was being uploaded (remote storage copies file by file) can leave one without."""
    for name in final_files:
        model = f"{directory}/{Path(name).parent / CHECKPOINT_FILE}".replace("/./", "/")
        if fs.get_file_info(model).type == pyarrow.fs.FileType.File:
            continue
        try:
            with fs.open_input_stream(f"{directory}/{name}") as f:
                if json.loads(f.read()).get("diverged") is None:
                    return False
        except (OSError, ValueError, AttributeError):
            return False
    return True


def _final_names(config: dict) -> list[str]:
    return [str(Path(seed_subdir(config, t)) / FINAL_FILE) for t in trial_seeds(config)]


def _resume_finished(config: dict) -> bool:
    """Re-report a trial that finished already (same files, nothing recomputed)."""
    names = _final_names(config)
    checkpoint = _final_checkpoint(names)
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as directory:
        finals = [json.loads((Path(directory) / name).read_text()) for name in names]
        per_seed = [_final_report(f["metrics"], f.get("cross_solver")) for f in finals]
        _report_with_checkpoint(_trial_metrics(config, per_seed), source=Path(directory))
    return True


def _final_report(metrics: dict, rows: list[dict] | None) -> dict:
    """One seed's final report: its final metrics and, under ``cross_solver``, its test-matrix rows
    (for TensorBoard's per-test-solver accuracies; ``final.json`` keeps them beside its metrics)."""
    return {**metrics, "cross_solver": rows} if rows is not None else dict(metrics)


def _restored_states(config: dict) -> list[dict] | None:
    """Each seed's state from the trial's latest checkpoint, or ``None`` for a fresh start."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return [load_checkpoint(Path(directory) / seed_subdir(config, t) / CHECKPOINT_FILE) for t in trial_seeds(config)]


def start_trial(config: dict) -> str | None:
    """The device a trial trains on, or None when it finished before (it was re-reported).

    Torch uses as many threads as the trial requested CPUs; the device is :func:`trial_device`'s.
    """
    if _resume_finished(config):
        return None
    cpus, gpus = trial_resources()
    torch.set_num_threads(max(1, math.floor(cpus)))
    return trial_device(gpus)


def trial_device(gpus: float, *, logical: bool | None = None) -> str:
    """The device of a trial given ``gpus`` GPU by Ray: ``"cpu"`` without one, ``"cuda"`` with one (Ray's
    CUDA_VISIBLE_DEVICES makes its GPU the process's first).

    A GPU whose process sees no CUDA raises RuntimeError naming the node and Ray's assignment, unless
    ``logical`` (default: ``TUNE_NODE_LOGICAL_GPUS=1`` here): Ray's GPUs are then bookkeeping, and the trial
    trains on CPU, saying so on stderr.
    """
    if gpus <= 0:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    import os
    import socket

    import ray

    from ..cli.common import LOGICAL_GPUS_ENV, logical_gpus

    ids, ip, node_id = [], "?", "?"
    if ray.is_initialized():  # else a direct call: ray.get_gpu_ids() would start a Ray
        ids, ip, node_id = ray.get_gpu_ids(), ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()[:8]
    where = f"node {ip} ({socket.gethostname()}, Ray node {node_id})"
    given = f"{gpus:g} GPU (Ray GPU ids {ids}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
    if logical_gpus() if logical is None else logical:
        print(f"{LOGICAL_GPUS_ENV}=1: this trial on {where} was given {given} but sees no CUDA: training on CPU",
              file=sys.stderr, flush=True)
        return "cpu"
    raise RuntimeError(f"this trial on {where} was given {given}, but its process sees no CUDA (torch {torch.__version__}, "
                       f"torch.cuda.is_available() is False): install a CUDA build of torch and the GPU driver on that node, "
                       f"or run with --gpus 0 ({LOGICAL_GPUS_ENV}=1 trains such trials on CPU)")


def _adaptation_metrics(progress: Progress, controller, totals: dict) -> dict:
    it = progress.iteration
    metrics = {
        "timesteps_total": it,  # TensorBoard's x axis: training iterations
        "iteration": it,
        "loss": progress.loss,
        "train_accuracy": progress.train_accuracy,  # the current batch's
        ("step_size" if controller.mode == "step" else "tol"): controller.value,  # for the next iteration
        "solver_steps": progress.steps,
        "nfe_forward": progress.nfe_forward,
        "nfe_backward": progress.nfe_backward,
        "nfe_per_iteration": progress.nfe_forward + progress.nfe_backward,  # this iteration's training passes
        "train_forward_nfe_per_iteration": totals["fwd"] / it,  # since the start
        "check_nfe_per_iteration": totals["check"] / it,
        "check_nfe": progress.check_nfe,
        "total_nfe": progress.total_nfe,
    }
    if controller.history:
        last = controller.history[-1]
        metrics.update(train_solver_accuracy=last.train_solver_accuracy, test_solver_accuracy=last.test_solver_accuracy,
                       check_accepted=float(last.accepted), check_iteration=last.iteration)
    if progress.test_accuracy is not None:
        metrics["test_accuracy"] = progress.test_accuracy
    return metrics


def _trial_id(config: dict, trial: dict) -> str | None:
    try:
        trial_id = tune.get_context().get_trial_id()
    except Exception:  # outside a Tune session (direct call)
        return None
    # A group's seeds share the Ray trial: each gets its own id in the results table.
    return f"{trial_id}_seed{trial['seed']}" if is_group(config) and trial_id is not None else trial_id


def run_trial(config: dict) -> None:
    """The one trainable: train the seed(s) of a Ray trial config, report, evaluate, report the end.

    ``config["trial"]`` is one :meth:`~tune_node.trial.Trial.to_dict` (one seed, of a grid or an
    adaptation) or a list of them (a grid's seed group). The lifecycle is the same for
    every kind: a trial that finished before is re-reported from its files; otherwise each
    seed's state is restored from the trial's latest checkpoint, training reports with a
    checkpoint every ``report_every`` iterations, and at the end every seed is evaluated with
    the paper's test matrix and the last report carries the final checkpoint with each
    seed's ``final.json``. An adaptation trial's controller lives in its checkpoints too.
    Torch uses as many threads as the trial requested CPUs; the device is CUDA when the
    trial was given a GPU (fraction; :func:`trial_device`).
    """
    seeds = trial_seeds(config)
    trials = [Trial.from_dict(t) for t in seeds]
    device = start_trial(config)
    if device is None:
        return
    train_configs = [t.train_config(device) for t in trials]
    data = [c.load_data() for c in train_configs]
    adaptation = trials[0].adaptation
    controller = None
    if adaptation is not None:
        if len(trials) != 1:
            raise ValueError(f"an adaptation trial trains one seed, got {len(trials)}")
        train_configs[0], controller = adaptation.controller(train_configs[0], data[0])
    subdirs = [seed_subdir(config, t) for t in seeds]
    resume_from = _restored_states(config)  # train() restores a controller's state from it too
    n, iterations = len(trials), train_configs[0].iterations
    pending: dict[int, tuple[Progress, object]] = {}
    last: dict = {"state_fns": [(lambda s=s: s) for s in resume_from] if resume_from is not None else None}

    def metrics_of(progress: Progress, state: dict) -> dict:
        return _progress_metrics(progress) if controller is None else _adaptation_metrics(progress, controller, state["totals"])

    def on_report(i: int, progress: Progress, state_fn) -> None:
        # A group reports its seeds one after another at the same iteration: report once all are in.
        pending[i] = (progress, state_fn)
        if len(pending) < n:
            return
        last["state_fns"] = [pending[j][1] for j in range(n)]
        states = [fn() for fn in last["state_fns"]]
        last["metrics"] = [metrics_of(pending[j][0], states[j]) for j in range(n)]
        pending.clear()
        if progress.iteration < iterations:
            _report_with_checkpoint(_trial_metrics(config, last["metrics"]), states=dict(zip(subdirs, states)))

    cpu_start = time.process_time()
    if controller is None:
        results = train_seed_group(train_configs, on_report=on_report, resume_from=resume_from, data=data)
    else:
        results = [train(train_configs[0], on_report=lambda p, s: on_report(0, p, s), controller=controller,
                         resume_from=resume_from[0] if resume_from else None, data=data[0])]
    train_cpu_time = time.process_time() - cpu_start
    finals, per_seed = {}, []
    for i, (t, result, d) in enumerate(zip(seeds, results, data)):
        rows = result.cross_solver_table(d)
        trial_id = _trial_id(config, t)
        if result.diverged is not None:  # stopped before the end: its last iteration is the diverged one
            metrics = {"timesteps_total": result.diverged.iteration, "iteration": result.diverged.iteration,
                       "diverged_at_iteration": result.diverged.iteration}
        elif "metrics" in last and last["metrics"][i]["iteration"] == iterations:
            metrics = dict(last["metrics"][i])  # the last iteration's report, which the final one replaces
        else:  # restored from the last regular checkpoint: nothing left to train
            metrics = {"timesteps_total": result.iterations, "iteration": result.iterations}
        finer = [r["accuracy"] for r in rows if not r["is_train_solver"]]
        metrics.update(
            train_accuracy=result.train_accuracy,  # now over the whole train set
            test_accuracy=result.test_accuracy,
            nfe_per_iteration=result.nfe_per_iteration,  # forward, backward and checks, whole run
            **({"nfe_forward_per_iteration": result.total_nfe_forward / max(1, result.iterations)} if controller is None
               else {"adaptation_nfe_per_iteration": result.forward_nfe_per_iteration}),  # the paper's Table 1 number
            cross_solver_min_accuracy=min(finer) if finer else result.test_accuracy,
            done_training=True,
        )
        final = {
            "trial_id": trial_id,
            "config": t,
            "device": device,
            # What guessing scores on this data: the analysis needs no dataset table for it.
            "chance_accuracy": chance_accuracy(d),
            "classes": d.classes,
            "cross_solver": rows,
            "metrics": metrics,
        }
        if controller is None:
            final.update(_grid_final(result, n))
        else:
            final.update(summary=summary_row(result, controller, t["experiment"], trial_id),
                         history=history_rows(result, controller, trial_id))
        finals[str(Path(subdirs[i]) / FINAL_FILE)] = final
        per_seed.append(_final_report(metrics, rows))
    # CPU seconds of this process since it (re)started training, and of training alone: unlike
    # wall time, blind to other jobs' load (benchmarks/estimate_grid.py reads them).
    cpu_time = time.process_time() - cpu_start
    files = {name: json.dumps({**final, "cpu_time": cpu_time, "train_cpu_time": train_cpu_time}, indent=1)
             for name, final in finals.items()}
    # A diverged seed's weights are not finite: nothing worth reloading.
    states = {d: fn() for d, fn, result in zip(subdirs, last["state_fns"] or [None] * n, results)
              if fn is not None and result.diverged is None}
    _report_with_checkpoint(_trial_metrics(config, per_seed), files, states=states)


def _grid_final(result, seeds_in_trial: int) -> dict:
    """A grid seed's part of ``final.json``: the numbers its results-table rows carry."""
    return {
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "iterations": result.iterations,
        "total_nfe_forward": result.total_nfe_forward,
        "total_nfe_backward": result.total_nfe_backward,
        "wall_time": result.wall_time,  # a group's: the whole group's training
        "seeds_in_trial": seeds_in_trial,
        # "diverged": its loss stopped being finite (see "diverged"); no checkpoint.pt is kept.
        "status": "trained" if result.diverged is None else "diverged",
        "diverged": None if result.diverged is None else result.diverged.to_dict(),
    }


def train_trial(config: dict) -> None:
    """The grid's trainable (:func:`run_trial`): ``{"trial": t}`` or a seed group's ``{"trial": [t, ...]}``.

    A group trains as one batched model where :func:`~tune_node.seed_groups.groupable`
    allows, else seed after seed.
    """
    run_trial(config)
