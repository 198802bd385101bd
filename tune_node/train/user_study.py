"""Checks of a researcher's own dataset and model, run in the driver before any training.

A search space names a user's loader and builder as ``"module:function"``
(:mod:`tune_node.user_code`). Importing them is checked when the space loads;
:func:`check_user_study` checks what they return: it loads the data of one seed,
builds the model and runs it on two examples, so a wrong return type, a label out
of range, a batch larger than the training set or logits of the wrong shape stop the
experiment before Ray starts, with a message naming the function and what was expected.
"""

from __future__ import annotations

from ..data.datasets import BUILTIN_DATASETS
from .models import check_model_output
from .training import TrainConfig

__all__ = ["uses_user_code", "check_user_study"]


def uses_user_code(config: TrainConfig) -> bool:
    """Whether ``config`` trains a user's dataset or model."""
    return config.model is not None or config.dataset not in BUILTIN_DATASETS


def check_user_study(config: TrainConfig) -> None:
    """Load ``config``'s data, build its model and run it once; raise on what would fail later.

    Raises :class:`~tune_node.user_code.UserCodeError`, TypeError or ValueError naming the
    loader or builder and what was expected. Does nothing for the paper's datasets and
    models (their checks need no loading: :func:`~tune_node.datasets.check_data_available`).
    """
    if not uses_user_code(config):
        return
    data = config.load_data()
    if config.batch_size > len(data.y_train):
        raise ValueError(f"batch_size {config.batch_size} is larger than the training set of dataset {config.dataset!r} "
                         f"({len(data.y_train)} examples); allowed: 1..{len(data.y_train)}")
    model = config.build_model(data)
    source = f"model {config.model!r}" if config.model is not None else "the paper's model"
    check_model_output(model, data, config.solver, source=f"{source} on dataset {config.dataset!r}")

