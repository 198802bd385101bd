"""Training adaptive settings through tune-node's own adaptive solve: the same NFE as torchdiffeq's,
per-seed step control in a seed group, and torchdiffeq kept one environment variable away."""

from __future__ import annotations

import pytest
import torch

from tune_node.ode.integrate import (
    SolverStepLimitError,
    adaptive_solver,
    integrate,
    integrate_seeds,
    seeded_adaptive,
)
from tune_node.ode.solvers import SolverSetting
from tune_node.train.seed_groups import stack_for, train_seed_group
from tune_node.train.training import TrainConfig, train

METHODS = ["fehlberg2", "dopri5"]


def _config(method: str, tol: float, seed: int = 0, iterations: int = 6, gradient: str = "backprop",
            max_steps: int | None = None) -> TrainConfig:
    return TrainConfig(dataset="sphere2", solver=SolverSetting(method, tol=tol, gradient=gradient, max_steps=max_steps), seed=seed,
                       iterations=iterations, report_every=2, test_every=0, lr=3e-3)


def _sphere_model(seed: int = 0):
    from tune_node.train.models import build_model

    torch.manual_seed(seed)
    return build_model("sphere", (1, 2), seed=seed)


@pytest.mark.parametrize("method", METHODS)
def test_one_solve_matches_torchdiffeq_in_nfe_and_values(method, monkeypatch):
    model = _sphere_model()
    x = torch.randn(64, 1, 2, generator=torch.Generator().manual_seed(1))
    setting = SolverSetting.adaptive(method, 1e-4)
    results = {}
    for solver in ("tune_node", "torchdiffeq"):
        monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", solver)
        assert adaptive_solver() == solver
        model.zero_grad()
        sol = integrate(model.field, x, setting)
        sol.z.square().sum().backward()
        results[solver] = (sol.z.detach(), sol.nfe_forward, sol.nfe_backward, sol.steps,
                           [p.grad.clone() for p in model.field.parameters()])
    ours, reference = results["tune_node"], results["torchdiffeq"]
    assert ours[1:4] == reference[1:4]
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-6, atol=1e-6)
    for g, h in zip(ours[4], reference[4]):
        torch.testing.assert_close(g, h, rtol=1e-4, atol=1e-6)


def test_training_counts_the_same_nfe_either_way(monkeypatch):
    runs = {}
    for solver in ("tune_node", "torchdiffeq"):
        monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", solver)
        runs[solver] = train(_config("dopri5", 1e-4, iterations=4))
    ours, reference = runs["tune_node"], runs["torchdiffeq"]
    assert ours.total_nfe_forward == reference.total_nfe_forward and ours.total_nfe_backward == reference.total_nfe_backward
    assert [h["nfe_forward"] for h in ours.history] == [h["nfe_forward"] for h in reference.history]
    assert [h["steps"] for h in ours.history] == [h["steps"] for h in reference.history]


@pytest.mark.parametrize("method", METHODS)
def test_a_seed_group_trains_as_its_seeds_alone(method):
    configs = [_config(method, 1e-5, seed=s) for s in (0, 1, 2)]
    assert stack_for(configs[0], (1, 2)) is not None
    group = train_seed_group(configs)
    alone = [train(c) for c in configs]
    for g, a in zip(group, alone):
        assert g.total_nfe_forward == a.total_nfe_forward and g.total_nfe_backward == a.total_nfe_backward
        assert [h["nfe_forward"] for h in g.history] == [h["nfe_forward"] for h in a.history]
        for key, value in a.model.state_dict().items():
            assert torch.equal(g.model.state_dict()[key], value), key
    # Each seed keeps its own step control: the seeds' NFE differ (a shared controller would make them equal).
    assert len({g.total_nfe_forward for g in group}) > 1


