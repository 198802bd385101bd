"""Fixed-step Runge-Kutta through the dense sphere field, with a hand-written backward pass.

:func:`dense_rk_solve` integrates ``f(z) = relu(relu(z W1 + c1) W2 + c2) W3 + c3``
(the dense form of :mod:`tune_node.dense`, ``S`` stacked models) with an explicit
tableau and returns ``z(T)``, differentiable in ``z0`` and the six weights. It is
the computation of :func:`~tune_node.integrate.rk_solve` on
:func:`~tune_node.dense.dense_field` (same stage sums in the same order; the last
layer's product is taken transposed), so outputs and gradients agree up to
floating-point rounding (tests: 1e-12 in float64). It is faster because:

- the products with the narrow matrices (``W3`` is ``H*D x C*D``, here 64 x 2) run in
  the orientation MKL handles well (a 64 x 2 right factor is ~4x slower than the
  same product transposed);
- the stage activations go to buffers kept between solves instead of fresh memory
  every step (fresh memory costs a page fault per 4 KiB on first touch);
- the backward pass accumulates weight gradients in place and fuses the ReLU masks;
- the first hidden layer is recomputed in the backward pass (a width-2 product)
  instead of stored, which halves the memory a long solve streams through;
- the loops run in C++ (:mod:`tune_node.native`: the same ATen calls in the same
  order, so the same results bit for bit) where a compiler is available, which
  removes the Python interpreter's cost per call, about a quarter of an evaluation.

Measured by ``benchmarks/bench_sphere.py``; used by :func:`~tune_node.integrate.integrate`
for backprop solves of the dense field while gradients are recorded.
"""

from __future__ import annotations

import torch

from ..ode.solvers import ButcherTableau
from . import native

__all__ = ["dense_rk_solve", "PythonLoops", "solve_loops", "held_buffers", "CUDA_LOOPS"]

#: The loops a solve on CUDA tensors runs: ``"cpp"`` (the C++ loops where they build, as on
#: the CPU) or ``"python"``. The C++ loops make ATen calls, which dispatch to CUDA kernels
#: for CUDA tensors and launch on the current stream, so they run (and are captured in CUDA
#: graphs) there as the Python loops do, with the same kernels in the same order; eagerly
#: they save the interpreter's cost per launch, and in a replayed graph neither costs anything.
CUDA_LOOPS = "cpp"

# Activation buffers between solves, keyed by shape, dtype and device: at most one free
# set per key. A solve takes the set (or allocates one) in its forward pass and gives
# it back at the end of its backward pass, so two solves alive at once never share one.
_free_buffers: dict[tuple, tuple[torch.Tensor, ...]] = {}
_MAX_KEYS = 4

_threshold_backward_into = torch.ops.aten.threshold_backward.grad_input


def _take_buffers(evals: int, z0: torch.Tensor, hidden: int) -> tuple[tuple, tuple[torch.Tensor, ...]]:
    key = (evals, tuple(z0.shape), hidden, z0.dtype, z0.device)
    free = _free_buffers.pop(key, None)
    if free is not None:
        return key, free
    *lead, width = z0.shape
    zs = z0.new_empty(evals, *lead, width)  # stage inputs
    # The first hidden layer is recomputed in the backward pass from the stage input
    # (a product with a width-2 factor: ~10 us per 5-seed evaluation), so one buffer
    # serves every evaluation. Storing it costs more than that: a long solve's
    # activations do not fit in cache, and reading them back from memory is slower.
    h1 = z0.new_empty(*lead, hidden)
    h2s = z0.new_empty(evals, *lead, hidden)  # second hidden activations after ReLU
    ks = z0.new_empty(evals, lead[0], width, lead[1])  # stage outputs, transposed
    # Per-evaluation bias-gradient sums, added up once at the end of the backward pass.
    bias_sums = [z0.new_empty(evals, lead[0], 1, n) for n in (hidden, hidden, width)]
    return key, (zs, h1, h2s, ks, *bias_sums)


def _give_back(key: tuple, buffers: tuple[torch.Tensor, ...]) -> None:
    if key not in _free_buffers and len(_free_buffers) >= _MAX_KEYS:
        _free_buffers.pop(next(iter(_free_buffers)))
    _free_buffers[key] = buffers


