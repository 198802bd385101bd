"""Adaptive embedded Runge-Kutta solves of autonomous fields, with per-seed step control.

:func:`adaptive_solve` integrates ``dz/dt = f(z)`` over ``[0, T]`` with an embedded pair
(a :class:`~tune_node.ode.solvers.ButcherTableau` with ``b_error`` and ``b_mid``, e.g.
``METHODS["dopri5"].embedded``) and a step-size controller kept apart from the stepping
(:class:`StepController`; :class:`IController` is torchdiffeq's). It is torchdiffeq's
adaptive Runge-Kutta solve (``rk_common.py``) for one output time ``T``:

- the first step from Hairer, Norsett and Wanner's rule (two evaluations: ``f(z0)`` and
  one trial Euler step), the RMS error norm with ``atol + rtol * max(|y0|, |y1|)``, the
  elementary ("I") controller with safety 0.9, growth at most 10, shrink at least 0.2
  after a rejection, exponent ``1 / order``, acceptance when the error ratio is <= 1;
- the last stage's evaluation starts the next step (FSAL), so an attempt costs
  ``stages - 1`` evaluations; steps are not shortened to end at ``T``: the last one
  passes it and ``z(T)`` is its 4th-order interpolant, as torchdiffeq returns it;
- gradients (backprop through the accepted steps) follow torchdiffeq's graph, which
  includes the first step size's dependence on ``z0`` and the field (later step sizes
  are constants to autograd, as there).

What differs is rounding only: the stage sums are matrix products here (torchdiffeq
sums stage by stage), and the controller's arithmetic runs on Python floats (the same
IEEE operations as torchdiffeq's float64 scalars, except that ``pow`` may differ in the
last bit). Tests compare accepted step times, NFE and solutions with torchdiffeq's.

With ``seeded=True`` the leading dimension of ``z0`` indexes independent problems (the
seeds of a stacked model, ``f`` acting on each slice separately): each keeps its own
step size, acceptance, NFE and end, as separate solves would (the norm is taken per
seed). A seed that has reached ``T`` rides along with step size 0, which leaves its
state unchanged bit for bit, and its evaluations are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .solvers import ButcherTableau, SolverSetting

__all__ = ["StepController", "IController", "AdaptiveSolution", "AdaptiveStepLimitError", "AdaptiveUnderflowError",
           "adaptive_solve", "solve_setting", "integrate_adaptive"]

Norm = Callable[[torch.Tensor], torch.Tensor]


class AdaptiveStepLimitError(RuntimeError):
    """A seed's solve needed more step attempts than ``max_steps``; ``seed`` and ``nfe`` are kept."""

    def __init__(self, seed: int, max_steps: int, nfe: int):
        self.seed, self.max_steps, self.nfe = seed, max_steps, nfe
        super().__init__(f"seed {seed}: more than max_steps={max_steps} step attempts before T (NFE reached: {nfe})")


class AdaptiveUnderflowError(RuntimeError):
    """A seed's step size no longer advances its time (or is not finite); ``seed`` and ``nfe`` are kept."""

    def __init__(self, seed: int, t: float, h: float, nfe: int):
        self.seed, self.nfe = seed, nfe
        super().__init__(f"seed {seed}: step size underflow at t={t!r} (h={h!r}, NFE reached: {nfe}): the tolerance is too small "
                         f"for the float precision, or the solution diverged")


class StepController(Protocol):
    """How an adaptive solve chooses its steps; the stepping itself knows nothing of it.

    ``norm`` maps a state-shaped tensor to one value per seed (a 0-dim tensor unseeded).
    """

    order: int

    def initial_step(self, f: Callable[[torch.Tensor], torch.Tensor], y0: torch.Tensor, f0: torch.Tensor,
                     norm: Norm) -> torch.Tensor:
        """The first step size per seed (float64), evaluating ``f`` exactly once; may carry gradients."""

    def error_ratio(self, error: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor, norm: Norm) -> torch.Tensor:
        """Per seed: the step's error estimate measured against the tolerance (<= 1 passes)."""

    def decide(self, h: float, ratio: float) -> tuple[bool, float]:
        """Whether a step of size ``h`` with error ratio ``ratio`` is accepted, and the next step size."""


