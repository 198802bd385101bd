"""ODE solvers as data: Runge-Kutta tableaus, named methods and solver settings.

A *method* is what the paper calls a solver (Euler, Midpoint, RK4, Fehlberg21,
Dopri54). A :class:`SolverSetting` is a method plus its accuracy parameter (a
number of fixed steps over ``[0, T]`` or an adaptive tolerance) plus the gradient
mode. Integration itself lives in :mod:`tune_node.integrate`.

This module is the one registry of methods: :data:`METHODS`, filled by
:func:`register_method`. Which methods test which (the cross-solver matrix, the
default test method, the adaptations' pairs) is derived from the methods' order,
kind (fixed-step or adaptive) and registration order by :func:`test_methods`,
:func:`default_test_method` and :func:`adaptation_test_methods`. A fixed-step
method is one :class:`Method` with a :class:`ButcherTableau`, registered here; an
adaptive one may carry its embedded pair (a tableau with error weights ``b_error``) as
``Method.embedded``, which :mod:`tune_node.ode.adaptive` integrates.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field, replace
from fractions import Fraction

__all__ = [
    "ButcherTableau",
    "Method",
    "METHODS",
    "FIXED_METHODS",
    "ADAPTIVE_METHODS",
    "GRADIENT_MODES",
    "SolverSetting",
    "MAX_FIXED_STEPS",
    "DEFAULT_MAX_ADAPTIVE_STEPS",
    "get_method",
    "register_method",
    "fixed_methods",
    "adaptive_methods",
    "test_methods",
    "default_test_method",
    "adaptation_test_methods",
    "test_solver_for",
    "DEFAULT_TEST_METHOD",
    "TOLERANCE_DIVISOR",
    "TEST_METHODS",
    "STEP_TEST_METHODS",
    "TOLERANCE_TEST_METHODS",
    "ERROR_FACTOR",
]

GRADIENT_MODES = ("backprop", "adjoint")
#: The most fixed steps a setting may ask for: beyond it one solve of ``[0, T]``
#: (with its recorded graph or path) needs absurd memory and time.
MAX_FIXED_STEPS = 100_000
#: Step attempts (accepted or rejected) one adaptive solve may make when a setting's
#: ``max_steps`` is None; a solve that needs more raises
#: :class:`~tune_node.integrate.SolverStepLimitError` instead of running on.
DEFAULT_MAX_ADAPTIVE_STEPS = 5000
# torchdiffeq holds the cap in an int32 tensor, and the adjoint's backward solve is
# given one attempt more (see tune_node.integrate), so this is the largest cap allowed.
_LARGEST_MAX_STEPS = 2**31 - 2


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge-Kutta method as data.

    Arguments:
        a: strictly lower-triangular stage coefficients, row ``i`` has ``i`` entries.
        b: solution weights, one per stage.
        c: stage times, one per stage.
        order: the method's global order of convergence.
        b_error: embedded pairs only: the error weights ``b - b_hat`` (``b_hat`` the
            embedded solution's weights), one per stage; the local error estimate of a
            step of size ``h`` is ``h * sum_i b_error[i] * k_i``. None for a plain method.
        b_mid: embedded pairs only, optional: the weights of the state at the step's
            midpoint, ``y(t + h/2) ~ y + h * sum_i b_mid[i] * k_i``, which torchdiffeq's
            4th-order interpolant of a step uses (the value at ``T`` of an adaptive solve).

    Guarantees (checked on construction): shapes agree, ``c[0] == 0``,
    ``sum(a[i]) == c[i]``, ``sum(b) == 1`` and ``sum(b_error) == 0`` (both solutions
    consistent), so the method is consistent.
    """

    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    c: tuple[float, ...]
    order: int
    b_error: tuple[float, ...] | None = None
    b_mid: tuple[float, ...] | None = None

    def __post_init__(self):
        stages = len(self.b)
        if stages < 1 or len(self.c) != stages or len(self.a) != stages:
            raise ValueError("tableau needs len(a) == len(b) == len(c) >= 1")
        if self.c[0] != 0:
            raise ValueError("explicit tableau needs c[0] == 0")
        for i, row in enumerate(self.a):
            if len(row) != i:
                raise ValueError(f"row {i} of a must have {i} entries, has {len(row)}")
            if not math.isclose(sum(row), self.c[i], abs_tol=1e-12):
                raise ValueError(f"row {i} of a sums to {sum(row)}, c[{i}] is {self.c[i]}")
        if not math.isclose(sum(self.b), 1.0, abs_tol=1e-12):
            raise ValueError(f"weights b sum to {sum(self.b)}, must sum to 1")
        if self.order < 1:
            raise ValueError("order must be >= 1")
        for name in ("b_error", "b_mid"):
            weights = getattr(self, name)
            if weights is not None and len(weights) != stages:
                raise ValueError(f"{name} must have one entry per stage ({stages}), has {len(weights)}")
        if self.b_error is not None and not math.isclose(sum(self.b_error), 0.0, abs_tol=1e-12):
            raise ValueError(f"error weights b_error sum to {sum(self.b_error)}, must sum to 0")

    @property
    def stages(self) -> int:
        return len(self.b)

    @property
    def embedded(self) -> bool:
        """Whether the tableau carries error weights (an embedded pair for adaptive steps)."""
        return self.b_error is not None

    def step_coefficients(self, h: float) -> tuple[list[list[tuple[int, float]]], list[tuple[int, float]]]:
        """The nonzero coefficients of one step of size ``h``, as ``(index, h * value)``
        pairs: per stage its ``a`` row, and the ``b`` weights. What an explicit
        Runge-Kutta loop multiplies by, zero terms left out."""
        a = [[(j, h * aij) for j, aij in enumerate(row) if aij != 0.0] for row in self.a]
        b = [(i, h * bi) for i, bi in enumerate(self.b) if bi != 0.0]
        return a, b


