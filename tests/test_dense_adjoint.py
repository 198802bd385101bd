"""tune-node's adjoint for adaptive solves of the dense sphere field against torchdiffeq's
``odeint_adjoint`` and against a closed-form solution; per-seed step control in a group;
its errors from ``backward()``; training with it."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq

from tune_node.fast.dense import StackedSphereClassifier, dense_conv_weights, dense_field
from tune_node.fast.dense_adjoint import dense_adjoint_solve, fused_adjoint_solve
from tune_node.ode.adaptive import IController
from tune_node.ode.integrate import SolverStepLimitError, integrate, integrate_seeds
from tune_node.ode.solvers import METHODS, SolverSetting
from tune_node.train.models import build_model
from tune_node.train.seed_groups import train_seed_group
from tune_node.train.training import TrainConfig, train

ADAPTIVE = ["fehlberg2", "dopri5"]


def _model(seed: int, dtype=torch.float32):
    return build_model("sphere", (1, 2), seed=seed).to(dtype)


def _conv(field) -> list[torch.Tensor]:
    return [field.conv1.weight, field.conv1.bias, field.conv2.weight, field.conv2.bias, field.conv3.weight, field.conv3.bias]


def _torchdiffeq_adjoint(f, conv, z0, method: str, tol: float):
    """torchdiffeq's adjoint as ``integrate`` calls it; returns z(T), its gradients under the loss
    ``sum(w * z)``, and the forward and backward evaluations."""
    calls = [0]

    class Counted(torch.nn.Module):
        def forward(self, t, z):
            calls[0] += 1
            return f(z)

    t = torch.tensor([0.0, 1.0], dtype=z0.dtype)
    z = torchdiffeq.odeint_adjoint(Counted(), z0, t, rtol=tol, atol=tol, method=METHODS[method].torchdiffeq_name,
                                   adjoint_rtol=tol, adjoint_atol=tol, adjoint_params=tuple(conv))[-1]
    forward = calls[0]
    return z, forward, lambda: calls[0] - forward


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("seed, tol", [(0, 1e-3), (1, 1e-5)])
def test_matches_torchdiffeq_on_the_papers_field_in_float64(method, seed, tol):
    """The same forward and backward evaluations, gradients equal up to rounding. (Where an error
    estimate is mostly rounding, e.g. on steps far shorter than the tolerance asks for, the two
    solves' step sizes drift apart by more than rounding and may take different steps: both are
    torchdiffeq's algorithm; the fields here are the paper's models at initialisation.)"""
    model = _model(seed, torch.float64)
    conv = _conv(model.field)
    x = torch.randn(128, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.randn(128, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    x_ref = x.clone().requires_grad_(True)
    z_ref, nfe_forward, nfe_backward = _torchdiffeq_adjoint(model.field, conv, x_ref, method, tol)
    grads_ref = torch.autograd.grad((z_ref * w).sum(), [x_ref, *conv])

    x_ours = x.clone().requires_grad_(True)
    sol, record = fused_adjoint_solve(model.field, x_ours, SolverSetting.adaptive(method, tol, gradient="adjoint"))
    grads = torch.autograd.grad((sol.z * w).sum(), [x_ours, *conv])

    assert sol.nfe == [nfe_forward] and record.ran and record.nfe == [nfe_backward()]
    torch.testing.assert_close(sol.z, z_ref.detach(), rtol=1e-12, atol=1e-12)  # the conv field against its dense form
    for g, h in zip(grads, grads_ref):
        assert ((g - h).norm() / h.norm()).item() < 1e-12


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("tol", [1e-3, 1e-5])
def test_matches_torchdiffeq_on_the_dense_field_in_float32(method, tol):
    """On the same dense field, the forward solve is torchdiffeq's bit for bit; the backward solve
    sums its products in another order, so in float32 its steps may part where an error ratio is
    within rounding of a decision (not in these cases, on this machine)."""
    model = _model(1)
    conv = _conv(model.field)
    x = torch.randn(128, 2, generator=torch.Generator().manual_seed(1))

    x_ref = x.clone().requires_grad_(True)
    z_ref, nfe_forward, nfe_backward = _torchdiffeq_adjoint(lambda z: dense_field(*dense_conv_weights(*conv, 2))(z), conv, x_ref,
                                                            method, tol)
    grads_ref = torch.autograd.grad(z_ref.square().sum(), [x_ref, *conv])

    x_ours = x.clone().requires_grad_(True)
    spec = METHODS[method]
    sol, record = dense_adjoint_solve(conv, x_ours, 2, spec.embedded, 1.0, IController(tol, tol, spec.order))
    grads = torch.autograd.grad(sol.z.square().sum(), [x_ours, *conv])

    assert torch.equal(sol.z, z_ref) and sol.nfe == [nfe_forward] and record.nfe == [nfe_backward()]
    for g, h in zip(grads, grads_ref):
        assert ((g - h).norm() / h.norm()).item() < 1e-5


def _affine_flow(conv, x, t: float):
    """``z(t)`` of the dense field of ``conv`` from ``x`` where no ReLU cuts (``f(z) = z A + b``):
    ``[z(t), 1] = [x, 1] expm(t [[A, 0], [b, 0]])``; also the smallest pre-activation on the way to it."""
    W1, c1, W2, c2, W3, c3 = dense_conv_weights(*conv, 2)
    A, b = W1 @ W2 @ W3, (c1 @ W2 + c2) @ W3 + c3
    M = torch.cat([torch.cat([A, torch.zeros(2, 1, dtype=A.dtype)], 1), torch.cat([b, torch.zeros(1, dtype=A.dtype)]).unsqueeze(0)])
    lifted = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    smallest = math.inf
    for s in torch.linspace(0, t, 11).tolist():
        z = (lifted @ torch.linalg.matrix_exp(s * M))[:, :2]
        first = z @ W1 + c1
        smallest = min(smallest, first.min().item(), (first @ W2 + c2).min().item())
    return (lifted @ torch.linalg.matrix_exp(t * M))[:, :2], smallest


@pytest.mark.parametrize("method", ADAPTIVE)
def test_gradients_of_an_affine_field_match_its_closed_form(method):
    """Biases large enough that no ReLU cuts make the field affine, with a closed-form flow that
    autograd differentiates in ``z0`` and the conv weights."""
    torch.manual_seed(3)
    hidden = 32
    conv = [0.5 * torch.randn(hidden, 1, 1), torch.full((hidden,), 20.0), 0.03 * torch.randn(hidden, hidden, 3),
            torch.full((hidden,), 20.0), 0.1 * torch.randn(1, hidden, 1), torch.zeros(1)]
    conv = [c.double().requires_grad_(True) for c in conv]
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    w = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact, smallest = _affine_flow(conv, x, 1.0)
    assert smallest > 0.1  # the premise: affine all the way, with room for the solver's error
    grads_exact = torch.autograd.grad((exact * w).sum(), [x, *conv])

    spec = METHODS[method]
    sol, record = dense_adjoint_solve(conv, x, 2, spec.embedded, 1.0, IController(1e-10, 1e-10, spec.order))
    grads = torch.autograd.grad((sol.z * w).sum(), [x, *conv])
    torch.testing.assert_close(sol.z, exact, rtol=1e-7, atol=1e-7)
    for g, h in zip(grads, grads_exact):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-8)
    assert record.ran and record.nfe[0] > 2


@pytest.mark.parametrize("method", ADAPTIVE)
def test_a_group_equals_its_seeds_solved_alone(method):
    models = [_model(s) for s in range(3)]
    net = StackedSphereClassifier(models)
    x = torch.randn(3, 64, 1, 2, generator=torch.Generator().manual_seed(1))
    setting = SolverSetting.adaptive(method, 1e-4, gradient="adjoint")
    sol = integrate_seeds(net.field, x, setting)
    sol.z.square().sum().backward()
    counts = sol.seed_counts(3)
    assert len({c[1] for c in counts}) > 1  # each seed its own backward step control
    for i, m in enumerate(models):
        alone = integrate(m.field, x[i], setting)
        alone.z.square().sum().backward()
        assert torch.equal(alone.z, sol.z[i]) and (alone.nfe_forward, alone.nfe_backward) == counts[i]
        for p, stacked in zip(m.field.parameters(), net.field.weights):
            assert torch.equal(p.grad, stacked.grad[i])


def test_the_backward_solve_is_capped_and_names_the_seed():
    models = [_model(s) for s in range(2)]
    for p in models[1].field.parameters():
        p.data.mul_(2)  # seed 1's backward solve needs far more steps than the others' solves
    net = StackedSphereClassifier(models)
    x = torch.randn(2, 64, 1, 2, generator=torch.Generator().manual_seed(1))
    free = integrate_seeds(net.field, x, SolverSetting.adaptive("fehlberg2", 1e-5, gradient="adjoint"))
    free.z.sum().backward()
    attempts = [(n - 2) // 2 for pair in free.seed_counts(2) for n in pair]  # forward, backward of seed 0, then seed 1
    cap = 60
    assert max(attempts[:3]) <= cap < attempts[3]
    capped = integrate_seeds(net.field, x, SolverSetting("fehlberg2", tol=1e-5, gradient="adjoint", max_steps=cap))
    with pytest.raises(SolverStepLimitError, match="adjoint's backward solve") as caught:
        capped.z.sum().backward()
    assert caught.value.phase == "backward" and caught.value.seed == 1 and caught.value.nfe == 2 + 2 * cap

    # Seed 0 diverged, so the solve runs seeds 1 and 2 of a 3-seed stack: the error names position 2
    # (under this loss their backward solves take 85 and 143 attempts).
    net = StackedSphereClassifier([_model(5), *models])
    with torch.no_grad():
        net.field.weights[0][0].fill_(float("nan"))
    logits, _ = net(torch.cat([x[:1], x]), SolverSetting("fehlberg2", tol=1e-5, gradient="adjoint", max_steps=110))
    with pytest.raises(SolverStepLimitError) as caught:
        logits[1:].sum().backward()
    assert caught.value.seed == 2 and "seed 2:" in str(caught.value.__cause__)


def test_a_seed_group_trains_with_the_adjoint_as_its_seeds_alone():
    configs = [TrainConfig(dataset="sphere2", solver=SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint"), seed=s,
                           iterations=4, report_every=2, test_every=0, lr=3e-3) for s in (0, 1)]
    group = train_seed_group(configs)
    alone = [train(c) for c in configs]
    for g, a in zip(group, alone):
        assert (g.total_nfe_forward, g.total_nfe_backward) == (a.total_nfe_forward, a.total_nfe_backward)
        assert [h["nfe_backward"] for h in g.history] == [h["nfe_backward"] for h in a.history]
        assert g.total_nfe_backward > 0
        for key, value in a.model.state_dict().items():
            assert torch.equal(g.model.state_dict()[key], value), key


def test_torchdiffeq_stays_one_variable_away(monkeypatch):
    model = _model(0, torch.float64)
    x = torch.randn(32, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    setting = SolverSetting.adaptive("dopri5", 1e-4, gradient="adjoint")
    runs = {}
    for solver in ("tune_node", "torchdiffeq"):
        monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", solver)
        model.zero_grad()
        sol = integrate(model.field, x, setting)
        sol.z.square().sum().backward()
        runs[solver] = (sol, [p.grad.clone() for p in model.field.parameters()])
    (ours, ours_grads), (reference, reference_grads) = runs["tune_node"], runs["torchdiffeq"]
    assert ours.backward_record is not None and reference.backward_record is None
    assert (ours.nfe_forward, ours.nfe_backward) == (reference.nfe_forward, reference.nfe_backward)
    torch.testing.assert_close(ours.z, reference.z, rtol=1e-12, atol=1e-12)
    for g, h in zip(ours_grads, reference_grads):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-14)


def test_weights_without_gradients_leave_the_norm_as_in_torchdiffeq():
    """torchdiffeq drops parameters that need no gradient from the adjoint's state and norm: so does this."""
    model = _model(0, torch.float64)
    conv = _conv(model.field)
    for w in conv[:4]:
        w.requires_grad_(False)
    x = torch.randn(128, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z_ref, nfe_forward, nfe_backward = _torchdiffeq_adjoint(model.field, [w for w in conv if w.requires_grad], x, "dopri5", 1e-5)
    grads_ref = torch.autograd.grad(z_ref.square().sum(), conv[4:])
    sol, record = fused_adjoint_solve(model.field, x, SolverSetting.adaptive("dopri5", 1e-5, gradient="adjoint"))
    grads = torch.autograd.grad(sol.z.square().sum(), conv[4:])
    assert sol.nfe == [nfe_forward] and record.nfe == [nfe_backward()]
    for g, h in zip(grads, grads_ref):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-14)