@dataclass(frozen=True)
class IController:
    """torchdiffeq's step control (``_select_initial_step``, ``_compute_error_ratio``,
    ``_optimal_step_size`` with its default safety 0.9, ifactor 10, dfactor 0.2).

    Arguments:
        rtol, atol: relative and absolute tolerance (the project uses ``rtol = atol = tol``).
        order: the method's order; the step-size exponent is ``1 / order``, as torchdiffeq's.
        safety, ifactor, dfactor: the next step is ``h * min(ifactor, max(safety / ratio**(1/order), d))``
            with ``d = dfactor`` after a rejection and 1 after an acceptance (an accepted
            step never shrinks the next one).
    """

    rtol: float
    atol: float
    order: int
    safety: float = 0.9
    ifactor: float = 10.0
    dfactor: float = 0.2

    def initial_step(self, f, y0, f0, norm):
        scale = self.atol + y0.abs() * self.rtol
        d0, d1 = norm(y0 / scale), norm(f0 / scale)
        tiny = (d0 < 1e-5) | (d1 < 1e-5)
        # Safe denominators in the branches torch.where drops: their gradients are zeros,
        # and a zero times an infinite derivative would be NaN.
        h0 = torch.where(tiny, torch.full_like(d0, 1e-6), 0.01 * d0 / torch.where(tiny, torch.ones_like(d1), d1)).abs()
        y1 = y0 + _per_seed(h0, y0) * f0
        f1 = f(y1)
        d2 = (norm((f1 - f0) / scale) / h0).abs()
        flat = (d1 <= 1e-15) & (d2 <= 1e-15)
        largest = torch.where(flat, torch.ones_like(d1), torch.maximum(d1, d2))
        h1 = torch.where(flat, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / largest) ** (1.0 / float(self.order))).abs()
        return torch.minimum(100 * h0, h1).to(torch.promote_types(torch.float64, y0.dtype))

    def error_ratio(self, error, y0, y1, norm):
        return norm(error / (self.atol + self.rtol * torch.maximum(y0.abs(), y1.abs()))).abs()

    def decide(self, h, ratio):
        if not ratio == ratio:  # NaN: torchdiffeq's step size becomes NaN, then underflows
            return False, math.nan
        accept = ratio <= 1
        if ratio == 0:
            return accept, h * self.ifactor
        shrink = 1.0 if ratio < 1 else self.dfactor
        return accept, h * min(self.ifactor, max(self.safety / ratio ** (1.0 / self.order), shrink))


@dataclass
class AdaptiveSolution:
    """The result of :func:`adaptive_solve`.

    Attributes:
        z: the state at ``T``, shaped like ``z0``.
        nfe: forward evaluations per seed (one entry unseeded): ``2 + attempts * (stages - 1)``;
            with backprop the backward pass differentiates each once.
        accepted: per seed, the end times of its accepted steps (the last one >= the end time).
        attempts: per seed, the step attempts (accepted and rejected).
    """

    z: torch.Tensor
    nfe: list[int]
    accepted: list[list[float]]
    attempts: list[int]

    @property
    def rejected(self) -> list[int]:
        return [a - len(acc) for a, acc in zip(self.attempts, self.accepted)]


