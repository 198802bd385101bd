"""The fused adaptive solve of the dense sphere field is the eager one, and torchdiffeq's.

Reference: torchdiffeq.odeint (accepted steps through callback_accept_step, NFE counted on
the field) and :func:`tune_node.ode.adaptive.adaptive_solve` on ``dense_field`` (the eager
solve, whose graph is torchdiffeq's). The fused forward pass makes the eager solve's ATen
calls on the same values, so steps, NFE and z(T) are compared for equality; its backward
pass sums the same terms in another order, so gradients are compared to rounding. A seed
group runs the same calls per seed as separate solves: equal bit for bit on CPU.
"""

import pytest
import torch
from _solve_reference import graph_node_names, torchdiffeq_solve

from tune_node import dense
from tune_node.fast.adaptive_native import adaptive_loops
from tune_node.fast.adaptive_solve import PythonAttemptLoops, dense_adaptive_solve
from tune_node.models import build_model
from tune_node.ode.adaptive import AdaptiveStepLimitError, AdaptiveUnderflowError, IController, adaptive_solve, integrate_adaptive
from tune_node.ode.solvers import METHODS, SolverSetting

ADAPTIVE = ["fehlberg2", "dopri5"]
# CI and the development machine have a C++ compiler, so the C++ loops are tested there;
# a machine without one skips only the tests that need them.
NATIVE = adaptive_loops()
needs_native = pytest.mark.skipif(NATIVE is None, reason="the C++ loops could not be built here")
LOOPS = [pytest.param(PythonAttemptLoops, id="python"), pytest.param(NATIVE, id="cpp", marks=needs_native)]
DTYPES = [pytest.param(torch.float64, 1e-5, 1e-10, id="float64"), pytest.param(torch.float32, 1e-3, 2e-5, id="float32")]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weighted_loss(z):
    # Every entry of a seed's state weighted differently, so no gradient term cancels; the
    # same weights for every seed, so a seed's loss in a group is its loss alone.
    weights = torch.linspace(-1, 2, z.shape[-2] * z.shape[-1], dtype=z.dtype).view(z.shape[-2:])
    return (z.square() * weights).sum()


def sphere_weights(dtype, seeds=None):
    """Dense weights of Sphere2 fields (one model, or ``seeds`` stacked) as leaves."""
    if seeds is None:
        conv = build_model("sphere", (1, 2), seed=3).to(dtype).field.parameters()
    else:
        conv = dense.StackedSphereClassifier([build_model("sphere", (1, 2), seed=s).to(dtype) for s in seeds]).field.weights
    return [w.detach().clone() for w in dense.dense_conv_weights(*conv, 2)]


def linear_weights(dtype):
    """A dense field whose ReLUs never cut: hidden biases far above the products' range,
    so f(z) = z A + b on the states reached, a decaying spiral (an affine ODE)."""
    gen = torch.Generator().manual_seed(5)
    W1 = torch.cat([torch.eye(2, dtype=dtype)] * 4, 1)
    W2 = torch.eye(8, dtype=dtype) + 0.05 * torch.randn(8, 8, generator=gen, dtype=dtype)
    W3 = 0.05 * torch.randn(8, 2, generator=gen, dtype=dtype)
    W3[:2] += torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=dtype)
    c1, c2 = torch.full((8,), 20.0, dtype=dtype), torch.full((8,), 80.0, dtype=dtype)
    c3 = 0.1 * torch.randn(2, generator=gen, dtype=dtype) - (c1 @ W2 + c2) @ W3
    return [W1, c1, W2, c2, W3, c3]


