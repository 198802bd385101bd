"""Accuracy over a whole test set, and the paper's cross-solver test matrix.

A trained model is evaluated with every test solver of the paper's protocol
(Section 2.4): Euler-trained models with Euler, Midpoint and RK4 at 0.5, 0.75, 1,
1.5 and 2 times the training number of steps; RK4-trained with RK4; Fehlberg21-trained
with Fehlberg21 and Dopri54 at 0.1, 1 and 10 times the training tolerance;
Dopri54-trained with Dopri54. Every registered method follows the same rule, see
:func:`~tune_node.solvers.test_methods`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..ode.solvers import TEST_METHODS, SolverSetting, test_methods

__all__ = [
    "FIXED_FACTORS",
    "TOLERANCE_FACTORS",
    "TEST_METHODS",
    "TestCase",
    "accuracy",
    "test_matrix",
    "cross_solver_table",
    "unevaluated_table",
]

FIXED_FACTORS = (0.5, 0.75, 1.0, 1.5, 2.0)
TOLERANCE_FACTORS = (0.1, 1.0, 10.0)
# TEST_METHODS (test methods per train method: the train method itself and those of
# smaller error) is derived in tune_node.solvers from the registered methods.


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, setting: SolverSetting, batch_size: int = 1000) -> tuple[float, int]:
    """Fraction of ``(x, y)`` classified correctly under ``setting``, and the NFE per batch.

    Every example counts once: correct predictions summed over all batches divided
    by ``len(y)`` (a short last batch is not weighted as a full one). The NFE is
    the mean number of field evaluations per batch, as one forward pass costs.
    """
    if len(y) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    correct, nfe, batches = 0, 0, 0
    for start in range(0, len(y), batch_size):
        logits, sol = model(x[start : start + batch_size], setting)
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
        nfe += sol.nfe_forward
        batches += 1
    return correct / len(y), round(nfe / batches)


@dataclass(frozen=True)
class TestCase:
    """One test setting of the matrix: the factor applied and the resulting setting."""

    factor: float
    setting: SolverSetting


def _scaled_steps(steps: int, factor: float) -> int:
    # Round half up so 0.75 x 2 = 1.5 becomes 2, and never fewer than one step.
    return max(1, math.floor(steps * factor + 0.5))


def test_matrix(train: SolverSetting) -> list[TestCase]:
    """The paper's test settings for a model trained with ``train``, in a fixed order:
    per method of :func:`~tune_node.solvers.test_methods`, per factor.

    Fixed step: ``test steps = max(1, round(factor x train steps))``. Adaptive:
    ``test tol = factor x train tol``. Gradient mode is irrelevant at test time and
    kept as in ``train``.
    """
    cases = []
    for method in test_methods(train.method):
        if train.is_adaptive:
            for factor in TOLERANCE_FACTORS:
                # A cap raised for training holds for its tests too (a test at tol/10 needs more steps).
                cases.append(TestCase(factor, SolverSetting(method, tol=train.tol * factor, gradient=train.gradient, T=train.T,
                                                            max_steps=train.max_steps)))
        else:
            for factor in FIXED_FACTORS:
                cases.append(TestCase(factor, SolverSetting.fixed(method, _scaled_steps(train.steps, factor), train.gradient, train.T)))
    return cases


def cross_solver_table(model, x: torch.Tensor, y: torch.Tensor, train: SolverSetting, batch_size: int = 1000) -> list[dict]:
    """Evaluate ``model`` with every test setting of :func:`test_matrix`.

    Returns one row per test setting with ``test_method``, ``test_steps``,
    ``test_tol``, ``factor``, ``accuracy``, ``nfe`` (per forward pass of one batch)
    and ``is_train_solver`` (the train setting itself). Identical settings reached by
    different factors are evaluated once.
    """
    cache: dict[SolverSetting, tuple[float, int]] = {}
    rows = []
    for case in test_matrix(train):
        s = case.setting
        if s not in cache:
            cache[s] = accuracy(model, x, y, s, batch_size)
        acc, nfe = cache[s]
        rows.append(
            {
                "test_method": s.method,
                "test_steps": s.steps,
                "test_tol": s.tol,
                "factor": case.factor,
                "accuracy": acc,
                "nfe": nfe,
                "is_train_solver": s.method == train.method and case.factor == 1.0,
            }
        )
    return rows


def unevaluated_table(train: SolverSetting) -> list[dict]:
    """The rows of :func:`cross_solver_table` for a model that is not evaluated (its training
    diverged): the same test settings, ``accuracy`` NaN and ``nfe`` 0."""
    return [{"test_method": case.setting.method, "test_steps": case.setting.steps, "test_tol": case.setting.tol,
             "factor": case.factor, "accuracy": float("nan"), "nfe": 0,
             "is_train_solver": case.setting.method == train.method and case.factor == 1.0} for case in test_matrix(train)]


# Named for what they are, not pytest tests: keep pytest from collecting them on import.
test_matrix.__test__ = False
TestCase.__test__ = False
