"""The paper's step and tolerance adaptation (Algorithms 2 and 3, Appendix C) as solver controllers.

Both controllers implement :class:`~tune_node.training.SolverController`: ``train``
calls ``update`` after every backward pass, on the iteration's batch, before the
optimizer step. Every ``k`` iterations the controller compares the batch accuracy of
the train solver (read off the training logits, free) with that of a more accurate
test solver. A difference above ``threshold`` shrinks the accuracy parameter
(step size ``h`` or tolerance) by ``shrink``; otherwise it proposes ``grow`` times
it and keeps the proposal only if the train solver at the proposed value still
agrees with the test solver.

Fixed-step settings are integer step counts, but ``h`` moves by factors such as
1.1: the controller keeps ``h`` as a real number and trains with
``SolverSetting.from_step_size(method, h)``, the fewest steps whose step size is at
most ``h``. So a growth of ``h`` may leave the number of steps unchanged for a
few checks, and repeated growths still accumulate as in the paper.

By default a check uses the iteration's batch, as the paper's Algorithm 2 does
("the accuracy is calculated over one batch"). :class:`StepAdaptation` can instead
check on fixed data (``check_data``; :meth:`StepAdaptation.for_training` with
``check_size`` draws a fixed subset of the training set): the train solver's accuracy
then needs a pass of its own, counted like the others.

Every function evaluation of a check (test-solver pass, trial pass at the proposed
value, and the starting-step selection) is returned as ``nfe_spent`` so that the
training's ``check_nfe`` holds the true cost of adapting. Every check is recorded
in ``controller.history`` as a :class:`Check`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ..data.datasets import Dataset
from ..ode.integrate import takes_time
from ..ode.solvers import (
    ERROR_FACTOR,
    STEP_TEST_METHODS,
    TOLERANCE_TEST_METHODS,
    SolverSetting,
    default_test_method,
    get_method,
    test_solver_for,
)

__all__ = [
    "BatchEvaluation",
    "Check",
    "StepAdaptation",
    "ToleranceAdaptation",
    "batch_accuracy",
    "initial_step_size",
    "first_batch",
    "check_subset",
    "STEP_TEST_METHODS",
    "TOLERANCE_TEST_METHODS",
    "INITIAL_STEP_NFE",
]

# STEP_TEST_METHODS and TOLERANCE_TEST_METHODS, the (train, test) pairs of Appendix C,
# are derived in tune_node.solvers (adaptation_test_methods) from the registered methods.
# The starting-step algorithm evaluates the field twice: f(z0) and f(z0 + h0 f(z0)).
INITIAL_STEP_NFE = 2


@dataclass(frozen=True)
class BatchEvaluation:
    """One forward pass over a batch: its accuracy, its function evaluations and solver steps."""

    accuracy: float
    nfe: int
    steps: int


Evaluator = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, SolverSetting], BatchEvaluation]


@torch.no_grad()
def batch_accuracy(model, x: torch.Tensor, y: torch.Tensor, setting: SolverSetting) -> BatchEvaluation:
    """Accuracy of ``model`` on the batch ``(x, y)`` under ``setting``, without gradients.

    The default evaluator of the controllers: the fraction of the batch classified
    correctly, the forward NFE of the solve and its number of steps.
    """
    logits, sol = model(x, setting)
    return BatchEvaluation(float((logits.argmax(1) == y).float().mean()), sol.nfe_forward, sol.steps)


@dataclass
class Check:
    """What one adaptation check saw and decided.

    Attributes:
        iteration: the training iteration of the check.
        step_size, tol: the controller's value the model trained with (one is None);
            ``step_size`` is the real-valued ``h``, the solver used ``ceil(T / h)`` steps.
        steps: train-solver steps at that value (None in tolerance mode when not
            needed: a disagreement shrinks the tolerance without counting them).
        test_steps, test_tol: the test solver's setting.
        train_solver_accuracy, test_solver_accuracy: the batch accuracies compared.
        proposed: the value proposed: ``shrink x`` on disagreement, ``grow x``
            (capped at T for step sizes) on agreement.
        accepted: whether the controller moved to ``proposed``; a shrink always is.
        candidate_accuracy: the train solver's accuracy at the proposed value, when tried.
        check_nfe: function evaluations this check spent.
    """

    iteration: int
    step_size: float | None
    tol: float | None
    steps: int | None
    test_steps: int | None
    test_tol: float | None
    train_solver_accuracy: float
    test_solver_accuracy: float
    proposed: float
    accepted: bool
    candidate_accuracy: float | None
    check_nfe: int

    def to_dict(self) -> dict:
        return asdict(self)


def _check_common(k: int, threshold: float, shrink: float, grow: float) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"check interval k must be an integer >= 1, got {k!r}")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise ValueError(f"threshold must be an accuracy difference in [0, 1), got {threshold!r}")
    if not (isinstance(shrink, (int, float)) and 0 < shrink < 1):
        raise ValueError(f"shrink must be in (0, 1), got {shrink!r}")
    if not (isinstance(grow, (int, float)) and grow > 1):
        raise ValueError(f"grow must be > 1, got {grow!r}")


class _Adaptation:
    """What both algorithms share: the check schedule, the decision rule, history and state."""

    mode: str
    _value_name: str  # the name of the adapted parameter in state dicts: "step_size" or "tol"

    def __init__(self, method: str, test_method: str, k: int, threshold: float, shrink: float, grow: float,
                 gradient: str, T: float, evaluate: Evaluator | None,
                 check_data: tuple[torch.Tensor, torch.Tensor] | None = None):
        _check_common(k, threshold, shrink, grow)
        if check_data is not None:
            if not (isinstance(check_data, (tuple, list)) and len(check_data) == 2 and len(check_data[1]) > 0
                    and len(check_data[0]) == len(check_data[1])):
                raise ValueError("check_data must be None or a non-empty (x, y) pair of equal length")
            check_data = (check_data[0], check_data[1])
        # None: every check uses the iteration's batch (the paper's); else the fixed (x, y) checked on.
        self.check_data = check_data
        self.method, self.test_method = method, test_method
        self.k, self.threshold, self.shrink, self.grow = k, float(threshold), float(shrink), float(grow)
        self.gradient, self.T = gradient, float(T)
        self.evaluate: Evaluator = evaluate or batch_accuracy
        self.history: list[Check] = []
        # Evaluations spent before training (the starting step), reported by the first update.
        self.pending_nfe = 0

    # -- subclasses define the parameter and its settings -------------------------------
    @property
    def value(self) -> float:
        raise NotImplementedError

    def _set_value(self, value: float) -> None:
        raise NotImplementedError

    def setting_for(self, value: float) -> SolverSetting:
        raise NotImplementedError

    def _test_setting(self) -> SolverSetting:
        raise NotImplementedError

    def _propose_growth(self) -> float:
        raise NotImplementedError

    def _may_grow(self, model, x, y, train_acc) -> tuple[bool, int | None, int]:
        """Whether a growth may be tried; the train steps if known, and the NFE spent finding out."""
        return True, self.setting.steps, 0

    # -- the algorithm ----------------------------------------------------------------------
    @property
    def setting(self) -> SolverSetting:
        """The train setting for the next iteration."""
        return self.setting_for(self.value)

    def update(self, iteration: int, model, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
               setting: SolverSetting) -> tuple[SolverSetting, int]:
        """One training iteration's call: a check every ``k`` iterations, else nothing.

        Returns the setting for the next iteration and the function evaluations spent.
        Raises ValueError when training used another setting than this controller's,
        e.g. when ``TrainConfig.solver`` was not set to ``controller.setting``.
        """
        if setting != self.setting:
            raise ValueError(f"training used {setting.label()} but the {self.mode} controller is at "
                             f"{self.setting.label()}; start training with controller.setting")
        spent, self.pending_nfe = self.pending_nfe, 0
        if iteration % self.k != 0:
            return self.setting, spent
        check = self._check(iteration, model, x, y, logits)
        self.history.append(check)
        return self.setting, spent + check.check_nfe

    def _check(self, iteration: int, model, x, y, logits) -> Check:
        current = self.setting
        test_setting = self._test_setting()
        if self.check_data is None:
            train_acc, nfe = float((logits.argmax(1) == y).float().mean()), 0
        else:
            # Fixed check data: the training logits are of another batch, so the train solver runs again.
            cx, cy = self.check_data
            if isinstance(x, torch.Tensor) and cx.device != x.device:  # kept where training runs, moved once
                cx, cy = cx.to(x.device), cy.to(x.device)
                self.check_data = (cx, cy)
            x, y = cx, cy
            own = self.evaluate(model, x, y, current)
            train_acc, nfe = own.accuracy, own.nfe
        test = self.evaluate(model, x, y, test_setting)
        nfe += test.nfe
        steps = current.steps
        candidate_acc = None
        if abs(train_acc - test.accuracy) > self.threshold:
            proposed, accepted = self.value * self.shrink, True
        else:
            proposed, accepted = self._propose_growth(), False
            may_grow, steps, spent = self._may_grow(model, x, y, train_acc)
            nfe += spent
            if may_grow:
                candidate = self.setting_for(proposed)
                if candidate == current:
                    # Same weights, data and setting as the pass train_acc came from: its accuracy is known.
                    candidate_acc = train_acc
                else:
                    trial = self.evaluate(model, x, y, candidate)
                    candidate_acc, nfe = trial.accuracy, nfe + trial.nfe
                accepted = abs(test.accuracy - candidate_acc) <= self.threshold
        check = Check(
            iteration=iteration,
            step_size=None if current.is_adaptive else self.value,
            tol=current.tol,
            steps=steps,
            test_steps=test_setting.steps,
            test_tol=test_setting.tol,
            train_solver_accuracy=train_acc,
            test_solver_accuracy=test.accuracy,
            proposed=proposed,
            accepted=accepted,
            candidate_accuracy=candidate_acc,
            check_nfe=nfe,
        )
        if accepted:
            self._set_value(proposed)
        return check

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "method": self.method,
            "test_method": self.test_method,
            self._value_name: self.value,
            "pending_nfe": self.pending_nfe,
            "history": [c.to_dict() for c in self.history],
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("mode", "method", "test_method"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"controller state is for {key}={state.get(key)!r}, this controller has {getattr(self, key)!r}")
        self._set_value(float(state[self._value_name]))
        self.pending_nfe = int(state.get("pending_nfe", 0))
        self.history = [Check(**c) for c in state["history"]]

    @property
    def check_nfe(self) -> int:
        """Evaluations spent on checks so far (the starting step not included)."""
        return sum(c.check_nfe for c in self.history)


class StepAdaptation(_Adaptation):
    """Algorithm 2: adapt the step size ``h`` of a fixed-step train solver.

    Arguments:
        method: the train method, a key of ``STEP_TEST_METHODS`` (the paper's:
            ``euler``, ``midpoint``).
        step_size: the starting ``h`` (see :func:`initial_step_size`; use
            :meth:`for_training` to compute it on the first batch); capped at ``T``.
        test_method: one of ``STEP_TEST_METHODS[method]`` (``midpoint`` or ``rk4``
            for Euler, ``rk4`` for Midpoint), by default
            :func:`~tune_node.solvers.default_test_method`; its step comes from
            :func:`~tune_node.solvers.test_solver_for` with ``error_factor`` (the
            paper's factor 50 rule).
        k: check every ``k`` iterations (50).
        threshold: the largest accuracy difference still counted as agreement (0.1).
        shrink, grow: factors applied to ``h`` on disagreement (0.5) and agreement (1.1).
        max_steps: optional floor on ``h`` as ``T / max_steps`` (the paper has none).
        gradient, T: gradient mode and final time of the train setting.
        evaluate: batch evaluator, :func:`batch_accuracy` by default.
        check_data: None (the paper's: each check uses the iteration's batch and reads the
            train solver's accuracy off the training logits), or a fixed ``(x, y)`` every
            check evaluates both solvers on (one more pass per check, counted in its NFE).

    Guarantees: ``h <= T`` always; the train setting is
    ``SolverSetting.from_step_size(method, h)``.
    """

    mode = "step"
    _value_name = "step_size"

    def __init__(self, method: str = "euler", step_size: float = 0.1, test_method: str | None = None, k: int = 50,
                 threshold: float = 0.1, shrink: float = 0.5, grow: float = 1.1, error_factor: float = ERROR_FACTOR,
                 max_steps: int | None = None, gradient: str = "backprop", T: float = 1.0,
                 evaluate: Evaluator | None = None, check_data: tuple[torch.Tensor, torch.Tensor] | None = None):
        if method not in STEP_TEST_METHODS:
            raise ValueError(f"step adaptation trains with a fixed-step method {' or '.join(STEP_TEST_METHODS)}, got {method!r}")
        test_method = test_method or default_test_method(method)
        if test_method not in STEP_TEST_METHODS[method]:
            raise ValueError(f"test method for {method} must be one of {', '.join(STEP_TEST_METHODS[method])}, got {test_method!r}")
        if not (isinstance(error_factor, (int, float)) and error_factor >= 1):
            raise ValueError(f"error_factor must be >= 1, got {error_factor!r}")
        if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps must be None or an integer >= 1, got {max_steps!r}")
        super().__init__(method, test_method, k, threshold, shrink, grow, gradient, T, evaluate, check_data)
        self.error_factor = float(error_factor)
        self.max_steps = max_steps
        if not (isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size must be a finite number > 0, got {step_size!r}")
        self._set_value(float(step_size))
        SolverSetting.fixed(method, 1, gradient, T)  # validates gradient and T now, not at the first check

    @property
    def value(self) -> float:
        return self.h

    def _set_value(self, value: float) -> None:
        h = min(value, self.T)
        if self.max_steps is not None:
            h = max(h, self.T / self.max_steps)
        self.h = h

    def setting_for(self, value: float) -> SolverSetting:
        return SolverSetting.from_step_size(self.method, value, self.gradient, self.T)

    def _test_setting(self) -> SolverSetting:
        return test_solver_for(self.setting, self.test_method, self.error_factor)

    def _propose_growth(self) -> float:
        return min(self.h * self.grow, self.T)

    @classmethod
    def for_training(cls, config, data: Dataset | None = None, rtol: float = 1e-3, atol: float = 1e-3,
                     check_size: int | None = None, **kwargs):
        """A controller starting at the step of :func:`initial_step_size` on the first batch of ``config``.

        Arguments:
            config: the :class:`~tune_node.training.TrainConfig` to train; its solver's
                method, gradient and T are used (its steps are replaced).
            data: the loaded dataset, to skip loading it again.
            rtol, atol: the weights of the starting-step algorithm's norm (the paper
                states none; 1e-3 is this package's choice).
            check_size: None (the paper's: checks use the iteration's batch), or the
                number of training points of a fixed subset every check uses, drawn
                once from ``config.seed`` by :func:`check_subset` (all of them when
                it exceeds the training set).
            kwargs: further :class:`StepAdaptation` arguments (``test_method``, ``k``, ...).

        Returns ``(config, controller)``: a copy of ``config`` whose solver is the
        controller's starting setting, and the controller. The starting step's two
        function evaluations are counted in the first ``update``'s ``nfe_spent``.
        """
        s = config.solver
        if check_size is not None:
            data = data or config.load_data()
            kwargs["check_data"] = check_subset(data, check_size, config.seed)
        model, x = first_batch(config, data)
        h = initial_step_size(model.field, x, get_method(s.method).order, rtol=rtol, atol=atol, T=s.T)
        controller = cls(s.method, h, gradient=s.gradient, T=s.T, **kwargs)
        controller.pending_nfe = INITIAL_STEP_NFE
        return _with_solver(config, controller.setting), controller


class ToleranceAdaptation(_Adaptation):
    """Algorithm 3: adapt the tolerance of an adaptive train solver.

    Arguments:
        method: the train method, a key of ``TOLERANCE_TEST_METHODS`` (the paper's:
            ``fehlberg2`` (Fehlberg21), ``dopri5`` (Dopri54)).
        tol: the starting tolerance (the paper: 1e-6), ``rtol = atol = tol``.
        test_method: one of ``TOLERANCE_TEST_METHODS[method]`` (the paper's: ``dopri5``),
            at ``tol / tolerance_divisor`` of the train method (Fehlberg21: 5, Dopri54:
            10), from :func:`~tune_node.solvers.test_solver_for`.
        minsteps: no growth while the train solver takes at most this many steps (2).
        k, threshold, shrink, grow, gradient, T, evaluate: as for :class:`StepAdaptation`.

    The update is not given the training solve, so to apply the ``minsteps`` rule
    a check that proposes a growth re-solves the batch with the train solver at the
    current tolerance (same weights, same batch: the same steps); those evaluations
    are counted in ``nfe_spent`` like every other check evaluation.
    """

    mode = "tolerance"
    _value_name = "tol"

    def __init__(self, method: str = "fehlberg2", tol: float = 1e-6, test_method: str | None = None, k: int = 50,
                 threshold: float = 0.1, shrink: float = 0.5, grow: float = 1.1, minsteps: int = 2,
                 gradient: str = "backprop", T: float = 1.0, evaluate: Evaluator | None = None):
        if method not in TOLERANCE_TEST_METHODS:
            raise ValueError(f"tolerance adaptation trains with an adaptive method {' or '.join(TOLERANCE_TEST_METHODS)}, got {method!r}")
        test_method = test_method or default_test_method(method)
        if test_method not in TOLERANCE_TEST_METHODS[method]:
            raise ValueError(f"test method for {method} must be one of {', '.join(TOLERANCE_TEST_METHODS[method])}, got {test_method!r}")
        if not isinstance(minsteps, int) or isinstance(minsteps, bool) or minsteps < 0:
            raise ValueError(f"minsteps must be an integer >= 0, got {minsteps!r}")
        super().__init__(method, test_method, k, threshold, shrink, grow, gradient, T, evaluate)
        self.minsteps = minsteps
        SolverSetting.adaptive(method, tol, gradient, T)  # validates tol, gradient and T
        self._set_value(float(tol))

    @property
    def value(self) -> float:
        return self.tol

    def _set_value(self, value: float) -> None:
        self.tol = value

    def setting_for(self, value: float) -> SolverSetting:
        return SolverSetting.adaptive(self.method, value, self.gradient, self.T)

    def _test_setting(self) -> SolverSetting:
        return test_solver_for(self.setting, self.test_method)

    def _propose_growth(self) -> float:
        return self.tol * self.grow

    def _may_grow(self, model, x, y, train_acc) -> tuple[bool, int | None, int]:
        current = self.evaluate(model, x, y, self.setting)
        return current.steps > self.minsteps, current.steps, current.nfe

    @classmethod
    def for_training(cls, config, tol: float = 1e-6, **kwargs):
        """Returns ``(config, controller)``: ``config`` with its solver set to the starting tolerance."""
        s = config.solver
        controller = cls(s.method, tol, gradient=s.gradient, T=s.T, **kwargs)
        return _with_solver(config, controller.setting), controller


def _with_solver(config, setting: SolverSetting):
    from .training import TrainConfig  # training imports nothing from here; keep the import local anyway

    return TrainConfig.from_dict({**config.to_dict(), "solver": setting.to_dict()})


def check_subset(data: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed subset of ``size`` training points of ``data`` (all of them if ``size`` is larger).

    Drawn with a generator of its own seeded by ``seed``: the global random state, and
    so training's batches and weights, stay as they are.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"check_size must be an integer >= 1, got {size!r}")
    n = len(data.y_train)
    if size >= n:
        return data.x_train, data.y_train
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:size]
    return data.x_train[idx], data.y_train[idx]


def first_batch(config, data: Dataset | None = None):
    """The initial model and first training batch ``train(config)`` will use.

    Rebuilt from the seed exactly as :func:`~tune_node.training.train` builds them,
    so the starting step is computed on the batch and weights training starts from.
    """
    from .training import BatchSampler

    data = data or config.load_data()
    model = config.build_model(data)
    idx = BatchSampler(len(data.y_train), config.batch_size, seed=config.seed).next()
    return model, data.x_train[idx]


@torch.no_grad()
def initial_step_size(field, z0: torch.Tensor, order: int, rtol: float = 1e-3, atol: float = 1e-3, T: float = 1.0) -> float:
    """The starting step size of Hairer, Norsett & Wanner (1993, p. 169), capped at ``T``.

    For ``dz/dt = field(z)`` (or ``field(t, z)``, at ``t = 0`` and ``h0``) from ``z0`` and a method of order ``order``, with the
    norm ``||v|| = sqrt(mean((v / sc) ** 2))`` over all components and
    ``sc = atol + |z0| * rtol``:

    - ``d0 = ||z0||``, ``d1 = ||f(z0)||``;
    - ``h0 = 0.01 d0 / d1`` (``1e-6`` if ``d0`` or ``d1`` is below ``1e-5``);
    - ``d2 = ||f(z0 + h0 f(z0)) - f(z0)|| / h0``;
    - ``h1 = (0.01 / max(d1, d2)) ** (1 / (order + 1))`` (``max(1e-6, 1e-3 h0)`` if
      ``max(d1, d2) <= 1e-15``);
    - ``h = min(100 h0, h1, T)``.

    Spends :data:`INITIAL_STEP_NFE` (2) field evaluations. The default weights
    ``rtol = atol = 1e-3`` are this package's choice: the paper does not state them.
    ``rtol = 0, atol = 1`` gives the unweighted RMS norm of the state (no tolerances
    at all, which is what a fixed-step solver has); ``atol`` must be > 0.
    """
    if not (isinstance(order, int) and order >= 1):
        raise ValueError(f"order must be an integer >= 1, got {order!r}")
    for name, v in (("atol", atol), ("T", T)):
        if not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name} must be > 0, got {v!r}")
    if not (isinstance(rtol, (int, float)) and rtol >= 0):
        raise ValueError(f"rtol must be >= 0, got {rtol!r}")
    scale = atol + z0.abs() * rtol

    def norm(v: torch.Tensor) -> float:
        return float(torch.sqrt(torch.mean((v / scale) ** 2)))

    if takes_time(field):
        def f(t, z):
            return field(torch.tensor(t, dtype=z0.dtype, device=z0.device), z)
    else:
        def f(t, z):
            return field(z)

    f0 = f(0.0, z0)
    d0, d1 = norm(z0), norm(f0)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = f(h0, z0 + h0 * f0)
    d2 = norm(f1 - f0) / h0
    largest = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if largest <= 1e-15 else (0.01 / largest) ** (1.0 / (order + 1))
    return min(100 * h0, h1, float(T))
