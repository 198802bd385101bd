"""Adaptive Runge-Kutta through the dense sphere field, with a hand-written backward pass.

:func:`dense_adaptive_solve` is :func:`~tune_node.ode.adaptive.adaptive_solve` with
:class:`~tune_node.ode.adaptive.IController` on the dense field
``f(z) = relu(relu(z W1 + c1) W2 + c2) W3 + c3`` (:mod:`tune_node.fast.dense`; one model, or
``S`` stacked seeds with per-seed step control), made fast the way
:func:`~tune_node.fast.dense_solve.dense_rk_solve` makes fixed steps fast:

- the whole solve, first step size included, runs without autograd and is one autograd
  node (through :func:`fused_adaptive_solve`, with the dense matrices' build from the conv
  weights inside it and its scatter-add backward by hand); the attempts write their stage
  inputs, hidden layers and stage outputs into buffers kept between solves, and an attempt
  that every seed rejects leaves its buffers to the next one, so only accepted steps are kept;
- the backward pass walks the kept attempts in reverse with per-seed step sizes as
  tensors (a seed's terms masked where it rejected or had finished), through the FSAL
  stage, the last step's interpolant to ``T`` (whose position in the step depends on
  the first step size when that step was accepted) and the first step size's rule;
- both hidden layers are kept (writing the first into a per-stage buffer costs nothing; recomputing
  it in the backward pass cost a product and a ReLU per evaluation);
- the per-attempt loops run in C++ (:mod:`tune_node.fast.adaptive_native`, the same ATen
  calls in the same order as :class:`PythonAttemptLoops`, so the same bits) where a compiler
  is available; with :class:`~tune_node.ode.adaptive.IController`'s own ``decide`` and
  ``error_ratio`` the whole solve steps there too (its ``solve_forward``: the controller's
  decisions in the same IEEE operations, one call for the forward pass and one for the
  backward pass), and a group drops its finished seeds from the batch (each seed's bits are
  those of its own solve either way); an overridden ``decide`` steps from Python here. The
  C++ loops run some elementwise chains (the error ratio's scaled squares, the first step
  size's norms and trial state, the interpolant; in the backward pass the output layer's
  product for a narrow state with its ReLU mask and bias sums, the first hidden layer's mask
  and bias sum, each stage's adjoint updates, the first step size's rule's elementwise chains)
  as plain loops making the same IEEE operations in the same order as the ATen calls they
  replace, so the same bits.

A solve whose backward pass never runs leaves its buffers to the garbage collector; the
next solve allocates afresh.

Guarantees: the forward pass makes the eager solve's ATen calls on the same values (one
model: 2-d products, as ``dense_field`` makes them; stacked: batched ones, on the running
seeds' rows), so accepted steps, NFE and ``z(T)`` equal the eager solve's and torchdiffeq's
bit for bit (tests: ``torch.equal``). Gradients are the eager solve's graph (torchdiffeq's, including the
first step size's dependence on ``z0`` and the weights) summed in another order: equal up
to rounding (tests: 1e-10 relative in float64). A seed of a group makes the same backward
calls as a solve of its own, in the same order, so a group's gradients equal separate
solves' bit for bit wherever its forward products do (the Sphere2 sizes, tested).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..ode.adaptive import (
    AdaptiveSolution,
    AdaptiveStepLimitError,
    AdaptiveUnderflowError,
    IController,
    _interpolate_at,
    _rms_norm,
)
from ..ode.integrate import fast_form, takes_time
from ..ode.solvers import ButcherTableau, SolverSetting
from ..train.models import ConvODEField
from . import adaptive_native
from .dense import DENSE_MAX_DIM, _gather_plan, _StackedField, dense_conv_weights, prepare_conv_field

__all__ = ["dense_adaptive_solve", "fused_adaptive_solve", "PythonAttemptLoops", "attempt_loops"]

_threshold_backward_into = torch.ops.aten.threshold_backward.grad_input
# A state this narrow (columns) or narrower takes the output layer's backward product g W3^T as
# elementwise products and additions (the C++ loops' kNarrowWidth: the same choice, the same bits).
_NARROW_WIDTH = 4

# Attempt buffers between solves, keyed by shape, dtype and device: a solve takes what it
# needs in its forward pass and gives all back at the end of its backward pass (fresh
# memory costs a page fault per 4 KiB on first touch, a large share of a small solve).
_free_slots: dict[tuple, list[tuple[torch.Tensor, ...]]] = {}
_MAX_KEYS = 4


def _take_slot(key: tuple, stages: int, lead: tuple, width: int, hidden: int, like: torch.Tensor):
    free = _free_slots.get(key)
    if free:
        return free.pop()
    zs = like.new_empty(stages - 1, *lead, width)  # stage inputs 1..n-1 (stage 0's is the step's start)
    h2s = like.new_empty(stages - 1, *lead, hidden)  # second hidden layer after ReLU
    ks = like.new_empty(*lead, width, stages)  # stage outputs stacked last, as the eager solve stacks them
    y1 = like.new_empty(*lead, width)  # the step's solution (non-FSAL pairs)
    h1s = like.new_empty(stages - 1, *lead, hidden)  # first hidden layer after ReLU
    return zs, h2s, ks, y1, h1s


def _give_back(key: tuple, slots: list) -> None:
    if key not in _free_slots and len(_free_slots) >= _MAX_KEYS:
        _free_slots.pop(next(iter(_free_slots)))
    _free_slots.setdefault(key, []).extend(slots)


class _Plan:
    """A tableau's coefficient rows as the eager solve lays them out, and its FSAL-ness."""

    def __init__(self, tableau: ButcherTableau):
        n = tableau.stages
        rows = [list(r) + [0.0] * (n - len(r)) for r in tableau.a[1:]]
        self.fsal = list(tableau.a[-1]) + [0.0] == list(tableau.b)
        self.row_b = len(rows) - 1 if self.fsal else len(rows)
        if not self.fsal:
            rows.append(list(tableau.b))
        self.row_err, self.row_mid = len(rows), len(rows) + 1
        rows += [list(tableau.b_error), list(tableau.b_mid)]
        self.rows = rows
        self.stages = n
        self._tensors: dict[tuple, torch.Tensor] = {}

    def rows_tensor(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The coefficient rows as a tensor, made once per dtype and device (read only)."""
        key = (dtype, device)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.rows, dtype=dtype, device=device)
        return self._tensors[key]


@functools.lru_cache(maxsize=16)
def _plan_of(tableau: ButcherTableau) -> _Plan:
    return _Plan(tableau)


@dataclass
class _Attempt:
    """What the backward pass needs of one kept attempt (one that a running seed accepted)."""

    y: torch.Tensor  # the state the attempt started from
    slot: tuple  # zs, h2s, ks, y1, h1s buffers
    weights: torch.Tensor  # step size times the coefficient rows, in the state dtype, per seed
    h_t: torch.Tensor  # (S,) float64: the step sizes (0 for finished seeds)
    accepted: list[bool]  # per seed: accepted by a seed still running
    first: bool  # the solve's first attempt (its step sizes are the first step size)
    finishing: list[bool] = field(default_factory=list)  # per seed: this step passed T
    starts: list[float] = field(default_factory=list)  # per seed: the step's start time (T where not finishing)
    offset: list[bool] = field(default_factory=list)  # per seed: its start time carries the first step size
    y1: torch.Tensor | None = None  # the step's solution and midpoint, kept for the interpolant's gradient
    y_mid: torch.Tensor | None = None


class PythonAttemptLoops:
    """The per-attempt loops in Python: the reference for the C++ loops of
    :mod:`tune_node.fast.adaptive_native` (``csrc/adaptive_loops.cpp``, the same ATen calls in
    the same order) and the fallback where those cannot be built.

    ``w`` lists the field's weights for evaluations (``W1, c1, W2, c2, W3, c3``, biases shaped
    for ``addmm`` (one model) or ``baddbmm`` (stacked)); for backward passes it lists
    ``W1, c1 (S, 1, H), W1^T, W2^T, W3^T``, and ``acc`` the gradient accumulators ``gW1, gW2,
    gW3^T``, the biases' per batch row ``gc1, gc2, gc3`` (summed over the rows at the end: one
    addition per evaluation) and the scratch ``hidden, first`` (all ``(S, ., .)``).

    Backward-only arithmetic chosen for the C++ plain loops (gradients agree with the eager
    solve's to rounding either way): a state of at most ``_NARROW_WIDTH`` columns takes the
    output layer's product ``g W3^T`` as elementwise products and additions in column order, the
    stages' adjoints take a product then a sum where ``addcmul_`` (whose kernel may fuse the two)
    ran before, and the first step size's rule sums its three scaled parts left to right.
    """

    @staticmethod
    def field_eval(z, w, h1, h2, stacked):
        """``f(z)`` as ``dense_field`` computes it, its hidden layers written to ``h1`` and ``h2``."""
        mm = torch.baddbmm if stacked else torch.addmm
        torch.relu_(mm(w[1], z, w[0], out=h1))
        torch.relu_(mm(w[3], h1, w[2], out=h2))
        return mm(w[5], h2, w[4])

    @staticmethod
    def attempt_forward(y, f0, h_t, coefficients, w, zs, h1s, h2s, ks, y1_buffer, stacked, fsal, row_b, row_err, atol, rtol, seeded):
        """One attempt's stages into ``zs``, ``h2s``, ``ks``: returns the step's solution, with
        ``atol`` given IController's error ratio (else the error estimate), and the step sizes
        ``h_t`` times the ``coefficients`` rows, per seed (one model: a 0-dim step size)."""
        n = ks.shape[-1]
        weights = (h_t.to(y.dtype).view(-1, 1, 1, 1, 1) if stacked else h_t.to(y.dtype).view(())) * coefficients
        ks[..., 0].copy_(f0)
        for i in range(1, n):
            zi = zs[i - 1]
            # y + sum over stages of k * (h a): the eager solve's products and sum, the same bits.
            torch.add(y, (ks[..., :i] * weights[..., i - 1, :i]).sum(-1), out=zi)
            ks[..., i].copy_(PythonAttemptLoops.field_eval(zi, w, h1s[i - 1], h2s[i - 1], stacked))
        y1 = zs[n - 2] if fsal else torch.add(y, (ks * weights[..., row_b, :]).sum(-1), out=y1_buffer)
        error = (ks * weights[..., row_err, :]).sum(-1)
        if atol is None:
            return [y1, error, weights]
        # IController.error_ratio with the eager solve's norm, call for call.
        x = (error / (atol + rtol * torch.maximum(y.abs(), y1.abs()))).abs().pow(2)
        ratio = x.flatten(1).mean(1).sqrt() if seeded else x.mean().sqrt()
        return [y1, ratio.abs(), weights]

    @staticmethod
    def eval_backward(g, z, h1, h2, w, acc):
        """Accumulates the weight gradients of one evaluation ``k = f(z)`` given ``dL/dk = g`` and
        its hidden layers ``h1``, ``h2`` (after ReLU, kept by the forward pass); returns ``dL/dz``."""
        gW1, gW2, gW3t, gc1, gc2, gc3, hidden, first = acc
        gW3t.baddbmm_(g.transpose(-1, -2), h2)
        gc3.add_(g)
        width = g.shape[-1]
        if width <= _NARROW_WIDTH:
            # g W3^T as elementwise products and additions in column order (the C++ loops' arithmetic).
            gh = torch.mul(g[..., 0:1], w[4][..., 0:1, :], out=hidden)
            for k in range(1, width):
                gh.add_(g[..., k : k + 1] * w[4][..., k : k + 1, :])
        else:
            gh = torch.bmm(g, w[4], out=hidden)
        _threshold_backward_into(gh, h2, 0, grad_input=gh)
        gW2.baddbmm_(h1.transpose(-1, -2), gh)
        gc2.add_(gh)
        gh = torch.bmm(gh, w[3], out=first)
        _threshold_backward_into(gh, h1, 0, grad_input=gh)
        gW1.baddbmm_(z.transpose(-1, -2), gh)
        gc1.add_(gh)
        return torch.bmm(gh, w[2])

    @staticmethod
    def attempt_backward(gy, gf, accepted, weights, zs, h1s, h2s, ks, w, acc, fsal, row_b, row_mid, interp, first, rows64):
        """One kept attempt's backward pass given the adjoints ``gy``, ``gf`` of the state and
        FSAL stage after it (``(S, B, W)``). ``accepted``: per seed, whether it accepted;
        ``weights``, ``zs``, ``h1s``, ``h2s``, ``ks``: the attempt's step sizes times the coefficient
        rows and its buffers (one model's without the seed dimension); ``interp``: the
        interpolant's adjoints of the start state, solution, midpoint, first and last stage
        outputs, or empty. Returns the adjoints of the state and FSAL stage before it and, on
        the ``first`` attempt, dL/dh per seed (float64) through its stage weights ``h * a`` (its
        solution's ``h * b`` for a non-FSAL pair, its midpoint's ``h * b_mid`` if it finished;
        ``rows64``: the coefficient rows), else zeros."""
        seeds, (rows, n) = gy.shape[0], rows64.shape
        if zs.dim() == 3:  # one model's buffers: seeds as a leading 1
            zs, h1s, h2s, ks = zs.unsqueeze(1), h1s.unsqueeze(1), h2s.unsqueeze(1), ks.unsqueeze(0)
        wk = weights.reshape(seeds, rows, n).permute(1, 2, 0).reshape(rows, n, seeds, 1, 1)
        # Every seed accepted (always so for one model): no masks, whose products by 1 and sums
        # with 0 leave the same values.
        all_accepted = all(accepted)
        m = None if all_accepted else torch.tensor(accepted, dtype=torch.long).to(torch.bool).to(gy.device).to(gy.dtype).view(-1, 1, 1)
        g_k = gy.new_zeros(n, *gy.shape)  # adjoints of the stage outputs
        g_y1 = gy.clone() if all_accepted else gy * m
        g_k[n - 1].copy_(gf if all_accepted else gf * m)
        g_y = None
        if interp:
            g_y = interp[0]
            g_y1.add_(interp[1])
            g_k[0].add_(interp[3])
            g_k[n - 1].add_(interp[4])
            g_y.add_(interp[2])
            g_k.addcmul_(interp[2].unsqueeze(0), wk[row_mid])
        if not fsal:
            g_y = g_y1.clone() if g_y is None else g_y.add_(g_y1)
            g_k.addcmul_(g_y1.unsqueeze(0), wk[row_b])
        combos, rows = [], []  # adjoints of the combinations h * row . k, for dL/dh
        for i in range(n - 1, 0, -1):
            g_in = PythonAttemptLoops.eval_backward(g_k[i], zs[i - 1], h1s[i - 1], h2s[i - 1], w, acc)
            if fsal and i == n - 1:
                g_in.add_(g_y1)
            if first:
                combos.append(g_in)
                rows.append(i - 1)
            g_y = g_in.clone() if g_y is None else g_y.add_(g_in)
            # A product, then a sum (not addcmul_, whose kernel may fuse them): the C++ loop's operations.
            g_k[:i].add_(g_in.unsqueeze(0) * wk[i - 1, :i])
        if first:
            if not fsal:
                combos.append(g_y1)
                rows.append(row_b)
            if interp:
                combos.append(interp[2])
                rows.append(row_mid)
            # dL/dh = sum over combinations c, stages j and elements of row_c[j] * combo_c * k_j, as
            # per-element terms (each product, then each sum, in double) summed per seed at the end.
            k = ks.to(torch.float64)
            terms = torch.zeros(k.shape[:3], dtype=torch.float64, device=k.device)
            for combo, row in zip(combos, rows):
                q = torch.zeros_like(terms)
                for j in range(n):
                    q = q + rows64[row, j] * k[..., j]
                terms = terms + combo.to(torch.float64) * q
            g_h = torch.sum(terms, (1, 2))
        else:
            g_h = torch.zeros(gy.shape[0], dtype=torch.float64, device=gy.device)
        if all_accepted:
            return [g_y, g_k[0], g_h]
        keep = 1 - m
        return [g_y.addcmul_(gy, keep), g_k[0].addcmul_(gf, keep), g_h]

    @staticmethod
    def first_step_forward(y0, f0, w, h1_trial, h2_trial, stacked, atol, rtol, order, seeded):
        """IController.initial_step with its trial evaluation through the dense field (its hidden
        layers into ``h1_trial``, ``h2_trial``): the first step size (float64, one per seed), the
        trial evaluation's input and output."""
        trial = {}

        def f(z):
            trial["z"], trial["k"] = z, PythonAttemptLoops.field_eval(z, w, h1_trial, h2_trial, stacked)
            return trial["k"]

        h = IController(rtol, atol, order).initial_step(f, y0, f0, _rms_norm(seeded))
        return [h.reshape(-1), trial["z"], trial["k"]]

    @staticmethod
    def interpolate_at(T, y0, y1, ks, weights, row_mid, h_t, starts, finishing, seeded):
        """The eager solve's interpolant at ``T`` of the ``finishing`` seeds' steps (start times
        without gradients), with the step's midpoint as the eager solve computes it; returns both."""
        y_mid = torch.add(y0, (ks * weights[..., row_mid, :]).sum(-1))
        total = _interpolate_at(T, y0, y1, y_mid, ks[..., 0], ks[..., -1], h_t, None, starts, finishing, [False] * len(finishing), seeded)
        return [total, y_mid]

    @staticmethod
    def interpolant_backward(T, grad_out, y0, y1, ym, ks, h_t, starts, finishing, offset, first):
        """The gradients of the interpolant at ``T`` for the seeds an attempt finishes (all
        ``(S, B, W)``): of its start state, solution, midpoint, first and last stage outputs,
        and of the first step size (float64; through the step size on the ``first`` attempt,
        and through the start time where that carries the first step size). The interpolant
        is linear in the states; its weights, polynomials in where T falls, are taken per
        seed in double precision."""
        seeds = grad_out.shape[0]
        if y0.dim() == 2:  # one model's states: seeds as a leading 1
            y0, y1, ym, ks = y0.unsqueeze(0), y1.unsqueeze(0), ym.unsqueeze(0), ks.unsqueeze(0)
        f0, f1 = ks[..., 0], ks[..., -1]
        h = h_t.to(torch.float64).tolist()
        x, dt, span, weights = [0.0] * seeds, [0.0] * seeds, [0.0] * seeds, [0.0] * (6 * seeds)
        for s in range(seeds):
            if not finishing[s]:
                continue  # its weights stay 0: the interpolant is not its output
            span[s] = (starts[s] + h[s]) - starts[s]
            x[s] = (T - starts[s]) / span[s]
            dt[s] = h[s]
            x1, d = x[s], dt[s]
            x2 = x1 * x1
            x3, x4 = x2 * x1, x2 * x2
            weights[s] = 1 - 11 * x2 + 18 * x3 - 8 * x4
            weights[seeds + s] = -5 * x2 + 14 * x3 - 8 * x4
            weights[2 * seeds + s] = 16 * x2 - 32 * x3 + 16 * x4
            weights[3 * seeds + s] = d * (x1 - 4 * x2 + 5 * x3 - 2 * x4)
            weights[4 * seeds + s] = d * (x2 - 3 * x3 + 2 * x4)
            weights[5 * seeds + s] = 1
        factors = _per_seed_factors(weights, 6, grad_out)
        grads = grad_out.unsqueeze(0) * factors[:5]
        # Per seed, G . v for v = y0, y1, midpoint, f0, f1: dL/dx and dL/ddt are combinations of these.
        G = grad_out * factors[5]
        dots = torch.sum(torch.stack([y0, y1, ym, f0, f1]) * G, (2, 3)).to(torch.float64).cpu().flatten().tolist()
        g_h = [0.0] * seeds
        for s in range(seeds):
            if not finishing[s]:
                continue
            x1, d = x[s], dt[s]
            x2 = x1 * x1
            x3, x4 = x2 * x1, x2 * x2
            Gy0, Gy1, Gym, Gf0, Gf1 = (dots[k * seeds + s] for k in range(5))
            # d/dx of y0 + x d + x^2 c + x^3 b + x^4 a, with a, b, c, d the interpolant's coefficients.
            g_x = (Gy0 * (-22 * x1 + 54 * x2 - 32 * x3) + Gy1 * (-10 * x1 + 42 * x2 - 32 * x3)
                   + Gym * (32 * x1 - 96 * x2 + 64 * x3) + Gf0 * d * (1 - 8 * x1 + 15 * x2 - 8 * x3)
                   + Gf1 * d * (2 * x1 - 9 * x2 + 8 * x3))
            if offset[s]:
                g_h[s] -= g_x / span[s]
            if first:
                g_dt = Gf0 * (x1 - 4 * x2 + 5 * x3 - 2 * x4) + Gf1 * (x2 - 3 * x3 + 2 * x4)
                g_h[s] += g_dt - g_x * (T - starts[s]) / (span[s] * span[s])
        return [*grads.unbind(0), torch.tensor(g_h, dtype=torch.float64).to(grad_out.device)]

    @staticmethod
    def first_step_backward(g_h, g_z0, g_f0, z0, f0, trial_z, trial_h1, trial_h2, f1, h1_first, h2_first, w, acc, atol, rtol, order):
        """Adds the first step size's rule (IController.initial_step) and the first evaluation
        ``f0 = f(z0)`` to ``dL/dz0``, given ``dL/dh`` (float64, per seed) and ``dL/df0`` from the
        steps (``(S, B, W)`` tensors); returns ``dL/dz0``. The rule's scalar chain (norms to
        step size) is differentiated per seed in double precision; only its ends touch the states."""
        seeds = z0.shape[0]
        count = float(z0.shape[1] * z0.shape[2])
        p = 1.0 / float(order)
        inv = torch.add(torch.mul(z0.abs(), rtol), atol).reciprocal()
        u = torch.stack([z0, f0, f1 - f0]) * inv  # scaled state, field, field difference
        norms = u.square().mean((2, 3)).sqrt().to(torch.float64).cpu().flatten().tolist()
        gh = g_h.to(torch.float64).cpu().tolist()
        h0, h0_sign, g_h0, g_d1 = [0.0] * seeds, [0.0] * seeds, [0.0] * seeds, [0.0] * seeds
        factors, tiny = [0.0] * (4 * seeds), [False] * seeds
        for s in range(seeds):
            d0, d1, n2 = norms[s], norms[seeds + s], norms[2 * seeds + s]
            tiny[s] = d0 < 1e-5 or d1 < 1e-5
            h0_raw = 1e-6 if tiny[s] else 0.01 * d0 / d1
            h0[s], h0_sign[s] = abs(h0_raw), _sign(h0_raw)
            d2_raw = n2 / h0[s]
            d2 = abs(d2_raw)
            flat = d1 <= 1e-15 and d2 <= 1e-15
            largest = 1.0 if flat else max(d1, d2)
            h1_raw = max(h0[s] * 1e-3, 1e-6) if flat else (0.01 / largest) ** p
            h1 = abs(h1_raw)
            g0 = 100 * _min_share(gh[s], 100 * h0[s], h1)
            g1_raw = _min_share(gh[s], h1, 100 * h0[s]) * _sign(h1_raw)
            if flat and h0[s] * 1e-3 >= 1e-6:
                g0 += 1e-3 * g1_raw
            g_largest = 0.0 if flat else g1_raw * p * (0.01 / largest) ** (p - 1) * (-0.01 / (largest * largest))
            g_d1[s] = _min_share(g_largest, -d1, -d2)  # maximum: to the larger, halved on ties
            g_d2_raw = _min_share(g_largest, -d2, -d1) * _sign(d2_raw)
            g0 -= g_d2_raw * n2 / (h0[s] * h0[s])
            g_h0[s] = g0
            factors[2 * seeds + s] = _divide(g_d2_raw / h0[s], count * n2)  # dL/du2 = factor * u2
            factors[3 * seeds + s] = h0[s]
        eval_backward = PythonAttemptLoops.eval_backward
        g_f1 = u[2] * _per_seed_factors(factors, 4, z0)[2] * inv
        g_trial = eval_backward(g_f1, trial_z, trial_h1, trial_h2, w, acc)  # the trial input z0 + h0 f0
        dots = torch.sum(g_trial * f0, (1, 2)).to(torch.float64).cpu().tolist()
        for s in range(seeds):
            d0, d1 = norms[s], norms[seeds + s]
            g_h0_raw = (g_h0[s] + dots[s]) * h0_sign[s]
            g_d0 = 0.0 if tiny[s] else 0.01 * g_h0_raw / d1
            g_d1_total = g_d1[s] - (0.0 if tiny[s] else 0.01 * d0 * g_h0_raw / (d1 * d1))
            factors[s] = _divide(g_d0, count * d0)
            factors[seeds + s] = _divide(g_d1_total, count * d1)
        f = _per_seed_factors(factors, 4, z0)
        g_u = u * f[:3]  # dL/du per part
        g_scale = -(g_u[0] * u[0] + g_u[1] * u[1] + g_u[2] * u[2]) * inv  # the parts' sum left to right (the C++ loop's)
        g_z0 = g_z0 + g_trial + g_u[0] * inv + torch.mul(g_scale * torch.sign(z0), rtol)
        g_f0 = g_f0 - g_f1 + g_trial * f[3] + g_u[1] * inv
        return g_z0 + eval_backward(g_f0, z0, h1_first, h2_first, w, acc)


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def _divide(a: float, b: float) -> float:
    """``a / b`` as IEEE division (the C++ loops' and autograd's): infinite or NaN where ``b`` is 0, where
    Python raises. A field flat at the start (a zero-initialised output layer) has zero norms there."""
    if b != 0.0:
        return a / b
    if a != a or a == 0.0:
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _min_share(g: float, a: float, b: float) -> float:
    """torch.minimum's gradient to its first input: all of it where smaller, half on a tie."""
    return g if a < b else (0.5 * g if a == b else 0.0)


def _per_seed_factors(values: list[float], rows: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(like.dtype).to(like.device).view(rows, -1, 1, 1)


def attempt_loops():
    """The loops :func:`dense_adaptive_solve` runs: the C++ ones of
    :func:`tune_node.fast.adaptive_native.adaptive_loops` where they build, else :class:`PythonAttemptLoops`."""
    return adaptive_native.adaptive_loops() or PythonAttemptLoops


class _Run:
    """One fused solve between its forward and backward passes."""

    def __init__(self, plan: _Plan, T: float, controller: IController, seeded: bool, max_steps: int | None, loops):
        self.plan, self.T, self.controller, self.seeded, self.max_steps = plan, T, controller, seeded, max_steps
        self.loops = loops
        self.z0: torch.Tensor | None = None
        self.kept: list[_Attempt] = []
        self.slots: list[tuple] = []
        self.key: tuple | None = None
        self.nfe: list[int] = []
        self.accepted: list[list[float]] = []
        self.attempts: list[int] = []
        # The first step size's rule: its trial evaluation's input, hidden layers and output,
        # and the first evaluation's hidden layers.
        self.first: dict[str, torch.Tensor] = {}
        self.native = None  # the C++ loops' whole solve (their solve_forward), which then runs the backward pass too
        # Set where the solve takes conv weights and builds the dense matrices itself: the signal
        # length and (channels, hidden).
        self.length: int | None = None
        self.conv_shape: tuple[int, int] = (0, 0)


def _forward(run: _Run, z0, W1, c1, W2, c2, W3, c3, record: bool) -> torch.Tensor:
    """The eager solve's computation without autograd; fills ``run`` for the backward pass."""
    plan, controller, T = run.plan, run.controller, run.T
    n = plan.stages
    stacked = W2.dim() == 3
    lead = tuple(z0.shape[:-1])
    seeds = z0.shape[0] if stacked else 1
    width, hidden = z0.shape[-1], W2.shape[-1]
    dtype, device = z0.dtype, z0.device
    norm = _rms_norm(run.seeded)
    coefficients = plan.rows_tensor(dtype, device)
    run.key = key = (n, lead, width, hidden, dtype, device)
    loops = run.loops
    w = [W1, c1.unsqueeze(-2), W2, c2.unsqueeze(-2), W3, c3.unsqueeze(-2)] if stacked else [W1, c1, W2, c2, W3, c3]
    # IController's ratio in the loops, call for call; any other error_ratio in Python.
    own_ratio = type(controller).error_ratio is IController.error_ratio
    atol, rtol = (controller.atol, controller.rtol) if own_ratio else (None, 0.0)

    if own_ratio and type(controller).decide is IController.decide and hasattr(loops, "solve_forward"):
        # The whole stepping in C++: IController's decisions made there in the same IEEE operations.
        solve = loops.solve_forward(z0, w, coefficients, stacked, plan.fsal, plan.row_b, plan.row_err, plan.row_mid, hidden, T,
                                    controller.atol, controller.rtol, controller.order, controller.safety, controller.ifactor,
                                    controller.dfactor, run.seeded, -1 if run.max_steps is None else run.max_steps, record,
                                    _free_slots.pop(key, []))
        run.slots = solve.slots
        if solve.failure:
            _give_back(key, run.slots)
            run.slots = []
            seed, nfe = solve.failed_seed, solve.nfe[solve.failed_seed]
            if solve.failure == 1:
                raise AdaptiveStepLimitError(seed, run.max_steps, nfe)
            raise AdaptiveUnderflowError(seed, solve.failed_t, solve.failed_h, nfe)
        run.native = solve if record else None
        run.nfe, run.accepted, run.attempts = solve.nfe, solve.accepted, solve.attempts
        return solve.out

    h1_first, h2_first, h1_trial, h2_trial = (z0.new_empty(*lead, hidden) for _ in range(4))
    f0 = PythonAttemptLoops.field_eval(z0, w, h1_first, h2_first, stacked)
    h_first, trial_z, trial_k = loops.first_step_forward(z0, f0, w, h1_trial, h2_trial, stacked, controller.atol, controller.rtol,
                                                         controller.order, run.seeded)
    run.first = dict(f0=f0, h1=h1_first, h2=h2_first, trial_z=trial_z, trial_h1=h1_trial, trial_h2=h2_trial, trial_k=trial_k)

    steps_h = h_first.tolist()
    nfe = [2] * seeds
    times, starts = [0.0] * seeds, [0.0] * seeds
    accepted: list[list[float]] = [[] for _ in range(seeds)]
    attempts = [0] * seeds
    timed_by_first = [False] * seeds
    done = [False] * seeds
    y, out = z0, None
    first = True
    slot = None
    while not all(done):
        for s in range(seeds):
            if done[s]:
                continue
            if run.max_steps is not None and attempts[s] >= run.max_steps:
                raise AdaptiveStepLimitError(s, run.max_steps, nfe[s])
            if not (math.isfinite(steps_h[s]) and times[s] + steps_h[s] > times[s]):
                raise AdaptiveUnderflowError(s, times[s], steps_h[s], nfe[s])
        h_t = h_first if first else torch.tensor([0.0 if d else v for d, v in zip(done, steps_h)], dtype=torch.float64, device=device)
        if slot is None:
            slot = _take_slot(key, n, lead, width, hidden, z0)
        zs, h2s, ks, y1_buffer, h1s = slot
        y1, ratios, weights = loops.attempt_forward(y, f0, h_t, coefficients, w, zs, h1s, h2s, ks, y1_buffer, stacked, plan.fsal,
                                                    plan.row_b, plan.row_err, atol, rtol, run.seeded)
        if not own_ratio:
            ratios = controller.error_ratio(ratios, y, y1, norm)
        ratios = ratios.reshape(seeds).tolist()
        accept = [True] * seeds  # a finished seed's zero step leaves it as it is
        active = [False] * seeds
        finishing = [False] * seeds
        offset = list(timed_by_first)
        for s in range(seeds):
            if done[s]:
                continue
            attempts[s] += 1
            nfe[s] += n - 1
            ok, h_next = controller.decide(steps_h[s], ratios[s])
            accept[s] = active[s] = ok
            if ok:
                timed_by_first[s] = timed_by_first[s] or first
                starts[s], times[s] = times[s], times[s] + steps_h[s]
                accepted[s].append(times[s])
                finishing[s] = times[s] >= T
            steps_h[s] = h_next
        attempt = None
        if any(active):
            attempt = _Attempt(y, slot, weights, h_t, active, first)
            if record:
                run.kept.append(attempt)
                run.slots.append(slot)
                slot = None
        if any(finishing):
            step_starts = [starts[s] if finishing[s] else T for s in range(seeds)]
            # The eager solve's interpolant with its start times' zero-valued shift left out.
            total, y_mid = loops.interpolate_at(T, y, y1, ks, weights, plan.row_mid, h_t, step_starts, finishing, stacked)
            out = total if out is None else torch.where(torch.tensor(finishing, device=device).view(-1, 1, 1), total, out)
            attempt.finishing, attempt.starts, attempt.offset = finishing, step_starts, offset
            attempt.y1, attempt.y_mid = y1, y_mid
            done = [d or e for d, e in zip(done, finishing)]
        if all(accept):
            y, f0 = y1, ks[..., n - 1]
        elif any(active):
            mask = torch.tensor(accept, device=device).view(-1, 1, 1)
            y, f0 = torch.where(mask, y1, y), torch.where(mask, ks[..., n - 1], f0)
        if not record and any(active):
            # The next attempt reuses this one's buffers: the state must not live in them.
            y, f0 = y.clone(), f0.clone()
        first = False
    if slot is not None:
        run.slots.append(slot)
    run.nfe, run.accepted, run.attempts = nfe, accepted, attempts
    return out


def _backward(run: _Run, grad_out, W1, c1, W2, W3):
    """``dL/dz0`` and the weight gradients' accumulators given ``dL/dz(T)``, all ``(S, ., .)``, for a
    solve stepped from Python (the C++ whole solve runs its own: ``Solve.gradients``)."""
    plan, T, loops = run.plan, run.T, run.loops
    seeds, batch, width = grad_out.shape
    hidden, device = W2.shape[-1], grad_out.device
    # W3's gradient accumulates transposed: MKL's fast orientation for a narrow factor.
    # The biases' gradients accumulate per batch row, summed over the rows at the end.
    acc = [W1.new_zeros(W1.shape), W2.new_zeros(W2.shape), W3.new_zeros(seeds, width, hidden),
           *(grad_out.new_zeros(seeds, batch, k) for k in (hidden, hidden, width)),
           *(grad_out.new_empty(seeds, batch, hidden) for _ in range(2))]
    # W1^T contiguous, as the C++ loops have it (their input-gradient product's operand).
    w = [W1, c1.unsqueeze(-2), W1.transpose(-1, -2).contiguous(), W2.transpose(-1, -2), W3.transpose(-1, -2)]
    grad_out = grad_out.contiguous()
    rows64 = plan.rows_tensor(torch.float64, device)
    gy = torch.zeros_like(grad_out)
    gf = torch.zeros_like(grad_out)
    g_h = torch.zeros(seeds, dtype=torch.float64, device=device)
    single = run.z0.dim() == 2
    as_seeds = (lambda t: t.unsqueeze(0)) if single else (lambda t: t)
    for attempt in reversed(run.kept):
        zs, h2s, ks, _, h1s = attempt.slot
        interp = []
        if any(attempt.finishing):
            *interp, g_hx = loops.interpolant_backward(T, grad_out, attempt.y, attempt.y1, attempt.y_mid, ks, attempt.h_t,
                                                       attempt.starts, attempt.finishing, attempt.offset, attempt.first)
            g_h += g_hx
        gy, gf, g_hs = loops.attempt_backward(gy, gf, attempt.accepted, attempt.weights, zs, h1s, h2s, ks, w, acc, plan.fsal,
                                              plan.row_b, plan.row_mid, interp, attempt.first, rows64)
        if attempt.first:
            g_h += g_hs
    first, ctl = run.first, run.controller
    gy = loops.first_step_backward(g_h, gy, gf, as_seeds(run.z0), as_seeds(first["f0"]), as_seeds(first["trial_z"]),
                                   as_seeds(first["trial_h1"]), as_seeds(first["trial_h2"]), as_seeds(first["trial_k"]),
                                   as_seeds(first["h1"]), as_seeds(first["h2"]), w, acc, ctl.atol, ctl.rtol, ctl.order)
    return gy, _summed_biases(acc)


def _summed_biases(acc: list[torch.Tensor]) -> list[torch.Tensor]:
    """The accumulators with the biases' per-row gradients summed over the batch rows (``(S, 1, .)``)."""
    return [*acc[:3], *(torch.sum(g, -2, keepdim=True) for g in acc[3:6])]


class _DenseAdaptiveSolve(torch.autograd.Function):
    """The solve as one autograd node, on the dense weights, or on the conv weights (``run.length``
    set) with the dense matrices built inside: autograd's graph of that build (a concatenation,
    a gather, a split and views) cost ~0.2 ms per solve forward and backward, a tenth of a
    one-seed solve; its backward pass is here the gather's scatter-add, the same one autograd runs."""

    @staticmethod
    def forward(ctx, z0, *weights_and_run):
        *weights, run = weights_and_run
        if run.length is not None:
            weights = _dense_weights(run, weights)
        W1, c1, W2, c2, W3, c3 = weights
        out = _forward(run, z0, W1, c1, W2, c2, W3, c3, record=True)
        run.z0 = z0
        ctx.run = run
        ctx.save_for_backward(W1, c1, W2, W3)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        run = ctx.run
        if run is None:
            raise RuntimeError("dense_adaptive_solve runs one backward pass per solve (retain_graph is not supported)")
        W1, c1, W2, W3 = ctx.saved_tensors
        if run.native is not None:
            # The C++ whole solve: its gradients (dense or conv) in one call.
            plan, ctl = run.plan, run.controller
            index = _gather_plan(*run.conv_shape, run.length, W1.device)[0] if run.length is not None else None
            grads = run.native.gradients(grad_out, [W1, c1, W2, W3], plan.rows_tensor(torch.float64, W1.device), run.T, plan.fsal,
                                         plan.row_b, plan.row_mid, ctl.atol, ctl.rtol, ctl.order, index, _conv_shapes(*run.conv_shape))
            run.native = None
            _give_back(run.key, run.slots)
            ctx.run = None
            return (*grads, None)
        single = W2.dim() == 2
        if single:
            W1, c1, W2, W3, grad_out = (t.unsqueeze(0) for t in (W1, c1, W2, W3, grad_out))
        gz, acc = _backward(run, grad_out, W1, c1, W2, W3)
        _give_back(run.key, run.slots)
        ctx.run = None
        gW1, gW2, gW3t, gc1, gc2, gc3 = acc[:6]
        if run.length is not None:
            return (gz.squeeze(0) if single else gz, *_conv_grads(run, [gW1, gc1, gW2, gc2, gW3t.transpose(-1, -2), gc3], single), None)
        grads = [gz, gW1, gc1.squeeze(-2), gW2, gc2.squeeze(-2), gW3t.transpose(-1, -2).contiguous(), gc3.squeeze(-2)]
        if single:
            grads = [t.squeeze(0) for t in grads]
        return (*grads, None)


def _conv_shapes(channels: int, hidden: int) -> list[tuple[int, ...]]:
    return [(hidden, channels, 1), (hidden,), (hidden, hidden, 3), (hidden,), (channels, hidden, 1), (channels,)]


def _dense_weights(run: _Run, conv: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`~tune_node.fast.dense.dense_conv_weights` (no gradients), by the C++ loops where they run."""
    if not hasattr(run.loops, "dense_from_conv"):
        return list(dense_conv_weights(*conv, run.length))
    index, shapes = _gather_plan(*run.conv_shape, run.length, conv[0].device)
    return run.loops.dense_from_conv(conv, conv[2].dim() == 4, index, shapes)


def _conv_grads(run: _Run, dense_grads: list[torch.Tensor], single: bool) -> list[torch.Tensor]:
    """The conv weights' gradients from the dense matrices' (all ``(S, ., .)``): the backward pass
    of :func:`~tune_node.fast.dense.dense_conv_weights`'s gather, the scatter-add autograd makes
    (the same sums in the same order)."""
    channels, hidden = run.conv_shape
    index, _ = _gather_plan(channels, hidden, run.length, dense_grads[0].device)
    seeds = dense_grads[0].shape[0]
    flat = torch.cat([g.reshape(seeds, -1) for g in dense_grads], dim=-1)
    sizes = [hidden * channels, hidden, hidden * hidden * 3, hidden, channels * hidden, channels]
    scattered = flat.new_zeros(seeds, sum(sizes) + 1).index_add_(-1, index, flat)
    shapes = _conv_shapes(channels, hidden)
    lead = () if single else (seeds,)
    return [piece.view(*lead, *shape) for piece, shape in zip(scattered.split(sizes + [1], dim=-1), shapes)]


def _check_solve(tableau: ButcherTableau, T: float, controller: IController) -> None:
    if not (tableau.embedded and tableau.b_mid is not None and tableau.c[-1] == 1):
        raise ValueError("dense_adaptive_solve needs an embedded tableau with b_error, b_mid and its last stage at c = 1")
    if not (T > 0 and math.isfinite(T)):
        raise ValueError(f"T must be a finite number > 0, got {T!r}")
    if not (isinstance(controller, IController) and type(controller).initial_step is IController.initial_step):
        raise TypeError(f"dense_adaptive_solve differentiates IController's first step size only, got {type(controller).__name__}; "
                        "use adaptive_solve")


def dense_adaptive_solve(weights, z0: torch.Tensor, tableau: ButcherTableau, T: float, controller: IController, *,
                         seeded: bool = False, max_steps: int | None = None, loops=None) -> AdaptiveSolution:
    """:func:`~tune_node.ode.adaptive.adaptive_solve` of the dense sphere field, fused.

    Arguments:
        weights: ``(W1, c1, W2, c2, W3, c3)`` as :func:`~tune_node.fast.dense.dense_conv_weights`
            returns them: for one model ``(., .)`` with ``z0 (batch, C*D)`` and ``seeded``
            False, or stacked ``(S, ., .)`` with ``z0 (S, batch, C*D)`` and ``seeded`` True
            (each seed its own step control, as ``adaptive_solve(..., seeded=True)``).
        z0, tableau, T, max_steps: as :func:`~tune_node.ode.adaptive.adaptive_solve`.
        controller: an :class:`~tune_node.ode.adaptive.IController` (its first step size's
            rule is differentiated by hand here; ``decide`` and ``error_ratio`` may be overridden).
        loops: :class:`PythonAttemptLoops` or the C++ module; by default :func:`attempt_loops`.

    Returns the :class:`~tune_node.ode.adaptive.AdaptiveSolution` ``adaptive_solve`` returns
    on ``dense_field(*weights)``: the same accepted steps, NFE and ``z`` bit for bit; ``z`` is
    differentiable in ``z0`` and the weights with the eager solve's gradients up to rounding,
    one backward pass per solve (no double backward, no ``retain_graph``). Raises the errors
    ``adaptive_solve`` raises where it raises them.
    """
    _check_solve(tableau, T, controller)
    single = weights[2].dim() == 2
    if single == seeded:
        raise ValueError("dense_adaptive_solve takes one model's weights unseeded or stacked weights seeded, "
                         f"got {'one model' if single else 'stacked'} weights with seeded={seeded}")
    run = _Run(_plan_of(tableau), float(T), controller, seeded, max_steps, loops or attempt_loops())
    tensors = (z0, *weights)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        z = _DenseAdaptiveSolve.apply(*tensors, run)
    else:
        with torch.no_grad():
            z = _forward(run, *tensors, record=False)
        _give_back(run.key, run.slots)
    return AdaptiveSolution(z, run.nfe, run.accepted, run.attempts)


def sphere_conv_weights(vector_field, z0: torch.Tensor, *, seeded: bool) -> list[torch.Tensor] | None:
    """The conv weights ``(w1, b1, w2, b2, w3, b3)`` of a field the fused solves take from ``z0``: a
    :class:`~tune_node.train.models.ConvODEField` whose dense form ``integrate`` would use (unseeded;
    the conditions of :func:`~tune_node.fast.dense.prepare_conv_field`, checked without building the
    dense form), or a stacked sphere field's (``seeded``); None for any other field or seeding."""
    if takes_time(vector_field):
        return None
    if isinstance(vector_field, ConvODEField) and not seeded:
        if fast_form(type(vector_field)) is not prepare_conv_field or not isinstance(vector_field.conv1, nn.Conv1d) or z0.dim() != 3:
            return None
        if vector_field.dense is False or (vector_field.dense is None and z0.shape[-1] > DENSE_MAX_DIM):
            return None
        return [vector_field.conv1.weight, vector_field.conv1.bias, vector_field.conv2.weight, vector_field.conv2.bias,
                vector_field.conv3.weight, vector_field.conv3.bias]
    if isinstance(vector_field, _StackedField) and seeded and z0.dim() == 4:
        return list(vector_field.weights)
    return None


def fused_adaptive_solve(vector_field, z0: torch.Tensor, setting: SolverSetting, *, seeded: bool = False) -> AdaptiveSolution | None:
    """:func:`dense_adaptive_solve` of an adaptive backprop ``setting`` (as
    :func:`~tune_node.ode.adaptive.solve_setting` runs it) on a field whose dense form
    ``integrate`` would use: a :class:`~tune_node.train.models.ConvODEField` unseeded, or a
    stacked sphere field with ``seeded``; ``z`` comes back in ``z0``'s shape. None for any
    other field, setting or seeding, and under autocast (the caller falls back to the eager solve).
    """
    spec = setting.spec
    if not setting.is_adaptive or spec.embedded is None or setting.gradient != "backprop":
        return None
    if torch.is_autocast_enabled(z0.device.type):
        return None  # the fused solve's buffers and products are in z0's dtype; autocast's eager ones are not
    conv = sphere_conv_weights(vector_field, z0, seeded=seeded)
    if conv is None:
        return None
    controller = IController(rtol=setting.tol, atol=setting.tol, order=spec.order)
    shape = z0.shape
    z0_flat = z0.reshape(*shape[:-2], shape[-2] * shape[-1])
    if torch.is_grad_enabled() and (z0.requires_grad or any(w.requires_grad for w in conv)):
        # dense_adaptive_solve's work with the dense matrices built inside its autograd node.
        _check_solve(spec.embedded, float(setting.T), controller)
        run = _Run(_plan_of(spec.embedded), float(setting.T), controller, seeded, setting.max_adaptive_steps, attempt_loops())
        run.length, run.conv_shape = shape[-1], (conv[0].shape[-2], conv[0].shape[-3])
        z = _DenseAdaptiveSolve.apply(z0_flat, *conv, run)
        return AdaptiveSolution(z.reshape(shape), run.nfe, run.accepted, run.attempts)
    sol = dense_adaptive_solve(dense_conv_weights(*conv, shape[-1]), z0_flat, spec.embedded, float(setting.T), controller,
                               seeded=seeded, max_steps=setting.max_adaptive_steps)
    sol.z = sol.z.reshape(shape)
    return sol
