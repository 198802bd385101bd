"""The project's adaptive integrator is torchdiffeq's solve, per seed.

Reference: torchdiffeq.odeint with the same method and rtol = atol, its accepted steps
read through its callback_accept_step hook and its NFE counted on the field. Problems
with known answers: z' = A z (solution expm(A t) z0) and the paper's Sphere2 field
(dense form, as training integrates it). In float64 and float32 the forward pass does
torchdiffeq's arithmetic in its order, so step times, NFE and states are compared for
equality; gradients sum the same terms in another order in the backward pass, so they
are compared to rounding. A seed group runs each seed's own solve: equal to separate
solves bit for bit on CPU.
"""

import math

import pytest
import torch
from _solve_reference import torchdiffeq_solve

from tune_node import dense
from tune_node.integrate import integrate
from tune_node.models import build_model
from tune_node.ode import adaptive
from tune_node.ode.adaptive import (
    AdaptiveStepLimitError,
    AdaptiveUnderflowError,
    IController,
    adaptive_solve,
    integrate_adaptive,
    solve_setting,
)
from tune_node.ode.solvers import METHODS, ButcherTableau, SolverSetting

ADAPTIVE = ["fehlberg2", "dopri5"]
A = torch.tensor([[-0.4, 1.3, 0.0], [-1.1, -0.2, 0.5], [0.3, 0.0, -0.7]], dtype=torch.float64)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation, and a loaded machine makes it costly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weighted_loss(z):
    # Every entry weighted differently, so no gradient term cancels.
    return (z.square() * torch.linspace(-1, 2, z.numel(), dtype=z.dtype).view_as(z)).sum()


@pytest.mark.parametrize("method", ADAPTIVE)
def test_tableaus_are_torchdiffeqs_bit_for_bit(method):
    from torchdiffeq._impl.odeint import SOLVERS

    theirs, ours = SOLVERS[method], METHODS[method].embedded
    assert list(ours.c[1:]) == theirs.tableau.alpha.tolist()
    assert [list(row) for row in ours.a[1:]] == [row.tolist() for row in theirs.tableau.beta]
    assert list(ours.b) == theirs.tableau.c_sol.tolist()
    assert list(ours.b_error) == theirs.tableau.c_error.tolist()
    assert list(ours.b_mid) == theirs.mid.tolist()
    assert ours.order == theirs.order == METHODS[method].order
    assert ours.stages - 1 == METHODS[method].stages_per_step


def test_error_weights_are_checked():
    with pytest.raises(ValueError, match="b_error must have one entry per stage"):
        ButcherTableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), order=2, b_error=(0.5,))
    with pytest.raises(ValueError, match="must sum to 0"):
        ButcherTableau(a=((), (1.0,)), b=(0.5, 0.5), c=(0.0, 1.0), order=2, b_error=(0.5, 0.0))
    assert not METHODS["rk4"].tableau.embedded and METHODS["dopri5"].embedded.embedded


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("tol", [1e-3, 1e-7])
def test_linear_ode_steps_nfe_and_solution_equal_torchdiffeqs(method, tol):
    z0 = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.8, -1.2]], dtype=torch.float64)
    T = 2.0
    exact = z0 @ torch.linalg.matrix_exp(A * T).T
    sol = adaptive_solve(lambda z: z @ A.T, z0, METHODS[method].embedded, T, IController(tol, tol, METHODS[method].order))
    z_ref, nfe_ref, accepted_ref = torchdiffeq_solve(lambda z: z @ A.T, z0, method, tol, T)
    assert sol.accepted == [accepted_ref]
    assert sol.nfe == [nfe_ref] == [2 + sol.attempts[0] * METHODS[method].stages_per_step]
    assert sol.accepted[0][-1] >= T > sol.accepted[0][-2]
    assert torch.equal(sol.z, z_ref)
    # The known answer, to the tolerance's order. Measured global errors on this problem:
    # dopri5 ~ 1-2 tol; Fehlberg 2(1), whose error estimate is first order, ~ 100-250 tol.
    assert (sol.z - exact).abs().max() < {"fehlberg2": 400, "dopri5": 4}[method] * tol


@pytest.mark.parametrize("method", ADAPTIVE)
def test_linear_ode_gradients_equal_torchdiffeqs(method):
    # Gradients include torchdiffeq's dependence of the first step size on z0 and A.
    results = []
    for ours in (True, False):
        a = A.clone().requires_grad_(True)
        z0 = torch.tensor([[1.0, -0.5, 0.25]], dtype=torch.float64, requires_grad=True)
        if ours:
            z = adaptive_solve(lambda z: z @ a.T, z0, METHODS[method].embedded, 1.0, IController(1e-5, 1e-5, METHODS[method].order)).z
        else:
            z = torchdiffeq_solve(lambda z: z @ a.T, z0, method, 1e-5)[0]
        weighted_loss(z).backward()
        results.append((a.grad, z0.grad))
    for g, g_ref in zip(*results):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def sphere_solve(model, x, method, tol, ours):
    """(z(T), NFE, accepted times, parameter gradients) of the dense Sphere2 field."""
    model.zero_grad()
    prepared = model.field.prepare(x)
    z0 = prepared.encode(x)
    if ours:
        sol = solve_setting(prepared.f, z0, SolverSetting.adaptive(method, tol))
        z, nfe, accepted = sol.z, sol.nfe[0], sol.accepted[0]
    else:
        z, nfe, accepted = torchdiffeq_solve(prepared.f, z0, method, tol)
    weighted_loss(z).backward()
    return z.detach(), nfe, accepted, [p.grad.clone() for p in model.field.parameters()]


