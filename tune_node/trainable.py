"""The Ray Tune function trainable of the grid experiment: one trial trains one model,
or one seed group (several seeds of one configuration, trained as one batched model).

:func:`train_trial` wraps :func:`tune_node.seed_groups.train_seed_group` (which, like
:func:`tune_node.training.train`, knows nothing of Ray). Each report interval it calls
``tune.report`` with the scalars TensorBoard shows and a checkpoint directory holding
``checkpoint.pt``; a restored trial continues from ``tune.get_checkpoint()`` exactly
where it stopped. After training it evaluates the paper's cross-solver test matrix and
reports once more with the final checkpoint, whose directory also holds ``final.json``
(the trial's config, final numbers and test-matrix rows) for :mod:`tune_node.results`.

A trial config is ``{"trial": t}`` (one seed) or ``{"trial": [t0, t1, ...]}`` (a seed
group), each ``t`` a per-seed config from :meth:`SearchSpace.trials`. A group keeps
everything per seed: its metrics carry ``seeds: {"<seed>": per-seed metrics}`` and its
checkpoint directories hold one subdirectory per seed (:func:`seed_subdir`) with that
seed's ``checkpoint.pt`` (``train``'s format) and, at the end, its ``final.json``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.fs
import torch
from ray import tune

from .datasets import load_dataset
from .search_space import train_config_from_trial
from .seed_groups import train_seed_group
from .training import Progress, load_checkpoint, save_checkpoint

__all__ = ["train_trial", "CHECKPOINT_FILE", "FINAL_FILE", "trial_resources", "is_group", "trial_seeds", "seed_subdir"]

CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"


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


def _report_with_checkpoint(metrics: dict, state: dict | None, extra_files: dict | None = None, source: Path | None = None,
                            states: dict[str, dict] | None = None) -> None:
    """``tune.report`` with a fresh checkpoint: a copy of ``source``, or ``state`` saved as
    ``checkpoint.pt`` (``states``: one state per seed subdirectory), plus ``extra_files``
    (relative path -> text)."""
    with tempfile.TemporaryDirectory(prefix="tune_node_ckpt_") as tmp:
        if source is not None:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        chosen = states if states is not None else ({"": state} if source is None and state is not None else {})
        for subdir, s in chosen.items():
            save_checkpoint(Path(tmp) / subdir / CHECKPOINT_FILE, s)
        for name, content in (extra_files or {}).items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_text(content)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _final_checkpoint(final_files: list[str] | None = None) -> tune.Checkpoint | None:
    """This trial's newest checkpoint holding every one of ``final_files`` (default
    ``[final.json]``), if it finished before.

    Looks in the trial's storage directory, not only at ``tune.get_checkpoint()``: a driver
    stopped right after the trial's last report may have persisted that checkpoint without
    registering it, and the trial must not train its last stretch again.
    """
    final_files = final_files or [FINAL_FILE]
    try:
        storage = tune.get_context().get_storage()
        fs, trial_path = storage.storage_filesystem, storage.trial_fs_path
        entries = fs.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
        directories = sorted(e.path for e in entries if e.type == pyarrow.fs.FileType.Directory and e.base_name.startswith("checkpoint_"))
        for directory in reversed(directories):
            infos = fs.get_file_info([f"{directory}/{name}" for name in final_files])
            if all(info.type == pyarrow.fs.FileType.File for info in infos):
                return tune.Checkpoint(path=directory, filesystem=fs)
    except (AttributeError, RuntimeError, OSError):  # no storage context (direct call)
        pass
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if all((Path(directory) / name).is_file() for name in final_files):
                return checkpoint
    return None


def _final_names(config: dict) -> list[str]:
    return [str(Path(seed_subdir(config, t)) / FINAL_FILE) for t in trial_seeds(config)]


def _resume_finished(config: dict | None = None) -> bool:
    """Re-report a trial that finished already (same files, nothing recomputed)."""
    config = config or {"trial": {}}
    names = _final_names(config)
    checkpoint = _final_checkpoint(names)
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as directory:
        per_seed = [json.loads((Path(directory) / name).read_text())["metrics"] for name in names]
        _report_with_checkpoint(_trial_metrics(config, per_seed), None, source=Path(directory))
    return True


def _restored_states(config: dict) -> list[dict] | None:
    """Each seed's state from the trial's latest checkpoint, or ``None`` for a fresh start."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return [load_checkpoint(Path(directory) / seed_subdir(config, t) / CHECKPOINT_FILE) for t in trial_seeds(config)]


def _restored_state() -> dict | None:
    """The state of a one-seed trial's latest checkpoint, or ``None`` for a fresh start."""
    states = _restored_states({"trial": {}})
    return states[0] if states else None


