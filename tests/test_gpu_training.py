"""The GPU side of training: the graph path's logic on the CPU (capture disabled), the GPU flags'
decisions, the dense solve's loops on CUDA; tests marked ``gpu`` need a CUDA GPU and skip without one."""

import pytest
import torch

import tune_node.fast.dense_solve as dense_solve
import tune_node.train.training as training
from tune_node.data.datasets import Dataset
from tune_node.fast import native
from tune_node.fast.dense import dense_conv_weights
from tune_node.models import build_model
from tune_node.seed_groups import SphereStack, train_seed_group
from tune_node.solvers import METHODS, SolverSetting
from tune_node.training import TrainConfig, gpu_features, train, train_seeds

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST = dict(dataset="sphere2", iterations=12, lr=3e-3, report_every=4)


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


def history_numbers(result):
    return [(h["iteration"], h["loss"], h["train_accuracy"], h["nfe_forward"], h["nfe_backward"], h["steps"])
            for h in result.history]


# ---------------------------------------------------------------- the graph path on the CPU

@pytest.mark.parametrize("method,steps,optimizer", [("rk4", 3, "adam"), ("euler", 2, "sgd"), ("euler", 8, "adam")])
def test_static_step_path_equals_plain_loop_bit_for_bit_one_seed(method, steps, optimizer):
    config = TrainConfig(solver=SolverSetting.fixed(method, steps), seed=3, optimizer=optimizer, **FAST)
    plain = train_seeds([config], static_step=False)[0]
    static = train_seeds([config], static_step=True)[0]
    assert torch.equal(weights(plain.model), weights(static.model))
    assert history_numbers(plain) == history_numbers(static)
    assert (plain.test_accuracy, plain.train_accuracy) == (static.test_accuracy, static.train_accuracy)
    assert (plain.total_nfe_forward, plain.total_nfe_backward) == (static.total_nfe_forward, static.total_nfe_backward)
    assert plain.total_nfe_forward == 12 * steps * METHODS[method].stages_per_step


def test_static_step_path_equals_plain_loop_bit_for_bit_seed_stack():
    configs = [TrainConfig(solver=SolverSetting.fixed("rk4", 2), seed=s, **FAST) for s in range(3)]
    plain = train_seeds(configs, stack=SphereStack, static_step=False)
    static = train_seeds(configs, stack=SphereStack, static_step=True)
    for p, s in zip(plain, static):
        assert torch.equal(weights(p.model), weights(s.model))
        assert history_numbers(p) == history_numbers(s)
        assert p.test_accuracy == s.test_accuracy


def test_static_step_reuses_its_input_buffers(monkeypatch):
    seen = []

    class Recording(training.StaticStep):
        def __call__(self, x, y):
            out = super().__call__(x, y)
            seen.append((self.x.data_ptr(), self.y.data_ptr(), self.graph))
            return out

    monkeypatch.setattr(training, "StaticStep", Recording)
    train_seeds([TrainConfig(solver=SolverSetting.fixed("euler", 4), **FAST)], static_step=True)
    assert len(seen) == FAST["iterations"]
    assert len({(a, b) for a, b, _ in seen}) == 1  # one static buffer pair, refilled every iteration
    assert all(graph is None for *_, graph in seen)  # no capture on the CPU


def test_static_step_refuses_adaptive_and_controlled_training():
    config = TrainConfig(solver=SolverSetting.adaptive("dopri5", 1e-3), **FAST)
    with pytest.raises(ValueError, match="fixed-step"):
        train_seeds([config], static_step=True)
    fixed = TrainConfig(solver=SolverSetting.fixed("euler", 2), **FAST)
    with pytest.raises(ValueError, match="without a solver controller"):
        train_seeds([fixed], static_step=True, controller=object())


def test_static_step_diverged_seed_is_marked_and_others_train_on():
    configs = [TrainConfig(solver=SolverSetting.fixed("euler", 4), seed=s, **FAST) for s in range(2)]
    data = [c.load_data() for c in configs]
    data[1].x_train[:] = float("nan")
    results = train_seeds(configs, stack=SphereStack, static_step=True, data=data)
    assert results[0].diverged is None and torch.isfinite(weights(results[0].model)).all()
    assert results[1].diverged is not None and results[1].diverged.iteration == 1


