"""Solvers against problems with known answers: dz/dt = A z has z(T) = expm(T A) z0."""

import math

import pytest
import torch
from torch import nn

from tune_node.integrate import integrate
from tune_node.solvers import ADAPTIVE_METHODS, FIXED_METHODS, METHODS, ButcherTableau, SolverSetting, test_solver_for

A = torch.tensor([[-0.5, 2.0], [-2.0, -0.5]], dtype=torch.float64)
Z0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(A.clone())

    def forward(self, z):
        return z @ self.A.T


def exact(T=1.0):
    return Z0 @ torch.linalg.matrix_exp(T * A).T


def error(setting):
    with torch.no_grad():
        return float((integrate(Linear(), Z0, setting).z - exact(setting.T)).norm())


@pytest.mark.parametrize("method,ratio", [("euler", 2), ("midpoint", 4), ("rk4", 16)])
def test_fixed_step_convergence_order(method, ratio):
    errors = [error(SolverSetting.fixed(method, n)) for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(ratio, rel=0.15)


@pytest.mark.parametrize("method", ADAPTIVE_METHODS)
def test_adaptive_error_falls_with_tolerance(method):
    errors = [error(SolverSetting.adaptive(method, tol)) for tol in (1e-3, 1e-5, 1e-7)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] / errors[2] > 10
    assert errors[2] < 1e-4


@pytest.mark.parametrize("method,stages", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_fixed_step_nfe_is_exact(method, stages, steps):
    sol = integrate(Linear(), Z0, SolverSetting.fixed(method, steps), record_path=True)
    assert sol.nfe_forward == stages * steps
    assert len(sol.path) == steps + 1
    sol.z.sum().backward()
    assert sol.nfe_backward == stages * steps


@pytest.mark.parametrize("method", FIXED_METHODS)
def test_fixed_step_takes_steps_of_size_h(method):
    # dz/dt = 1 with Euler: exactly z(T) = T whatever h; the path shows every step is h.
    class One(nn.Module):
        def forward(self, z):
            return torch.ones_like(z)

    sol = integrate(One(), torch.zeros(1, 1, dtype=torch.float64), SolverSetting.fixed(method, 10), record_path=True)
    increments = torch.diff(torch.stack(sol.path).flatten())
    assert torch.allclose(increments, torch.full_like(increments, 0.1))


# The adjoint of a discretisation differs from backprop through it by the method's error.
@pytest.mark.parametrize("method,rtol", [("euler", 0.05), ("midpoint", 0.01), ("rk4", 1e-4), ("dopri5", 1e-4)])
def test_adjoint_counts_backward_separately_and_matches_backprop(method, rtol):
    kwargs = {"tol": 1e-8} if METHODS[method].adaptive else {"steps": 64}
    grads, counts = [], []
    for gradient in ("backprop", "adjoint"):
        field = Linear()
        z0 = Z0.clone().requires_grad_(True)
        sol = integrate(field, z0, SolverSetting(method, gradient=gradient, **kwargs))
        sol.z.pow(2).sum().backward()
        grads.append(field.A.grad.clone())
        counts.append((sol.nfe_forward, sol.nfe_backward))
    fwd, bwd = counts[1]
    assert fwd > 0 and bwd > 0
    if not METHODS[method].adaptive:
        assert fwd == 64 * METHODS[method].stages_per_step
        assert bwd == fwd  # the adjoint solve backwards takes the same grid
    assert torch.allclose(grads[0], grads[1], rtol=rtol, atol=rtol)


@pytest.mark.parametrize("method", FIXED_METHODS)
def test_fixed_step_matches_torchdiffeq(method):
    import torchdiffeq

    field = Linear()
    ours = integrate(field, Z0, SolverSetting.fixed(method, 5)).z
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    theirs = torchdiffeq.odeint(lambda t, z: field(z), Z0, t, method=METHODS[method].torchdiffeq_name,
                                 options={"step_size": 0.2})[-1]
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)


def test_adaptive_step_count_from_nfe():
    sol = integrate(Linear(), Z0, SolverSetting.adaptive("dopri5", 1e-6))
    spec = METHODS["dopri5"]
    assert (sol.nfe_forward - spec.startup_nfe) % spec.stages_per_step == 0
    assert sol.steps >= 2


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "ralston"}, "unknown solver method 'ralston'; allowed: euler, midpoint, rk4, fehlberg2, dopri5, heun"),
        ({"method": "euler", "steps": 0}, "steps >= 1, got steps=0"),
        ({"method": "euler", "steps": -4}, "steps >= 1, got steps=-4"),
        ({"method": "rk4", "steps": 2.5}, "integer number of steps"),
        ({"method": "dopri5", "tol": 0.0}, "tol > 0, got tol=0.0"),
        ({"method": "fehlberg2", "tol": -1e-3}, "tol > 0"),
        ({"method": "dopri5", "steps": 4}, "adaptive: give tol"),
        ({"method": "euler", "steps": 4, "gradient": "magic"}, "unknown gradient mode 'magic'"),
    ],
)
def test_bad_settings_name_value_and_allowed(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        SolverSetting(**kwargs)


def test_tableau_checked_on_construction():
    with pytest.raises(ValueError, match="sum to"):
        ButcherTableau(a=((), (0.5,)), b=(0.3, 0.3), c=(0.0, 0.5), order=2)
    with pytest.raises(ValueError, match="row 1"):
        ButcherTableau(a=((), (0.4,)), b=(0.0, 1.0), c=(0.0, 0.5), order=2)


@pytest.mark.parametrize(
    "train,test_method,expected_h",
    [
        # Euler -> Midpoint: h_test^2 = h / 50 while that is finer than h.
        (SolverSetting.fixed("euler", 4), "midpoint", math.sqrt(0.25 / 50)),
        (SolverSetting.fixed("euler", 64), "midpoint", 1 / 64),
        # Euler -> RK4: h_test^4 = h / 50.
        (SolverSetting.fixed("euler", 2), "rk4", (0.5 / 50) ** 0.25),
        # Midpoint -> RK4: h_test^4 = h^2 / 50.
        (SolverSetting.fixed("midpoint", 4), "rk4", (0.25**2 / 50) ** 0.25),
    ],
)
def test_test_solver_rule_on_the_papers_pairs(train, test_method, expected_h):
    test = test_solver_for(train, test_method)
    assert test.method == test_method
    assert test.steps == max(train.steps, math.ceil(1 / expected_h - 1e-9))
    assert test.step_size <= min(train.step_size, expected_h) + 1e-12


@pytest.mark.parametrize("train_method,divisor", [("fehlberg2", 5), ("dopri5", 10)])
def test_test_solver_tolerance_rule(train_method, divisor):
    test = test_solver_for(SolverSetting.adaptive(train_method, 1e-3))
    assert test.method == "dopri5"
    assert test.tol == pytest.approx(1e-3 / divisor)


def test_test_solver_refuses_less_accurate_method():
    with pytest.raises(ValueError, match="less accurate"):
        test_solver_for(SolverSetting.fixed("rk4", 4), "euler")
