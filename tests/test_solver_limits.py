"""Adaptive solves are capped, and torchdiffeq's failures become errors that say what happened.

Real solves on small fields: a stiff linear one (the step size is held down by
stability, so a cap is reached) and dz/dt = z**2 from z(0) = 1, whose solution
1 / (1 - t) blows up at t = 1. New names are looked up on their modules inside the
tests, so that each test fails on its own where they are missing.
"""

import pytest
import torch
from torch import nn

from tune_node import integrate as integrate_mod
from tune_node import solvers
from tune_node.integrate import integrate
from tune_node.search_space import load_space, train_config_from_trial
from tune_node.solvers import METHODS, SolverSetting
from tune_node.training import TrainConfig

Z0 = torch.tensor([[1.0, 0.5]], dtype=torch.float64)


class Stiff(nn.Module):
    def __init__(self):
        super().__init__()
        self.A = nn.Parameter(torch.tensor([[-50.0, 1.0], [0.0, -1.0]], dtype=torch.float64))

    def forward(self, z):
        return z @ self.A.T


class Square(nn.Module):
    def forward(self, z):
        return z * z


def nfe_after(method, attempts):
    spec = METHODS[method]
    return spec.startup_nfe + attempts * spec.stages_per_step


@pytest.mark.parametrize("method", ["dopri5", "fehlberg2"])
@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_step_cap_raises_naming_method_tol_cap_and_nfe(method, gradient):
    with pytest.raises(integrate_mod.SolverStepLimitError) as err:
        integrate(Stiff(), Z0, SolverSetting(method, tol=1e-6, gradient=gradient, max_steps=3))
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    for part in (method, "tol=1e-06", "max_steps=3", f"NFE reached: {nfe_after(method, 3)}", "'max_steps' key", "[[solvers]]"):
        assert part in message, part
    assert (err.value.nfe, err.value.phase) == (nfe_after(method, 3), "forward")


def test_default_cap_applies_without_max_steps(monkeypatch):
    assert solvers.DEFAULT_MAX_ADAPTIVE_STEPS == 5000
    setting = SolverSetting("dopri5", tol=1e-6)
    assert setting.max_adaptive_steps == 5000 and SolverSetting.fixed("rk4", 2).max_adaptive_steps is None
    monkeypatch.setattr(solvers, "DEFAULT_MAX_ADAPTIVE_STEPS", 4)
    with pytest.raises(integrate_mod.SolverStepLimitError, match=r"max_steps=4 .*NFE reached: 26"):
        integrate(Stiff(), Z0, setting)


def test_a_cap_that_is_not_reached_changes_nothing():
    plain = integrate(Stiff(), Z0, SolverSetting("dopri5", tol=1e-6))
    capped = integrate(Stiff(), Z0, SolverSetting("dopri5", tol=1e-6, max_steps=plain.steps))
    assert torch.equal(plain.z, capped.z) and plain.nfe_forward == capped.nfe_forward


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
@pytest.mark.parametrize("field, z0, tol", [
    (Square(), torch.ones(1, 1, dtype=torch.float64), 1e-6),  # blows up at t = 1
    (Stiff(), Z0, 1e-300),  # below what float64 resolves
])
def test_step_size_underflow_raises_naming_method_tol_and_nfe(gradient, field, z0, tol):
    # What torchdiffeq really produces here: 'underflow in dt', before 5000 attempts.
    with pytest.raises(integrate_mod.StepSizeUnderflowError) as err:
        integrate(field, z0, SolverSetting("dopri5", tol=tol, gradient=gradient, T=2.0))
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    for part in ("dopri5", f"tol={tol:g}", f"NFE reached: {err.value.nfe}", "too small", "diverged"):
        assert part in message, part
    assert err.value.nfe >= 2