# ---------------------------------------------------------------- the flags' decisions

def test_gpu_features_all_off_on_cpu_whatever_the_flags():
    config = TrainConfig(solver=SolverSetting.fixed("rk4", 2), cuda_graph=True, channels_last=True, tf32=True, amp=True, **FAST)
    features = gpu_features(config)
    assert set(features) == {"cuda_graph", "channels_last", "tf32", "amp"}
    assert all(on is False and "CUDA only" in why for on, why in features.values())


def test_gpu_features_decisions_for_a_cuda_device():
    sphere = TrainConfig(solver=SolverSetting.fixed("rk4", 2), **FAST)
    f = gpu_features(sphere, "cuda")
    assert f["cuda_graph"][0] and not f["channels_last"][0] and not f["tf32"][0] and not f["amp"][0]
    assert "image models only" in f["channels_last"][1]
    adaptive = TrainConfig(solver=SolverSetting.adaptive("dopri5", 1e-3), **FAST)
    assert not gpu_features(adaptive, "cuda")["cuda_graph"][0]
    adjoint = TrainConfig(solver=SolverSetting.fixed("rk4", 2, gradient="adjoint"), **FAST)
    assert "backprop" in gpu_features(adjoint, "cuda")["cuda_graph"][1]
    assert "controller" in gpu_features(sphere, "cuda", controller=object())["cuda_graph"][1]
    sphere_amp = gpu_features(TrainConfig(solver=SolverSetting.fixed("rk4", 2), amp=True, **FAST), "cuda")
    assert sphere_amp["cuda_graph"][0] and sphere_amp["amp"] == (False, "amp is for the paper's image models only")
    assert not gpu_features(TrainConfig(solver=SolverSetting.fixed("rk4", 2), cuda_graph=False, **FAST), "cuda")["cuda_graph"][0]
    mnist = TrainConfig(dataset="mnist", solver=SolverSetting.fixed("euler", 2), tf32=True)
    f = gpu_features(mnist, "cuda")
    assert f["channels_last"][0] and f["tf32"][0] and not f["cuda_graph"][0] and not f["amp"][0]
    assert gpu_features(TrainConfig(dataset="mnist", solver=SolverSetting.fixed("euler", 2), amp=True), "cuda")["amp"][0]
    assert not gpu_features(TrainConfig(dataset="cifar10", solver=SolverSetting.fixed("euler", 2), channels_last=False),
                            "cuda")["channels_last"][0]


def test_gpu_flags_checked_and_kept_out_of_default_config_dicts():
    with pytest.raises(ValueError, match="amp must be True or False"):
        TrainConfig(solver=SolverSetting.fixed("rk4", 2), amp=1, **FAST)
    default = TrainConfig(solver=SolverSetting.fixed("rk4", 2), **FAST).to_dict()
    assert not {"cuda_graph", "channels_last", "tf32", "amp"} & set(default)
    changed = TrainConfig(solver=SolverSetting.fixed("rk4", 2), cuda_graph=False, tf32=True, **FAST)
    d = changed.to_dict()
    assert d["cuda_graph"] is False and d["tf32"] is True and "amp" not in d
    assert TrainConfig.from_dict(d) == changed


def test_cpu_training_ignores_the_gpu_flags_bit_for_bit():
    solver = SolverSetting.fixed("rk4", 2)
    a = train(TrainConfig(solver=solver, **FAST))
    b = train(TrainConfig(solver=solver, cuda_graph=False, channels_last=False, tf32=True, amp=True, **FAST))
    assert torch.equal(weights(a.model), weights(b.model))


# ---------------------------------------------------------------- the dense solve's loops on CUDA

