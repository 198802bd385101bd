"""The adjoint method for adaptive solves of the dense sphere field, per seed in a stacked group.

:func:`dense_adjoint_solve` is torchdiffeq's ``odeint_adjoint`` as :func:`~tune_node.ode.integrate.integrate`
calls it for an adaptive adjoint setting (the six conv weights as ``adjoint_params``, the adjoint's
tolerances equal to the forward ones, its default adjoint norm), for the dense form of the sphere
field (:mod:`tune_node.fast.dense`):

- forward: :func:`~tune_node.fast.adaptive_solve.dense_adaptive_solve` without autograd, the solve
  torchdiffeq's adjoint makes under ``no_grad``: on the dense field, the same accepted steps, NFE and
  ``z(T)`` as torchdiffeq's, bit for bit (``integrate``'s torchdiffeq call evaluates the Conv1d field,
  which the dense form equals up to rounding);
- backward: the augmented state ``(t-adjoint, z, a, weight adjoint)`` integrated from ``T`` back to 0
  by :func:`~tune_node.ode.adaptive.adaptive_solve` with the same embedded pair and
  :class:`~tune_node.ode.adaptive.IController`, as torchdiffeq integrates it: in reversed time
  (from ``-T`` to 0, the augmented field negated; times in errors are reversed ones), the first step
  from the same rule, and the error norm ``max(|t-adjoint|, rms(z), rms(a), max over the weights
  that need a gradient of rms(weight adjoint))``;
- one evaluation of the augmented field is ``f(z)`` and the vector-Jacobian products ``a df/dz`` and
  ``a df/dtheta`` written out for the three dense layers; the weight adjoint is kept for the conv
  weights themselves (the dense matrices' products added back onto the kernel entries they repeat),
  since torchdiffeq's norm measures the conv weights' adjoints;
- stacked seeds (``seeded``) each keep their own step control, backward as forward, with the norm
  taken per seed, so a group makes its seeds' own solves (the backward solves one seed after
  another, on the CPU bound by arithmetic; a seed the loss does not touch is not solved backward).

Guarantees: forward as above. Backward: torchdiffeq's algorithm (same tableau, controller, norm,
reversed times), its arithmetic in another order (torchdiffeq differentiates Conv1d with autograd):
gradients equal up to rounding, and so are its accepted steps, except where an error estimate is
mostly rounding and an attempt may be accepted here and rejected there (tests: float64, the same
backward NFE and gradients to 1e-12 relative on the paper's field; an affine field against its
closed-form solution). One backward pass per solve (``retain_graph`` passes overwrite the record;
no double backward). On CUDA ``index_add_`` adds in no fixed order, so a group equals separate
solves up to rounding only there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..ode.adaptive import AdaptiveSolution, AdaptiveStepLimitError, AdaptiveUnderflowError, IController, adaptive_solve
from ..ode.solvers import ButcherTableau, SolverSetting
from .adaptive_solve import dense_adaptive_solve, sphere_conv_weights
from .dense import _gather_plan, _StackedField, dense_conv_weights

__all__ = ["AdjointRecord", "dense_adjoint_solve", "fused_adjoint_solve", "solves_adjoint", "stacked_adjoint"]

_threshold_backward = torch.ops.aten.threshold_backward


@dataclass
class AdjointRecord:
    """What a backward pass of :func:`dense_adjoint_solve` did, filled in when it runs.

    Attributes:
        nfe: per seed, the augmented field's evaluations of the backward solve
            (``2 + attempts * (stages - 1)``, as the forward solve counts); zeros before it runs.
        accepted: per seed, the end times of the backward solve's accepted steps, in its
            reversed time (from ``-T`` to 0, as torchdiffeq's).
        ran: whether the backward pass has run.
    """

    nfe: list[int]
    accepted: list[list[float]] = field(default_factory=list)
    ran: bool = False


@dataclass
class _Run:
    tableau: ButcherTableau
    T: float
    controller: IController
    seeded: bool
    max_steps: int | None
    length: int
    record: AdjointRecord
    on_error: Callable[[Exception], Exception] | None
    positions: list[int] | None = None
    forward: AdaptiveSolution | None = None


def _augmented_field(weights: tuple[torch.Tensor, ...], index: torch.Tensor, conv_total: int, batch: int, width: int):
    """The reversed augmented field of stacked weights ``(S, ., .)`` on flat states ``(S, N)``:
    ``(t-adjoint, z, a, conv adjoint) -> (0, -f(z), a df/dz, a df/dtheta)``."""
    W1, c1, W2, c2, W3, c3 = weights
    seeds = W1.shape[0]
    c1, c2 = c1.unsqueeze(-2), c2.unsqueeze(-2)
    # -f(z) = h2 (-W3) + (-c3) bit for bit (negation is exact), one product instead of a product and a negation.
    minus_W3, minus_c3 = -W3, -c3.unsqueeze(-2)
    W1t, W2t, W3t = (w.transpose(1, 2).contiguous() for w in (W1, W2, W3))
    state = batch * width
    z_part, a_part = slice(1, 1 + state), slice(1 + state, 1 + 2 * state)

    def g(y: torch.Tensor) -> torch.Tensor:
        z = y[:, z_part].view(seeds, batch, width)
        a = y[:, a_part].view(seeds, batch, width)
        h1 = torch.relu_(torch.baddbmm(c1, z, W1))
        h2 = torch.relu_(torch.baddbmm(c2, h1, W2))
        minus_f = torch.baddbmm(minus_c3, h2, minus_W3)
        g2 = _threshold_backward(torch.bmm(a, W3t), h2, 0)
        g1 = _threshold_backward(torch.bmm(g2, W2t), h1, 0)
        gz = torch.bmm(g1, W1t)
        dense = torch.cat([torch.bmm(z.transpose(1, 2), g1).flatten(1), g1.sum(1), torch.bmm(h1.transpose(1, 2), g2).flatten(1),
                           g2.sum(1), torch.bmm(h2.transpose(1, 2), a).flatten(1), a.sum(1)], 1)
        # Every dense entry repeats one kernel entry (or is zero: the extra last slot): its products add up there.
        conv = y.new_zeros(seeds, conv_total + 1).index_add_(1, index, dense)
        return torch.cat([y.new_zeros(seeds, 1), minus_f.flatten(1), gz.flatten(1), conv[:, :conv_total]], 1)

    return g


def _adjoint_norm(sizes: list[int], measured: list[bool]):
    """torchdiffeq's default adjoint norm per seed: the largest RMS over the ``measured`` pieces of the
    flat state (torchdiffeq leaves weights that need no gradient out of its state, and so of its norm)."""

    def norm(x: torch.Tensor) -> torch.Tensor:
        squares = x.abs().pow(2)
        return torch.stack([piece.mean(1) for piece, kept in zip(squares.split(sizes, 1), measured) if kept], 1).sqrt().amax(1)

    return norm


class _DenseAdjointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z0, run, *conv):
        weights = dense_conv_weights(*conv, run.length)
        sol = dense_adaptive_solve(weights, z0, run.tableau, run.T, run.controller, seeded=run.seeded, max_steps=run.max_steps)
        ctx.run, run.forward = run, sol
        ctx.conv_shapes = [w.shape for w in conv]
        ctx.save_for_backward(sol.z, *weights)
        return sol.z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        run = ctx.run
        zT, *weights = ctx.saved_tensors
        if not run.seeded:
            zT, grad_out, weights = zT.unsqueeze(0), grad_out.unsqueeze(0), [w.unsqueeze(0) for w in weights]
        seeds, batch, width = zT.shape
        conv_sizes = [math.prod(s[1:] if run.seeded else s) for s in ctx.conv_shapes]
        conv_total = sum(conv_sizes)
        hidden, channels = (ctx.conv_shapes[0][1:] if run.seeded else ctx.conv_shapes[0])[:2]
        index, _ = _gather_plan(channels, hidden, run.length, zT.device)
        dtype = zT.dtype
        y0 = torch.cat([zT.new_zeros(seeds, 1, dtype=dtype), zT.flatten(1).to(dtype), grad_out.flatten(1).to(dtype),
                        zT.new_zeros(seeds, conv_total, dtype=dtype)], 1)
        weights = [w.to(dtype) for w in weights]
        norm = _adjoint_norm([1, batch * width, batch * width, *conv_sizes], [True, True, True, *ctx.needs_input_grad[2:]])
        # Seed by seed: on the CPU the solve is bound by its products' arithmetic, so a stacked solve
        # saves nothing per evaluation, and its seeds would ride along until the slowest one ends.
        ends, accepted = [], []
        for s in range(seeds):
            if run.seeded and not bool(grad_out[s].any()):
                # A seed the loss does not touch: nothing to solve (alone, its backward pass would not run).
                ends.append(torch.zeros_like(y0[s:s + 1]))
                run.record.nfe[s] = 0
                accepted.append([])
                continue
            if run.seeded and not bool(grad_out[s].isfinite().all()):
                # A seed whose loss stopped being finite (training marks it diverged and trains the others
                # on): its gradients are not finite, as backprop's would be; its solve would only fail.
                ends.append(torch.full_like(y0[s:s + 1], math.nan))
                run.record.nfe[s] = 0
                accepted.append([])
                continue
            g = _augmented_field(tuple(w[s:s + 1] for w in weights), index, conv_total, batch, width)
            try:
                sol = adaptive_solve(g, y0[s:s + 1], run.tableau, run.T, run.controller, seeded=True, max_steps=run.max_steps,
                                     norm=norm, t_start=-run.T)
            except (AdaptiveStepLimitError, AdaptiveUnderflowError) as err:
                position = s if run.positions is None else run.positions[s]  # its place in the stack
                err.seed, err.args = position, (str(err).replace("seed 0:", f"seed {position}:", 1),)
                if run.on_error is None:
                    raise
                raise run.on_error(err) from err
            ends.append(sol.z)
            run.record.nfe[s] = sol.nfe[0]
            accepted.append(sol.accepted[0])
        run.record.accepted[:] = accepted
        run.record.ran = True
        out = torch.cat(ends)
        state = batch * width
        grad_z0 = out[:, 1 + state:1 + 2 * state].reshape(seeds, batch, width)
        grads = [piece.reshape(seeds, *(s[1:] if run.seeded else s)) for piece, s in
                 zip(out[:, 1 + 2 * state:].split(conv_sizes, 1), ctx.conv_shapes)]
        if not run.seeded:
            grad_z0, grads = grad_z0.squeeze(0), [w.squeeze(0) for w in grads]
        return (grad_z0, None, *grads)


def dense_adjoint_solve(conv: list[torch.Tensor], z0: torch.Tensor, length: int, tableau: ButcherTableau, T: float,
                        controller: IController, *, seeded: bool = False, max_steps: int | None = None,
                        on_error: Callable[[Exception], Exception] | None = None,
                        positions: list[int] | None = None) -> tuple[AdaptiveSolution, AdjointRecord]:
    """``z(T)`` of the dense sphere field with adaptive steps, differentiated by the adjoint method.

    Arguments:
        conv: the field's conv weights ``(w1, b1, w2, b2, w3, b3)`` (see
            :func:`~tune_node.fast.dense.dense_conv_weights`), one model's, or S models' stacked
            along a leading axis with ``seeded``; the gradients the backward pass returns are theirs.
        z0: the initial state, flat: ``(batch, C*length)``, or ``(S, batch, C*length)`` with ``seeded``.
        length: the signal length ``D`` the conv weights act on.
        tableau, T, controller, max_steps: as :func:`~tune_node.ode.adaptive.adaptive_solve`; the
            backward solve uses the same tableau, controller and cap.
        seeded: stacked seeds, each with its own step control forward and backward.
        on_error: maps an error of the backward solve (:class:`~tune_node.ode.adaptive.AdaptiveStepLimitError`,
            :class:`~tune_node.ode.adaptive.AdaptiveUnderflowError`, its ``seed`` set) to the one ``backward()`` raises.
        positions: the seeds' places in a larger stack, for the ``seed`` of those errors (default: their index here).

    Returns the forward solve's :class:`~tune_node.ode.adaptive.AdaptiveSolution` (its ``z``
    differentiable in ``z0`` and ``conv`` when gradients are recorded) and an :class:`AdjointRecord`
    that the backward pass fills. One backward pass per solve.
    """
    single = conv[2].dim() == 3
    if single == seeded:
        raise ValueError(f"dense_adjoint_solve takes one model's conv weights unseeded or stacked ones seeded, "
                         f"got {'one model' if single else 'stacked'} weights with seeded={seeded}")
    seeds = 1 if single else conv[0].shape[0]
    record = AdjointRecord(nfe=[0] * seeds)
    run = _Run(tableau, float(T), controller, seeded, max_steps, length, record, on_error, positions)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (z0, *conv)):
        z = _DenseAdjointSolve.apply(z0, run, *conv)
        forward = run.forward
        run.forward = None  # the backward pass needs only the saved tensors
        return AdaptiveSolution(z, forward.nfe, forward.accepted, forward.attempts), record
    with torch.no_grad():
        sol = dense_adaptive_solve(dense_conv_weights(*conv, length), z0, tableau, T, controller, seeded=seeded, max_steps=max_steps)
    return sol, record


def stacked_adjoint(vector_field) -> bool:
    """Whether ``vector_field`` is a stacked sphere field, whose adaptive adjoint solves
    :func:`fused_adjoint_solve` makes per seed (from states ``(S, batch, C, D)``)."""
    return isinstance(vector_field, _StackedField)


def solves_adjoint(vector_field, z0: torch.Tensor, *, seeded: bool) -> bool:
    """Whether :func:`fused_adjoint_solve` solves ``vector_field`` from ``z0``: a sphere
    :class:`~tune_node.train.models.ConvODEField` whose dense form ``integrate`` would use
    (unseeded), or a stacked sphere field (``seeded``); as the fused adaptive solve takes them."""
    return sphere_conv_weights(vector_field, z0, seeded=seeded) is not None


def fused_adjoint_solve(vector_field, z0: torch.Tensor, setting: SolverSetting, *, seeded: bool = False,
                        on_error: Callable[[Exception], Exception] | None = None) -> tuple[AdaptiveSolution, AdjointRecord] | None:
    """:func:`dense_adjoint_solve` of an adaptive adjoint ``setting`` (its method's embedded pair,
    ``rtol = atol = setting.tol``, the cap ``setting.max_adaptive_steps``, forward and backward) on a
    field :func:`solves_adjoint` accepts; ``z`` comes back in ``z0``'s shape. None for any other
    field, setting or seeding, and under autocast."""
    spec = setting.spec
    if not setting.is_adaptive or spec.embedded is None or setting.gradient != "adjoint":
        return None
    if torch.is_autocast_enabled(z0.device.type):
        return None
    conv = sphere_conv_weights(vector_field, z0, seeded=seeded)
    if conv is None:
        return None
    controller = IController(rtol=setting.tol, atol=setting.tol, order=spec.order)
    shape = z0.shape
    sol, record = dense_adjoint_solve(conv, z0.reshape(*shape[:-2], shape[-2] * shape[-1]), shape[-1], spec.embedded,
                                      float(setting.T), controller, seeded=seeded, max_steps=setting.max_adaptive_steps,
                                      on_error=on_error, positions=getattr(vector_field, "seed_positions", None))
    sol.z = sol.z.reshape(shape)
    return sol, record