def _per_seed(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (one per seed, or 0-dim) shaped to broadcast against ``like``; numbers cast to its dtype."""
    values = values if values.dtype == torch.bool else values.to(like.dtype)
    return values if values.dim() == 0 else values.view(-1, *([1] * (like.dim() - 1)))


def _rms_norm(seeded: bool) -> Norm:
    if not seeded:
        return lambda x: x.abs().pow(2).mean().sqrt()  # torchdiffeq's _rms_norm
    return lambda x: x.abs().pow(2).flatten(1).mean(1).sqrt()


def adaptive_solve(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, tableau: ButcherTableau, T: float,
                   controller: StepController, *, seeded: bool = False, max_steps: int | None = None,
                   norm: Norm | None = None, t_start: float = 0.0) -> AdaptiveSolution:
    """``z(T)`` of ``dz/dt = f(z)``, ``z(0) = z0``, with adaptive steps of an embedded pair.

    Arguments:
        f: the autonomous field on states shaped like ``z0``; with ``seeded`` it must act on
            each leading slice on its own (the seeds of a stacked model).
        z0: the initial state.
        tableau: an embedded pair: ``b_error`` and ``b_mid`` set, last stage at ``c = 1``
            (its evaluation is the next step's first, torchdiffeq's convention).
        T: the length of the interval, > 0 (the end time, starting at 0).
        controller: the step control, e.g. ``IController(tol, tol, order)``.
        seeded: ``z0``'s leading dimension indexes independent solves (own steps, NFE, end).
        max_steps: the most step attempts per seed; the next one raises
            :class:`AdaptiveStepLimitError` (torchdiffeq's ``max_num_steps``). None: no cap.
        norm: the error norm, a state-shaped tensor to one value per seed (0-dim unseeded);
            None: the RMS norm over each seed's state (torchdiffeq's default).
        t_start: the time the solve starts at; it ends at ``t_start + T``. Only rounding
            depends on it (the times a step accumulates, where ``T`` falls in the last step),
            e.g. ``-T`` for torchdiffeq's reversed solves, which run from ``-T`` to 0.

    Guarantees: every seed takes the steps, evaluations and result of a solve of its own
    slice (equal up to rounding; exact counts). Raises :class:`AdaptiveUnderflowError` when a
    step size stops advancing a seed's time or is not finite.
    """
    if not (tableau.embedded and tableau.b_mid is not None and tableau.c[-1] == 1):
        raise ValueError("adaptive_solve needs an embedded tableau with b_error, b_mid and its last stage at c = 1")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T must be a finite number > 0, got {T!r}")
    n = tableau.stages
    seeds = z0.shape[0] if seeded else 1
    norm = _rms_norm(seeded) if norm is None else norm
    t_end = t_start + T
    dtype, device = z0.dtype, z0.device
    # One row per stage input (a's rows, padded), then the solution (unless it is the last
    # stage's input: exact FSAL), the error and the midpoint. Each combination is
    # torchdiffeq's: y + sum(K * (h * row), -1) over the stage outputs stacked last, the
    # same products summed in the same order, so the same bits (the error estimate is a
    # difference of near-equal sums: another order would move it in the 10th digit).
    rows = [list(r) + [0.0] * (n - len(r)) for r in tableau.a[1:]]
    fsal = list(tableau.a[-1]) + [0.0] == list(tableau.b)
    row_b = len(rows) - 1 if fsal else len(rows)
    if not fsal:
        rows.append(list(tableau.b))
    row_err, row_mid = len(rows), len(rows) + 1
    rows += [list(tableau.b_error), list(tableau.b_mid)]
    coefficients = torch.tensor(rows, dtype=dtype, device=device)
    step_shape = (seeds, *([1] * (z0.dim() - 1)), 1, 1) if seeded else ()

    def combine(y, weights, ks):
        products = torch.stack(ks, -1) * weights
        return products.sum(-1) if y is None else y + products.sum(-1)

    f0 = f(z0)
    h_first = controller.initial_step(f, z0, f0, norm).reshape(seeds)
    steps_h = h_first.detach().tolist()
    nfe = [2] * seeds
    times, starts = [t_start] * seeds, [t_start] * seeds
    accepted: list[list[float]] = [[] for _ in range(seeds)]
    attempts = [0] * seeds
    # Whether a seed's time carries the first step's gradient (its first attempt was accepted).
    timed_by_first = [False] * seeds
    done = [False] * seeds
    y, out = z0, None
    first = True
    while not all(done):
        for s in range(seeds):
            if done[s]:
                continue
            if max_steps is not None and attempts[s] >= max_steps:
                raise AdaptiveStepLimitError(s, max_steps, nfe[s])
            if not (math.isfinite(steps_h[s]) and times[s] + steps_h[s] > times[s]):
                raise AdaptiveUnderflowError(s, times[s], steps_h[s], nfe[s])
        # The first attempt's step sizes carry gradients (torchdiffeq's first step is a
        # function of f(z0)); later ones are constants, as torchdiffeq's no_grad control makes them.
        h_t = h_first if first else torch.tensor([0.0 if d else v for d, v in zip(done, steps_h)], dtype=torch.float64, device=device)
        weights = h_t.to(dtype).view(step_shape) * coefficients
        ks = [f0]
        for i in range(1, n):
            zi = combine(y, weights[..., i - 1, :i], ks)
            ks.append(f(zi))
        y1 = zi if fsal else combine(y, weights[..., row_b, :], ks)
        with torch.no_grad():
            error = combine(None, weights[..., row_err, :].detach(), [k.detach() for k in ks])
            ratios = controller.error_ratio(error, y.detach(), y1.detach(), norm).reshape(seeds).tolist()
        accept = [True] * seeds  # a finished seed's zero step leaves it as it is
        finishing = [False] * seeds
        offset = [timed_by_first[s] for s in range(seeds)]
        for s in range(seeds):
            if done[s]:
                continue
            attempts[s] += 1
            nfe[s] += n - 1
            ok, h_next = controller.decide(steps_h[s], ratios[s])
            accept[s] = ok
            if ok:
                timed_by_first[s] = timed_by_first[s] or first
                starts[s], times[s] = times[s], times[s] + steps_h[s]
                accepted[s].append(times[s])
                finishing[s] = times[s] >= t_end
            steps_h[s] = h_next
        if any(finishing):
            total = _interpolate_at(t_end, y, y1, combine(y, weights[..., row_mid, :], ks), ks[0], ks[-1], h_t, h_first,
                                    [starts[s] if finishing[s] else t_end for s in range(seeds)], finishing, offset, seeded)
            if out is None or not seeded:
                out = total
            else:
                out = torch.where(_per_seed(torch.tensor(finishing, device=device), y), total, out)
            done = [d or e for d, e in zip(done, finishing)]
        if all(accept):
            y, f0 = y1, ks[-1]
        elif any(a and not d for a, d in zip(accept, done)):
            mask = _per_seed(torch.tensor(accept, device=device), y)
            y, f0 = torch.where(mask, y1, y), torch.where(mask, ks[-1], f0)
        first = False
    return AdaptiveSolution(out, nfe, accepted, attempts)


def _interpolate_at(T, y0, y1, y_mid, f0, f1, h_t, h_first, t_starts, finishing, offset, seeded):
    """torchdiffeq's 4th-order interpolant of a step (``_interp_fit``, ``_interp_evaluate``) at ``T``,
    per seed; seeds not ``finishing`` get finite values to be discarded (start ``T``, step 1)."""
    device = y0.device
    start = torch.tensor(t_starts, dtype=torch.float64, device=device)
    if any(offset):
        # Zero in value; gives the start the first step's gradient, as torchdiffeq's times have it.
        shift = h_first - h_first.detach()
        start = start + torch.where(torch.tensor(offset, device=device), shift, torch.zeros_like(shift))
    finish_mask = torch.tensor(finishing, device=device)
    step = torch.where(finish_mask, h_t, torch.ones_like(h_t)) if not all(finishing) else h_t
    end = start + step
    x = (T - start) / (end - start)
    if not seeded:
        x, h_t = x.reshape(()), h_t.reshape(())
    x, dt = _per_seed(x, y0), _per_seed(h_t, y0)
    a = 2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid
    b = dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid
    c = dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid
    d = dt * f0
    total = y0 + x * d
    power = x
    for coefficient in (c, b, a):
        power = power * x
        total = total + power * coefficient
    return total


def solve_setting(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, setting: SolverSetting, *,
                  seeded: bool = False) -> AdaptiveSolution:
    """:func:`adaptive_solve` of an adaptive ``setting`` (its method's embedded tableau,
    ``rtol = atol = setting.tol``, ``setting.T``, the cap ``setting.max_adaptive_steps``):
    the solve :func:`~tune_node.ode.integrate.integrate` runs through torchdiffeq, with
    the same steps and NFE. Backprop only (ValueError for the adjoint or a method
    without an embedded tableau)."""
    spec = setting.spec
    if not setting.is_adaptive or spec.embedded is None:
        raise ValueError(f"{setting.method} has no embedded tableau; allowed: adaptive methods with one")
    if setting.gradient != "backprop":
        raise ValueError(f"adaptive_solve backpropagates through its steps; gradient {setting.gradient!r} is not supported")
    controller = IController(rtol=setting.tol, atol=setting.tol, order=spec.order)
    return adaptive_solve(f, z0, spec.embedded, float(setting.T), controller, seeded=seeded, max_steps=setting.max_adaptive_steps)


def integrate_adaptive(vector_field, z0: torch.Tensor, setting: SolverSetting, *, seeded: bool = False,
                       fused: bool = True) -> AdaptiveSolution:
    """The adaptive backprop solve :func:`~tune_node.ode.integrate.integrate` runs for fields with a
    fast form (unless ``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq``); it takes any autonomous field: the
    field in its fast form where it has one (the dense sphere field, as ``integrate`` prepares it),
    solved by :func:`solve_setting`; ``z`` comes back in ``z0``'s shape. Same steps, NFE and
    (forward) values as ``integrate``'s torchdiffeq solve.

    Arguments:
        vector_field: an autonomous field ``vector_field(z)``; with ``seeded`` one acting on
            stacked seeds (e.g. a :class:`~tune_node.fast.dense.StackedSphereClassifier`'s ``field``).
        z0, setting, seeded: as :func:`solve_setting`.
        fused: where the field has the dense form (one sphere field, or a stacked one with
            ``seeded``), solve with :func:`~tune_node.fast.adaptive_solve.dense_adaptive_solve`
            (one autograd node, hand-written backward: the same steps, NFE and ``z``, gradients
            equal up to rounding); False keeps this module's eager solve, the reference.
    """
    from .integrate import _preparer, takes_time

    if takes_time(vector_field):
        raise ValueError("integrate_adaptive integrates autonomous fields f(z) only")
    if fused:
        from ..fast.adaptive_solve import fused_adaptive_solve

        sol = fused_adaptive_solve(vector_field, z0, setting, seeded=seeded)
        if sol is not None:
            return sol
    prepare = _preparer(vector_field)
    prepared = prepare(z0) if prepare is not None else None
    if prepared is None:
        return solve_setting(vector_field, z0, setting, seeded=seeded)
    sol = solve_setting(prepared.f, prepared.encode(z0), setting, seeded=seeded)
    sol.z = prepared.decode(sol.z)
    return sol