def test_cuda_loops_choice_is_explicit(monkeypatch):
    assert dense_solve.CUDA_LOOPS == "cpp"
    assert dense_solve.solve_loops("cuda") is dense_solve.solve_loops("cpu")
    monkeypatch.setattr(dense_solve, "CUDA_LOOPS", "python")
    assert dense_solve.solve_loops("cuda:0") is dense_solve.PythonLoops
    assert dense_solve.solve_loops(torch.device("cpu")) is (native.dense_loops() or dense_solve.PythonLoops)


def _dense_problem(device, seeds=3, batch=16, dtype=torch.float32):
    models = [build_model("sphere", (1, 2), seed=s) for s in range(seeds)]
    raw = [torch.stack([p.detach() for p in ps]).to(device, dtype).requires_grad_() for ps in zip(*(m.parameters() for m in models))]
    z0 = torch.randn(seeds, batch, 2, generator=torch.Generator().manual_seed(0), dtype=dtype).to(device).requires_grad_()
    return raw[:6], z0


def _solve_and_grads(raw, z0, loops, method="rk4", steps=3):
    for t in (*raw, z0):
        t.grad = None
    z = dense_solve.dense_rk_solve(dense_conv_weights(*raw, 2), z0, METHODS[method].tableau, steps, loops=loops)
    (z * torch.linspace(-1, 1, z.shape[-1], device=z.device, dtype=z.dtype)).sum().backward()
    return [z.detach().clone()] + [t.grad.clone() for t in (*raw, z0)]


def test_cpp_loops_make_device_generic_aten_calls():
    # The C++ loops take whatever device their tensors are on: on the meta device (shapes
    # only, no kernels of any real device) every call dispatches and the shapes come out right.
    loops = native.dense_loops()
    if loops is None:
        pytest.skip("C++ loops not built on this machine")
    W1, c1, W2, c2, W3, c3 = (w.detach().to("meta") for w in dense_conv_weights(*_dense_problem("cpu")[0], 2))
    z0 = torch.empty(3, 16, 2, device="meta")
    a, b = METHODS["rk4"].tableau.step_coefficients(0.5)
    key, buffers = dense_solve._take_buffers(2 * len(a), z0, W2.shape[-1])
    zs, h1, h2s, ks = buffers[:4]
    z = loops.forward_loop(z0, W1, c1.unsqueeze(-2), W2, c2.unsqueeze(-2), W3.transpose(-1, -2).contiguous(),
                           c3.unsqueeze(-1), zs, h1, h2s, ks, a, b, 2)
    assert z.device.type == "meta" and tuple(z.shape) == (3, 16, 2)


# ---------------------------------------------------------------- on a GPU