def start_trial(config: dict | None = None) -> str | None:
    """The device a trial trains on, or None when it finished before (it was re-reported).

    Torch uses as many threads as the trial requested CPUs; the device is CUDA when
    the trial was given a GPU (fraction).
    """
    if _resume_finished(config):
        return None
    cpus, gpus = trial_resources()
    torch.set_num_threads(max(1, math.floor(cpus)))
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def train_trial(config: dict) -> None:
    """Train the model(s) of one trial config: ``{"trial": t}`` or a group's ``{"trial": [t, ...]}``.

    Torch uses as many threads as the trial requested CPUs; the device is CUDA when
    the trial was given a GPU (fraction). A group trains as one batched model where
    :func:`~tune_node.seed_groups.groupable` allows, else seed after seed.
    """
    trials = trial_seeds(config)
    device = start_trial(config)
    if device is None:
        return
    train_configs = [train_config_from_trial(t, device=device) for t in trials]
    data = [load_dataset(c.dataset, c.seed, c.data_root, c.download) for c in train_configs]
    subdirs = [seed_subdir(config, t) for t in trials]
    resume_from = _restored_states(config)
    n, iterations = len(trials), train_configs[0].iterations
    pending: dict[int, tuple[Progress, object]] = {}
    last: dict = {"state_fns": [(lambda s=s: s) for s in resume_from] if resume_from is not None else None}

    def on_report(i: int, progress: Progress, state_fn) -> None:
        # A group reports its seeds one after another at the same iteration: report once all are in.
        pending[i] = (progress, state_fn)
        if len(pending) < n:
            return
        progresses = [pending[j][0] for j in range(n)]
        last["state_fns"] = [pending[j][1] for j in range(n)]
        pending.clear()
        if progress.iteration < iterations:
            metrics = _trial_metrics(config, [_progress_metrics(p) for p in progresses])
            _report_with_checkpoint(metrics, None, states={d: fn() for d, fn in zip(subdirs, last["state_fns"])})
        else:
            last["progresses"] = progresses  # the final report follows, with the test matrix

    cpu_start = time.process_time()
    results = train_seed_group(train_configs, on_report=on_report, resume_from=resume_from, data=data)
    train_cpu_time = time.process_time() - cpu_start
    try:
        trial_id = tune.get_context().get_trial_id()
    except Exception:
        trial_id = None
    finals, per_seed = {}, []
    for i, (t, result, d) in enumerate(zip(trials, results, data)):
        rows = result.cross_solver_table(d)
        if "progresses" in last:
            metrics = _progress_metrics(last["progresses"][i])
        elif result.diverged is not None:  # stopped before the end: its last iteration is the diverged one
            metrics = {"timesteps_total": result.diverged.iteration, "iteration": result.diverged.iteration}
        else:  # restored from the last regular checkpoint: nothing left to train
            metrics = {"timesteps_total": result.iterations, "iteration": result.iterations}
        if result.diverged is not None:
            metrics["diverged_at_iteration"] = result.diverged.iteration
        finer = [r["accuracy"] for r in rows if not r["is_train_solver"]]
        metrics.update(
            train_accuracy=result.train_accuracy,  # now over the whole train set
            test_accuracy=result.test_accuracy,
            nfe_per_iteration=result.nfe_per_iteration,
            nfe_forward_per_iteration=result.total_nfe_forward / max(1, result.iterations),
            cross_solver_min_accuracy=min(finer) if finer else result.test_accuracy,
            done_training=True,
        )
        final = {
            # A group's seeds share the Ray trial: each gets its own id in the results table.
            "trial_id": trial_id if not is_group(config) or trial_id is None else f"{trial_id}_seed{t['seed']}",
            "config": t,
            "device": device,
            "train_accuracy": result.train_accuracy,
            "test_accuracy": result.test_accuracy,
            "iterations": result.iterations,
            "total_nfe_forward": result.total_nfe_forward,
            "total_nfe_backward": result.total_nfe_backward,
            "wall_time": result.wall_time,  # a group's: the whole group's training
            "seeds_in_trial": n,
            # "diverged": its loss stopped being finite (see "diverged"); no checkpoint.pt is kept.
            "status": "trained" if result.diverged is None else "diverged",
            "diverged": None if result.diverged is None else result.diverged.to_dict(),
            "cross_solver": rows,
            "metrics": metrics,
        }
        finals[str(Path(subdirs[i]) / FINAL_FILE)] = final
        per_seed.append(metrics)
    # CPU seconds of this process since it (re)started training, and of training alone: unlike
    # wall time, blind to other jobs' load (benchmarks/estimate_grid.py reads them).
    cpu_time = time.process_time() - cpu_start
    files = {name: json.dumps({**final, "cpu_time": cpu_time, "train_cpu_time": train_cpu_time}, indent=1)
             for name, final in finals.items()}
    # A diverged seed's weights are not finite: nothing worth reloading.
    states = {d: fn() for d, fn, result in zip(subdirs, last["state_fns"] or [None] * n, results)
              if fn is not None and result.diverged is None}
    _report_with_checkpoint(_trial_metrics(config, per_seed), None, files, states=states)
