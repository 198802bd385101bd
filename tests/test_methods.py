"""The method registry: derived pairings, convergence orders, Heun's method, registration.

Problems with known answers: dz/dt = a z (z(T) = z0 exp(a T)) and dz/dt = 1 + z^2
(z(t) = tan t from z0 = 0), in float64. The fused dense solve runs with its Python
loops only (the C++ loops make the same calls; tests/test_dense_solve.py compares them).
"""

import math

import pytest
import torch
from torch import nn

from tune_node import adaptation, evaluation, solvers
from tune_node.adapt import resolve_solvers
from tune_node.adaptation import StepAdaptation, batch_accuracy
from tune_node.dense import StackedSphereClassifier, dense_conv_weights, dense_field
from tune_node.dense_solve import PythonLoops, dense_rk_solve
from tune_node.evaluation import cross_solver_table, test_matrix
from tune_node.integrate import PreparedField, integrate, rk_solve
from tune_node.models import build_model
from tune_node.search_space import load_space
from tune_node.solvers import (
    FIXED_METHODS,
    METHODS,
    ButcherTableau,
    Method,
    SolverSetting,
    adaptation_test_methods,
    default_test_method,
    register_method,
    test_methods,
    test_solver_for,
)

torch.set_num_threads(1)
F64 = torch.float64
PAPER = ("euler", "midpoint", "rk4", "fehlberg2", "dopri5")

# The values these constants had before they were derived from the registry.
OLD_TEST_METHODS = {"euler": ("euler", "midpoint", "rk4"), "midpoint": ("midpoint", "rk4"), "rk4": ("rk4",),
                    "fehlberg2": ("fehlberg2", "dopri5"), "dopri5": ("dopri5",)}
OLD_DEFAULT_TEST_METHOD = {"euler": "midpoint", "midpoint": "rk4", "rk4": "rk4", "fehlberg2": "dopri5", "dopri5": "dopri5"}
OLD_TOLERANCE_DIVISOR = {"fehlberg2": 5.0, "dopri5": 10.0}
OLD_STEP_TEST_METHODS = {"euler": ("midpoint", "rk4"), "midpoint": ("rk4",)}
OLD_TOLERANCE_TEST_METHODS = {"fehlberg2": ("dopri5",), "dopri5": ("dopri5",)}


def paper_part(d: dict) -> dict:
    return {k: v for k, v in d.items() if k in PAPER}


# --- the derived pairings ----------------------------------------------------------------

def test_paper_methods_keep_their_pairings():
    assert list(METHODS)[:5] == list(PAPER)
    assert paper_part(evaluation.TEST_METHODS) == OLD_TEST_METHODS
    assert paper_part(solvers.DEFAULT_TEST_METHOD) == OLD_DEFAULT_TEST_METHOD
    assert paper_part(solvers.TOLERANCE_DIVISOR) == OLD_TOLERANCE_DIVISOR
    assert paper_part(adaptation.STEP_TEST_METHODS) == OLD_STEP_TEST_METHODS
    assert paper_part(adaptation.TOLERANCE_TEST_METHODS) == OLD_TOLERANCE_TEST_METHODS
    # Re-exports are the registry's objects, so they follow later registrations.
    assert evaluation.TEST_METHODS is solvers.TEST_METHODS
    assert adaptation.STEP_TEST_METHODS is solvers.STEP_TEST_METHODS
    assert adaptation.TOLERANCE_TEST_METHODS is solvers.TOLERANCE_TEST_METHODS
    assert solvers.ERROR_FACTOR == 50.0


@pytest.mark.parametrize("name", PAPER)
def test_functions_agree_with_the_dicts(name):
    assert test_methods(name) == OLD_TEST_METHODS[name]
    assert default_test_method(name) == OLD_DEFAULT_TEST_METHOD[name]
    old = {**OLD_STEP_TEST_METHODS, **OLD_TOLERANCE_TEST_METHODS}
    assert adaptation_test_methods(name) == old.get(name, ())
    assert METHODS[name].tolerance_divisor == OLD_TOLERANCE_DIVISOR.get(name)


def test_methods_added_after_the_paper_leave_its_methods_alone():
    # Every key beyond the paper's is a later method; no paper method's entry mentions one.
    for d in (solvers.TEST_METHODS, solvers.DEFAULT_TEST_METHOD, solvers.STEP_TEST_METHODS, solvers.TOLERANCE_TEST_METHODS):
        for name in PAPER:
            if name in d:
                values = d[name] if isinstance(d[name], tuple) else (d[name],)
                assert set(values) <= set(PAPER)