def _f(*values) -> tuple[float, ...]:
    return tuple(float(Fraction(v)) for v in values)


@dataclass(frozen=True)
class Method:
    """A named ODE method. Register one with :func:`register_method` to make it usable.

    Arguments:
        name: the name used in configs and on the command line.
        paper_name: the name the paper uses (or a display name).
        order: global order of convergence.
        tableau: the Butcher tableau for fixed-step methods, None for adaptive ones.
        torchdiffeq_name: the torchdiffeq method that integrates it (adaptive ones
            and the adjoint path of fixed-step ones).
        stages_per_step: function evaluations per step attempt (adaptive: net of FSAL).
        startup_nfe: evaluations spent once per solve before the first step
            (adaptive: the initial-step selection of torchdiffeq).
        tolerance_divisor: adaptive methods only: a test solver checks this method's
            tolerance ``tol`` at ``tol / tolerance_divisor`` (Appendix C.2).
        as_test_method: whether the pairings derived for *other* methods (see
            :func:`test_methods`) may pick this one. False keeps a method added after
            the paper's out of their protocols, so their results stay as they were.
        embedded: adaptive methods only, optional: the embedded pair as a tableau with
            ``b_error`` (and ``b_mid``), for :mod:`tune_node.ode.adaptive`'s own
            integrator. torchdiffeq's convention: the last stage (``c == 1``) is the next
            step's first, so a step attempt costs ``stages - 1`` evaluations.
    """

    name: str
    paper_name: str
    order: int
    tableau: ButcherTableau | None
    torchdiffeq_name: str
    stages_per_step: int
    startup_nfe: int = 0
    tolerance_divisor: float | None = None
    as_test_method: bool = True
    embedded: ButcherTableau | None = None

    @property
    def adaptive(self) -> bool:
        return self.tableau is None


#: Every registered method by name, in registration order. Add to it with
#: :func:`register_method` only: the pairings below are rebuilt on registration.
METHODS: dict[str, Method] = {}
#: Names of the registered fixed-step and adaptive methods, in registration order.
#: Rebound on registration: read them as ``solvers.FIXED_METHODS`` (or call
#: :func:`fixed_methods`) rather than keeping a copy imported earlier.
FIXED_METHODS: tuple[str, ...] = ()
ADAPTIVE_METHODS: tuple[str, ...] = ()
# The pairings as dicts, for code written before the functions below: derived from
# METHODS and updated in place on registration, so imported references stay current.
#: :func:`default_test_method` per method.
DEFAULT_TEST_METHOD: dict[str, str] = {}
#: ``Method.tolerance_divisor`` per adaptive method.
TOLERANCE_DIVISOR: dict[str, float] = {}
#: :func:`test_methods` per method (re-exported by :mod:`tune_node.evaluation`).
TEST_METHODS: dict[str, tuple[str, ...]] = {}
#: :func:`adaptation_test_methods` per step-adaptable (fixed-step) method and per
#: adaptive method (re-exported by :mod:`tune_node.adaptation`).
STEP_TEST_METHODS: dict[str, tuple[str, ...]] = {}
TOLERANCE_TEST_METHODS: dict[str, tuple[str, ...]] = {}
#: Step-size rule of the fixed-step test solver (see :func:`test_solver_for`).
ERROR_FACTOR = 50.0

_NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _check_method(method: Method) -> None:
    """ValueError naming the first field of ``method`` that is invalid or inconsistent."""
    if not isinstance(method, Method):
        raise ValueError(f"a Method is needed, got {type(method).__name__} {method!r}")
    name = method.name
    if not (isinstance(name, str) and _NAME_PATTERN.fullmatch(name)):
        raise ValueError(f"method name {name!r} is not allowed; allowed: a letter, then letters, digits or '_'")
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered; registered: {', '.join(METHODS)}")
    if not (isinstance(method.paper_name, str) and method.paper_name):
        raise ValueError(f"method {name}: paper_name must be a non-empty string, got {method.paper_name!r}")
    if not (_is_integer(method.order) and method.order >= 1):
        raise ValueError(f"method {name}: order must be an integer >= 1, got {method.order!r}")
    if not (isinstance(method.torchdiffeq_name, str) and method.torchdiffeq_name):
        raise ValueError(f"method {name}: torchdiffeq_name must be a non-empty string, got {method.torchdiffeq_name!r}")
    if not isinstance(method.as_test_method, bool):
        raise ValueError(f"method {name}: as_test_method must be True or False, got {method.as_test_method!r}")
    t = method.tableau
    if t is not None and not isinstance(t, ButcherTableau):
        raise ValueError(f"method {name}: tableau must be a ButcherTableau (fixed-step) or None (adaptive), got {t!r}")
    if t is not None:
        if t.order != method.order:
            raise ValueError(f"method {name}: order is {method.order!r} but its tableau's order is {t.order}; allowed: equal orders")
        if method.stages_per_step != t.stages:
            raise ValueError(f"method {name}: stages_per_step is {method.stages_per_step!r} but its tableau has "
                             f"{t.stages} stages; allowed: {t.stages}")
        if method.startup_nfe != 0:
            # rk_solve spends nothing before the first step; the NFE accounting relies on it.
            raise ValueError(f"method {name} is fixed-step: startup_nfe must be 0, got {method.startup_nfe!r}")
        if method.tolerance_divisor is not None:
            raise ValueError(f"method {name} is fixed-step: tolerance_divisor is for adaptive methods only "
                             f"(tableau=None), got {method.tolerance_divisor!r}; allowed: None")
        if method.embedded is not None:
            raise ValueError(f"method {name} is fixed-step: embedded is for adaptive methods only (tableau=None); allowed: None")
        return
    if not (_is_integer(method.stages_per_step) and method.stages_per_step >= 1):
        raise ValueError(f"method {name} is adaptive: stages_per_step must be an integer >= 1, got {method.stages_per_step!r}")
    if not (_is_integer(method.startup_nfe) and method.startup_nfe >= 0):
        raise ValueError(f"method {name} is adaptive: startup_nfe must be an integer >= 0, got {method.startup_nfe!r}")
    d = method.tolerance_divisor
    if not (_is_real(d) and math.isfinite(d) and d > 1):
        # > 1: the most accurate adaptive method is tested by itself at tol / divisor.
        raise ValueError(f"method {name} is adaptive: tolerance_divisor must be a finite number > 1, got {d!r}")
    e = method.embedded
    if e is not None:
        if not (isinstance(e, ButcherTableau) and e.embedded and e.c[-1] == 1):
            raise ValueError(f"method {name}: embedded must be a ButcherTableau with b_error whose last stage is at c = 1, got {e!r}")
        if e.order != method.order or e.stages - 1 != method.stages_per_step:
            raise ValueError(f"method {name}: its embedded tableau (order {e.order}, {e.stages} stages) must have the method's "
                             f"order {method.order!r} and stages_per_step + 1 = {method.stages_per_step + 1} stages")