def test_a_seed_the_loss_does_not_touch_is_not_solved_backward():
    net = StackedSphereClassifier([_model(s) for s in range(3)])
    x = torch.randn(3, 32, 1, 2, generator=torch.Generator().manual_seed(1))
    sol = integrate_seeds(net.field, x, SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint"))
    sol.z[0].square().sum().backward()
    counts = sol.seed_counts(3)
    assert counts[0][1] > 0 and counts[1][1] == counts[2][1] == 0
    assert all(not bool(w.grad[1:].any()) for w in net.field.weights)


def test_a_diverged_seed_is_left_out_and_the_others_keep_their_counts():
    models = [_model(s) for s in range(3)]
    net = StackedSphereClassifier(models)
    with torch.no_grad():
        net.field.weights[2][1].fill_(float("nan"))  # seed 1 diverged
    x = torch.randn(3, 32, 1, 2, generator=torch.Generator().manual_seed(1))
    setting = SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint")
    logits, sol = net(x, setting)
    logits[[0, 2]].square().sum().backward()
    counts = sol.seed_counts(3)
    assert counts[1] == (0, 0)
    for i in (0, 2):
        alone = integrate(models[i].field, x[i], setting)
        models[i].classifier(alone.z.flatten(1)).square().sum().backward()
        assert counts[i] == (alone.nfe_forward, alone.nfe_backward) and counts[i][1] > 0


def test_a_seed_whose_loss_is_not_finite_gets_nan_gradients_and_the_others_train_on():
    net = StackedSphereClassifier([_model(s) for s in range(3)])
    x = torch.randn(3, 32, 1, 2, generator=torch.Generator().manual_seed(1))
    sol = integrate_seeds(net.field, x, SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint"))
    scale = torch.tensor([1.0, math.nan, 1.0]).view(3, 1, 1, 1)
    (sol.z * scale).square().sum().backward()
    counts = sol.seed_counts(3)
    assert counts[1][1] == 0 and counts[0][1] > 0 and counts[2][1] > 0
    for w in net.field.weights:
        assert bool(w.grad[[0, 2]].isfinite().all()) and not bool(w.grad[1].isfinite().any())


def test_solver_errors_copy_and_pickle_with_their_message_and_attributes():
    import copy
    import pickle

    from tune_node.ode.integrate import StepSizeUnderflowError

    setting = SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint")
    for error in (SolverStepLimitError(setting, 12, "backward"), StepSizeUnderflowError(setting, 7, "backward", "detail")):
        error.seed = 3
        error.args = (f"seed 3 of the group: {error}",)
        for twin in (copy.copy(error), pickle.loads(pickle.dumps(error))):
            assert type(twin) is type(error) and str(twin) == str(error)
            assert (twin.setting, twin.nfe, twin.phase, twin.seed) == (setting, error.nfe, "backward", 3)


def test_a_seed_whose_backward_solve_fails_stops_and_the_others_train_on(monkeypatch):
    import tune_node.fast.dense_adjoint as module
    from tune_node.ode.adaptive import AdaptiveUnderflowError

    real, calls = module.adaptive_solve, [0]

    def failing_once(f, y0, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:  # iteration 3 (two backward solves per iteration), seed 1's
            raise AdaptiveUnderflowError(0, -1.0, math.nan, 2)
        return real(f, y0, *args, **kwargs)

    configs = [TrainConfig(dataset="sphere2", solver=SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint"), seed=s,
                           iterations=5, report_every=1, test_every=0, lr=3e-3) for s in (0, 1)]
    monkeypatch.setattr(module, "adaptive_solve", failing_once)
    group = train_seed_group(configs)
    monkeypatch.setattr(module, "adaptive_solve", real)
    assert group[1].diverged.iteration == 3 and "the adjoint's backward solve failed" in group[1].diverged.reason
    assert group[1].iterations == 2 and group[0].diverged is None
    alone = train(configs[0])
    assert (group[0].total_nfe_forward, group[0].total_nfe_backward) == (alone.total_nfe_forward, alone.total_nfe_backward)
    for key, value in alone.model.state_dict().items():
        assert torch.equal(group[0].model.state_dict()[key], value), key
