"""Integrating a vector field with a :class:`~tune_node.solvers.SolverSetting`.

A field is autonomous, called as ``field(z)`` (the paper's), or time-dependent,
called as ``field(t, z)`` (torchdiffeq's convention, ``t`` a 0-dim tensor of the
state's dtype and device); :func:`takes_time` tells which from its signature. Every
solver passes ``t`` to a time-dependent field: the fixed-step loop at each stage's
time ``t_n + c_i h``, torchdiffeq in adaptive and adjoint solves.

Fixed-step methods with backprop run this module's own explicit Runge-Kutta loop:
exactly ``steps`` steps of size ``h = T / steps``, nothing else per step. Adaptive
backprop solves of a field with a fast form (the paper's dense sphere field) run
:mod:`tune_node.ode.adaptive`, torchdiffeq's adaptive Runge-Kutta solve rewritten (the same
accepted steps and NFE; gradients equal up to rounding), and so do adaptive adjoint solves of
the sphere field (:mod:`tune_node.fast.dense_adjoint`, torchdiffeq's adjoint rewritten), unless
``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq`` (:func:`adaptive_solver`); other adaptive solves,
and fixed-step methods in adjoint mode, run through torchdiffeq. Every solve counts its function
evaluations exactly, forward and backward separately.

Adaptive solves are capped at ``setting.max_adaptive_steps`` step attempts
(:data:`~tune_node.solvers.DEFAULT_MAX_ADAPTIVE_STEPS` unless the setting's
``max_steps`` says otherwise), in the adjoint's backward solve too. A solve that
reaches the cap raises :class:`SolverStepLimitError`; one whose step size underflows
raises :class:`StepSizeUnderflowError`. Both are RuntimeErrors naming the method,
tolerance and evaluations spent, in place of torchdiffeq's bare AssertionErrors.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch
import torchdiffeq
from torch import nn

from .solvers import DEFAULT_MAX_ADAPTIVE_STEPS, ButcherTableau, SolverSetting

__all__ = ["NFECounter", "PreparedField", "Solution", "SolverStepLimitError", "StepSizeUnderflowError", "integrate", "rk_solve",
           "takes_time", "FieldSignatureError", "register_fast_form", "fast_form", "adaptive_solver", "ADAPTIVE_SOLVERS",
           "integrate_seeds", "steps_taken",
           "ADAPTIVE_SOLVER_ENV", "use_adaptive_solver"]

#: The solvers of adaptive solves of a field with a fast form (backprop; the adjoint of the sphere field);
#: :func:`adaptive_solver` picks one.
ADAPTIVE_SOLVERS = ("tune_node", "torchdiffeq")
#: The environment variable that picks it.
ADAPTIVE_SOLVER_ENV = "TUNE_NODE_ADAPTIVE_SOLVER"


def adaptive_solver() -> str:
    """Which solver runs adaptive solves of fields with a fast form (backprop; the sphere field's adjoint too):
    ``"tune_node"`` (:mod:`tune_node.ode.adaptive`, the default) or ``"torchdiffeq"`` (the reference), from
    the environment variable ``TUNE_NODE_ADAPTIVE_SOLVER``, which Ray's workers inherit. ValueError for another value."""
    import os

    chosen = os.environ.get(ADAPTIVE_SOLVER_ENV, "tune_node")
    if chosen not in ADAPTIVE_SOLVERS:
        raise ValueError(f"{ADAPTIVE_SOLVER_ENV}={chosen!r}; allowed: {', '.join(ADAPTIVE_SOLVERS)}")
    return chosen

@contextlib.contextmanager
def use_adaptive_solver(name: str):
    """Within the ``with`` block, this process solves as :func:`adaptive_solver` would with
    ``TUNE_NODE_ADAPTIVE_SOLVER=name`` (the variable is set, then restored); e.g. to compare
    tune-node's solves with torchdiffeq's side by side. ValueError for a name not in :data:`ADAPTIVE_SOLVERS`."""
    import os

    if name not in ADAPTIVE_SOLVERS:
        raise ValueError(f"adaptive solver {name!r}; allowed: {', '.join(ADAPTIVE_SOLVERS)}")
    previous = os.environ.get(ADAPTIVE_SOLVER_ENV)
    os.environ[ADAPTIVE_SOLVER_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[ADAPTIVE_SOLVER_ENV]
        else:
            os.environ[ADAPTIVE_SOLVER_ENV] = previous


# The messages of torchdiffeq's adaptive Runge-Kutta loop (rk_common.py) that this
# module turns into its own errors; any other AssertionError passes through unchanged.
_TORCHDIFFEQ_STEP_LIMIT = "max_num_steps exceeded"
_TORCHDIFFEQ_UNDERFLOW = "underflow in dt"


def _rebuilt(cls, args: tuple, state: dict) -> RuntimeError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class _SolverError(RuntimeError):
    """Copies and pickles as it is (message, possibly amended, and attributes): Ray copies a
    trial's exception, which the constructors' own arguments could not rebuild."""

    def __reduce__(self):
        return _rebuilt, (type(self), self.args, dict(self.__dict__))


class SolverStepLimitError(_SolverError):
    """An adaptive solve reached its cap on step attempts (``max_steps``) before ``T``.

    The message names the method, tolerance, cap, the function evaluations spent and
    how to raise the cap. ``setting``, ``nfe`` and ``phase`` (``"forward"`` or
    ``"backward"``: the adjoint's solve) are kept as attributes.
    """

    def __init__(self, setting: SolverSetting, nfe: int, phase: str = "forward"):
        self.setting, self.nfe, self.phase = setting, nfe, phase
        where = "the adjoint's backward solve" if phase == "backward" else "one solve"
        super().__init__(
            f"{setting.method} (tol={setting.tol:g}) needed more than max_steps={setting.max_adaptive_steps} step attempts "
            f"in {where} of [0, {setting.T:g}] (NFE reached: {nfe}); the field is too stiff for this tolerance or "
            f"diverged. To allow more, raise the cap: SolverSetting(..., max_steps=N) or the 'max_steps' key of a search "
            f"space's [[solvers]] table (default without it: DEFAULT_MAX_ADAPTIVE_STEPS = {DEFAULT_MAX_ADAPTIVE_STEPS})"
        )


class StepSizeUnderflowError(_SolverError):
    """An adaptive solve's step size fell below what the time's float precision resolves.

    The message names the method, tolerance, the function evaluations spent and the
    likely causes. ``setting``, ``nfe`` and ``phase`` are kept as attributes.
    """

    def __init__(self, setting: SolverSetting, nfe: int, phase: str = "forward", detail: str = ""):
        self.setting, self.nfe, self.phase = setting, nfe, phase
        where = "the adjoint's backward solve" if phase == "backward" else "the solve"
        super().__init__(
            f"{setting.method} (tol={setting.tol:g}): the step size underflowed in {where} of [0, {setting.T:g}] "
            f"(NFE reached: {nfe}; solver: {detail}): the tolerance is too small for the float precision of the "
            f"state and time, or the solution diverged (blew up); allowed: a larger tol, or a model that stays finite"
        )


def _solver_error(err: AssertionError, setting: SolverSetting, nfe: int, phase: str) -> RuntimeError | None:
    """The error of this module standing for torchdiffeq's ``err``, or None if it is another assertion."""
    message = str(err)
    if message.startswith(_TORCHDIFFEQ_STEP_LIMIT):
        return SolverStepLimitError(setting, nfe, phase)
    if message.startswith(_TORCHDIFFEQ_UNDERFLOW):
        return StepSizeUnderflowError(setting, nfe, phase, message)
    return None


class FieldSignatureError(TypeError):
    """A vector field that takes neither ``(z)`` nor ``(t, z)``; the message shows its signature."""


def takes_time(vector_field) -> bool:
    """Whether ``vector_field`` is called as ``field(t, z)`` (True) or ``field(z)`` (False).

    Decided from the signature of its ``forward`` (modules) or of the callable itself:
    two required positional parameters mean ``(t, z)``, one means ``(z)``. A field
    may say so itself with an attribute ``time_dependent`` (True or False), which wins.
    Raises :class:`FieldSignatureError` for any other signature.
    """
    declared = getattr(vector_field, "time_dependent", None)
    if isinstance(declared, bool):
        return declared
    if isinstance(vector_field, nn.Module):
        # Asked at every solve: a module's answer is its class's, so look once per class.
        cls = type(vector_field)
        if cls not in _TAKES_TIME:
            _TAKES_TIME[cls] = _signature_takes_time(vector_field.forward, cls.__qualname__)
        return _TAKES_TIME[cls]
    return _signature_takes_time(vector_field, getattr(vector_field, "__qualname__", type(vector_field).__qualname__))


_TAKES_TIME: dict[type, bool] = {}


def _signature_takes_time(target, name: str) -> bool:
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # builtins without a signature: the paper's convention
        return False
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
    if len(positional) == 2:
        return True
    if len(positional) == 1 or (not positional and varargs):
        return False
    raise FieldSignatureError(f"vector field {name}{signature} must take the state z, as forward(z), or the time and "
                              f"the state, as forward(t, z) (torchdiffeq's convention); it takes {len(positional)} "
                              f"required positional arguments")


@dataclass(frozen=True)
class PreparedField:
    """A vector field in a faster form, built once per solve from the field's parameters.

    A field may offer ``prepare(z0) -> PreparedField | None`` (or have one registered for
    its type, :func:`register_fast_form`); :func:`integrate` asks for it at the start of
    every backprop solve. ``f`` acts on encoded states:
    ``decode(f(encode(z)))`` equals ``field(z)`` up to floating-point rounding, and
    gradients reach the field's parameters through ``f``'s construction.
    """

    f: Callable[[torch.Tensor], torch.Tensor]
    encode: Callable[[torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    #: Optional fused fixed-step solver ``solve(z0, tableau, steps, T) -> z_T`` on encoded
    #: states, equal to :func:`rk_solve` on ``f`` up to rounding; used while gradients
    #: are recorded (its backward pass is its own). It returns None to decline a solve.
    solve: Callable[[torch.Tensor, ButcherTableau, int, float], torch.Tensor] | None = None


_FAST_FORMS: dict[type, Callable[[nn.Module, torch.Tensor], "PreparedField | None"]] = {}


def register_fast_form(field_type: type, prepare: Callable[[nn.Module, torch.Tensor], "PreparedField | None"]) -> None:
    """Let fields of ``field_type`` be integrated in a faster form: ``prepare(field, z0)`` returns
    a :class:`PreparedField` (or None to decline) at the start of every backprop solve, as a
    field's own ``prepare(z0)`` method would. How the fast path plugs in without the field's
    module knowing it (:mod:`tune_node.fast` registers the paper's sphere field)."""
    _FAST_FORMS[field_type] = prepare


def fast_form(field_type: type) -> Callable[[nn.Module, torch.Tensor], "PreparedField | None"] | None:
    """The ``prepare(field, z0)`` registered for ``field_type`` or a base class of it, or None."""
    for cls in field_type.__mro__:
        if cls in _FAST_FORMS:
            return _FAST_FORMS[cls]
    return None


def _preparer(vector_field) -> Callable[[torch.Tensor], "PreparedField | None"] | None:
    registered = fast_form(type(vector_field))
    if registered is not None:
        return lambda z0: registered(vector_field, z0)
    return getattr(vector_field, "prepare", None)


@dataclass
class NFECounter:
    """Function evaluations of one solve.

    ``forward`` counts evaluations made while integrating. ``backward`` counts the
    evaluations the adjoint method makes while gradients are computed; with backprop
    every forward evaluation is differentiated once, so it equals ``forward`` once
    a backward pass has run.
    """

    forward: int = 0
    backward: int = 0
    in_backward: bool = field(default=False, repr=False)


class _CountingField(nn.Module):
    """``f(t, z)`` for torchdiffeq (``field(z)``, or ``field(t, z)`` when ``time_dependent``),
    counting calls into an :class:`NFECounter`.

    With ``backward_cap`` (a setting, adaptive adjoint solves only) it also counts the
    step attempts of the adjoint's backward solve through torchdiffeq's
    ``callback_step_adjoint`` hook and raises :class:`SolverStepLimitError` on the
    attempt after the setting's cap, before that attempt evaluates anything.
    """

    def __init__(self, vector_field: Callable[..., torch.Tensor], counter: NFECounter,
                 backward_cap: SolverSetting | None = None, time_dependent: bool = False):
        super().__init__()
        self.vector_field = vector_field
        self.time_dependent = time_dependent
        self.counter = counter
        self.backward_cap = backward_cap
        self.backward_attempts = 0
        self.backward_nfe_start = 0

    def start_backward(self, grad):
        """Tensor hook on the solution: a new backward solve begins, so its attempts
        (and the evaluations an error reports) count from 0."""
        self.backward_attempts = 0
        self.backward_nfe_start = self.counter.backward
        return None

    def callback_step_adjoint(self, t0, y0, dt):
        if self.backward_cap is None:
            return
        self.backward_attempts += 1
        if self.backward_attempts > self.backward_cap.max_adaptive_steps:
            raise SolverStepLimitError(self.backward_cap, self.counter.backward - self.backward_nfe_start, "backward")

    def forward(self, t, z):
        if self.counter.in_backward:
            self.counter.backward += 1
        else:
            self.counter.forward += 1
        return self.vector_field(t, z) if self.time_dependent else self.vector_field(z)


@dataclass
class Solution:
    """The result of :func:`integrate`.

    Attributes:
        z: the state at time T.
        setting: the solver setting used.
        counter: evaluation counts; ``nfe_backward`` is final only after ``backward()``.
        path: the states after every step (including ``z0``) when requested;
            fixed-step solves only.
    """

    z: torch.Tensor
    setting: SolverSetting
    counter: NFECounter
    path: list[torch.Tensor] | None = None
    #: A stacked seeds' adaptive solve (:func:`integrate_seeds`): each seed's forward evaluations
    #: (``counter.forward`` is then their largest); None where every seed took the same.
    seed_nfe: list[int] | None = None
    #: An adjoint solve by tune-node's solver: what its backward pass records (at least per-seed ``nfe``
    #: and ``ran``, as :class:`tune_node.fast.dense_adjoint.AdjointRecord`); None for torchdiffeq's,
    #: which counts into ``counter``.
    backward_record: object | None = None

    @property
    def nfe_forward(self) -> int:
        return self.counter.forward

    def seed_counts(self, seeds: int) -> list[tuple[int, int]]:
        """``(forward, backward)`` evaluations of each of ``seeds`` stacked seeds (backward as
        :attr:`nfe_backward` counts it: with backprop, each forward evaluation once a backward pass runs)."""
        if self.seed_nfe is None:
            return [(self.nfe_forward, self.nfe_backward)] * seeds
        if self.backward_record is not None:
            return list(zip(self.seed_nfe, self.backward_record.nfe))
        differentiated = self.setting.gradient == "backprop" and self.z.requires_grad
        return [(n, n if differentiated else 0) for n in self.seed_nfe]

    @property
    def nfe_backward(self) -> int:
        if self.setting.gradient == "backprop":
            return self.counter.forward if self.z.requires_grad else 0
        if self.backward_record is not None:
            return max(self.backward_record.nfe)
        return self.counter.backward

    @property
    def steps(self) -> int:
        """Steps taken: exact for fixed-step methods; step attempts (accepted or
        rejected) for adaptive ones, from the evaluation count (the most any stacked seed took)."""
        return steps_taken(self.setting, self.counter.forward)


def steps_taken(setting: SolverSetting, nfe_forward: int) -> int:
    """The steps of a solve of ``setting`` that made ``nfe_forward`` evaluations: ``setting.steps`` for a
    fixed-step method; step attempts (accepted or rejected) for an adaptive one."""
    if not setting.is_adaptive:
        return setting.steps
    spec = setting.spec
    return max(0, (nfe_forward - spec.startup_nfe) // spec.stages_per_step)


def _converted(err: Exception, setting: SolverSetting, seeded: bool, phase: str = "forward") -> Exception:
    """This module's error for an error of :mod:`tune_node.ode.adaptive`'s solves (others unchanged)."""
    from .adaptive import AdaptiveStepLimitError, AdaptiveUnderflowError

    if isinstance(err, AdaptiveStepLimitError):
        converted = SolverStepLimitError(setting, err.nfe, phase)
    elif isinstance(err, AdaptiveUnderflowError):
        converted = StepSizeUnderflowError(setting, err.nfe, phase, detail=str(err))
    else:
        return err
    converted.seed = err.seed if seeded else None  # which of the stacked seeds failed
    return converted


def _ours(vector_field, z0: torch.Tensor, setting: SolverSetting, *, seeded: bool) -> Solution | None:
    """An adaptive solve by tune-node's solver, its errors as this module's: backprop by
    :func:`tune_node.ode.adaptive.integrate_adaptive`; the adjoint by
    :func:`tune_node.fast.dense_adjoint.fused_adjoint_solve` where it takes the field (else None)."""
    from .adaptive import AdaptiveStepLimitError, AdaptiveUnderflowError, integrate_adaptive

    record = None
    try:
        if setting.gradient == "adjoint":
            from ..fast.dense_adjoint import fused_adjoint_solve

            solved = fused_adjoint_solve(vector_field, z0, setting, seeded=seeded,
                                         on_error=lambda err: _converted(err, setting, seeded, "backward"))
            if solved is None:
                return None
            sol, record = solved
        else:
            sol = integrate_adaptive(vector_field, z0, setting, seeded=seeded)
    except (AdaptiveStepLimitError, AdaptiveUnderflowError) as err:
        raise _converted(err, setting, seeded) from err
    counter = NFECounter(forward=max(sol.nfe), in_backward=True)
    return Solution(sol.z, setting, counter, None, seed_nfe=list(sol.nfe) if seeded else None, backward_record=record)


def integrate_seeds(stacked_field: nn.Module, z0: torch.Tensor, setting: SolverSetting) -> Solution:
    """:func:`integrate` of S stacked seeds' field (``z0``'s leading dimension indexes the seeds, the
    field acts on each slice alone): fixed-step solves as ``integrate``; an adaptive backprop solve gives
    each seed its own steps, acceptance and NFE (:attr:`Solution.seed_nfe`), as separate solves would.

    The same for an adaptive adjoint solve of the stacked sphere field, forward and backward
    (:mod:`tune_node.fast.dense_adjoint`; per-seed backward evaluations in :meth:`Solution.seed_counts`).

    Raises ValueError for an adaptive setting this cannot solve per seed (a method without an
    embedded pair, ``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq``, a field without a fast form, the adjoint of
    another field than the stacked sphere field): one shared step control would couple the seeds.
    A seed's failed solve raises :class:`SolverStepLimitError` or :class:`StepSizeUnderflowError`
    whose ``seed`` attribute names it (from ``backward()`` where the adjoint's backward solve fails).
    """
    if not setting.is_adaptive:
        return integrate(stacked_field, z0, setting)
    if not seeded_adaptive(stacked_field, setting):
        raise ValueError(f"{setting.method} (tol={setting.tol:g}, {setting.gradient}) cannot be solved per seed here; "
                         f"allowed: adaptive settings of an embedded pair with TUNE_NODE_ADAPTIVE_SOLVER=tune_node, "
                         f"backprop for a field with a fast form, the adjoint for the stacked sphere field")
    sol = _ours(stacked_field, z0, setting, seeded=True)
    if sol is None:
        raise ValueError(f"the adjoint of {type(stacked_field).__name__} from states of shape {tuple(z0.shape)} cannot be solved "
                         f"per seed; allowed: the stacked sphere field on (seeds, batch, channels, dim) states")
    return sol


def seeded_adaptive(stacked_field, setting: SolverSetting) -> bool:
    """Whether :func:`integrate_seeds` solves the adaptive ``setting`` of ``stacked_field`` per seed."""
    if not (setting.is_adaptive and setting.spec.embedded is not None and not takes_time(stacked_field)
            and adaptive_solver() == "tune_node"):
        return False
    if setting.gradient == "adjoint":
        from ..fast.dense_adjoint import stacked_adjoint

        return stacked_adjoint(stacked_field)
    return _preparer(stacked_field) is not None


def rk_solve(f, z0: torch.Tensor, tableau: ButcherTableau, steps: int, T: float = 1.0, record_path: bool = False,
             *, time_dependent: bool = False):
    """Explicit Runge-Kutta with ``steps`` equal steps over ``[0, T]`` of ``f``: ``f(z)``, or
    ``f(t, z)`` with ``time_dependent`` (``t`` the stage time ``t_n + c_i h``, a 0-dim tensor).

    Returns ``(z_T, path)``; ``path`` is None unless ``record_path``. Calls ``f``
    exactly ``steps * tableau.stages`` times; besides those calls an autonomous step
    does one fused ``z + c * k`` per nonzero tableau coefficient and nothing else.
    """
    if time_dependent:
        return _rk_solve_in_time(f, z0, tableau, steps, T, record_path)
    h = T / steps
    a, b = tableau.step_coefficients(h)
    z = z0
    path = [z0] if record_path else None
    if tableau.stages == 1:  # Euler: b == (1,)
        for _ in range(steps):
            z = torch.add(z, f(z), alpha=h)
            if record_path:
                path.append(z)
        return z, path
    for _ in range(steps):
        k = []
        for row in a:
            zi = z
            for j, coef in row:
                zi = torch.add(zi, k[j], alpha=coef)
            k.append(f(zi))
        for i, coef in b:
            z = torch.add(z, k[i], alpha=coef)
        if record_path:
            path.append(z)
    return z, path


def _rk_solve_in_time(f, z0: torch.Tensor, tableau: ButcherTableau, steps: int, T: float, record_path: bool):
    h = T / steps
    a, b = tableau.step_coefficients(h)
    z = z0
    path = [z0] if record_path else None
    for n in range(steps):
        # Times from the step index, not by summing h, so the last step ends at T itself.
        t_n = n * T / steps
        k = []
        for row, c in zip(a, tableau.c):
            zi = z
            for j, coef in row:
                zi = torch.add(zi, k[j], alpha=coef)
            k.append(f(torch.tensor(t_n + c * h, dtype=z0.dtype, device=z0.device), zi))
        for i, coef in b:
            z = torch.add(z, k[i], alpha=coef)
        if record_path:
            path.append(z)
    return z, path


def _identity(z):
    return z


def integrate(vector_field: nn.Module, z0: torch.Tensor, setting: SolverSetting, record_path: bool = False) -> Solution:
    """Solve ``dz/dt = vector_field(z)`` (or ``vector_field(t, z)``), ``z(0) = z0`` over ``[0, setting.T]``.

    Arguments:
        vector_field: an autonomous field, called as ``vector_field(z)``, or a
            time-dependent one, ``vector_field(t, z)`` (see :func:`takes_time`).
        z0: initial state, any shape the field accepts.
        setting: method, steps or tolerance, gradient mode.
        record_path: keep every step's state (fixed-step methods only).

    Guarantees: fixed-step solves take exactly ``setting.steps`` steps of size
    ``T / steps`` and evaluate the field ``steps * stages`` times; adaptive solves use
    ``rtol = atol = setting.tol`` and make at most ``setting.max_adaptive_steps`` step
    attempts, forward and (adjoint) backward. With backprop, a field offering ``prepare(z0)``
    (see :class:`PreparedField`) is integrated in its prepared form, by its fused
    solver where it has one and gradients are recorded; adjoint solves call the field
    itself (torchdiffeq differentiates each call), except adaptive adjoint solves of the
    sphere field, which :mod:`tune_node.fast.dense_adjoint` makes in the dense form.

    Raises:
        SolverStepLimitError: an adaptive solve needs more attempts than the cap; from
            ``backward()`` too when the adjoint's backward solve does (``phase`` "backward").
        StepSizeUnderflowError: an adaptive forward solve's step size underflowed; from
            ``backward()`` too in tune-node's adjoint. In torchdiffeq's adjoint backward solve its
            own AssertionError ('underflow in dt') surfaces from ``backward()`` unchanged: it is
            raised inside autograd, out of reach.
    """
    counter = NFECounter()
    spec = setting.spec
    T = float(setting.T)
    if record_path and setting.is_adaptive:
        raise ValueError("record_path is only available for fixed-step methods")
    time_dependent = takes_time(vector_field)
    prepare = _preparer(vector_field)
    # tune-node's adaptive solves prepare the field themselves (or not at all): decided before the
    # prepared form is built (for the sphere field, its dense matrices: ~0.1 ms a solve).
    if (setting.is_adaptive and setting.gradient == "backprop" and prepare is not None and not time_dependent
            and spec.embedded is not None and adaptive_solver() == "tune_node"):
        return _ours(vector_field, z0, setting, seeded=False)
    if (setting.is_adaptive and setting.gradient == "adjoint" and not time_dependent and spec.embedded is not None
            and adaptive_solver() == "tune_node"):
        sol = _ours(vector_field, z0, setting, seeded=False)
        if sol is not None:
            return sol
    prepared = prepare(z0) if prepare is not None and setting.gradient == "backprop" and not time_dependent else None
    if prepared is None:
        prepared = PreparedField(vector_field, _identity, _identity)
    if setting.gradient == "backprop" and not setting.is_adaptive:
        if prepared.solve is not None and not record_path and torch.is_grad_enabled():
            z = prepared.solve(prepared.encode(z0), spec.tableau, setting.steps, T)
            if z is not None:
                counter.forward += setting.steps * spec.tableau.stages
                return Solution(prepared.decode(z), setting, counter, None)
        field_fn = prepared.f

        def f(*tz):
            counter.forward += 1
            return field_fn(*tz)

        z, path = rk_solve(f, prepared.encode(z0), spec.tableau, setting.steps, T, record_path, time_dependent=time_dependent)
        path = None if path is None else [prepared.decode(p) for p in path]
        return Solution(prepared.decode(z), setting, counter, path)

    adaptive_adjoint = setting.is_adaptive and setting.gradient == "adjoint"
    counted = _CountingField(prepared.f, counter, backward_cap=setting if adaptive_adjoint else None,
                             time_dependent=time_dependent)
    z0 = prepared.encode(z0)

    t = torch.tensor([0.0, T], dtype=z0.dtype, device=z0.device)
    kwargs = {"method": spec.torchdiffeq_name}
    if setting.is_adaptive:
        kwargs.update(rtol=setting.tol, atol=setting.tol)
        # torchdiffeq refuses attempt max_num_steps + 1 of a solve (n counts attempts
        # of its one interval [0, T]): the cap's exact meaning.
        kwargs["options"] = {"max_num_steps": setting.max_adaptive_steps}
    else:
        steps = setting.steps
        # The grid as given: exactly `steps` equal steps between the requested times
        # (also in the adjoint's reversed solve), free of arange rounding.
        kwargs["options"] = {
            "grid_constructor": lambda func, y0, tt: torch.linspace(tt[0], tt[-1], steps + 1, dtype=tt.dtype, device=tt.device)}
    if setting.gradient == "adjoint":
        if not setting.is_adaptive:
            kwargs["adjoint_options"] = kwargs["options"]
        else:
            kwargs["adjoint_rtol"] = setting.tol
            kwargs["adjoint_atol"] = setting.tol
            # The backward solve runs inside autograd, where torchdiffeq's AssertionError
            # could not be caught and renamed here: counted.callback_step_adjoint enforces
            # the cap itself and raises SolverStepLimitError. torchdiffeq's own limit sits
            # one attempt above it, a backstop should that hook ever not be called.
            kwargs["adjoint_options"] = {"max_num_steps": setting.max_adaptive_steps + 1}
        try:
            z = torchdiffeq.odeint_adjoint(counted, z0, t, adjoint_params=tuple(vector_field.parameters()), **kwargs)[-1]
        except AssertionError as err:
            converted = _solver_error(err, setting, counter.forward, "forward")
            if converted is None:
                raise
            raise converted from err
        if adaptive_adjoint and z.requires_grad:
            z.register_hook(counted.start_backward)
    else:
        try:
            z = prepared.decode(torchdiffeq.odeint(counted, z0, t, **kwargs)[-1])
        except AssertionError as err:
            converted = _solver_error(err, setting, counter.forward, "forward")
            if converted is None:
                raise
            raise converted from err
    counter.in_backward = True
    return Solution(z, setting, counter, None)