class PythonLoops:
    """The solve's loops in Python: the reference for :mod:`tune_node.native`'s C++
    loops (``tune_node/csrc/dense_solve.cpp``, same calls in the same order) and the
    fallback where those cannot be built. Both take the buffers of one solve and
    write into them; see :class:`_DenseRKSolve` for the layout."""

    @staticmethod
    def forward_loop(z0, W1, c1, W2, c2, W3t, c3t, zs, h1, h2s, ks, a, b, steps):
        # Indexing and transposing the buffers once per solve (unbind) rather than per
        # evaluation saves a few dispatches per evaluation, which small fields notice.
        h2s_t, ks_t = h2s.transpose(-1, -2).unbind(0), ks.transpose(-1, -2).unbind(0)
        zs, h2s, ks = zs.unbind(0), h2s.unbind(0), ks.unbind(0)
        stages = len(a)
        evals = steps * stages
        # Every stage input is written straight into its buffer slot: the last
        # b-sum of a step lands in the next step's first slot, so nothing is copied.
        zs[0].copy_(z0)
        e = 0
        for _ in range(steps):
            k = []
            for i, row in enumerate(a):
                zi = zs[e]
                if i > 0:
                    if row:
                        torch.add(zs[e - i], k[row[0][0]], alpha=row[0][1], out=zi)
                        for j, coef in row[1:]:
                            zi.add_(k[j], alpha=coef)
                    else:
                        zi.copy_(zs[e - i])
                torch.relu_(torch.baddbmm(c1, zi, W1, out=h1))
                torch.relu_(torch.baddbmm(c2, h1, W2, out=h2s[e]))
                torch.baddbmm(c3t, W3t, h2s_t[e], out=ks[e])
                k.append(ks_t[e])
                e += 1
            z = zs[e] if e < evals else torch.empty_like(z0)  # the next step's first stage input
            torch.add(zs[e - stages], k[b[0][0]], alpha=b[0][1], out=z)
            for i, coef in b[1:]:
                z.add_(k[i], alpha=coef)
        return z

    @staticmethod
    def backward_loop(grad_z, W1, c1, W2, W3, zs, h1, h2s, sums1, sums2, sums3, gW1, gW2, gW3t, a, b, steps):
        stages = len(a)
        b = dict(b)
        W1t, W2t, W3t = W1.transpose(-1, -2), W2.transpose(-1, -2), W3.transpose(-1, -2)
        h1_t = h1.transpose(-1, -2)
        zs_t, h2s = zs.transpose(-1, -2).unbind(0), h2s.unbind(0)
        zs, e = zs.unbind(0), len(zs)
        sums1, sums2, sums3 = sums1.unbind(0), sums2.unbind(0), sums3.unbind(0)
        g_hidden, g_first = torch.empty_like(h2s[0]), torch.empty_like(h2s[0])
        gz = grad_z.contiguous().clone()
        for _ in range(steps):
            e -= stages
            # Gradient reaching each stage's output k_l, as (tensor, factor): through
            # z_{n+1} (factor b_l) and through later stages' inputs (a_ml), gathered in
            # reverse stage order. The factor rides on the accumulations (alpha=), as
            # everything below is linear in it, so one-stage methods never scale.
            if stages > 1:
                g_stage = [(gz * b[i], 1.0) if i in b else None for i in range(stages)]
            else:
                g_stage = [(gz, b[0]) if 0 in b else None]
            for stage in reversed(range(stages)):
                i = e + stage
                if g_stage[stage] is None:
                    for sums in (sums1, sums2, sums3):
                        sums[i].zero_()
                    continue
                gk, factor = g_stage[stage]
                gW3t.baddbmm_(gk.transpose(-1, -2), h2s[i], alpha=factor)
                torch.sum(gk, -2, keepdim=True, out=sums3[i])
                g = torch.bmm(gk, W3t, out=g_hidden)
                _threshold_backward_into(g, h2s[i], 0, grad_input=g)
                torch.relu_(torch.baddbmm(c1, zs[i], W1, out=h1))  # as in the forward pass
                gW2.baddbmm_(h1_t, g, alpha=factor)
                torch.sum(g, -2, keepdim=True, out=sums2[i])
                g = torch.bmm(g, W2t, out=g_first)
                _threshold_backward_into(g, h1, 0, grad_input=g)
                gW1.baddbmm_(zs_t[i], g, alpha=factor)
                torch.sum(g, -2, keepdim=True, out=sums1[i])
                g_input = torch.bmm(g, W1t)
                for j, coef in a[stage]:
                    if g_stage[j] is None:
                        g_stage[j] = (g_input.mul(coef * factor), 1.0)
                    else:
                        g_stage[j][0].add_(g_input, alpha=coef * factor)
                gz.add_(g_input, alpha=factor)
        return gz


def held_buffers() -> tuple[tuple[torch.Tensor, ...], ...]:
    """The activation buffers kept between solves now: a CUDA graph that captured a solve
    writes into these, so it holds them for as long as it is replayed."""
    return tuple(_free_buffers.values())