@pytest.mark.parametrize("train,expected", [
    (SolverSetting.fixed("euler", 2), SolverSetting.fixed("midpoint", 10)),  # (1/2 / 50) ** (1/2) = 1/10
    (SolverSetting.fixed("midpoint", 4), SolverSetting.fixed("rk4", 6)),
    (SolverSetting.fixed("rk4", 3), SolverSetting.fixed("rk4", 8)),
    (SolverSetting.adaptive("fehlberg2", 1e-3), SolverSetting.adaptive("dopri5", 1e-3 / 5)),
    (SolverSetting.adaptive("dopri5", 1e-3), SolverSetting.adaptive("dopri5", 1e-3 / 10)),
])
def test_default_test_solvers_are_the_papers(train, expected):
    assert test_solver_for(train) == expected


def test_every_method_has_its_torchdiffeq_method():
    from torchdiffeq._impl.odeint import SOLVERS

    assert all(m.torchdiffeq_name in SOLVERS for m in METHODS.values())


# --- convergence orders --------------------------------------------------------------------

def observed_order(f, z0: float, exact: float, method: str, steps: int) -> float:
    errors = [abs(float(integrate(f, torch.tensor([z0], dtype=F64), SolverSetting.fixed(method, n)).z) - exact)
              for n in (steps, 2 * steps)]
    return math.log2(errors[0] / errors[1])


@pytest.mark.parametrize("method", FIXED_METHODS)
def test_convergence_order_matches_order(method):
    order = METHODS[method].order
    assert observed_order(lambda z: -z, 1.0, math.exp(-1.0), method, 32) == pytest.approx(order, abs=0.1)
    # A nonlinear field: linear ones cannot tell all order conditions apart.
    assert observed_order(lambda z: 1 + z * z, 0.0, math.tan(1.0), method, 128) == pytest.approx(order, abs=0.1)


class Scaled(nn.Module):
    """dz/dt = a z with a learnable ``a``."""

    def __init__(self, a: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=F64))

    def forward(self, z):
        return self.a * z


@pytest.mark.parametrize("method", FIXED_METHODS)
def test_adjoint_path_integrates_the_same_method(method):
    # The adjoint path runs torchdiffeq's torchdiffeq_name on the same grid: the same
    # numbers as rk_solve up to rounding, and gradients within the discretisation error.
    steps, z0 = 16, torch.tensor([1.0, -2.0], dtype=F64)
    results = {}
    for gradient in ("backprop", "adjoint"):
        field = Scaled(-1.0)
        sol = integrate(field, z0, SolverSetting.fixed(method, steps, gradient))
        sol.z.sum().backward()
        results[gradient] = (sol.z.detach(), float(field.a.grad))
    torch.testing.assert_close(results["adjoint"][0], results["backprop"][0], rtol=1e-12, atol=1e-14)
    exact_grad = float(z0.sum()) * math.exp(-1.0)  # d/da of sum(z0) e^{a T} at a = -1, T = 1
    for _, grad in results.values():
        assert grad == pytest.approx(exact_grad, rel=4 * (1 / steps) ** METHODS[method].order)


# --- Heun's method -------------------------------------------------------------------------

def test_heun_is_the_explicit_trapezoid():
    heun = METHODS["heun"]
    assert (heun.order, heun.stages_per_step, heun.adaptive, heun.torchdiffeq_name) == (2, 2, False, "heun2")
    assert heun.tableau.a == ((), (1.0,)) and heun.tableau.b == (0.5, 0.5) and heun.tableau.c == (0.0, 1.0)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
def test_one_heun_step_is_the_hand_computed_trapezoid(gradient):
    # f(z) = z^2 + 1, z0 = 1/2, h = 1/2: k1 = f(1/2) = 5/4, k2 = f(1/2 + 5/8) = 145/64,
    # z1 = 1/2 + (1/4)(5/4 + 145/64) = 353/256; every number is exact in binary.
    # (Midpoint gives 681/512: two-stage order-2 methods differ off linear fields.)
    class Riccati(nn.Module):
        def __init__(self):
            super().__init__()
            self.one = nn.Parameter(torch.tensor(1.0, dtype=F64))

        def forward(self, z):
            return z * z + self.one

    sol = integrate(Riccati(), torch.tensor([0.5], dtype=F64), SolverSetting.fixed("heun", 1, gradient, T=0.5))
    assert float(sol.z.detach()) == 353 / 256
    assert sol.nfe_forward == 2


def sphere_weights(seeds, dim):
    """The conv weights of sphere models, stacked along a leading seed axis."""
    models = [build_model("sphere", (1, dim), seed=s).to(F64) for s in seeds]
    return [w.detach().clone() for w in StackedSphereClassifier(models).field.weights]