def solve(weights, z0, method, tol, *, fused, seeded=False, T=1.0, loss=weighted_loss, loops=None):
    """(solution, [dL/dz0, dL/dweights...]) of the fused (``loops``: its default) or the eager solve."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    z = z0.detach().clone().requires_grad_(True)
    tableau, controller = METHODS[method].embedded, IController(tol, tol, METHODS[method].order)
    if fused:
        sol = dense_adaptive_solve(leaves, z, tableau, T, controller, seeded=seeded, loops=loops)
    else:
        sol = adaptive_solve(dense.dense_field(*leaves), z, tableau, T, controller, seeded=seeded)
    loss(sol.z).backward()
    return sol, [z.grad, *(w.grad for w in leaves)]


def assert_grads_close(grads, grads_ref, tol):
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("dtype, tol, grad_tol", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("T", [1.0, 0.02])
def test_sphere_field_equals_torchdiffeq_and_the_eager_gradients(method, dtype, tol, grad_tol, T, loops):
    # T = 0.02 ends within the first attempt: the interpolant's step is the first step size.
    weights = sphere_weights(dtype)
    z0 = torch.randn(64, 2, dtype=dtype, generator=torch.Generator().manual_seed(0))
    sol, grads = solve(weights, z0, method, tol, fused=True, T=T, loops=loops)
    z_ref, nfe_ref, accepted_ref = torchdiffeq_solve(dense.dense_field(*weights), z0, method, tol, T)
    assert sol.accepted == [accepted_ref] and sol.nfe == [nfe_ref]
    assert len(accepted_ref) >= (3 if T == 1.0 else 1)
    assert torch.equal(sol.z, z_ref)
    eager, grads_ref = solve(weights, z0, method, tol, fused=False, T=T)
    assert torch.equal(eager.z, sol.z) and eager.attempts == sol.attempts
    assert_grads_close(grads, grads_ref, grad_tol)


@pytest.mark.parametrize("dtype, tol, grad_tol", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE)
def test_affine_field_equals_torchdiffeq_and_the_exact_solution(method, dtype, tol, grad_tol):
    weights = linear_weights(dtype)
    z0 = torch.randn(16, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))
    T = 2.0
    sol, grads = solve(weights, z0, method, tol, fused=True, T=T)
    f = dense.dense_field(*weights)
    z_ref, nfe_ref, accepted_ref = torchdiffeq_solve(f, z0, method, tol, T)
    assert sol.accepted == [accepted_ref] and sol.nfe == [nfe_ref] and torch.equal(sol.z, z_ref)
    # The affine ODE z' = z A + b in closed form (augmented matrix exponential).
    with torch.no_grad():
        A = weights[0] @ weights[2] @ weights[4]
        b = (weights[1] @ weights[2] + weights[3]) @ weights[4] + weights[5]
        augmented = torch.zeros(3, 3, dtype=torch.float64)
        augmented[:2, :2], augmented[2, :2] = A.double(), b.double()
        exact = torch.cat([z0.double(), torch.ones(16, 1, dtype=torch.float64)], 1) @ torch.linalg.matrix_exp(augmented * T)
        for z in (z0, sol.z):  # the hidden pre-activations stay far from the ReLUs' kinks
            assert (z @ weights[0] + weights[1]).min() > 5
        # Fehlberg 2(1)'s error estimate is first order: its global error is hundreds of tol.
        assert (sol.z.double() - exact[:, :2]).abs().max() < {"fehlberg2": 1000, "dopri5": 20}[method] * tol
    _, grads_ref = solve(weights, z0, method, tol, fused=False, T=T)
    assert_grads_close(grads, grads_ref, grad_tol)


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("dtype, tol, grad_tol", DTYPES)
@pytest.mark.parametrize("method", ADAPTIVE)
def test_five_seed_group_equals_five_separate_solves(method, dtype, tol, grad_tol, loops):
    seeds = range(5)
    weights = sphere_weights(dtype, seeds)
    z0 = torch.randn(5, 32, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tol = tol / 10  # more steps, and seeds that reject on their own
    group, group_grads = solve(weights, z0, method, tol, fused=True, seeded=True, loops=loops)
    separate = [solve([w[s] for w in weights], z0[s], method, tol, fused=True, loops=loops) for s in seeds]
    assert len({tuple(sol.accepted[0]) for sol, _ in separate}) > 1
    for s, (sol, grads) in enumerate(separate):
        assert group.nfe[s] == sol.nfe[0] and group.accepted[s] == sol.accepted[0] and group.attempts[s] == sol.attempts[0]
        assert torch.equal(group.z[s], sol.z)
        for g_group, g in zip(group_grads, grads):
            assert torch.equal(g_group[s], g)
    eager, eager_grads = solve(weights, z0, method, tol, fused=False, seeded=True)
    assert torch.equal(eager.z, group.z) and eager.nfe == group.nfe
    assert_grads_close(group_grads, eager_grads, grad_tol)


def test_rejections_and_a_rejected_first_attempt_are_covered():
    # Fehlberg 2(1) rejects often; a start far from the origin makes its first attempt fail.
    weights = sphere_weights(torch.float64, range(5))
    z0 = torch.randn(5, 32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z0[4] *= 40
    sol, grads = solve(weights, z0, "fehlberg2", 1e-6, fused=True, seeded=True)
    eager, grads_ref = solve(weights, z0, "fehlberg2", 1e-6, fused=False, seeded=True)
    assert sol.accepted == eager.accepted and sol.nfe == eager.nfe and torch.equal(sol.z, eager.z)
    assert min(sol.rejected) < max(sol.rejected)
    assert_grads_close(grads, grads_ref, 1e-10)


@needs_native
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("seeds", [None, range(5)], ids=["one", "group"])
def test_cpp_and_python_loops_agree_bit_for_bit(method, seeds):
    weights = sphere_weights(torch.float32, seeds)
    z0 = torch.randn(*([] if seeds is None else [5]), 32, 2, generator=torch.Generator().manual_seed(6))
    cpp, cpp_grads = solve(weights, z0, method, 1e-4, fused=True, seeded=seeds is not None, loops=NATIVE)
    py, py_grads = solve(weights, z0, method, 1e-4, fused=True, seeded=seeds is not None, loops=PythonAttemptLoops)
    assert cpp.accepted == py.accepted and cpp.nfe == py.nfe and torch.equal(cpp.z, py.z)
    assert all(torch.equal(a, b) for a, b in zip(cpp_grads, py_grads))


@needs_native
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("seeds", [None, range(5)], ids=["one", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_narrow_products_as_loops_leave_every_bit_of_the_solve(method, seeds, dtype):
    # The loops stand in for ATen's products only where a check on first use found them equal; on and
    # off, the same steps, NFE, solution and gradients (batch 128: the BLAS's own kernels, not ATen's
    # small-product loop).
    weights = sphere_weights(dtype, seeds)
    z0 = torch.randn(*([] if seeds is None else [5]), 128, 2, generator=torch.Generator().manual_seed(8), dtype=dtype)
    try:
        NATIVE.set_narrow_products(False)
        off, off_grads = solve(weights, z0, method, 1e-5, fused=True, seeded=seeds is not None)
    finally:
        NATIVE.set_narrow_products(True)
    NATIVE.narrow_product_outcomes(reset=True)
    on, on_grads = solve(weights, z0, method, 1e-5, fused=True, seeded=seeds is not None)
    outcomes = NATIVE.narrow_product_outcomes(reset=True)
    assert on.accepted == off.accepted and on.nfe == off.nfe and torch.equal(on.z, off.z)
    assert all(torch.equal(a, b) for a, b in zip(on_grads, off_grads))
    # Every narrow product of the field is one the loops take (whether they then run is the check's
    # answer on each machine): no layout, width or dtype of the solve's own sends them to ATen.
    assert all(counts["not the loops' operands"] == 0 for counts in outcomes.values()), outcomes
    layers = {"input addmm", "output addmm"} if seeds is None else {"input baddbmm", "output baddbmm"}
    assert {"bmm", "accumulate"} | layers <= {kind for kind, counts in outcomes.items() if sum(counts.values())}


@needs_native
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("rows", [1, 2, 17])
def test_small_and_odd_batches_equal_the_eager_solve(method, rows):
    # Batches below the loops' 16-row blocks and the checks' poisoned rows (one row has no second).
    weights = sphere_weights(torch.float32)
    z0 = torch.randn(rows, 2, generator=torch.Generator().manual_seed(rows))
    fused, fused_grads = solve(weights, z0, method, 1e-4, fused=True)
    eager, eager_grads = solve(weights, z0, method, 1e-4, fused=False)
    assert fused.accepted == eager.accepted and fused.nfe == eager.nfe and torch.equal(fused.z, eager.z)
    assert_grads_close(fused_grads, eager_grads, 2e-5)


@pytest.mark.parametrize("method", ADAPTIVE)
def test_a_field_flat_at_the_start_gives_the_eager_solves_nan_gradients(method):
    # A zero output layer: f = 0 everywhere, so the first step size's norms are 0 and its derivative
    # is 0/0, as autograd finds through torchdiffeq's rule. Every loop gives NaN where the eager solve
    # does (the Python loops raised ZeroDivisionError here once), and the C++ and Python loops agree.
    weights = sphere_weights(torch.float64)
    weights[4], weights[5] = torch.zeros_like(weights[4]), torch.zeros_like(weights[5])
    z0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    eager, eager_grads = solve(weights, z0, method, 1e-5, fused=False)
    runs = [solve(weights, z0, method, 1e-5, fused=True, loops=loops) for loops in ([PythonAttemptLoops] + ([NATIVE] if NATIVE else []))]
    for sol, grads in runs:
        assert sol.nfe == eager.nfe and torch.equal(sol.z, eager.z)
        assert all(torch.equal(g.isnan(), g_ref.isnan()) for g, g_ref in zip(grads, eager_grads))
        assert any(g.isnan().any() for g in grads)
    if len(runs) == 2:
        for g_py, g_cpp in zip(runs[0][1], runs[1][1]):
            torch.testing.assert_close(g_cpp, g_py, rtol=0, atol=0, equal_nan=True)


def random_dense_weights(width, hidden, dtype, seeds):
    """A dense field of ``seeds`` stacked models on states of ``width`` columns (Sphere2's have 2)."""
    gen = torch.Generator().manual_seed(11)

    def draw(*shape, scale):
        return scale * torch.randn(seeds, *shape, generator=gen, dtype=dtype)

    return [
        draw(width, hidden, scale=0.7),
        draw(hidden, scale=0.3),
        draw(hidden, hidden, scale=0.25),
        draw(hidden, scale=0.3),
        draw(hidden, width, scale=0.25),
        draw(width, scale=0.1),
    ]


@needs_native
@pytest.mark.parametrize("width", [3, 6], ids=["narrow", "wide"])
def test_other_state_widths_cpp_and_python_loops_agree_and_a_group_equals_separate_solves(width):
    # The output layer's backward product: elementwise up to 4 columns (Sphere2's 2 have their own
    # loop, 3 takes the general one), batched beyond; the C++ and Python loops choose alike.
    weights = random_dense_weights(width, 64, torch.float64, 3)
    z0 = torch.randn(3, 32, width, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    group, grads = solve(weights, z0, "fehlberg2", 1e-6, fused=True, seeded=True, loops=NATIVE)
    py, py_grads = solve(weights, z0, "fehlberg2", 1e-6, fused=True, seeded=True, loops=PythonAttemptLoops)
    assert len(set(group.attempts)) > 1
    assert py.nfe == group.nfe and torch.equal(py.z, group.z) and all(torch.equal(a, b) for a, b in zip(grads, py_grads))
    for s in range(3):
        sol, grads_s = solve([w[s] for w in weights], z0[s], "fehlberg2", 1e-6, fused=True, loops=NATIVE)
        assert sol.nfe[0] == group.nfe[s] and torch.equal(sol.z, group.z[s])
        assert all(torch.equal(g[s], g_s) for g, g_s in zip(grads, grads_s))
    eager, grads_ref = solve(weights, z0, "fehlberg2", 1e-6, fused=False, seeded=True)
    assert eager.nfe == group.nfe and torch.equal(eager.z, group.z)
    assert_grads_close(grads, grads_ref, 1e-10)


class SteppedInPython(IController):
    """IController's decisions, overridden: the fused solve then steps from Python around the
    per-attempt loops instead of running the C++ loops' whole solve."""

    def decide(self, h, ratio):
        return super().decide(h, ratio)


@needs_native
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_cpp_whole_solve_equals_stepping_from_python_and_compacts_a_group(method, grad):
    # Seeds that end after different numbers of attempts: the whole solve drops finished ones
    # from the group's batch, the Python stepping computes them masked until the last ends.
    weights = sphere_weights(torch.float32, range(5))
    z0 = torch.randn(5, 32, 2, generator=torch.Generator().manual_seed(4))
    tableau, tol = METHODS[method].embedded, 1e-5
    results = []
    for controller in (IController(tol, tol, METHODS[method].order), SteppedInPython(tol, tol, METHODS[method].order)):
        leaves = [w.detach().clone().requires_grad_(grad) for w in weights]
        z = z0.clone().requires_grad_(grad)
        sol = dense_adaptive_solve(leaves, z, tableau, 1.0, controller, seeded=True, loops=NATIVE)
        grads = torch.autograd.grad(weighted_loss(sol.z), [z, *leaves]) if grad else []
        results.append((sol, grads))
    (whole, grads), (stepped, grads_ref) = results
    assert len(set(whole.attempts)) > 2
    assert whole.accepted == stepped.accepted and whole.nfe == stepped.nfe and whole.attempts == stepped.attempts
    assert torch.equal(whole.z, stepped.z)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ref))