@pytest.mark.parametrize("dtype, tol, grad_tol", [(torch.float64, 1e-5, 1e-12), (torch.float32, 1e-3, 1e-5)], ids=["float64", "float32"])
@pytest.mark.parametrize("method", ADAPTIVE)
def test_sphere_field_steps_nfe_and_solution_equal_torchdiffeqs(method, dtype, tol, grad_tol):
    model = build_model("sphere", (1, 2), seed=3).to(dtype)
    x = torch.randn(64, 1, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    z, nfe, accepted, grads = sphere_solve(model, x, method, tol, ours=True)
    z_ref, nfe_ref, accepted_ref, grads_ref = sphere_solve(model, x, method, tol, ours=False)
    assert accepted == accepted_ref and len(accepted) >= 3
    assert nfe == nfe_ref == integrate(model.field, x, SolverSetting.adaptive(method, tol)).nfe_forward
    assert torch.equal(z, z_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=grad_tol, atol=grad_tol * g_ref.abs().max().item())


@pytest.mark.parametrize("method", ADAPTIVE)
def test_five_seed_group_equals_five_separate_solves(method):
    tol, seeds = 1e-4, range(5)
    models = [build_model("sphere", (1, 2), seed=s).double() for s in seeds]
    x = torch.randn(5, 32, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    separate = [sphere_solve(m, x[s], method, tol, ours=True) for s, m in zip(seeds, models)]
    # Distinct step sequences, so seeds do finish at different attempts and reject on their own.
    assert len({tuple(r[2]) for r in separate}) > 1 and len({r[1] for r in separate}) > 1

    stacked = dense.StackedSphereClassifier(models)
    prepared = stacked.field.prepare(x)
    sol = solve_setting(prepared.f, prepared.encode(x), SolverSetting.adaptive(method, tol), seeded=True)
    weighted_loss(sol.z[0]).backward()  # seed 0's loss only: the others get no gradient
    z = prepared.decode(sol.z).detach()
    for s, (z_s, nfe, accepted, grads) in enumerate(separate):
        assert sol.nfe[s] == nfe and sol.accepted[s] == accepted
        assert torch.equal(prepared.encode(z)[s], z_s)
    for w, g in zip(stacked.field.weights, separate[0][3]):
        assert torch.equal(w.grad[0], g)
        assert not w.grad[1:].any()

    # Each seed's own loss: every seed's gradients equal its separate solve's.
    for w in stacked.field.weights:
        w.grad = None
    prepared = stacked.field.prepare(x)
    sol = solve_setting(prepared.f, prepared.encode(x), SolverSetting.adaptive(method, tol), seeded=True)
    sum(weighted_loss(sol.z[s]) for s in seeds).backward()
    for s in seeds:
        for w, g in zip(stacked.field.weights, separate[s][3]):
            assert torch.equal(w.grad[s], g)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_step_cap_is_torchdiffeqs_max_num_steps(method):
    f = lambda z: z @ A.T  # noqa: E731
    z0 = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    tableau, controller = METHODS[method].embedded, IController(1e-8, 1e-8, METHODS[method].order)
    attempts = adaptive_solve(f, z0, tableau, 1.0, controller).attempts[0]
    assert adaptive_solve(f, z0, tableau, 1.0, controller, max_steps=attempts).attempts == [attempts]
    torchdiffeq_solve(f, z0, method, 1e-8, max_num_steps=attempts)
    with pytest.raises(AdaptiveStepLimitError, match=f"max_steps={attempts - 1}") as caught:
        adaptive_solve(f, z0, tableau, 1.0, controller, max_steps=attempts - 1)
    assert caught.value.nfe == 2 + (attempts - 1) * METHODS[method].stages_per_step
    with pytest.raises(AssertionError, match="max_num_steps exceeded"):
        torchdiffeq_solve(f, z0, method, 1e-8, max_num_steps=attempts - 1)


def test_blow_up_raises_underflow_where_torchdiffeq_does():
    # z' = z^2, z(0) = 1: z = 1 / (1 - t) blows up at t = 1.
    z0 = torch.ones(1, 1, dtype=torch.float64)
    with pytest.raises(AdaptiveUnderflowError, match="underflow"):
        adaptive_solve(lambda z: z * z, z0, METHODS["dopri5"].embedded, 2.0, IController(1e-6, 1e-6, 5))
    with pytest.raises(AssertionError, match="underflow in dt"):
        torchdiffeq_solve(lambda z: z * z, z0, "dopri5", 1e-6, 2.0)


@pytest.mark.parametrize("ratio, accept, factor", [(0.0, True, 10.0), (1e-9, True, 10.0), (0.5, True, 0.9 / 0.5 ** 0.2),
                                                   (0.99, True, 1.0), (1.0, True, 0.9), (2.0, False, 0.9 / 2.0 ** 0.2),
                                                   (1e6, False, 0.2)])
def test_controller_rules(ratio, accept, factor):
    from torchdiffeq._impl.misc import _optimal_step_size

    ok, h_next = IController(1e-3, 1e-3, order=5).decide(0.1, ratio)
    assert ok is accept
    assert math.isclose(h_next, 0.1 * factor, rel_tol=1e-15)
    f64 = dict(dtype=torch.float64)
    theirs = _optimal_step_size(torch.tensor(0.1, **f64), torch.tensor(ratio, **f64), torch.tensor(0.9, **f64),
                                torch.tensor(10.0, **f64), torch.tensor(0.2, **f64), 5)
    assert h_next == theirs.item()


def test_bad_arguments_are_refused():
    z0 = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="embedded tableau"):
        adaptive_solve(lambda z: z, z0, METHODS["rk4"].tableau, 1.0, IController(1e-3, 1e-3, 4))
    with pytest.raises(ValueError, match="no embedded tableau"):
        solve_setting(lambda z: z, z0, SolverSetting.fixed("rk4", 4))
    with pytest.raises(ValueError, match="adjoint"):
        solve_setting(lambda z: z, z0, SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint"))
    assert adaptive.__all__ and all(hasattr(adaptive, name) for name in adaptive.__all__)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_opt_in_integrate_adaptive_matches_integrate(method):
    model = build_model("sphere", (1, 2), seed=4)
    x = torch.randn(16, 1, 2, generator=torch.Generator().manual_seed(2))
    setting = SolverSetting.adaptive(method, 1e-4)
    ours, theirs = integrate_adaptive(model.field, x, setting), integrate(model.field, x, setting)
    assert ours.z.shape == x.shape and torch.equal(ours.z, theirs.z)
    assert ours.nfe == [theirs.nfe_forward]
    models = [build_model("sphere", (1, 2), seed=s) for s in (4, 5)]
    group = integrate_adaptive(dense.StackedSphereClassifier(models).field, torch.stack([x, x]), setting, seeded=True)
    assert torch.equal(group.z[0], ours.z) and group.nfe[0] == ours.nfe[0]
    assert group.nfe[1] == integrate(models[1].field, x, setting).nfe_forward


@pytest.mark.parametrize("method", ADAPTIVE)
def test_five_seed_group_trains_to_the_weights_of_five_separate_trainings(method):
    # A few Adam iterations in float32 (the training dtype), each seed on its own batches:
    # the stacked group's weights and NFE per iteration equal separate trainings', bit for bit.
    seeds, iterations, setting = range(5), 2, SolverSetting.adaptive(method, 1e-3)
    gen = torch.Generator().manual_seed(4)
    batches = torch.randn(iterations, 5, 16, 1, 2, generator=gen)
    targets = torch.randn(iterations, 5, 16, 1, 2, generator=gen)

    def loss_of(z, target):
        return (z - target).square().mean()

    separate_nfe, separate_weights = [], []
    for s in seeds:
        model = build_model("sphere", (1, 2), seed=s)
        opt = torch.optim.Adam(model.field.parameters(), lr=1e-2)
        nfe = []
        for it in range(iterations):
            opt.zero_grad()
            sol = integrate_adaptive(model.field, batches[it, s], setting)
            loss_of(sol.z, targets[it, s]).backward()
            opt.step()
            nfe.append(sol.nfe[0])
        separate_nfe.append(nfe)
        separate_weights.append([p.detach().clone() for p in model.field.parameters()])

    stacked = dense.StackedSphereClassifier([build_model("sphere", (1, 2), seed=s) for s in seeds])
    opt = torch.optim.Adam(stacked.field.parameters(), lr=1e-2)
    group_nfe = []
    for it in range(iterations):
        opt.zero_grad()
        sol = integrate_adaptive(stacked.field, batches[it], setting, seeded=True)
        sum(loss_of(sol.z[s], targets[it, s]) for s in seeds).backward()
        opt.step()
        group_nfe.append(sol.nfe)
    assert [list(n) for n in zip(*group_nfe)] == separate_nfe
    assert len({tuple(n) for n in separate_nfe}) > 1  # the seeds do step differently
    initial = [p.detach() for p in build_model("sphere", (1, 2), seed=0).field.parameters()]
    assert all(not torch.equal(w, w0) for w, w0 in zip(separate_weights[0], initial))
    for s in seeds:
        for w, w_separate in zip(stacked.field.weights, separate_weights[s]):
            assert torch.equal(w[s], w_separate)
