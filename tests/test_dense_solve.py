"""The fused dense solve equals the generic Runge-Kutta loop on the dense field.

Tolerances: float64, rtol = atol = 1e-12 (the forward pass does the same operations;
the hand-written backward sums the same terms in another order). The C++ loops of
tune_node.native and the Python loops give the same bits.
"""

import warnings

import pytest
import torch
from _solve_reference import graph_node_names

from tune_node import dense, native
from tune_node.dense_solve import PythonLoops, dense_rk_solve, solve_loops
from tune_node.integrate import integrate, rk_solve
from tune_node.models import build_model
from tune_node.solvers import METHODS, SolverSetting

TIGHT = dict(rtol=1e-12, atol=1e-12)

# CI and the development machine have a C++ compiler, so the C++ loops are tested
# there; a machine without one skips only the tests that need them.
NATIVE = native.dense_loops()
needs_native = pytest.mark.skipif(NATIVE is None, reason="the C++ loops could not be built here")
LOOPS = [pytest.param(PythonLoops, id="python"), pytest.param(NATIVE, id="cpp", marks=needs_native)]


def stacked_weights(seeds, dim, dtype=torch.float64):
    models = [build_model("sphere", (1, dim), seed=s).to(dtype) for s in seeds]
    stacked = dense.StackedSphereClassifier(models)
    return [w.detach().clone().requires_grad_(True) for w in stacked.field.weights]