def _image_data(name, shape, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return Dataset(name, x, y, x[:256].clone(), y[:256].clone(), 10)


@pytest.mark.gpu
@NEEDS_CUDA
def test_gpu_cpp_and_python_loops_agree_on_cuda():
    loops = native.dense_loops()
    if loops is None:
        pytest.skip("C++ loops not built on this machine")
    raw, z0 = _dense_problem("cuda", dtype=torch.float64)
    cpp = _solve_and_grads(raw, z0, loops)
    python = _solve_and_grads(raw, z0, dense_solve.PythonLoops)
    for a, b in zip(cpp, python):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    cpu = _solve_and_grads([t.detach().cpu().requires_grad_() for t in raw], z0.detach().cpu().requires_grad_(), loops)
    for a, b in zip(cpp, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-10, atol=1e-10)


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("seeds", [1, 5])
def test_gpu_graph_training_equals_eager_up_to_rounding(monkeypatch, seeds):
    graphs = []

    class Recording(training.StaticStep):
        def __call__(self, x, y):
            out = super().__call__(x, y)
            graphs.append(self.graph)
            return out

    monkeypatch.setattr(training, "StaticStep", Recording)
    make = lambda s, graph: TrainConfig(solver=SolverSetting.fixed("rk4", 4), seed=s, device="cuda", cuda_graph=graph,  # noqa: E731
                                         iterations=30, lr=3e-3, report_every=10, dataset="sphere2")
    eager = train_seed_group([make(s, False) for s in range(seeds)])
    assert graphs == []
    graphed = train_seed_group([make(s, True) for s in range(seeds)])
    assert len(graphs) == 30 and graphs[training.GRAPH_WARMUP - 1] is None and graphs[-1] is not None
    for e, g in zip(eager, graphed):
        assert e.total_nfe_forward == g.total_nfe_forward == 30 * 16
        assert relative_difference(weights(g.model), weights(e.model)) < 1e-4
        assert [h["loss"] for h in g.history] == pytest.approx([h["loss"] for h in e.history], rel=1e-4)


@pytest.mark.gpu
@NEEDS_CUDA
def test_gpu_graph_training_resumes_like_an_unbroken_run():
    config = TrainConfig(solver=SolverSetting.fixed("euler", 4), device="cuda", iterations=20, lr=3e-3, report_every=10,
                         dataset="sphere2")
    states = []
    whole = train(config, on_report=lambda p, state: states.append(state()))
    resumed = train(config, resume_from=states[0])
    assert relative_difference(weights(resumed.model), weights(whole.model)) < 1e-5


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("family,shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_gpu_image_flags_keep_results_up_to_rounding(family, shape):
    data = _image_data(family, shape)
    base = dict(dataset=family, solver=SolverSetting.fixed("euler", 2), device="cuda", iterations=3, batch_size=64,
                optimizer="sgd", lr=1e-2, eval_batch_size=256)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    fp32 = train(TrainConfig(channels_last=False, **base), data=data)
    nhwc = train(TrainConfig(channels_last=True, **base), data=data)
    assert next(nhwc.model.field.parameters()).is_contiguous(memory_format=torch.channels_last)
    assert relative_difference(weights(nhwc.model), weights(fp32.model)) < 1e-4
    tf32 = train(TrainConfig(tf32=True, **base), data=data)
    assert relative_difference(weights(tf32.model), weights(fp32.model)) < 1e-2
    amp = train(TrainConfig(amp=True, **base), data=data)
    assert torch.isfinite(weights(amp.model)).all() and amp.diverged is None
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_seed_group_refuses_configs_differing_in_a_gpu_flag():
    configs = [TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=0, **FAST),
               TrainConfig(solver=SolverSetting.fixed("euler", 2), seed=1, amp=True, **FAST)]
    with pytest.raises(ValueError, match="differs in amp"):
        train_seed_group(configs)


@pytest.mark.parametrize("family,shape", [("mnist", (1, 28, 28)), ("cifar10", (3, 32, 32))])
def test_channels_last_image_model_equals_nchw_up_to_rounding(family, shape):
    # The layout the channels_last feature gives an image model on CUDA, checked on the CPU's kernels.
    nchw = build_model(family, shape, seed=0)
    nhwc = build_model(family, shape, seed=0).to(memory_format=torch.channels_last)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))
    setting = SolverSetting.fixed("rk4", 1)
    outputs = []
    for model, xi in ((nchw, x), (nhwc, x.contiguous(memory_format=torch.channels_last))):
        logits, _ = model(xi, setting)
        logits.square().sum().backward()
        outputs.append([logits.detach()] + [p.grad for p in model.parameters()])
    assert next(nhwc.field.parameters()).is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(*outputs):  # other summation orders: rounding, small against the whole tensor
        assert relative_difference(a, b) < 1e-5


def test_bench_gpu_prints_ratios_before_absolute_numbers():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    us = {"rk4": {(d, s): v for d, base in (("cpu", 40.0), ("gpu eager", 20.0), ("gpu graph", 4.0)) for s, v in ((1, base), (5, base / 2))}}
    ms = {"cifar10": {"cpu": 3000.0, "gpu fp32": 30.0, "gpu channels-last": 20.0}}
    lines = bench.report(us, ms, gpu=True)
    assert lines[0].startswith("ratios") and lines.index("absolute") > 1
    assert "cpu/gpu graph 10.00" in lines[1] and "best CPU / best GPU per NFE per seed 10.00" in lines[3]
    assert "cpu/gpu fp32 100.0, cpu/gpu channels-last 150.0" in lines[4]
    assert bench.report(us, ms, gpu=False)[0] == "absolute"
