"""Is a Neural ODE trained elsewhere an ODE? ``check_model`` answers without Ray or a search space.

It evaluates a trained vector field (and the head that reads its final state) with
the paper's test solvers (:func:`~tune_node.evaluation.test_matrix`: the train
method and the more accurate ones, at 0.5 to 2 times the train steps or 0.1 to 10
times the tolerance) and applies the critical-step rule's test to that one model:
the model is solver-independent when every test setting of equal or smaller error
(:func:`~tune_node.results.critical_step.qualifying_tests`) scores within
``threshold`` of the train solver's accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import nn

from ..ode.integrate import Solution, integrate
from ..ode.solvers import SolverSetting
from ..results.critical_step import qualifying_tests
from .evaluation import cross_solver_table

__all__ = ["SolverCheck", "check_model"]


class _FieldWithHead(nn.Module):
    """``head(z(T))`` with ``z`` solved from the input under a given setting: the
    ``model(x, setting) -> (logits, solution)`` form evaluation takes."""

    def __init__(self, field: nn.Module, head: Callable[[torch.Tensor], torch.Tensor] | None):
        super().__init__()
        self.field = field
        self.head = head

    def forward(self, x: torch.Tensor, setting: SolverSetting) -> tuple[torch.Tensor, Solution]:
        solution = integrate(self.field, x, setting)
        z = solution.z
        return (z if self.head is None else self.head(z)), solution


@dataclass(frozen=True)
class SolverCheck:
    """The outcome of :func:`check_model`.

    Attributes:
        trained_with: the train solver setting.
        table: one row per test setting: ``test_method``, ``test_steps``, ``test_tol``,
            ``factor``, ``accuracy``, ``nfe``, ``is_train_solver`` (the paper's cross-solver
            table), ``qualifies`` (of equal or smaller error, so it counts) and
            ``difference`` (accuracy minus the train solver's).
        train_accuracy: accuracy under the train solver.
        independent: the verdict: every qualifying test is within ``threshold``.
        worst_test: the qualifying test setting farthest from the train solver's accuracy
            (None when none qualifies), and ``worst_accuracy`` its accuracy.
        threshold: the largest accuracy difference allowed.
    """

    trained_with: SolverSetting
    table: pd.DataFrame
    train_accuracy: float
    independent: bool
    worst_test: SolverSetting | None
    worst_accuracy: float | None
    threshold: float

    @property
    def accuracy_drop(self) -> float:
        """Train-solver accuracy minus the worst qualifying test's (0 when none qualifies)."""
        return 0.0 if self.worst_accuracy is None else self.train_accuracy - self.worst_accuracy

    def __str__(self) -> str:
        trained = self.trained_with.label()
        if self.worst_test is None:
            return (f"solver-independent (nothing to test against): trained with {trained}, accuracy "
                    f"{100 * self.train_accuracy:.1f} %, and no test solver of smaller error exists")
        change = (f"accuracy {100 * self.train_accuracy:.1f} % under {trained}, {100 * self.worst_accuracy:.1f} % under "
                  f"{self.worst_test.label()}")
        if self.independent:
            return (f"solver-independent: {change} (the largest change of any test solver of equal or smaller error, "
                    f"within {100 * self.threshold:g} points)")
        return (f"solver-dependent, not a valid ODE model (a ResNet in disguise): {change}, a change of "
                f"{100 * abs(self.accuracy_drop):.1f} points (more than {100 * self.threshold:g}); train with a finer "
                f"solver setting")


@torch.no_grad()
def check_model(field: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, trained_with: SolverSetting, *,
                head: Callable[[torch.Tensor], torch.Tensor] | None = None, threshold: float = 0.1,
                batch_size: int = 1000) -> SolverCheck:
    """Test a trained Neural ODE with the paper's test solvers and say whether it is an ODE.

    Arguments:
        field: the trained vector field, ``forward(z)`` or torchdiffeq's ``forward(t, z)``.
        x_test, y_test: test inputs (the initial states, on the field's device) and int labels.
        trained_with: the solver setting it was trained with (``SolverSetting.fixed("euler", 2)``,
            ``SolverSetting.adaptive("dopri5", 1e-4)``); ``[0, T]`` is the setting's (T = 1).
        head: keyword only: maps the final state ``z(T)`` to logits (a linear layer, say);
            None when ``z(T)`` holds the logits.
        threshold: the largest accuracy difference of a solver-independent model (the paper's 0.1).
        batch_size: examples per evaluation pass.

    Returns a :class:`SolverCheck`; ``str()`` of it is the verdict in one sentence. The
    model's mode (train or eval) is left as it is: put it in eval mode first if it has
    dropout or batch norm. Raises ValueError for a threshold outside (0, 1), a non-setting
    ``trained_with``, or test data of mismatched length.
    """
    if not isinstance(trained_with, SolverSetting):
        raise ValueError(f"trained_with must be a tune_node.solvers.SolverSetting (e.g. SolverSetting.fixed('euler', 2)), "
                         f"got {type(trained_with).__name__} {trained_with!r}")
    if not 0 < threshold < 1:  # also refuses nan
        raise ValueError(f"threshold must be in (0, 1): the largest accuracy difference allowed, got {threshold!r}")
    if len(x_test) != len(y_test) or len(y_test) == 0:
        raise ValueError(f"x_test and y_test must hold the same, non-zero number of examples, got {len(x_test)} and "
                         f"{len(y_test)}")
    model = _FieldWithHead(field, head)
    rows = pd.DataFrame(cross_solver_table(model, x_test, y_test, trained_with, batch_size))
    train_accuracy = float(rows.loc[rows["is_train_solver"], "accuracy"].iloc[0])
    setting_columns = pd.DataFrame({"train_method": trained_with.method, "train_steps": trained_with.steps,
                                    "train_tol": trained_with.tol}, index=rows.index)
    rows["qualifies"] = qualifying_tests(pd.concat([setting_columns, rows], axis=1)).to_numpy()
    rows["difference"] = rows["accuracy"] - train_accuracy
    tests = rows[rows["qualifies"]]
    if tests.empty:
        return SolverCheck(trained_with, rows, train_accuracy, True, None, None, threshold)
    worst = tests.loc[tests["difference"].abs().idxmax()]
    steps = None if pd.isna(worst["test_steps"]) else int(worst["test_steps"])
    tol = None if pd.isna(worst["test_tol"]) else float(worst["test_tol"])
    worst_setting = SolverSetting(worst["test_method"], steps=steps, tol=tol, gradient=trained_with.gradient,
                                  T=trained_with.T, max_steps=trained_with.max_steps)
    independent = bool(tests["difference"].abs().max() <= threshold)
    return SolverCheck(trained_with, rows, train_accuracy, independent, worst_setting, float(worst["accuracy"]), threshold)