def solve_both(weights, z0, method, steps, dim, loops=None):
    """(z_T, gradients) from the fused solve and from rk_solve on the dense field."""
    tableau = METHODS[method].tableau
    results = []
    for fused in (True, False):
        ws = [w.detach().clone().requires_grad_(True) for w in weights]
        z = z0.detach().clone().requires_grad_(True)
        mats = dense.dense_conv_weights(*ws, dim)
        if fused:
            zT = dense_rk_solve(mats, z, tableau, steps, 1.0, loops=loops)
        else:
            zT, _ = rk_solve(dense.dense_field(*mats), z, tableau, steps, 1.0)
        # A loss that weighs every output entry differently, so no gradient term cancels.
        weights_of_loss = torch.linspace(-1, 2, zT.numel(), dtype=zT.dtype).view_as(zT)
        (zT.square() * weights_of_loss).sum().backward()
        results.append((zT.detach(), [z.grad, *(w.grad for w in ws)]))
    return results


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("steps", [1, 3])
def test_fused_solve_matches_the_generic_loop_stacked(method, steps, loops):
    dim = 3
    weights = stacked_weights([0, 1, 2], dim)
    z0 = torch.randn(3, 8, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (z_fused, g_fused), (z_loop, g_loop) = solve_both(weights, z0, method, steps, dim, loops)
    torch.testing.assert_close(z_fused, z_loop, **TIGHT)
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("method", ["euler", "rk4"])
def test_fused_solve_matches_the_generic_loop_single_model(method, loops):
    dim = 2
    model = build_model("sphere", (1, dim), seed=4).double()
    f = model.field
    weights = [f.conv1.weight, f.conv1.bias, f.conv2.weight, f.conv2.bias, f.conv3.weight, f.conv3.bias]
    z0 = torch.randn(5, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    (z_fused, g_fused), (z_loop, g_loop) = solve_both(weights, z0, method, 4, dim, loops)
    assert z_fused.shape == (5, dim)
    torch.testing.assert_close(z_fused, z_loop, **TIGHT)
    for a, b in zip(g_fused, g_loop):
        torch.testing.assert_close(a, b, **TIGHT)


def test_fused_gradient_matches_finite_differences():
    # Independent of autograd: <grad, v> against a central difference along random v.
    dim = 2
    weights = stacked_weights([0, 1], dim)
    gen = torch.Generator().manual_seed(5)
    z0 = torch.randn(2, 3, dim, dtype=torch.float64, generator=gen)
    tableau = METHODS["midpoint"].tableau

    def loss(z, ws):
        return dense_rk_solve(dense.dense_conv_weights(*ws, dim), z, tableau, 2).square().sum()

    inputs = [z0.clone().requires_grad_(True), *(w.detach().clone().requires_grad_(True) for w in weights)]
    loss(inputs[0], inputs[1:]).backward()
    for _ in range(3):
        v = [torch.randn(t.shape, dtype=t.dtype, generator=gen) for t in inputs]
        eps = 1e-6
        with torch.no_grad():
            plus = [t + eps * d for t, d in zip(inputs, v)]
            minus = [t - eps * d for t, d in zip(inputs, v)]
            numeric = (loss(plus[0], plus[1:]) - loss(minus[0], minus[1:])) / (2 * eps)
        analytic = sum((t.grad * d).sum() for t, d in zip(inputs, v))
        torch.testing.assert_close(analytic, numeric, rtol=1e-7, atol=1e-7)


def test_a_second_backward_pass_fails_clearly():
    weights = stacked_weights([0], 2)
    out = dense_rk_solve(dense.dense_conv_weights(*weights, 2), torch.randn(1, 3, 2, dtype=torch.float64),
                         METHODS["euler"].tableau, 2)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass per solve"):
        out.sum().backward()


def test_two_solves_alive_at_once_keep_their_own_activations():
    # The second forward pass must not overwrite the first one's saved activations,
    # whichever backward pass runs first.
    dim = 2
    weights = stacked_weights([0, 1], dim)
    tableau = METHODS["rk4"].tableau
    gen = torch.Generator().manual_seed(3)
    z_a, z_b = (torch.randn(2, 6, dim, dtype=torch.float64, generator=gen) for _ in range(2))

    def grads(z0s):
        ws = [w.detach().clone().requires_grad_(True) for w in weights]
        outs = [dense_rk_solve(dense.dense_conv_weights(*ws, dim), z, tableau, 3) for z in z0s]
        for out in reversed(outs):
            out.square().sum().backward()
        return [w.grad for w in ws]

    together = grads([z_a, z_b])
    separately = [a + b for a, b in zip(grads([z_a]), grads([z_b]))]
    for a, b in zip(together, separately):
        torch.testing.assert_close(a, b, **TIGHT)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_integrate_counts_the_fused_solves_evaluations(method):
    model = build_model("sphere", (1, 2), seed=0)
    x = torch.randn(4, 1, 2)
    steps = dense.fused_min_evaluations()  # enough evaluations for the fused solve
    setting = SolverSetting.fixed(method, steps)
    sol = integrate(model.field, x, setting)
    assert any("DenseRKSolve" in name for name in graph_node_names(sol.z.grad_fn))
    sol.z.sum().backward()
    assert sol.nfe_forward == sol.nfe_backward == steps * METHODS[method].stages_per_step
    with torch.no_grad():
        plain = integrate(model.field, x, setting)
    assert plain.nfe_forward == sol.nfe_forward
    torch.testing.assert_close(plain.z, sol.z.detach(), rtol=1e-5, atol=1e-6)


def test_short_solves_keep_the_autograd_loop():
    model = build_model("sphere", (1, 2), seed=0)
    x = torch.randn(4, 1, 2)
    short = SolverSetting.fixed("euler", dense.fused_min_evaluations() - 1)
    long = SolverSetting.fixed("euler", dense.fused_min_evaluations())
    assert not any("DenseRKSolve" in n for n in graph_node_names(integrate(model.field, x, short).z.grad_fn))
    assert any("DenseRKSolve" in n for n in graph_node_names(integrate(model.field, x, long).z.grad_fn))


def solve_and_grads(loops, weights, z0, tableau, steps):
    ws = [w.detach().clone().requires_grad_(True) for w in weights]
    z = z0.clone().requires_grad_(True)
    zT = dense_rk_solve(ws, z, tableau, steps, 0.7, loops=loops)
    (zT * torch.linspace(-1, 2, zT.numel(), dtype=zT.dtype).view_as(zT)).sum().backward()
    return [zT.detach(), z.grad, *(w.grad for w in ws)]


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_cpp_loops_give_the_python_loops_bits(method, dtype):
    # The Sphere2 training shapes: 5 seeds, batch 128, 64 hidden units.
    weights = [w.to(dtype) for w in dense.dense_conv_weights(*stacked_weights(range(5), 2), 2)]
    z0 = torch.randn(5, 128, 2, generator=torch.Generator().manual_seed(7)).to(dtype)
    tableau = METHODS[method].tableau
    cpp = solve_and_grads(NATIVE, weights, z0, tableau, 5)
    python = solve_and_grads(PythonLoops, weights, z0, tableau, 5)
    for a, b in zip(cpp, python):
        assert torch.equal(a, b)


@needs_native
def test_dense_rk_solve_uses_the_cpp_loops_where_built():
    assert solve_loops() is NATIVE


def test_native_loops_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(native, "_loaded", native._UNSET)
    monkeypatch.setenv("TUNE_NODE_NATIVE", "0")
    assert native.dense_loops() is None
    assert solve_loops() is PythonLoops


def test_a_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(**_):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(native, "_loaded", native._UNSET)
    monkeypatch.setenv("TUNE_NODE_NATIVE", "1")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(RuntimeWarning, match="c\\+\\+: command not found"):
        assert native.dense_loops() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.dense_loops() is None  # no second warning, no second attempt
