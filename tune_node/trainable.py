"""The Ray Tune function trainable of the grid experiment: one trial trains one model.

:func:`train_trial` wraps :func:`tune_node.training.train` (which knows nothing of
Ray). Each report interval it calls ``tune.report`` with the scalars TensorBoard
shows and a checkpoint directory holding ``checkpoint.pt``; a restored trial
continues from ``tune.get_checkpoint()`` exactly where it stopped. After training it
evaluates the paper's cross-solver test matrix and reports once more with the final
checkpoint, whose directory also holds ``final.json`` (the trial's config, final
numbers and test-matrix rows) for :mod:`tune_node.results`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs
import torch
from ray import tune

from .datasets import load_dataset
from .search_space import train_config_from_trial
from .training import Progress, load_checkpoint, save_checkpoint, train

__all__ = ["train_trial", "CHECKPOINT_FILE", "FINAL_FILE", "trial_resources"]

CHECKPOINT_FILE = "checkpoint.pt"
FINAL_FILE = "final.json"


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


def _report_with_checkpoint(metrics: dict, state: dict | None, extra_files: dict | None = None, source: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="tune_node_ckpt_") as tmp:
        if source is not None:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        else:
            save_checkpoint(Path(tmp) / CHECKPOINT_FILE, state)
        for name, content in (extra_files or {}).items():
            (Path(tmp) / name).write_text(content)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _final_checkpoint() -> tune.Checkpoint | None:
    """This trial's newest checkpoint holding ``final.json``, if it finished before.

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
            if fs.get_file_info(f"{directory}/{FINAL_FILE}").type == pyarrow.fs.FileType.File:
                return tune.Checkpoint(path=directory, filesystem=fs)
    except (AttributeError, RuntimeError, OSError):  # no storage context (direct call)
        pass
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / FINAL_FILE).is_file():
                return checkpoint
    return None


def _resume_finished() -> bool:
    """Re-report a trial that finished already (same files, nothing recomputed)."""
    checkpoint = _final_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as directory:
        final = json.loads((Path(directory) / FINAL_FILE).read_text())
        _report_with_checkpoint(final["metrics"], None, source=Path(directory))
    return True


def _restored_state() -> dict | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_checkpoint(Path(directory) / CHECKPOINT_FILE)


def start_trial() -> str | None:
    """The device a trial trains on, or None when it finished before (it was re-reported).

    Torch uses as many threads as the trial requested CPUs; the device is CUDA when
    the trial was given a GPU (fraction).
    """
    if _resume_finished():
        return None
    cpus, gpus = trial_resources()
    torch.set_num_threads(max(1, math.floor(cpus)))
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def train_trial(config: dict) -> None:
    """Train the model of one trial config (from :meth:`SearchSpace.trials`, key ``"trial"``); see :func:`start_trial`."""
    trial = config["trial"]
    device = start_trial()
    if device is None:
        return
    train_config = train_config_from_trial(trial, device=device)
    data = load_dataset(train_config.dataset, train_config.seed, train_config.data_root, train_config.download)
    resume_from = _restored_state()
    last = {"state": (lambda: resume_from) if resume_from is not None else None}

    def on_report(progress: Progress, state_fn) -> None:
        last["state"] = state_fn
        if progress.iteration < train_config.iterations:
            _report_with_checkpoint(_progress_metrics(progress), state_fn())
        else:
            last["progress"] = progress  # the final report follows, with the test matrix

    result = train(train_config, on_report=on_report, resume_from=resume_from, data=data)
    rows = result.cross_solver_table(data)
    try:
        trial_id = tune.get_context().get_trial_id()
    except Exception:
        trial_id = None
    final = {
        "trial_id": trial_id,
        "config": trial,
        "device": device,
        "train_accuracy": result.train_accuracy,
        "test_accuracy": result.test_accuracy,
        "iterations": result.iterations,
        "total_nfe_forward": result.total_nfe_forward,
        "total_nfe_backward": result.total_nfe_backward,
        "wall_time": result.wall_time,
        "cross_solver": rows,
    }
    metrics = _progress_metrics(last["progress"]) if "progress" in last else {"timesteps_total": result.iterations, "iteration": result.iterations}
    finer = [r["accuracy"] for r in rows if not r["is_train_solver"]]
    metrics.update(
        train_accuracy=result.train_accuracy,  # now over the whole train set
        test_accuracy=result.test_accuracy,
        nfe_per_iteration=result.nfe_per_iteration,
        nfe_forward_per_iteration=result.total_nfe_forward / max(1, result.iterations),
        cross_solver_min_accuracy=min(finer) if finer else result.test_accuracy,
        done_training=True,
    )
    final["metrics"] = metrics
    _report_with_checkpoint(metrics, last["state"](), {FINAL_FILE: json.dumps(final, indent=1)})