def test_adjoint_backward_solve_is_capped():
    # Forward ~62 attempts, the adjoint's backward solve several hundred: 100 lets the
    # forward pass through and stops the backward one on its 101st attempt.
    sol = integrate(Stiff(), Z0.clone().requires_grad_(True), SolverSetting("dopri5", tol=1e-8, gradient="adjoint", max_steps=100))
    assert sol.steps < 100
    with pytest.raises(integrate_mod.SolverStepLimitError) as err:
        sol.z.pow(2).sum().backward()
    message = str(err.value)
    for part in ("dopri5", "tol=1e-08", "max_steps=100", "adjoint's backward solve", f"NFE reached: {nfe_after('dopri5', 100)}"):
        assert part in message, part
    assert err.value.phase == "backward"


def test_adjoint_backward_cap_counts_each_backward_solve_afresh():
    def grads(max_steps, passes):
        field = Stiff()
        sol = integrate(field, Z0.clone().requires_grad_(True), SolverSetting("dopri5", tol=1e-8, gradient="adjoint", max_steps=max_steps))
        for _ in range(passes):
            sol.z.pow(2).sum().backward(retain_graph=True)
        return field.A.grad.clone(), sol.nfe_backward

    reference, nfe = grads(None, 1)
    attempts = (nfe - METHODS["dopri5"].startup_nfe) // METHODS["dopri5"].stages_per_step
    # A cap of exactly the attempts one backward solve needs: two passes both fit.
    capped, capped_nfe = grads(attempts, 2)
    assert torch.equal(capped, 2 * reference) and capped_nfe == 2 * nfe


def test_other_assertions_pass_through_unchanged():
    class Broken(nn.Module):
        def forward(self, z):
            raise AssertionError("the field's own check")

    with pytest.raises(AssertionError, match="the field's own check"):
        integrate(Broken(), Z0, SolverSetting("dopri5", tol=1e-3))
    assert not issubclass(integrate_mod.SolverStepLimitError, AssertionError)
    assert {"SolverStepLimitError", "StepSizeUnderflowError"} <= set(integrate_mod.__all__)


def test_to_dict_carries_max_steps_only_when_set():
    # Without max_steps: exactly the dicts stored before it existed.
    assert SolverSetting("dopri5", tol=1e-3).to_dict() == {"method": "dopri5", "steps": None, "tol": 1e-3, "gradient": "backprop", "T": 1.0}
    assert SolverSetting.fixed("rk4", 8, "adjoint").to_dict() == {"method": "rk4", "steps": 8, "tol": None, "gradient": "adjoint", "T": 1.0}
    capped = SolverSetting("fehlberg2", tol=1e-4, gradient="adjoint", max_steps=777)
    assert capped.to_dict() == {"method": "fehlberg2", "steps": None, "tol": 1e-4, "gradient": "adjoint", "T": 1.0, "max_steps": 777}
    assert SolverSetting.from_dict(capped.to_dict()) == capped
    config = TrainConfig(dataset="sphere2", solver=capped)
    assert TrainConfig.from_dict(config.to_dict()).solver == capped


def test_search_space_max_steps_reaches_trials_only_when_given(tmp_path):
    path = tmp_path / "capped.toml"
    path.write_text('dataset = "sphere2"\nseeds = 2\n'
                    '[[solvers]]\nmethod = "dopri5"\ntol = [1e-3, 1e-4]\nmax_steps = 12345\n'
                    '[[solvers]]\nmethod = "fehlberg2"\ntol = 1e-3\n'
                    '[[solvers]]\nmethod = "euler"\nsteps = 4\n')
    trials = load_space(str(path)).trials()
    capped = [t for t in trials if t["method"] == "dopri5"]
    assert len(capped) == 4 and all(t["max_steps"] == 12345 for t in capped)
    assert all(train_config_from_trial(t).solver.max_steps == 12345 for t in capped)
    assert all("max_steps" not in t and train_config_from_trial(t).solver.max_steps is None for t in trials if t["method"] != "dopri5")
    # The shipped studies give none: their trial configs keep the keys they always had.
    for name in ("sphere2_adaptive", "mnist_adaptive", "quick"):
        assert all("max_steps" not in t for t in load_space(name).trials())