@pytest.mark.parametrize("steps", [1, 3])
def test_fused_dense_solve_runs_heun(steps):
    # Heun is the one method with two nonzero weights b and a stage reading a full k:
    # the fused forward and hand-written backward must match autograd through rk_solve.
    dim = 3
    weights = sphere_weights([0, 1], dim)
    z0 = torch.randn(2, 5, dim, dtype=F64, generator=torch.Generator().manual_seed(0))
    tableau = METHODS["heun"].tableau
    outputs = []
    for fused in (True, False):
        ws = [w.clone().requires_grad_(True) for w in weights]
        z = z0.clone().requires_grad_(True)
        mats = dense_conv_weights(*ws, dim)
        if fused:
            zT = dense_rk_solve(mats, z, tableau, steps, 1.0, loops=PythonLoops)
        else:
            zT, _ = rk_solve(dense_field(*mats), z, tableau, steps, 1.0)
        (zT.square() * torch.linspace(-1, 2, zT.numel(), dtype=F64).view_as(zT)).sum().backward()
        outputs.append([zT.detach(), z.grad, *(w.grad for w in ws)])
    for fused, loop in zip(*outputs):
        torch.testing.assert_close(fused, loop, rtol=1e-12, atol=1e-12)


def test_integrate_hands_heun_to_a_fused_solver():
    weights = sphere_weights([0], 2)
    mats = dense_conv_weights(*(w.requires_grad_(True) for w in weights), 2)
    calls = []

    class DenseField(nn.Module):
        def prepare(self, z0):
            def solve(z, tableau, steps, T):
                calls.append((tableau, steps))
                return dense_rk_solve(mats, z, tableau, steps, T, loops=PythonLoops)
            return PreparedField(dense_field(*mats), lambda z: z, lambda z: z, solve)

    z0 = torch.randn(1, 4, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    sol = integrate(DenseField(), z0, SolverSetting.fixed("heun", 4))
    expected, _ = rk_solve(dense_field(*mats), z0, METHODS["heun"].tableau, 4)
    torch.testing.assert_close(sol.z, expected, rtol=1e-12, atol=1e-12)
    assert calls == [(METHODS["heun"].tableau, 4)] and sol.nfe_forward == 8


def test_heun_test_matrix_and_cross_solver_table():
    train = SolverSetting.fixed("heun", 4)
    assert [(c.setting.method, c.setting.steps) for c in test_matrix(train)] == \
        [(m, s) for m in ("heun", "rk4") for s in (2, 3, 4, 6, 8)]
    model = build_model("sphere", (1, 2), seed=0)
    x = torch.randn(20, 1, 2, generator=torch.Generator().manual_seed(0))
    rows = cross_solver_table(model, x, torch.zeros(20, dtype=torch.long), train)
    assert [r["test_method"] for r in rows] == ["heun"] * 5 + ["rk4"] * 5
    assert [r["is_train_solver"] for r in rows].count(True) == 1
    assert rows[2]["nfe"] == 8


def test_heun_in_a_search_space(tmp_path):
    path = tmp_path / "heun.toml"
    path.write_text('dataset = "sphere2"\nseeds = 1\n\n[[solvers]]\nmethod = "heun"\nsteps = [1, 4]\n'
                    'gradient = ["backprop", "adjoint"]\n')
    space = load_space(str(path))
    assert {(s.method, s.steps, s.gradient) for s, _ in space.solvers} == \
        {("heun", n, g) for n in (1, 4) for g in ("backprop", "adjoint")}
    assert {t["method"] for t in space.trials()} == {"heun"}


def test_heun_step_adaptation_checks_with_rk4():
    assert resolve_solvers(None, "heun", None) == ("step", "heun", "rk4")
    c = StepAdaptation("heun", 0.25, evaluate=batch_accuracy)
    assert c.test_method == "rk4" and c.setting == SolverSetting.fixed("heun", 4)
    # h^2 / 50 = 1/800 for RK4's h^4: h_test = 800 ** -0.25, 6 steps.
    assert c._test_setting() == SolverSetting.fixed("rk4", 6)
    model = build_model("sphere", (1, 2), seed=0)
    x = torch.randn(16, 1, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = model(x, c.setting)
    y = logits.argmax(1)
    _, spent = c.update(50, model, x, y, logits, c.setting)
    assert c.history[-1].test_steps == 6 and spent >= 6 * 4  # at least RK4's 6 steps of 4 stages
    with pytest.raises(ValueError, match="test method for heun must be one of rk4, got 'midpoint'"):
        StepAdaptation("heun", test_method="midpoint")


# --- register_method -----------------------------------------------------------------------

@pytest.fixture
def restore_registry():
    saved = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(saved)
    solvers._rebuild_pairings()


# torchdiffeq's heun3: Heun's third-order method.
HEUN3 = ButcherTableau(a=((), (1 / 3,), (0.0, 2 / 3)), b=(0.25, 0.0, 0.75), c=(0.0, 1 / 3, 2 / 3), order=3)


def test_a_registered_method_joins_everything(restore_registry):
    register_method(Method("heun3", "Heun3", 3, HEUN3, "heun3", 3))
    assert "heun3" in solvers.FIXED_METHODS and "heun3" in solvers.fixed_methods()
    assert "heun3" not in solvers.ADAPTIVE_METHODS and solvers.adaptive_methods() == solvers.ADAPTIVE_METHODS
    assert test_methods("euler") == ("euler", "midpoint", "rk4", "heun3")
    assert default_test_method("euler") == "midpoint" and default_test_method("heun3") == "rk4"
    assert solvers.STEP_TEST_METHODS["heun3"] == ("rk4",)
    assert evaluation.TEST_METHODS["midpoint"] == ("midpoint", "rk4", "heun3")
    assert observed_order(lambda z: -z, 1.0, math.exp(-1.0), "heun3", 32) == pytest.approx(3, abs=0.1)
    field = Scaled(-1.0)
    z = {g: integrate(field, torch.ones(1, dtype=F64), SolverSetting.fixed("heun3", 8, g)).z for g in ("backprop", "adjoint")}
    torch.testing.assert_close(z["adjoint"], z["backprop"], rtol=1e-12, atol=1e-14)


def test_ties_go_to_the_first_registered(restore_registry):
    register_method(Method("trapezoid", "Trapezoid", 2, METHODS["heun"].tableau, "heun2", 2))
    assert default_test_method("euler") == "midpoint"
    assert solvers.STEP_TEST_METHODS["euler"] == ("midpoint", "rk4", "trapezoid")


EULER_TABLEAU = METHODS["euler"].tableau


@pytest.mark.parametrize("method,match", [
    (Method("euler", "Euler", 1, EULER_TABLEAU, "euler", 1), "method 'euler' is already registered; registered: euler, "),
    (Method("my euler", "E", 1, EULER_TABLEAU, "euler", 1), "method name 'my euler' is not allowed; allowed: a letter"),
    (Method("e2", "E", 2, EULER_TABLEAU, "euler", 1), "method e2: order is 2 but its tableau's order is 1"),
    (Method("e2", "E", 1, EULER_TABLEAU, "euler", 2), "method e2: stages_per_step is 2 but its tableau has 1 stages; allowed: 1"),
    (Method("e2", "E", 1, EULER_TABLEAU, "euler", 1, startup_nfe=1), "method e2 is fixed-step: startup_nfe must be 0, got 1"),
    (Method("e2", "E", 1, EULER_TABLEAU, "euler", 1, tolerance_divisor=5.0),
     r"method e2 is fixed-step: tolerance_divisor is for adaptive methods only \(tableau=None\), got 5.0"),
    (Method("e2", "E", 1, "not a tableau", "euler", 1), "method e2: tableau must be a ButcherTableau"),
    (Method("e2", "E", 0, EULER_TABLEAU, "euler", 1), "method e2: order must be an integer >= 1, got 0"),
    (Method("e2", "", 1, EULER_TABLEAU, "euler", 1), "method e2: paper_name must be a non-empty string"),
    (Method("d2", "D", 5, None, "dopri5", 6), "method d2 is adaptive: tolerance_divisor must be a finite number > 1, got None"),
    (Method("d2", "D", 5, None, "dopri5", 6, tolerance_divisor=1.0), "tolerance_divisor must be a finite number > 1, got 1.0"),
    (Method("d2", "D", 5, None, "dopri5", 0, tolerance_divisor=10.0),
     "method d2 is adaptive: stages_per_step must be an integer >= 1, got 0"),
    (Method("d2", "D", 5, None, "dopri5", 6, startup_nfe=-1, tolerance_divisor=10.0), "startup_nfe must be an integer >= 0, got -1"),
    (Method("e2", "E", 1, EULER_TABLEAU, "euler2", 1), "method e2: torchdiffeq_name 'euler2' is not a torchdiffeq method; allowed: "),
    ("euler", "a Method is needed, got str 'euler'"),
])
def test_register_method_refuses_inconsistent_methods(method, match, restore_registry):
    before = dict(METHODS)
    with pytest.raises(ValueError, match=match):
        register_method(method)
    assert METHODS == before
