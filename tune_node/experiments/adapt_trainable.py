"""The adaptation's names for the one trial lifecycle (:func:`tune_node.trainable.run_trial`).

An adaptation trial trains one seed with :class:`~tune_node.adaptation.StepAdaptation`
or :class:`~tune_node.adaptation.ToleranceAdaptation` as the solver controller; its
reports carry step size or tolerance, solver steps, NFE and the last check's train-
and test-solver batch accuracies, its checkpoints the controller's state, and its
``final.json`` the rows of :mod:`tune_node.adaptation_results` (and the paper's
cross-solver test matrix), from which :func:`~tune_node.adaptation_results.write_tables`
builds ``adaptation.csv`` and ``adaptation_history.csv``.
"""

from __future__ import annotations

from ..ode.solvers import SolverSetting
from ..train.training import TrainConfig
from .search_space import train_config_from_trial
from .trainable import run_trial
from .trial import TRAINING_KEYS, Adaptation, Trial

__all__ = ["adapt_trial", "train_config_from_adapt_trial", "controller_for", "starting_setting", "TRAIN_KEYS"]

# The TrainConfig fields an adaptation trial config carries (besides dataset, solver and device).
TRAIN_KEYS = TRAINING_KEYS


def starting_setting(mode: str, method: str, gradient: str, initial_tol: float) -> SolverSetting:
    """A placeholder train setting of the right kind (:meth:`~tune_node.trial.Adaptation.starting_setting`)."""
    return Adaptation(mode, method, method, 1, 0.1, initial_tol, gradient).starting_setting()


#: The :class:`TrainConfig` of an adaptation trial config, at a placeholder starting setting:
#: one function serves both kinds of trial config (:meth:`~tune_node.trial.Trial.train_config`).
train_config_from_adapt_trial = train_config_from_trial


def controller_for(trial: dict, config: TrainConfig, data=None):
    """``(config, controller)`` of an adaptation trial config (:meth:`~tune_node.trial.Adaptation.controller`).
    Raises ValueError on invalid adaptation parameters."""
    return Trial.from_dict(trial).adaptation.controller(config, data)


def adapt_trial(config: dict) -> None:
    """The adaptation's trainable (:func:`~tune_node.trainable.run_trial`): one seed, key ``"trial"``."""
    run_trial(config)