def _check_torchdiffeq_name(method: Method) -> None:
    try:
        from torchdiffeq._impl.odeint import SOLVERS
    except ImportError:  # another torchdiffeq layout: leave the check to the first solve
        return
    if method.torchdiffeq_name not in SOLVERS:
        raise ValueError(f"method {method.name}: torchdiffeq_name {method.torchdiffeq_name!r} is not a torchdiffeq "
                         f"method; allowed: {', '.join(SOLVERS)}")


def register_method(method: Method, *, check_torchdiffeq: bool = True) -> Method:
    """Add ``method`` to :data:`METHODS`, after the methods registered before it.

    Arguments:
        method: the method; its name must be new.
        check_torchdiffeq: also check that torchdiffeq has ``method.torchdiffeq_name``
            (imports torchdiffeq; the built-in methods skip it, which keeps this module
            free of torch, and their names are checked by the tests).

    Returns ``method``. Raises ValueError naming the bad value and what is allowed: a
    duplicate name, or fields that disagree (a tableau whose order or stage count is
    not the method's, a tolerance divisor on a fixed-step method, ...). Afterwards
    :data:`FIXED_METHODS`, :data:`ADAPTIVE_METHODS` and the pairing dicts include it;
    the pairings of methods registered earlier may gain it as a test method (unless
    ``method.as_test_method`` is False).
    """
    _check_method(method)
    if check_torchdiffeq:
        _check_torchdiffeq_name(method)
    METHODS[method.name] = method
    _rebuild_pairings()
    return method


def fixed_methods() -> tuple[str, ...]:
    """Names of the registered fixed-step methods, in registration order."""
    return tuple(n for n, m in METHODS.items() if not m.adaptive)


def adaptive_methods() -> tuple[str, ...]:
    """Names of the registered adaptive methods, in registration order."""
    return tuple(n for n, m in METHODS.items() if m.adaptive)


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError naming the allowed ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown solver method {name!r}; allowed: {', '.join(METHODS)}") from None


def _more_accurate(method: Method) -> tuple[str, ...]:
    # The candidates a train method is tested with: same kind, higher order, offered as test methods.
    return tuple(n for n, m in METHODS.items()
                 if m.adaptive == method.adaptive and m.order > method.order and m.as_test_method)


def test_methods(name: str) -> tuple[str, ...]:
    """The test methods of the cross-solver matrix of a model trained with ``name``
    (Section 2.4): ``name`` itself, then the registered methods of its kind
    (fixed-step or adaptive) of higher order, in registration order."""
    return (name, *_more_accurate(get_method(name)))


def default_test_method(name: str) -> str:
    """The test method :func:`test_solver_for` and the adaptations use by default: the
    first registered method of ``name``'s kind among those of the lowest order above
    ``name``'s own; ``name`` itself when there is none (rk4, dopri5)."""
    candidates = _more_accurate(get_method(name))
    if not candidates:
        return name
    lowest = min(METHODS[n].order for n in candidates)
    return next(n for n in candidates if METHODS[n].order == lowest)


def adaptation_test_methods(name: str) -> tuple[str, ...]:
    """The test methods step or tolerance adaptation may check ``name`` with (Appendix C).

    Fixed-step: the fixed-step methods of higher order, in registration order; empty
    when there is none, and then ``name`` cannot be step-adapted. Adaptive: the
    adaptive methods of higher order, or ``(name,)`` when there is none (tested at
    ``tol / tolerance_divisor``). :func:`default_test_method` is always among them.
    """
    method = get_method(name)
    candidates = _more_accurate(method)
    return candidates or ((name,) if method.adaptive else ())


def _rebuild_pairings() -> None:
    global FIXED_METHODS, ADAPTIVE_METHODS
    FIXED_METHODS, ADAPTIVE_METHODS = fixed_methods(), adaptive_methods()
    derived = [
        (DEFAULT_TEST_METHOD, {n: default_test_method(n) for n in METHODS}),
        (TOLERANCE_DIVISOR, {n: METHODS[n].tolerance_divisor for n in ADAPTIVE_METHODS}),
        (TEST_METHODS, {n: test_methods(n) for n in METHODS}),
        (STEP_TEST_METHODS, {n: adaptation_test_methods(n) for n in FIXED_METHODS if adaptation_test_methods(n)}),
        (TOLERANCE_TEST_METHODS, {n: adaptation_test_methods(n) for n in ADAPTIVE_METHODS}),
    ]
    for target, values in derived:
        target.clear()
        target.update(values)