def solve_loops(device: torch.device | str | None = None):
    """The loops :func:`dense_rk_solve` runs on ``device``: the C++ ones of
    :func:`tune_node.native.dense_loops` where they build, else :class:`PythonLoops`; on CUDA
    as :data:`CUDA_LOOPS` says."""
    if device is not None and torch.device(device).type == "cuda" and CUDA_LOOPS == "python":
        return PythonLoops
    return native.dense_loops() or PythonLoops


class _DenseRKSolve(torch.autograd.Function):
    # Buffers of one solve (leading dimension: evaluation): zs the stage inputs, h2s
    # the second hidden layer after ReLU, ks the stage outputs (transposed); h1 one
    # first-hidden-layer buffer, recomputed per evaluation in the backward pass.
    @staticmethod
    def forward(ctx, z0, W1, c1, W2, c2, W3, c3, a, b, steps, loops):
        key, buffers = _take_buffers(steps * len(a), z0, W2.shape[-1])
        zs, h1, h2s, ks = buffers[:4]
        c1, c2 = c1.unsqueeze(-2), c2.unsqueeze(-2)
        W3t, c3t = W3.transpose(-1, -2).contiguous(), c3.unsqueeze(-1)
        z = loops.forward_loop(z0, W1, c1, W2, c2, W3t, c3t, zs, h1, h2s, ks, a, b, steps)
        ctx.buffers, ctx.key = buffers, key
        ctx.a, ctx.b, ctx.steps, ctx.loops = a, b, steps, loops
        ctx.save_for_backward(W1, c1, W2, W3)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_z):
        if ctx.buffers is None:
            raise RuntimeError("dense_rk_solve runs one backward pass per solve (retain_graph is not supported)")
        W1, c1, W2, W3 = ctx.saved_tensors
        zs, h1, h2s, _, *bias_sums = ctx.buffers
        # Gradient accumulators are contiguous whatever the weights' strides (zeros_like
        # would keep those of a dense view): MKL accumulates into a transposed layout ~6x
        # slower (~50 us per 5-seed evaluation for W3's, an eighth of the whole solve).
        # W3's is accumulated transposed, the fast orientation.
        gW1, gW2 = W1.new_zeros(W1.shape), W2.new_zeros(W2.shape)
        gW3t = W3.new_zeros(*W3.shape[:-2], W3.shape[-1], W3.shape[-2])
        gz = ctx.loops.backward_loop(grad_z, W1, c1, W2, W3, zs, h1, h2s, *bias_sums, gW1, gW2, gW3t,
                                     ctx.a, ctx.b, ctx.steps)
        # One-stage methods scale every evaluation's gradient by the same b_0 h; the
        # loops apply it to all but the bias sums, which get it here.
        bias_factor = dict(ctx.b).get(0, 0.0) if len(ctx.a) == 1 else 1.0
        gc1, gc2, gc3 = (t.sum(0).mul_(bias_factor) for t in bias_sums)
        _give_back(ctx.key, ctx.buffers)
        ctx.buffers = None
        return (gz, gW1, gc1.squeeze(-2), gW2, gc2.squeeze(-2), gW3t.transpose(-1, -2).contiguous(),
                gc3.squeeze(-2), None, None, None, None)


def dense_rk_solve(weights, z0: torch.Tensor, tableau: ButcherTableau, steps: int, T: float = 1.0,
                   loops=None) -> torch.Tensor:
    """``z(T)`` of ``dz/dt = f(z)`` for the dense field with ``steps`` equal steps of ``tableau``.

    Arguments:
        weights: ``(W1, c1, W2, c2, W3, c3)`` as :func:`~tune_node.dense.dense_conv_weights`
            returns them, stacked ``(S, ., .)`` or for one model ``(., .)``.
        z0: ``(S, batch, C*D)`` (stacked) or ``(batch, C*D)``.
        tableau, steps, T: the method, the number of equal steps, the end time.
        loops: :class:`PythonLoops` or the C++ module; by default :func:`solve_loops` for ``z0``'s device.

    Evaluates the field exactly ``steps * tableau.stages`` times. Differentiable in
    ``z0`` and the weights, with one backward pass per solve (no double backward, no
    ``retain_graph``: the activation buffers are reused by later solves).
    """
    W1, c1, W2, c2, W3, c3 = weights
    single = W2.dim() == 2
    if single:
        W1, c1, W2, c2, W3, c3 = (w.unsqueeze(0) for w in (W1, c1, W2, c2, W3, c3))
        z0 = z0.unsqueeze(0)
    a, b = tableau.step_coefficients(T / steps)
    z = _DenseRKSolve.apply(z0, W1, c1, W2, c2, W3, c3, a, b, steps, loops or solve_loops(z0.device))
    return z.squeeze(0) if single else z
