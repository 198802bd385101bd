"""The sphere ODE block as dense matrix products, and several seeds of it stacked.

A k=1 Conv1d is a per-position linear map, and a k=3, pad=1 Conv1d on a length-D
signal is one ``(C_out*D) x (C_in*D)`` linear map built from its kernel. For short
signals (the spheres in a few dimensions) three matrix products on a
``(batch, channels*D)`` layout are far cheaper than three Conv1d calls, so
:class:`~tune_node.models.ConvODEField` hands :func:`~tune_node.integrate.integrate`
this form once per solve (:func:`prepare_conv_field`, registered by :mod:`tune_node.fast`). The parameters stay the
Conv1d weights: the matrices are rebuilt from them at the start of every solve,
so gradients flow back to the kernels.

:class:`StackedSphereClassifier` holds the weights of S models of one
architecture stacked along a leading axis and evaluates all of them with batched
matrix products (``bmm``): training several seeds at once in one process.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ..ode.integrate import (
    NFECounter,
    PreparedField,
    Solution,
    SolverStepLimitError,
    StepSizeUnderflowError,
    integrate_seeds,
    seeded_adaptive,
)
from ..ode.solvers import SolverSetting
from .dense_solve import PythonLoops, dense_rk_solve, solve_loops

__all__ = ["prepare_conv_field", "DENSE_MAX_DIM", "FUSED_MIN_EVALUATIONS", "fused_min_evaluations", "dense_conv_weights", "dense_field",
           "prepare_dense", "StackedSphereClassifier"]

# Signal lengths up to which the dense form is used automatically. Measured on CPU
# (`python benchmarks/bench_sphere.py --crossover`: one thread, batch 128, forward and
# backward of an RK4 solve, matrices built per solve): dense is ~4.7x faster than
# Conv1d at D=2, ~4x at D=3, ~1.8x at D=5, ~1.2x at D=8..10, even at D=12 and slower
# beyond (its cost grows as D^2, the conv's as D); Sphere900 keeps the conv.
DENSE_MAX_DIM = 10

# Solves of at least this many evaluations use the fused solve
# (:func:`~tune_node.dense_solve.dense_rk_solve`); shorter ones the autograd loop, as the
# fused solve's set-up per solve outweighs its gain there. Measured (Sphere2, batch 128,
# forward and backward of one solve, interleaved): with the Python loops, at 4 evaluations
# the fused solve was 1.2x (5 seeds) to 1.5x (one seed) slower, at 16 1.15x to 1.2x
# faster; with the C++ loops (tune_node.native) equal at 2, 1.1x faster at 4 (Euler 4
# steps, RK4 1 step), 1.2-1.4x at 8 to 16.
FUSED_MIN_EVALUATIONS = {"python": 16, "cpp": 4}


def fused_min_evaluations(device: torch.device | str | None = None) -> int:
    """The fewest evaluations a solve needs to take the fused path, for the loops
    :func:`~tune_node.dense_solve.solve_loops` picks here (on ``device``)."""
    return FUSED_MIN_EVALUATIONS["python" if solve_loops(device) is PythonLoops else "cpp"]


def _dense_by_einsum(w1, b1, w2, b2, w3, b3, length: int) -> list[torch.Tensor]:
    # The definition: entry [j*D + p, o*D + d] of a conv's matrix is w[o, j, k] where
    # input position p feeds output position d through tap k: p == d for the k=1
    # convs, p == d + k - 1 for the k=3, pad=1 conv (PyTorch convs are correlations).
    pos = torch.arange(length, device=w2.device)
    offset = pos[:, None] - pos[None, :]
    eye = (offset == 0).to(w2.dtype)
    shifts = torch.stack([(offset == k - 1).to(w2.dtype) for k in range(3)])
    h, c = w1.shape[0], w1.shape[1]
    W1 = torch.einsum("oj,pd->jpod", w1[..., 0], eye).reshape(c * length, h * length)
    W2 = torch.einsum("ojk,kpd->jpod", w2, shifts).reshape(h * length, h * length)
    W3 = torch.einsum("oj,pd->jpod", w3[..., 0], eye).reshape(h * length, c * length)
    return [W1, b1.repeat_interleave(length), W2, b2.repeat_interleave(length), W3, b3.repeat_interleave(length)]


@lru_cache(maxsize=32)
def _gather_plan(channels: int, hidden: int, length: int, device: torch.device):
    """Where each dense entry comes from: an index into the concatenated flat
    weights plus one trailing zero, and the dense pieces' shapes.

    Every entry of the dense form is one weight or zero (a k=3 conv on a line has
    at most one tap linking two positions), so evaluating the definition on the
    weights' own positions (1, 2, ...) as values reads the index off exactly.
    """
    shapes = [(hidden, channels, 1), (hidden,), (hidden, hidden, 3), (hidden,), (channels, hidden, 1), (channels,)]
    sizes = [torch.Size(s).numel() for s in shapes]
    codes = torch.arange(1, sum(sizes) + 1, dtype=torch.float64).split(sizes)
    dense = _dense_by_einsum(*(c.view(s) for c, s in zip(codes, shapes)), length)
    zero_slot = sum(sizes)
    index = torch.cat([d.flatten() for d in dense]).long() - 1
    index[index < 0] = zero_slot
    return index.to(device), [tuple(d.shape) for d in dense]


def dense_conv_weights(w1, b1, w2, b2, w3, b3, length: int) -> tuple[torch.Tensor, ...]:
    """Matrices and biases of conv1 (k=1), conv2 (k=3, pad=1), conv3 (k=1) on length ``length``.

    Weights have PyTorch's Conv1d shapes with any leading (stacking) dimensions:
    ``w1 (..., H, C, 1)``, ``w2 (..., H, H, 3)``, ``w3 (..., C, H, 1)``, biases
    ``(..., out_channels)``. Returns ``(W1, c1, W2, c2, W3, c3)`` for
    right-multiplication of a channel-major flattened signal ``z (..., C*D)``:
    ``conv(z) == z @ W + c``. Differentiable in the weights; built with one gather
    (and its backward is one scatter-add), several times cheaper than einsums.
    """
    lead = w2.shape[:-3]
    hidden, channels = w1.shape[-3], w1.shape[-2]
    index, shapes = _gather_plan(channels, hidden, length, w2.device)
    weights = (w1, b1, w2, b2, w3, b3)
    flat = torch.cat([w.reshape(*lead, -1) for w in weights] + [w2.new_zeros(*lead, 1)], dim=-1)
    dense = flat.index_select(-1, index)
    pieces = dense.split([torch.Size(s).numel() for s in shapes], dim=-1)
    return tuple(p.view(*lead, *s) for p, s in zip(pieces, shapes))


def dense_field(W1, c1, W2, c2, W3, c3):
    """``f(z) = relu(relu(z W1 + c1) W2 + c2) W3 + c3`` for ``z (batch, C*D)``, or
    ``(S, batch, C*D)`` with per-model matrices ``(S, ., .)`` (stacked seeds)."""
    if W2.dim() == 2:
        def f(z):
            # In-place ReLU is safe (addmm keeps its inputs, not its output for backward)
            # and saves an allocation per layer: ~20% of a small field's cost.
            h = torch.relu_(torch.addmm(c1, z, W1))
            h = torch.relu_(torch.addmm(c2, h, W2))
            return torch.addmm(c3, h, W3)
    else:
        c1, c2, c3 = c1.unsqueeze(-2), c2.unsqueeze(-2), c3.unsqueeze(-2)

        def f(z):
            h = torch.relu_(torch.baddbmm(c1, z, W1))
            h = torch.relu_(torch.baddbmm(c2, h, W2))
            return torch.baddbmm(c3, h, W3)
    return f


def prepare_dense(weights, z0: torch.Tensor) -> PreparedField:
    """The dense field for states shaped like ``z0 (..., C, D)``, weights as in
    :func:`dense_conv_weights`; states travel flattened to ``(..., C*D)``. Fixed-step
    solves that record gradients and take at least :func:`fused_min_evaluations`
    evaluations go through :func:`~tune_node.dense_solve.dense_rk_solve`."""
    shape = z0.shape
    dense = dense_conv_weights(*weights, shape[-1])
    flat = (*shape[:-2], shape[-2] * shape[-1])

    def solve(z, tableau, steps, T):
        if steps * tableau.stages < fused_min_evaluations(z.device):
            return None
        return dense_rk_solve(dense, z, tableau, steps, T)

    return PreparedField(dense_field(*dense), encode=lambda z: z.reshape(flat), decode=lambda z: z.reshape(shape), solve=solve)


def prepare_conv_field(field, z0: torch.Tensor) -> PreparedField | None:
    """A :class:`~tune_node.models.ConvODEField` as dense matrix products for states shaped
    like ``z0``, built from its current conv weights; None where the conv form is used
    (images, adjoint callers, ``field.dense`` False, or signals longer than
    :data:`DENSE_MAX_DIM` unless ``field.dense`` is True)."""
    if not isinstance(field.conv1, nn.Conv1d) or z0.dim() != 3 or field.dense is False:
        return None
    if field.dense is None and z0.shape[-1] > DENSE_MAX_DIM:
        return None
    weights = [field.conv1.weight, field.conv1.bias, field.conv2.weight, field.conv2.bias, field.conv3.weight, field.conv3.bias]
    return prepare_dense(weights, z0)


class _StackedField(nn.Module):
    """S sphere vector fields, weights stacked; acts on states ``(S, batch, C, D)``."""

    time_dependent = False

    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        #: Where its seeds sit in a larger stack (None: this is the stack), for errors that name a seed.
        self.seed_positions: list[int] | None = None
        if all(isinstance(w, nn.Parameter) for w in weights):
            self.weights = nn.ParameterList(weights)
        else:  # some seeds of a stack (rows of its parameters): gradients flow back to the stack's parameters
            self.weights = list(weights)

    def prepare(self, z0: torch.Tensor) -> PreparedField:
        return prepare_dense(list(self.weights), z0)

    def forward(self, z):
        # Rebuilt per call so the generic (torchdiffeq, adjoint) paths stay correct.
        p = self.prepare(z)
        return p.decode(p.f(p.encode(z)))


class _PositionedRecord:
    """The backward record of some seeds' adjoint solve, read at their positions in the whole stack
    (the others' counts 0); read when asked, as the backward pass fills it later."""

    def __init__(self, record, positions: list[int], size: int):
        self.record, self.positions, self.size = record, positions, size

    @property
    def nfe(self) -> list[int]:
        counts = [0] * self.size
        for position, nfe in zip(self.positions, self.record.nfe):
            counts[position] = nfe
        return counts

    @property
    def ran(self) -> bool:
        return self.record.ran


class StackedSphereClassifier(nn.Module):
    """S sphere classifiers (:func:`~tune_node.models.build_model` ``("sphere", ...)``) as one model.

    Parameters are those of the S models stacked along a new leading axis, in
    ``model.parameters()`` order; seed ``i``'s own weights are slices ``[i]``.
    ``model(x, setting)`` takes ``x (S, batch, 1, D)`` and returns logits
    ``(S, batch, classes)`` and the shared :class:`~tune_node.integrate.Solution`
    (a fixed-step solve's NFE is each model's; an adaptive backprop solve controls each seed's
    steps on its own, :func:`~tune_node.ode.integrate.integrate_seeds`, and counts them in
    ``seed_nfe``). Model ``i``'s outputs equal those of the ``i``-th input model up to
    floating-point rounding.
    """

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        if not models:
            raise ValueError("StackedSphereClassifier needs at least one model")
        self.keys = [name for name, _ in models[0].named_parameters()]
        expected = ["field.conv1.weight", "field.conv1.bias", "field.conv2.weight", "field.conv2.bias",
                    "field.conv3.weight", "field.conv3.bias", "classifier.weight", "classifier.bias"]
        if self.keys != expected:
            raise ValueError(f"not a sphere classifier: parameters {self.keys}, expected {expected}")
        stacked = [nn.Parameter(torch.stack([dict(m.named_parameters())[k].detach() for m in models]).clone()) for k in self.keys]
        self.field = _StackedField(stacked[:6])
        self.classifier_weight, self.classifier_bias = stacked[6], stacked[7]

    @property
    def size(self) -> int:
        return self.classifier_weight.shape[0]

    def stacked_parameters(self) -> list[nn.Parameter]:
        """The stacked tensors, in the per-model ``parameters()`` order."""
        return [*self.field.weights, self.classifier_weight, self.classifier_bias]

    def model_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Model ``i``'s weights as a state dict of the single model (copies)."""
        return {k: p[i].detach().clone() for k, p in zip(self.keys, self.stacked_parameters())}

    def solve(self, x: torch.Tensor, setting: SolverSetting) -> Solution:
        if not seeded_adaptive(self.field, setting):
            return integrate_seeds(self.field, x, setting)
        # A seed whose weights are no longer finite (it diverged) would break its adaptive step control
        # and so the group's solve: the finite seeds are solved, the others' states are NaN at no cost.
        finite = torch.stack([torch.isfinite(w).flatten(1).all(1) for w in self.field.weights]).all(0)
        if bool(finite.all()):
            return integrate_seeds(self.field, x, setting)
        rows = finite.nonzero().flatten()
        seed_nfe = [0] * self.size
        z = torch.full_like(x, float("nan"))
        if len(rows) == 0:
            return Solution(z, setting, NFECounter(), seed_nfe=seed_nfe)
        some = _StackedField([w.index_select(0, rows) for w in self.field.weights])
        some.seed_positions = rows.tolist()  # errors of the adjoint's backward solve name positions in this stack
        try:
            sol = integrate_seeds(some, x.index_select(0, rows), setting)
        except (SolverStepLimitError, StepSizeUnderflowError) as err:
            err.seed = int(rows[err.seed])  # the position in this stack, not in the finite seeds
            raise
        for position, nfe in zip(rows.tolist(), sol.seed_nfe):
            seed_nfe[position] = nfe
        record = None if sol.backward_record is None else _PositionedRecord(sol.backward_record, rows.tolist(), self.size)
        return Solution(z.index_copy(0, rows, sol.z), setting, sol.counter, seed_nfe=seed_nfe, backward_record=record)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.classifier_bias.unsqueeze(1), z.flatten(2), self.classifier_weight.transpose(1, 2))

    def forward(self, x: torch.Tensor, setting: SolverSetting) -> tuple[torch.Tensor, Solution]:
        if x.dim() != 4 or x.shape[0] != self.size:
            raise ValueError(f"expected x of shape ({self.size}, batch, channels, dim), got {tuple(x.shape)}")
        sol = self.solve(x, setting)
        return self.classify(sol.z), sol