def _is_real(value) -> bool:
    # bool is an Integral (True == 1), but a flag given where a number belongs is a mistake.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# The paper's methods. Registration order decides ties between test methods of equal
# order, so methods added later go after these.
EULER = Method("euler", "Euler", 1, ButcherTableau(a=((),), b=(1.0,), c=(0.0,), order=1), "euler", 1)
MIDPOINT = Method(
    "midpoint",
    "Midpoint",
    2,
    ButcherTableau(a=((), _f("1/2")), b=(0.0, 1.0), c=_f(0, "1/2"), order=2),
    "midpoint",
    2,
)
# torchdiffeq's (and so the paper's) "rk4" is Kutta's 3/8 rule, not the classic RK4.
RK4 = Method(
    "rk4",
    "RK4",
    4,
    ButcherTableau(
        a=((), _f("1/3"), _f("-1/3", 1), _f(1, -1, 1)),
        b=_f("1/8", "3/8", "3/8", "1/8"),
        c=_f(0, "1/3", "2/3", 1),
        order=4,
    ),
    "rk4",
    4,
)
# Adaptive: embedded pairs integrated by torchdiffeq. Both are FSAL; torchdiffeq spends
# two evaluations per solve on f(t0, y0) and its initial step selection. Their tableaus
# are torchdiffeq's: it propagates the higher-order solution b (local extrapolation).
# Fehlberg 2(1): b is second order, the last stage is evaluated at the first-order
# solution (a's last row), and that evaluation starts the next step, as in torchdiffeq.
FEHLBERG21_TABLEAU = ButcherTableau(
    a=((), _f("1/2"), _f("1/256", "255/256")),
    b=_f("1/512", "255/256", "1/512"),
    c=_f(0, "1/2", 1),
    order=2,
    b_error=_f("-1/512", 0, "1/512"),
    b_mid=_f(0, "1/2", 0),
)
# Dormand-Prince 5(4): the seventh stage is at the fifth-order solution (exact FSAL).
_DOPRI_B = ("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0)
# torchdiffeq's embedded fourth-order weights (not Dormand and Prince's 5179/57600, ...).
_DOPRI_B_HAT = ("1951/21600", 0, "22642/50085", "451/720", "-12231/42400", "649/6300", "1/60")
DOPRI54_TABLEAU = ButcherTableau(
    a=(
        (),
        _f("1/5"),
        _f("3/40", "9/40"),
        _f("44/45", "-56/15", "32/9"),
        _f("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        _f("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _f(*_DOPRI_B[:6]),
    ),
    b=_f(*_DOPRI_B),
    c=_f(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    order=5,
    # Each weight rounded, then subtracted, as torchdiffeq computes them: the same bits.
    b_error=tuple(b - bh for b, bh in zip(_f(*_DOPRI_B), _f(*_DOPRI_B_HAT))),
    # Shampine's dense-output weights (torchdiffeq's DPS_C_MID) halved: y(t + h/2).
    b_mid=tuple(v / 2 for v in _f("6025192743/30085553152", 0, "51252292925/65400821598", "-2691868925/45128329728",
                                   "187940372067/1594534317056", "-1776094331/19743644256", "11237099/235043384")),
)
del _DOPRI_B, _DOPRI_B_HAT
FEHLBERG21 = Method("fehlberg2", "Fehlberg21", 2, None, "fehlberg2", 2, startup_nfe=2, tolerance_divisor=5.0,
                    embedded=FEHLBERG21_TABLEAU)
DOPRI54 = Method("dopri5", "Dopri54", 5, None, "dopri5", 6, startup_nfe=2, tolerance_divisor=10.0, embedded=DOPRI54_TABLEAU)

# Heun's method (explicit trapezoid), not in the paper. as_test_method=False keeps it
# out of the paper methods' test matrices and adaptation pairs (Euler's would gain it),
# so their results stay as they were; it is tested with RK4 like Midpoint.
HEUN = Method(
    "heun",
    "Heun",
    2,
    ButcherTableau(a=((), (1.0,)), b=_f("1/2", "1/2"), c=(0.0, 1.0), order=2),
    "heun2",
    2,
    as_test_method=False,
)

for _method in (EULER, MIDPOINT, RK4, FEHLBERG21, DOPRI54, HEUN):
    register_method(_method, check_torchdiffeq=False)
del _method


@dataclass(frozen=True)
class SolverSetting:
    """How to integrate: a method and its accuracy parameter, and how to differentiate.

    Arguments:
        method: a name from :data:`METHODS`.
        steps: number of equal steps over ``[0, T]`` (fixed-step methods only), an
            integer in ``1..MAX_FIXED_STEPS`` (numpy integers and integral floats are
            stored as ``int``).
        tol: ``rtol = atol`` (adaptive methods only), a finite real number > 0.
        gradient: ``"backprop"`` (through the solver's operations) or ``"adjoint"``.
        T: final time, a finite real number > 0; the paper uses 1.
        max_steps: keyword only, adaptive methods only: the most step attempts
            (accepted or rejected) one solve may make, an integer >= 1; None means
            :data:`DEFAULT_MAX_ADAPTIVE_STEPS`. The adjoint's backward solve gets
            the same cap.

    Guarantees: a constructed setting is valid; bad values raise ValueError naming
    the value and what is allowed. Booleans are refused wherever a number belongs.
    """

    method: str
    steps: int | None = None
    tol: float | None = None
    gradient: str = "backprop"
    T: float = field(default=1.0)
    max_steps: int | None = field(default=None, kw_only=True)

    def __post_init__(self):
        m = get_method(self.method)
        if self.gradient not in GRADIENT_MODES:
            raise ValueError(f"unknown gradient mode {self.gradient!r}; allowed: {', '.join(GRADIENT_MODES)}")
        if not (_is_real(self.T) and math.isfinite(self.T) and self.T > 0):
            raise ValueError(f"final time T must be a finite number > 0, got {self.T!r}")
        if m.adaptive:
            if self.steps is not None:
                raise ValueError(f"{self.method} is adaptive: give tol, not steps (got steps={self.steps!r})")
            if not (_is_real(self.tol) and math.isfinite(self.tol) and self.tol > 0):
                raise ValueError(f"{self.method} needs a tolerance tol > 0, got tol={self.tol!r}; allowed: a finite real number > 0")
            object.__setattr__(self, "tol", float(self.tol))
            if self.max_steps is not None:
                if not (_is_integer(self.max_steps) and 1 <= self.max_steps <= _LARGEST_MAX_STEPS):
                    raise ValueError(f"{self.method} needs max_steps to be an integer in 1..{_LARGEST_MAX_STEPS} "
                                     f"(or None: {DEFAULT_MAX_ADAPTIVE_STEPS}), got max_steps={self.max_steps!r}")
                object.__setattr__(self, "max_steps", int(self.max_steps))
        else:
            if self.tol is not None:
                raise ValueError(f"{self.method} is fixed-step: give steps, not tol (got tol={self.tol!r})")
            if self.max_steps is not None:
                raise ValueError(f"{self.method} is fixed-step: max_steps is for adaptive methods only "
                                 f"({', '.join(ADAPTIVE_METHODS)}), got max_steps={self.max_steps!r}")
            if isinstance(self.steps, float) and self.steps.is_integer():
                object.__setattr__(self, "steps", int(self.steps))
            if not _is_integer(self.steps) or self.steps < 1:
                raise ValueError(f"{self.method} needs an integer number of steps >= 1, got steps={self.steps!r}")
            if self.steps > MAX_FIXED_STEPS:
                raise ValueError(f"{self.method} needs steps <= MAX_FIXED_STEPS = {MAX_FIXED_STEPS}, got steps={self.steps!r}")
            object.__setattr__(self, "steps", int(self.steps))

    @property
    def max_adaptive_steps(self) -> int | None:
        """The step-attempt cap an adaptive solve runs under (``max_steps`` or the
        default); None for fixed-step settings."""
        if not self.is_adaptive:
            return None
        return DEFAULT_MAX_ADAPTIVE_STEPS if self.max_steps is None else self.max_steps

    @classmethod
    def fixed(cls, method: str, steps: int, gradient: str = "backprop", T: float = 1.0) -> "SolverSetting":
        return cls(method=method, steps=steps, gradient=gradient, T=T)

    @classmethod
    def adaptive(cls, method: str, tol: float, gradient: str = "backprop", T: float = 1.0) -> "SolverSetting":
        return cls(method=method, tol=tol, gradient=gradient, T=T)

    @classmethod
    def from_step_size(cls, method: str, h: float, gradient: str = "backprop", T: float = 1.0) -> "SolverSetting":
        """The fixed-step setting with the fewest steps whose step size is <= ``h``."""
        if not h > 0:
            raise ValueError(f"step size must be > 0, got {h!r}")
        return cls.fixed(method, max(1, math.ceil(T / h - 1e-9)), gradient, T)

    @property
    def spec(self) -> Method:
        return METHODS[self.method]

    @property
    def is_adaptive(self) -> bool:
        return self.spec.adaptive

    @property
    def step_size(self) -> float | None:
        """``h = T / steps`` for fixed-step settings, None for adaptive ones."""
        return None if self.steps is None else self.T / self.steps

    @property
    def accuracy_parameter(self) -> float:
        """The paper's epsilon: the step size h (fixed) or the tolerance (adaptive)."""
        return self.tol if self.is_adaptive else self.step_size

    def with_(self, **changes) -> "SolverSetting":
        return replace(self, **changes)

    def label(self) -> str:
        p = f"tol={self.tol:g}" if self.is_adaptive else f"steps={self.steps}"
        g = "" if self.gradient == "backprop" else f", {self.gradient}"
        return f"{self.spec.paper_name}({p}{g})"

    def to_dict(self) -> dict:
        """A plain dict that :meth:`from_dict` reads back. ``max_steps`` is present only
        when set, so settings without it give the same dict (and checkpoints, trial
        configs and result tables the same bits) as before it existed."""
        d = {"method": self.method, "steps": self.steps, "tol": self.tol, "gradient": self.gradient, "T": self.T}
        if self.max_steps is not None:
            d["max_steps"] = self.max_steps
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SolverSetting":
        """The setting of a :meth:`to_dict` dict; only ``method`` is required.

        Raises ValueError naming a missing ``method`` or unknown keys, and the allowed keys.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a solver setting dict is needed, got {type(d).__name__} {d!r}")
        allowed = ("method", "steps", "tol", "gradient", "T", "max_steps")
        unknown = sorted(set(d) - set(allowed), key=str)
        if unknown:
            raise ValueError(f"unknown solver setting key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
        if "method" not in d:
            raise ValueError(f"solver setting {d!r} lacks the required key 'method'; allowed keys: {', '.join(allowed)}")
        return cls(method=d["method"], steps=d.get("steps"), tol=d.get("tol"), gradient=d.get("gradient", "backprop"),
                   T=d.get("T", 1.0), max_steps=d.get("max_steps"))


def test_solver_for(train: SolverSetting, test_method: str | None = None, error_factor: float = ERROR_FACTOR) -> SolverSetting:
    """The setting of a test solver more accurate than ``train`` (paper, Appendix C).

    Fixed step: the test solver's global error order ``h_test ** p_test`` is
    ``error_factor`` (50) times smaller than the train solver's ``h ** p_train``,
    i.e. ``h_test = (h ** p_train / 50) ** (1 / p_test)``, never coarser than
    ``h``; the number of test steps is rounded up. Adaptive: Dopri54 at
    ``tol / 5`` (Fehlberg21 trains) or ``tol / 10`` (Dopri54 trains).

    ``test_method`` defaults to :func:`default_test_method` (Euler -> Midpoint,
    Midpoint -> RK4, RK4 -> RK4, adaptive -> Dopri54); the tolerance divisor is the
    train method's ``tolerance_divisor``.
    """
    test_method = test_method or default_test_method(train.method)
    tm = get_method(test_method)
    if train.is_adaptive:
        if not tm.adaptive:
            raise ValueError(f"test method for adaptive {train.method} must be adaptive, got {test_method!r}")
        return SolverSetting.adaptive(test_method, train.tol / train.spec.tolerance_divisor, train.gradient, train.T)
    if tm.adaptive:
        raise ValueError(f"test method for fixed-step {train.method} must be fixed-step, got {test_method!r}")
    if tm.order < train.spec.order:
        raise ValueError(f"test method {test_method} (order {tm.order}) is less accurate than {train.method} (order {train.spec.order})")
    h = train.step_size
    # Work in units of T so that the rule is scale free: error ~ (h/T) ** p.
    rel = h / train.T
    rel_test = min(rel, (rel ** train.spec.order / error_factor) ** (1.0 / tm.order))
    steps = max(train.steps, math.ceil(1.0 / rel_test - 1e-9))
    return SolverSetting.fixed(test_method, steps, train.gradient, train.T)


# Functions named test_*, not pytest tests.
test_solver_for.__test__ = False
test_methods.__test__ = False