@pytest.mark.parametrize("method", ADAPTIVE)
def test_a_group_whose_seeds_end_at_the_first_attempt_or_later(method):
    # T between the seeds' first step sizes: some end within their first attempt (the interpolant's
    # step is the first step size, with its gradient), the others run on, compacted.
    weights = sphere_weights(torch.float64, range(4))
    z0 = torch.randn(4, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    z0[2:] *= 6  # larger states, larger fields: smaller first steps
    tol = 1e-6
    firsts = [solve([w[s] for w in weights], z0[s], method, tol, fused=True, T=10.0)[0].accepted[0][0] for s in range(4)]
    T = (min(firsts) + max(firsts)) / 2
    group, grads = solve(weights, z0, method, tol, fused=True, seeded=True, T=T)
    assert min(group.attempts) == 1 < max(group.attempts)
    for s in range(4):
        sol, grads_s = solve([w[s] for w in weights], z0[s], method, tol, fused=True, T=T)
        assert group.accepted[s] == sol.accepted[0] and group.nfe[s] == sol.nfe[0] and torch.equal(group.z[s], sol.z)
        assert all(torch.equal(g[s], g_s) for g, g_s in zip(grads, grads_s))
    eager, grads_ref = solve(weights, z0, method, tol, fused=False, seeded=True, T=T)
    assert eager.accepted == group.accepted and torch.equal(eager.z, group.z)
    assert_grads_close(grads, grads_ref, 1e-10)


def test_a_group_seed_over_the_step_limit_is_the_eager_solves_error():
    weights = sphere_weights(torch.float64, range(3))
    z0 = torch.randn(3, 16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    tableau, controller = METHODS["fehlberg2"].embedded, IController(1e-6, 1e-6, 2)
    attempts = dense_adaptive_solve(weights, z0, tableau, 1.0, controller, seeded=True).attempts
    assert len(set(attempts)) > 1
    limit = sorted(set(attempts))[-2]  # the seeds with the most attempts exceed it, after others finished
    errors = []
    for fused in (True, False):
        with pytest.raises(AdaptiveStepLimitError) as caught:
            if fused:
                dense_adaptive_solve(weights, z0, tableau, 1.0, controller, seeded=True, max_steps=limit)
            else:
                adaptive_solve(dense.dense_field(*weights), z0, tableau, 1.0, controller, seeded=True, max_steps=limit)
        errors.append((caught.value.seed, caught.value.nfe, str(caught.value)))
    assert errors[0] == errors[1]
    # The failed solve gave its buffers back: the next one runs as before.
    assert dense_adaptive_solve(weights, z0, tableau, 1.0, controller, seeded=True).attempts == attempts


def test_without_gradients_same_result_and_no_recorded_attempts():
    weights = sphere_weights(torch.float32, range(3))
    z0 = torch.randn(3, 16, 2, generator=torch.Generator().manual_seed(2))
    tableau, controller = METHODS["dopri5"].embedded, IController(1e-4, 1e-4, 5)
    with torch.no_grad():
        quiet = dense_adaptive_solve(weights, z0, tableau, 1.0, controller, seeded=True)
    recorded = dense_adaptive_solve([w.requires_grad_(True) for w in weights], z0, tableau, 1.0, controller, seeded=True)
    assert torch.equal(quiet.z, recorded.z.detach()) and quiet.nfe == recorded.nfe and quiet.z.grad_fn is None


def test_errors_and_limits_are_the_eager_solves():
    weights = sphere_weights(torch.float64)
    z0 = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    tableau, controller = METHODS["dopri5"].embedded, IController(1e-8, 1e-8, 5)
    attempts = dense_adaptive_solve(weights, z0, tableau, 1.0, controller).attempts[0]
    with pytest.raises(AdaptiveStepLimitError, match=f"max_steps={attempts - 1}"):
        dense_adaptive_solve(weights, z0, tableau, 1.0, controller, max_steps=attempts - 1)
    with pytest.raises(AdaptiveUnderflowError):
        dense_adaptive_solve(weights, torch.where(z0 > 1, torch.nan, z0), tableau, 1.0, controller)
    with pytest.raises(ValueError, match="seeded"):
        dense_adaptive_solve(weights, z0, tableau, 1.0, controller, seeded=True)
    with pytest.raises(ValueError, match="embedded tableau"):
        dense_adaptive_solve(weights, z0, METHODS["rk4"].tableau, 1.0, controller)
    sol = dense_adaptive_solve([w.requires_grad_(True) for w in weights], z0, tableau, 1.0, controller)
    sol.z.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        sol.z.sum().backward()


@pytest.mark.parametrize("method", ADAPTIVE)
def test_integrate_adaptive_takes_the_fused_solve_by_default(method):
    model = build_model("sphere", (1, 2), seed=4)
    x = torch.randn(16, 1, 2, generator=torch.Generator().manual_seed(2))
    setting = SolverSetting.adaptive(method, 1e-4)
    results = []
    for fused in (True, False):
        model.zero_grad()
        sol = integrate_adaptive(model.field, x, setting, fused=fused)
        weighted_loss(sol.z).backward()
        results.append((sol, [p.grad.clone() for p in model.field.parameters()]))
    (ours, grads), (eager, grads_ref) = results
    assert ours.z.shape == x.shape and torch.equal(ours.z, eager.z) and ours.nfe == eager.nfe
    assert "_DenseAdaptiveSolveBackward" in graph_node_names(ours.z.grad_fn)
    assert "_DenseAdaptiveSolveBackward" not in graph_node_names(eager.z.grad_fn)
    assert_grads_close(grads, grads_ref, 2e-5)


@pytest.mark.parametrize("loops", LOOPS)
@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("seeds", [None, range(3)], ids=["one", "group"])
def test_conv_weights_inside_the_node_equal_autograd_through_the_dense_build(method, seeds, loops, monkeypatch):
    # integrate_adaptive builds the dense matrices inside the solve's autograd node and scatters
    # their gradients back by hand: the same values as autograd through dense_conv_weights.
    from tune_node.fast import adaptive_solve

    monkeypatch.setattr(adaptive_solve, "attempt_loops", lambda: loops)
    models = [build_model("sphere", (1, 2), seed=s) for s in (range(1) if seeds is None else seeds)]
    field = models[0].field if seeds is None else dense.StackedSphereClassifier(models).field
    conv = list(field.parameters()) if seeds is None else list(field.weights)
    x = torch.randn(*([] if seeds is None else [len(seeds)]), 16, 1, 2, generator=torch.Generator().manual_seed(3))
    setting = SolverSetting.adaptive(method, 1e-4)
    sol = integrate_adaptive(field, x, setting, seeded=seeds is not None)
    assert "_DenseAdaptiveSolveBackward" in graph_node_names(sol.z.grad_fn)
    grads = torch.autograd.grad(weighted_loss(sol.z), conv)
    tableau, controller = METHODS[method].embedded, IController(1e-4, 1e-4, METHODS[method].order)
    weights = dense.dense_conv_weights(*conv, 2)
    ref = dense_adaptive_solve(weights, x.flatten(-2), tableau, 1.0, controller, seeded=seeds is not None, loops=loops)
    grads_ref = torch.autograd.grad(weighted_loss(ref.z.view(x.shape)), conv)
    assert sol.nfe == ref.nfe and torch.equal(sol.z, ref.z.view(x.shape))
    assert all(g.shape == g_ref.shape and torch.equal(g, g_ref) for g, g_ref in zip(grads, grads_ref))


def test_fields_and_settings_it_does_not_fuse_fall_back_to_the_eager_solve():
    from tune_node.fast.adaptive_solve import fused_adaptive_solve

    model = build_model("sphere", (1, 2), seed=4)
    x = torch.randn(8, 1, 2, generator=torch.Generator().manual_seed(2))
    setting = SolverSetting.adaptive("dopri5", 1e-3)
    assert fused_adaptive_solve(model.field, x, setting) is not None
    assert fused_adaptive_solve(model.field, x, SolverSetting.adaptive("dopri5", 1e-3, gradient="adjoint")) is None
    assert fused_adaptive_solve(model.field, x, setting, seeded=True) is None  # one model's field, seeded
    model.field.dense = False
    assert fused_adaptive_solve(model.field, x, setting) is None
    model.field.dense = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_adaptive_solve(model.field, x, setting) is None