def test_what_does_not_stack_per_seed(monkeypatch):
    assert stack_for(_config("dopri5", 1e-3, gradient="adjoint"), (1, 2)) is not None
    fixed_adjoint = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("rk4", 4, gradient="adjoint"), iterations=2)
    assert stack_for(fixed_adjoint, (1, 2)) is None
    monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", "torchdiffeq")
    assert stack_for(_config("dopri5", 1e-3), (1, 2)) is None
    assert stack_for(_config("dopri5", 1e-3, gradient="adjoint"), (1, 2)) is None
    from tune_node.fast.dense import StackedSphereClassifier

    net = StackedSphereClassifier([_sphere_model(0), _sphere_model(1)])
    setting = SolverSetting.adaptive("dopri5", 1e-3)
    assert not seeded_adaptive(net.field, setting)
    with pytest.raises(ValueError, match=r"cannot be solved per seed here; allowed: adaptive settings of an embedded pair"):
        integrate_seeds(net.field, torch.zeros(2, 4, 1, 2), setting)
    monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", "scipy")
    with pytest.raises(ValueError, match=r"TUNE_NODE_ADAPTIVE_SOLVER='scipy'; allowed: tune_node, torchdiffeq"):
        adaptive_solver()


def test_a_seeds_failed_solve_names_the_seed():
    from tune_node.fast.dense import StackedSphereClassifier

    net = StackedSphereClassifier([_sphere_model(0), _sphere_model(1)])
    setting = SolverSetting("dopri5", tol=1e-9, max_steps=2)
    with pytest.raises(SolverStepLimitError, match=r"max_steps=2") as caught:
        integrate_seeds(net.field, torch.randn(2, 16, 1, 2), setting)
    assert caught.value.seed in (0, 1)
    # In training, as for one seed: with finite weights the solver's error stands (the trial fails saying so).
    with pytest.raises(SolverStepLimitError, match=r"max_steps=2") as caught:
        train_seed_group([_config("dopri5", 1e-9, seed=s, iterations=2, max_steps=2) for s in (0, 1)])
    assert caught.value.seed in (0, 1)


def test_a_diverged_seed_leaves_its_adaptive_group_training(monkeypatch):
    """A seed whose loss stops being finite is marked diverged and its NaN weights are left out of the
    group's adaptive solve (their step control would fail), so the other seeds train on as alone."""
    from tune_node.train.seed_groups import SphereStack

    configs = [_config("dopri5", 1e-4, seed=s, iterations=6) for s in (0, 1, 2)]
    alone = [train(c) for c in configs[::2]]
    honest = SphereStack.losses

    def poisoned(self, logits, y):
        losses, total = honest(self, logits, y)
        if poisoned.calls == 2:  # iteration 3: seed 1's loss is not finite
            bad = torch.zeros_like(losses)
            bad[1] = float("nan")
            total = total + (logits[1].sum() * float("nan"))
            losses = losses + bad
        poisoned.calls += 1
        return losses, total

    poisoned.calls = 0
    monkeypatch.setattr(SphereStack, "losses", poisoned)
    group = train_seed_group(configs)
    assert group[1].diverged is not None and group[1].diverged.iteration == 3
    for g, a in zip(group[::2], alone):
        assert g.diverged is None and g.total_nfe_forward == a.total_nfe_forward
        for key, value in a.model.state_dict().items():
            assert torch.equal(g.model.state_dict()[key], value), key
    # Seed 1's cost stops where it diverged; the solves after it did not evaluate it.
    assert 0 < group[1].total_nfe_forward < group[0].total_nfe_forward + group[2].total_nfe_forward


def test_a_bad_solver_choice_is_refused_before_any_work(monkeypatch, capsys, tmp_path):
    from tune_node import grid

    monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", "scipy")
    assert grid.main(["--space", "tiny", "--storage", str(tmp_path / "runs"), "--dry-run"]) == 2
    assert "error: TUNE_NODE_ADAPTIVE_SOLVER='scipy'; allowed: tune_node, torchdiffeq" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_use_adaptive_solver_sets_and_restores_the_choice(monkeypatch):
    from tune_node.ode.integrate import use_adaptive_solver

    monkeypatch.delenv("TUNE_NODE_ADAPTIVE_SOLVER", raising=False)
    with use_adaptive_solver("torchdiffeq"):
        assert adaptive_solver() == "torchdiffeq"
    assert adaptive_solver() == "tune_node"
    monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", "torchdiffeq")
    with use_adaptive_solver("tune_node"):
        assert adaptive_solver() == "tune_node"
    assert adaptive_solver() == "torchdiffeq"
    with pytest.raises(ValueError, match=r"adaptive solver 'scipy'; allowed: tune_node, torchdiffeq"):
        with use_adaptive_solver("scipy"):
            pass
