"""The sphere fast path is the paper's model, and a seed group is separate runs.

Tolerances: in float64 the dense and Conv1d forms agree to 1e-10 (they are the same
linear maps, summed in another order); in float32 to rtol 1e-4, atol 1e-5 (observed
differences are ~1e-6). Grouped and separate training agree to 1e-5 in every weight
(observed: bit-identical on CPU).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tune_node import dense
from tune_node.dense import StackedSphereClassifier
from tune_node.integrate import rk_solve
from tune_node.models import build_model
from tune_node.seed_groups import train_seed_group
from tune_node.solvers import METHODS, SolverSetting
from tune_node.training import TrainConfig, load_checkpoint, restore_model, save_checkpoint, train

FAST = dict(dataset="sphere2", iterations=40, lr=3e-3, report_every=20)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The machine's cores are shared; tiny ops oversubscribed on 2 threads run ~50x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def outputs_and_grads(model, x, setting, use_dense):
    model.field.dense = use_dense
    model.zero_grad(set_to_none=True)
    logits, sol = model(x, setting)
    (logits.square().sum() + sol.z.sum()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()], sol.nfe_forward


@pytest.mark.parametrize("dim", [2, 3, 10])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, dict(rtol=1e-10, atol=1e-10)), (torch.float32, dict(rtol=1e-4, atol=1e-5))])
def test_dense_and_conv_agree_in_outputs_and_gradients(dim, method, dtype, tol):
    model = build_model("sphere", (1, dim), seed=dim).to(dtype)
    x = torch.randn(16, 1, dim, dtype=dtype, generator=torch.Generator().manual_seed(0))
    setting = SolverSetting.fixed(method, 3)
    plain = outputs_and_grads(model, x, setting, False)
    fast = outputs_and_grads(model, x, setting, True)
    torch.testing.assert_close(fast[0], plain[0], **tol)
    for g_fast, g_plain in zip(fast[1], plain[1]):
        torch.testing.assert_close(g_fast, g_plain, **tol)
    assert fast[2] == plain[2] == 3 * METHODS[method].stages_per_step


def test_automatic_rule_and_unchanged_parameters():
    for dim in (2, 3, dense.DENSE_MAX_DIM):
        assert build_model("sphere", (1, dim), seed=0).field.prepare(torch.zeros(4, 1, dim)) is not None
    long_field = build_model("sphere", (1, dense.DENSE_MAX_DIM + 1), seed=0).field
    assert long_field.prepare(torch.zeros(4, 1, dense.DENSE_MAX_DIM + 1)) is None
    long_field.dense = True
    assert long_field.prepare(torch.zeros(4, 1, dense.DENSE_MAX_DIM + 1)) is not None
    short = build_model("sphere", (1, 2), seed=0)
    short.field.dense = False
    assert short.field.prepare(torch.zeros(4, 1, 2)) is None
    assert build_model("mnist", (1, 28, 28), seed=0).field.prepare(torch.zeros(2, 1, 28, 28)) is None
    # Parameters are the Conv1d weights: same keys, shapes and initial values as nn.Conv1d's.
    model = build_model("sphere", (1, 2), seed=7)
    assert [type(m).__name__ for m in model.field.children()] == ["Conv1d"] * 3
    assert list(model.state_dict()) == ["field.conv1.weight", "field.conv1.bias", "field.conv2.weight", "field.conv2.bias",
                                        "field.conv3.weight", "field.conv3.bias", "classifier.weight", "classifier.bias"]


@pytest.mark.parametrize("setting", [SolverSetting.adaptive("dopri5", 1e-5), SolverSetting.adaptive("fehlberg2", 1e-4)])
def test_adaptive_backprop_uses_fast_path_with_same_result(setting):
    model = build_model("sphere", (1, 2), seed=1).double()
    x = torch.randn(32, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = outputs_and_grads(model, x, setting, False)
    fast = outputs_and_grads(model, x, setting, True)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-9, atol=1e-9)
    for a, b in zip(fast[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert fast[2] == plain[2]


def test_adjoint_calls_the_conv_field_and_matches_backprop_gradients():
    model = build_model("sphere", (1, 2), seed=2).double()
    x = torch.randn(8, 1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    adjoint = SolverSetting.fixed("rk4", 64, gradient="adjoint")
    adj = outputs_and_grads(model, x, adjoint, None)
    adj_conv = outputs_and_grads(model, x, adjoint, False)
    back = outputs_and_grads(model, x, SolverSetting.fixed("rk4", 64), None)
    for a, c, b in zip(adj[1], adj_conv[1], back[1]):
        assert torch.equal(a, c)  # the adjoint differentiates the field's own calls
        # Adjoint and backprop gradients differ by the discretisation's error (~1e-8 here).
        assert float((a - b).abs().max()) <= 1e-6 * float(b.abs().max())


def test_record_path_comes_back_in_the_models_shape():
    model = build_model("sphere", (1, 3), seed=0)
    sol = model.solve(torch.randn(5, 1, 3), SolverSetting.fixed("midpoint", 4), record_path=True)
    assert len(sol.path) == 5 and all(p.shape == (5, 1, 3) for p in sol.path)
    assert torch.equal(sol.path[-1], sol.z)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_stacked_models_compute_each_models_function(method):
    models = [build_model("sphere", (1, 3), seed=s) for s in range(3)]
    stacked = StackedSphereClassifier(models)
    x = torch.randn(3, 10, 1, 3, generator=torch.Generator().manual_seed(3))
    setting = SolverSetting.fixed(method, 2)
    logits, sol = stacked(x, setting)
    assert logits.shape == (3, 10, 2) and sol.nfe_forward == 2 * METHODS[method].stages_per_step
    for i, m in enumerate(models):
        torch.testing.assert_close(logits[i], m(x[i], setting)[0], rtol=1e-4, atol=1e-5)
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in stacked.model_state_dict(i).items())
    with pytest.raises(ValueError, match=r"expected x of shape \(3, batch, channels, dim\), got \(2, 10, 1, 3\)"):
        stacked(x[:2], setting)


def graph_ops(tensor):
    """Names of the autograd nodes that produced ``tensor``."""
    seen, stack, names = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_fixed_step_does_only_the_methods_arithmetic(method):
    # f is one multiplication; a step adds one fused z + c*k per nonzero coefficient.
    tableau = METHODS[method].tableau
    coefficients = sum(1 for row in tableau.a for v in row if v) + sum(1 for v in tableau.b if v)
    z0 = torch.ones(3, requires_grad=True)
    z, _ = rk_solve(lambda z: z * 0.5, z0, tableau, steps=5)
    ops = graph_ops(z)
    assert ops.count("MulBackward0") == 5 * tableau.stages
    assert ops.count("AddBackward0") == 5 * coefficients
    assert len(ops) == 5 * (tableau.stages + coefficients) + 1  # + the leaf's AccumulateGrad


def test_one_seed_trains_the_same_either_way(monkeypatch):
    # Training amplifies rounding: after ~100 iterations the two paths (like one path
    # under two thread counts) follow different trajectories of equal quality. So:
    # identical early, and equally good at the end.
    short = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 4), seed=1, iterations=30, lr=3e-3, report_every=30)
    long = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 4), seed=1, iterations=400, lr=3e-3, report_every=400)
    fast = train(short), train(long)
    monkeypatch.setattr(dense, "DENSE_MAX_DIM", 0)
    assert build_model("sphere", (1, 2)).field.prepare(torch.zeros(1, 1, 2)) is None
    plain = train(short), train(long)
    torch.testing.assert_close(weights(fast[0].model), weights(plain[0].model), rtol=0, atol=1e-4)
    assert abs(fast[0].test_accuracy - plain[0].test_accuracy) <= 0.003
    assert fast[1].test_accuracy > 0.95 and plain[1].test_accuracy > 0.95  # chance: 0.5
    assert abs(fast[1].test_accuracy - plain[1].test_accuracy) <= 0.02


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("setting", [SolverSetting.fixed("euler", 2), SolverSetting.fixed("rk4", 1)])
def test_seed_group_equals_separate_runs(setting):
    configs = [TrainConfig(solver=setting, seed=s, test_every=20, **FAST) for s in (3, 4)]
    reports = []
    grouped = train_seed_group(configs, on_report=lambda i, p, s: reports.append((i, p.iteration, p.loss)))
    assert sorted((i, it) for i, it, _ in reports) == [(0, 20), (0, 40), (1, 20), (1, 40)]
    for config, g in zip(configs, grouped):
        alone = train(config)
        assert g.config.seed == config.seed
        torch.testing.assert_close(weights(g.model), weights(alone.model), rtol=0, atol=1e-5)
        assert abs(g.test_accuracy - alone.test_accuracy) <= 0.002
        assert (g.total_nfe_forward, g.total_nfe_backward) == (alone.total_nfe_forward, alone.total_nfe_backward)
        assert [h["iteration"] for h in g.history] == [h["iteration"] for h in alone.history]
        assert g.history[-1]["loss"] == pytest.approx(alone.history[-1]["loss"], abs=1e-5)
        assert [h["test_accuracy"] for h in g.history] == pytest.approx([h["test_accuracy"] for h in alone.history], abs=0.002)
    assert not torch.equal(weights(grouped[0].model), weights(grouped[1].model))


def test_seed_group_checkpoints_resume_in_train_and_in_a_group(tmp_path):
    configs = [TrainConfig(solver=SolverSetting.fixed("midpoint", 2), seed=s, **FAST) for s in (0, 1)]
    states = {}
    full = train_seed_group(configs, on_report=lambda i, p, s: states.setdefault((i, p.iteration), s()) if p.iteration == 20 else None)
    paths = [save_checkpoint(tmp_path / f"seed{i}.pt", states[(i, 20)]) for i in range(2)]
    model, setting, config = restore_model(load_checkpoint(paths[1]))
    assert config.seed == 1 and setting == configs[1].solver
    resumed_alone = train(configs[1], resume_from=load_checkpoint(paths[1]))
    resumed_group = train_seed_group(configs, resume_from=[load_checkpoint(p) for p in paths])
    torch.testing.assert_close(weights(resumed_alone.model), weights(full[1].model), rtol=0, atol=1e-5)
    for r, f in zip(resumed_group, full):
        torch.testing.assert_close(weights(r.model), weights(f.model), rtol=0, atol=1e-5)
        assert r.total_nfe_forward == f.total_nfe_forward and len(r.history) == len(f.history)


def test_settings_without_a_grouped_path_train_seed_after_seed():
    configs = [TrainConfig(dataset="sphere2", solver=SolverSetting.adaptive("dopri5", 1e-3), seed=s, iterations=3, report_every=3)
               for s in (0, 1)]
    seen = []
    grouped = train_seed_group(configs, on_report=lambda i, p, s: seen.append(i))
    assert seen == [0, 1]
    for config, g in zip(configs, grouped):
        assert torch.equal(weights(g.model), weights(train(config).model))


@pytest.mark.parametrize("configs,match", [
    ([], "at least one config"),
    ([TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=1, **FAST)] * 2, r"seeds of a group must differ, got \[1, 1\]"),
    ([TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=1, **FAST),
      TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=2, **{**FAST, "lr": 1e-3})], "seed 2 differs in lr"),
])
def test_bad_groups_fail_before_work(configs, match):
    with pytest.raises(ValueError, match=match):
        train_seed_group(configs)


@pytest.mark.slow
def test_benchmark_quick_run_prints_ratios_then_times():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_sphere.py"), "--quick", "--skip-images"],
                         capture_output=True, text=True, check=True, cwd=root, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(root)}).stdout
    lines = out.splitlines()
    ratios, absolute = lines.index(next(ln for ln in lines if ln.startswith("ratios"))), lines.index("absolute, us per NFE per seed")
    assert ratios < absolute
    for line in lines[ratios + 2 : absolute] + lines[absolute + 1 : absolute + 6]:
        euler, rk4 = (float(v) for v in line.split()[-2:])
        assert euler > 0 and rk4 > 0
