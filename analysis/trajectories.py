"""Phase-space trajectories of trained 2-D models, computed: the data of the trajectory
figures (Figures 1 and 2) and the crossing fraction of every 2-D fixed-step trial.

Loads trial checkpoints and runs their solvers; nothing here draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tune_node.solvers import SolverSetting
from tune_node.training import load_checkpoint, restore_model

from .crossing import CrossingStats, crossing_stats, solver_paths

__all__ = [
    "CROSSING_BUDGET",
    "SolverTrajectories",
    "ModelTrajectories",
    "finer_setting",
    "stratified_subset",
    "model_trajectories",
    "crossing_table",
]

# Crossing checks cost pairs x steps^2 segment tests; each is kept under ~1e8.
CROSSING_BUDGET = 100_000_000
_REGION_GRID = 300  # points per axis of the decision-region grid


@dataclass(frozen=True)
class SolverTrajectories:
    """A trained model's test set under one fixed-step solver setting.

    Attributes:
        setting: the solver setting.
        paths: the ODE block's states of every test point, shape ``(steps + 1, N, 2)``.
        crossing: the different-class pairs of those paths that cross.
        accuracy: the classifier's test accuracy on the outputs ``paths[-1]``.
        region_x, region_y, region_class: the classifier's class on a grid over the
            outputs (padded by 8 %), as :func:`numpy.meshgrid` arrays.
    """

    setting: SolverSetting
    paths: np.ndarray
    crossing: CrossingStats
    accuracy: float
    region_x: np.ndarray
    region_y: np.ndarray
    region_class: np.ndarray


@dataclass(frozen=True)
class ModelTrajectories:
    """What :func:`model_trajectories` computes for one checkpoint.

    Attributes:
        dataset, seed: the trial's dataset and seed.
        labels: true class of every test point, shape ``(N,)``.
        shown: indices of the test points whose paths are drawn (sorted).
        train: the test set under the train solver.
        finer: the test set under the comparison solver.
    """

    dataset: str
    seed: int
    labels: np.ndarray
    shown: np.ndarray
    train: SolverTrajectories
    finer: SolverTrajectories


def finer_setting(setting: SolverSetting) -> SolverSetting:
    """The default comparison for ``setting``: RK4 at 8x its steps (16 to 256), close to the exact flow."""
    # Capped at 256 steps so that crossing checks stay cheap.
    return SolverSetting.fixed("rk4", min(256, max(16, 8 * setting.steps)), setting.gradient, setting.T)


def stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted indices of about ``count`` of ``labels``, each class in proportion, drawn
    with ``seed``; every index when there are at most ``count``."""
    if len(labels) <= count:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, size=max(1, round(count * len(idx) / len(labels))), replace=False))
    return np.sort(np.concatenate(picked))


@torch.no_grad()
def _under(model, x: torch.Tensor, labels: np.ndarray, setting: SolverSetting, max_pairs: int, seed: int) -> SolverTrajectories:
    paths = solver_paths(model, x, setting)
    budget_pairs = max(200, CROSSING_BUDGET // (setting.steps * setting.steps))
    stats = crossing_stats(paths, labels, min(max_pairs, budget_pairs), seed)
    z_end = paths[-1]
    accuracy = float((model.classify(torch.tensor(z_end, dtype=torch.float32)).argmax(1).numpy() == labels).mean())
    lo, hi = z_end.min(0), z_end.max(0)
    pad = 0.08 * (hi - lo) + 1e-6
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], _REGION_GRID),
                         np.linspace(lo[1] - pad[1], hi[1] + pad[1], _REGION_GRID))
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    region = model.classify(grid).argmax(1).numpy().reshape(gx.shape)
    return SolverTrajectories(setting, paths, stats, accuracy, gx, gy, region)


def model_trajectories(checkpoint: str | Path, finer: SolverSetting | None = None, max_paths: int = 300,
                       max_pairs: int = 20_000, seed: int = 0) -> ModelTrajectories:
    """The test set's paths, crossing, accuracy and decision regions of a 2-D model
    under its train solver and a finer one.

    Arguments:
        checkpoint: a trial's ``checkpoint.pt`` (``tune_node.training`` format) of a
            model on 2-D data trained with a fixed-step solver.
        finer: the comparison setting; default :func:`finer_setting` of the train setting.
        max_paths: test points whose paths are to be drawn (a class-stratified, seeded
            subset; accuracy and crossing use the whole test set).
        max_pairs, seed: passed to :func:`~analysis.crossing.crossing_stats` (at most
            ~1e8 segment tests per solver).

    Raises ValueError for an adaptive train solver or data that is not 2-D.
    """
    model, setting, config = restore_model(load_checkpoint(checkpoint))
    model.eval()
    if setting.is_adaptive:
        raise ValueError(f"trajectory figures need a fixed-step train solver; {checkpoint} was trained with {setting.label()}")
    data = config.load_data()
    if tuple(data.input_shape) not in ((1, 2), (2,)):
        raise ValueError(f"trajectory figures need 2-D data; {config.dataset} has examples of shape {data.input_shape}")
    labels = data.y_test.numpy()
    return ModelTrajectories(
        dataset=config.dataset,
        seed=config.seed,
        labels=labels,
        shown=stratified_subset(labels, max_paths, seed),
        train=_under(model, data.x_test, labels, setting, max_pairs, seed),
        finer=_under(model, data.x_test, labels, finer or finer_setting(setting), max_pairs, seed),
    )


def crossing_table(results: pd.DataFrame, max_pairs: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Crossing fraction of the train solver's test-point paths, per 2-D fixed-step trial.

    One row per trial of ``results`` whose checkpoint exists:
    ``trial_id, dataset, train_method, train_steps, seed, crossing``. Each uses at most
    ``max_pairs`` different-class pairs (fewer for many steps: at most ~1e8 segment
    tests per trial), drawn with ``seed``.
    """
    trials = results[results.train_steps.notna()].drop_duplicates("trial_id")
    rows = []
    for t in trials.itertuples(index=False):
        if not Path(t.checkpoint).is_file():
            continue
        model, setting, config = restore_model(load_checkpoint(t.checkpoint))
        data = config.load_data()
        if tuple(data.input_shape) not in ((1, 2), (2,)):
            continue
        pairs = min(max_pairs, max(100, CROSSING_BUDGET // (setting.steps * setting.steps)))
        stats = crossing_stats(solver_paths(model, data.x_test, setting), data.y_test.numpy(), pairs, seed)
        rows.append({"trial_id": t.trial_id, "dataset": t.dataset, "train_method": t.train_method,
                     "train_steps": int(t.train_steps), "seed": t.seed, "crossing": stats.fraction})
    return pd.DataFrame(rows, columns=["trial_id", "dataset", "train_method", "train_steps", "seed", "crossing"])
