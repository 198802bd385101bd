"""Running trial configs as one Ray Tune experiment, shared by the grid and adaptation CLIs.

:func:`fit` starts (or restores) the Tuner with the project's conventions: one
grid-search entry per trial config under the key ``"trial"``, TensorBoard runs
with hparams, concise progress lines, two checkpoints kept per trial, one retry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

__all__ = ["fit"]


def fit(trainable: Callable, trials: list[dict], *, name: str, storage: Path, resume: bool, resources: dict,
        dirname: Callable):
    """Run every trial config with ``trainable`` in ``storage / name``; returns Ray's ResultGrid.

    Arguments:
        trainable: a function trainable of the installed package, reading ``config["trial"]``.
        trials: the JSON-friendly trial configs.
        name, storage: the experiment is ``storage / name``.
        resume: restore that experiment: finished trials are not rerun, unfinished and
            failed ones continue from their newest checkpoint.
        resources: one trial's request, ``{"cpu": ..., "gpu": ...}``.
        dirname: ``dirname(trial) -> str``, the trial's directory name.
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
                callbacks=[TensorBoardCallback(), ProgressCallback(len(trials))],
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=1),
                verbose=0,
            ),
        )
    return tuner.fit()
