import copy
import math

import pytest
import torch

from tune_node.adaptation import (
    INITIAL_STEP_NFE,
    BatchEvaluation,
    StepAdaptation,
    ToleranceAdaptation,
    check_subset,
    initial_step_size,
)
from tune_node.adaptation_results import HISTORY_COLUMNS, SUMMARY_COLUMNS, history_rows, summary_row
from tune_node.solvers import SolverSetting, test_solver_for
from tune_node.training import TrainConfig, load_checkpoint, save_checkpoint, train

torch.set_num_threads(1)

Y = torch.tensor([0, 1] * 50)  # a batch of 100 labels


def logits_with_accuracy(acc: float, y: torch.Tensor = Y) -> torch.Tensor:
    """Two-class logits that classify exactly ``round(acc * len(y))`` examples correctly."""
    correct = round(acc * len(y))
    predicted = torch.where(torch.arange(len(y)) < correct, y, 1 - y)
    return torch.nn.functional.one_hot(predicted, 2).float()


class Scripted:
    """An evaluator whose accuracies are scripted per setting; costs are the real NFE of a solve.

    ``accuracies`` maps a setting to its accuracy; ``steps`` maps adaptive settings to
    their number of steps (fixed-step settings have their own).
    """

    def __init__(self, accuracies: dict, steps: dict | None = None):
        self.accuracies, self.steps, self.calls = accuracies, steps or {}, []

    def __call__(self, model, x, y, setting):
        self.calls.append(setting)
        if setting.is_adaptive:
            steps = self.steps[setting]
            nfe = setting.spec.startup_nfe + steps * setting.spec.stages_per_step
        else:
            steps = setting.steps
            nfe = steps * setting.spec.tableau.stages
        return BatchEvaluation(self.accuracies[setting], nfe, steps)

    @property
    def nfe(self) -> int:
        return sum(self(None, None, None, s).nfe for s in list(self.calls))


def euler(steps):
    return SolverSetting.fixed("euler", steps)


def midpoint_test_of(steps):
    return test_solver_for(euler(steps), "midpoint")


def check_once(controller, train_acc, iteration=50):
    setting = controller.setting
    new, spent = controller.update(iteration, None, None, Y, logits_with_accuracy(train_acc), setting)
    return new, spent


def test_disagreement_halves_h():
    evaluator = Scripted({midpoint_test_of(20): 0.70})
    c = StepAdaptation("euler", 0.05, "midpoint", evaluate=evaluator)
    new, spent = check_once(c, 0.90)
    assert c.h == pytest.approx(0.025) and new == euler(40)
    check = c.history[-1]
    assert (check.proposed, check.accepted, check.candidate_accuracy) == (pytest.approx(0.025), True, None)
    assert check.train_solver_accuracy == pytest.approx(0.90) and check.test_solver_accuracy == 0.70
    # Only the test solver ran: Midpoint at the factor-50 step, two stages per step.
    assert evaluator.calls == [midpoint_test_of(20)] and spent == 2 * midpoint_test_of(20).steps


def test_agreement_grows_h_by_1_1_when_the_trial_agrees():
    # h = 1/20 grows to 0.055: 19 steps, a new setting that must be tried.
    evaluator = Scripted({midpoint_test_of(20): 0.90, euler(19): 0.88})
    c = StepAdaptation("euler", 0.05, "midpoint", evaluate=evaluator)
    new, spent = check_once(c, 0.90)
    assert c.h == pytest.approx(0.055) and new == euler(19)
    assert c.history[-1].accepted and c.history[-1].candidate_accuracy == 0.88
    assert evaluator.calls == [midpoint_test_of(20), euler(19)] and spent == evaluator.nfe


def test_growth_within_the_same_step_count_reuses_the_training_pass():
    # h = 0.1 grows to 0.11, still 10 steps: the trial is the training pass itself, free.
    evaluator = Scripted({midpoint_test_of(10): 0.95, euler(9): 0.9})
    c = StepAdaptation("euler", 0.1, "midpoint", evaluate=evaluator)
    new, spent = check_once(c, 0.90)
    assert c.h == pytest.approx(0.11) and new == euler(10)
    assert c.history[-1].candidate_accuracy == pytest.approx(0.90)
    assert evaluator.calls == [midpoint_test_of(10)] and spent == 2 * midpoint_test_of(10).steps
    check_once(c, 0.90, iteration=100)
    # History records the real-valued h beside the integer steps the solver used.
    assert [(ch.step_size, ch.steps) for ch in c.history] == [(0.1, 10), (pytest.approx(0.11), 10)]


def test_rejected_growth_keeps_h():
    evaluator = Scripted({midpoint_test_of(20): 0.90, euler(19): 0.75})
    c = StepAdaptation("euler", 0.05, "midpoint", evaluate=evaluator)
    new, spent = check_once(c, 0.90)
    assert c.h == 0.05 and new == euler(20)
    check = c.history[-1]
    assert check.proposed == pytest.approx(0.055) and not check.accepted and check.candidate_accuracy == 0.75
    assert spent == 2 * midpoint_test_of(20).steps + 19


def test_cap_at_T_holds():
    test_at_1 = test_solver_for(euler(1), "rk4")
    evaluator = Scripted({test_solver_for(euler(2), "rk4"): 0.9, euler(1): 0.9, test_at_1: 0.9})
    c = StepAdaptation("euler", 0.95, "rk4", evaluate=evaluator)
    assert c.setting == euler(2)
    check_once(c, 0.9)
    assert c.h == 1.0 and c.history[-1].proposed == 1.0 and c.setting == euler(1)
    check_once(c, 0.9, iteration=100)
    assert c.h == 1.0 and c.setting == euler(1)
    assert StepAdaptation("euler", 7.0).h == 1.0  # a starting step beyond T is capped too
    assert StepAdaptation("euler", 1.5, T=2.0).setting == SolverSetting.fixed("euler", 2, T=2.0)


def test_max_steps_floors_h():
    evaluator = Scripted({midpoint_test_of(4): 0.9})
    c = StepAdaptation("euler", 0.25, "midpoint", max_steps=6, evaluate=evaluator)
    check_once(c, 0.5)
    assert c.h == pytest.approx(1 / 6) and c.setting == euler(6)


def adaptive(tol):
    return SolverSetting.adaptive("fehlberg2", tol)


@pytest.mark.parametrize("steps,grows", [(2, False), (1, False), (3, True)])
def test_tolerance_stops_growing_at_minsteps(steps, grows):
    test = adaptive(1e-3).with_(method="dopri5", tol=1e-3 / 5)
    evaluator = Scripted({test: 0.9, adaptive(1e-3): 0.9, adaptive(1.1e-3): 0.9},
                         steps={test: 5, adaptive(1e-3): steps, adaptive(1.1e-3): steps})
    c = ToleranceAdaptation("fehlberg2", 1e-3, minsteps=2, evaluate=evaluator)
    new, spent = check_once(c, 0.9)
    assert c.tol == pytest.approx(1.1e-3 if grows else 1e-3) and new == c.setting
    check = c.history[-1]
    assert check.steps == steps and check.accepted is grows and check.proposed == pytest.approx(1.1e-3)
    # The test solver and the step count always run; the trial only when steps > minsteps.
    assert evaluator.calls == [test, adaptive(1e-3)] + ([adaptive(1.1e-3)] if grows else [])
    assert spent == evaluator.nfe


def test_tolerance_disagreement_halves_and_test_solver_is_the_papers():
    dopri_test = SolverSetting.adaptive("dopri5", 1e-4 / 10)
    evaluator = Scripted({dopri_test: 0.6}, steps={dopri_test: 7})
    c = ToleranceAdaptation("dopri5", 1e-4, evaluate=evaluator)
    check_once(c, 0.9)
    assert c.tol == pytest.approx(5e-5) and evaluator.calls == [dopri_test]
    assert c.history[-1].test_tol == pytest.approx(1e-5) and c.history[-1].steps is None
    assert ToleranceAdaptation().tol == 1e-6  # the paper's starting tolerance


def test_checks_only_every_k_iterations_and_nfe_is_counted():
    evaluator = Scripted({midpoint_test_of(20): 0.9, euler(19): 0.9, midpoint_test_of(19): 0.9, euler(17): 0.9})
    c = StepAdaptation("euler", 0.05, "midpoint", k=5, evaluate=evaluator)
    c.pending_nfe = INITIAL_STEP_NFE
    spent = []
    for iteration in range(1, 13):
        new, nfe = c.update(iteration, None, None, Y, logits_with_accuracy(0.9), c.setting)
        spent.append(nfe)
    assert [ch.iteration for ch in c.history] == [5, 10]
    assert spent[0] == INITIAL_STEP_NFE and all(spent[i] == 0 for i in (1, 2, 3, 5, 6, 7, 8, 10, 11))
    assert spent[4] + spent[9] == evaluator.nfe == c.check_nfe
    assert [ch.check_nfe for ch in c.history] == [spent[4], spent[9]]


def test_update_refuses_a_setting_it_did_not_choose():
    c = StepAdaptation("euler", 0.05)
    with pytest.raises(ValueError, match=r"training used Euler\(steps=7\).*controller is at Euler\(steps=20\)"):
        c.update(1, None, None, Y, logits_with_accuracy(0.9), euler(7))


def test_state_dict_round_trip_continues_identically():
    script = {midpoint_test_of(20): 0.9, euler(19): 0.9, midpoint_test_of(19): 0.5, midpoint_test_of(37): 0.9, euler(34): 0.9}
    a = StepAdaptation("euler", 0.05, "midpoint", evaluate=Scripted(script))
    check_once(a, 0.9, 50)
    state = copy.deepcopy(a.state_dict())
    b = StepAdaptation("euler", 0.3, "midpoint", evaluate=Scripted(script))
    b.load_state_dict(state)
    assert b.h == a.h and b.history == a.history and b.state_dict() == a.state_dict()
    for c in (a, b):
        check_once(c, 0.9, 100)
        check_once(c, 0.9, 150)
    assert a.h == b.h == pytest.approx(0.0275 * 1.1) and a.history == b.history and len(a.history) == 3
    with pytest.raises(ValueError, match="controller state is for mode='step'"):
        ToleranceAdaptation().load_state_dict(state)
    t = ToleranceAdaptation("fehlberg2", 1e-3)
    t2 = ToleranceAdaptation("fehlberg2", 1e-6)
    t2.load_state_dict(t.state_dict())
    assert t2.tol == 1e-3


@pytest.mark.parametrize("make,match", [
    (lambda: StepAdaptation("rk4"), "step adaptation trains with a fixed-step method euler or midpoint or heun, got 'rk4'"),
    (lambda: StepAdaptation("midpoint", test_method="midpoint"), "test method for midpoint must be one of rk4, got 'midpoint'"),
    (lambda: StepAdaptation("euler", 0.0), "step_size must be a finite number > 0, got 0.0"),
    (lambda: StepAdaptation("euler", k=0), "check interval k must be an integer >= 1, got 0"),
    (lambda: StepAdaptation("euler", shrink=1.5), r"shrink must be in \(0, 1\), got 1.5"),
    (lambda: StepAdaptation("euler", grow=0.9), "grow must be > 1, got 0.9"),
    (lambda: StepAdaptation("euler", threshold=-0.1), r"threshold must be an accuracy difference in \[0, 1\), got -0.1"),
    (lambda: StepAdaptation("euler", gradient="magic"), "unknown gradient mode 'magic'"),
    (lambda: ToleranceAdaptation("euler"), "tolerance adaptation trains with an adaptive method fehlberg2 or dopri5, got 'euler'"),
    (lambda: ToleranceAdaptation("fehlberg2", tol=-1.0), "needs a tolerance tol > 0, got tol=-1.0"),
    (lambda: ToleranceAdaptation("fehlberg2", minsteps=-1), "minsteps must be an integer >= 0, got -1"),
])
def test_bad_parameters_fail_clearly(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def hand_computed_initial_step(a, z0, order, rtol, atol, T):
    """Hairer-Norsett-Wanner's starting step for dz/dt = a z, written out in plain floats."""
    sc = [atol + abs(v) * rtol for v in z0]
    rms = lambda v: math.sqrt(sum((vi / si) ** 2 for vi, si in zip(v, sc)) / len(v))
    f0 = [a * v for v in z0]
    d0, d1 = rms(z0), rms(f0)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    f1 = [a * (v + h0 * fv) for v, fv in zip(z0, f0)]
    d2 = rms([u - w for u, w in zip(f1, f0)]) / h0
    big = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if big <= 1e-15 else (0.01 / big) ** (1 / (order + 1))
    return min(100 * h0, h1, T)


@pytest.mark.parametrize("a,z0,order,rtol,atol,T,expected", [
    # d0 = sqrt(((1/2e-3)^2 + (2/3e-3)^2) / 2), d1 = 3 d0, d2 = 9 d0 -> h1 = (0.01 / (9 d0)) ** (1/2)
    (-3.0, [1.0, -2.0], 1, 1e-3, 1e-3, 1.0, (0.01 / (9 * math.sqrt((500.0 ** 2 + (2 / 3e-3) ** 2) / 2))) ** 0.5),
    (-3.0, [1.0, -2.0], 4, 1e-3, 1e-3, 1.0, None),
    (0.5, [0.3, 0.1, -0.2], 2, 1e-2, 1e-4, 1.0, None),
    # Large tolerances, slow field: h0 = 0.01 / 0.01 = 1, h1 = (0.01 / (0.01 d0)) ** (1/2) > 1 -> capped at T.
    (0.01, [1.0, -2.0], 1, 10.0, 10.0, 1.0, 1.0),
    (0.01, [1.0, -2.0], 1, 10.0, 10.0, 0.5, 0.5),
    # rtol = 0, atol = 1: the unweighted RMS norm (a fixed-step solver has no tolerances): d0 = sqrt(5/2), d1 = 3 d0,
    # d2 = 9 d0, h0 = 0.01/3, h1 = (0.01 / (9 d0)) ** (1/2) is smaller than 100 h0.
    (-3.0, [1.0, -2.0], 1, 0.0, 1.0, 1.0, (0.01 / (9 * math.sqrt(2.5))) ** 0.5),
    # z0 = 0: d0 < 1e-5 gives h0 = 1e-6, d1 = d2 = 0 gives h1 = max(1e-6, 1e-9), h = 1e-6.
    (-3.0, [0.0, 0.0], 1, 1e-3, 1e-3, 1.0, 1e-6),
])
def test_initial_step_size_matches_hand_computation_on_linear_ode(a, z0, order, rtol, atol, T, expected):
    reference = hand_computed_initial_step(a, z0, order, rtol, atol, T)
    if expected is not None:
        assert reference == pytest.approx(expected, rel=1e-12)
    calls = []

    def field(z):
        calls.append(1)
        return a * z

    h = initial_step_size(field, torch.tensor(z0, dtype=torch.float64), order, rtol=rtol, atol=atol, T=T)
    assert h == pytest.approx(reference, rel=1e-9) and len(calls) == INITIAL_STEP_NFE


def test_initial_step_size_rejects_bad_order_and_weights():
    with pytest.raises(ValueError, match="order must be an integer >= 1, got 0"):
        initial_step_size(lambda z: z, torch.ones(2), 0)
    with pytest.raises(ValueError, match="rtol must be >= 0, got -0.1"):
        initial_step_size(lambda z: z, torch.ones(2), 1, rtol=-0.1)
    with pytest.raises(ValueError, match="atol must be > 0, got 0"):
        initial_step_size(lambda z: z, torch.ones(2), 1, rtol=1e-3, atol=0)


def test_short_real_step_adaptation_run_moves_h_and_counts_every_evaluation():
    config = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 1), seed=0, iterations=300, lr=3e-3,
                         report_every=100, test_every=100)
    # Loose starting-step weights keep this test fast (about 10 steps instead of about 130).
    config, controller = StepAdaptation.for_training(config, test_method="midpoint", k=25, rtol=0.1, atol=0.1)
    start = controller.h
    result = train(config, controller=controller)
    step_sizes = [start] + [c.step_size for c in controller.history]
    assert len(controller.history) == 12 and len(set(step_sizes)) > 2
    assert result.check_nfe == controller.check_nfe + INITIAL_STEP_NFE
    # Above chance (0.5): how far above depends on the CPU's float kernels (0.585 on an Intel Xeon, above 0.6 on AMD EPYC).
    assert result.setting == controller.setting and result.test_accuracy > 0.55

    row = summary_row(result, controller, "test", "t0")
    assert tuple(row) == SUMMARY_COLUMNS
    assert row["nfe_per_iteration"] == pytest.approx((result.total_nfe_forward + result.check_nfe) / 300)
    assert row["total_nfe"] == result.total_nfe_forward + result.total_nfe_backward + result.check_nfe
    assert (row["mode"], row["train_method"], row["test_method"], row["final_steps"]) == ("step", "euler", "midpoint", result.setting.steps)
    rows = history_rows(result, controller, "t0")
    assert [tuple(r) for r in rows] == [HISTORY_COLUMNS] * 12
    tested = {r["iteration"]: r["test_accuracy"] for r in rows if not math.isnan(r["test_accuracy"])}
    assert sorted(tested) == [100, 200, 300] and tested[300] == pytest.approx(result.test_accuracy)


def test_short_real_tolerance_adaptation_run():
    config = TrainConfig(dataset="sphere2", solver=SolverSetting.adaptive("fehlberg2", 1.0), seed=0, iterations=20,
                         lr=3e-3, report_every=10)
    config, controller = ToleranceAdaptation.for_training(config, tol=1e-3, k=5)
    assert config.solver == SolverSetting.adaptive("fehlberg2", 1e-3)
    result = train(config, controller=controller)
    assert [c.iteration for c in controller.history] == [5, 10, 15, 20]
    assert all(c.test_tol == pytest.approx(c.tol / 5) for c in controller.history)
    assert result.check_nfe == controller.check_nfe > 0
    assert summary_row(result, controller, "test", "t1")["final_tol"] == controller.tol


def test_training_resumed_from_a_checkpoint_adapts_exactly_as_uninterrupted(tmp_path):
    def start():
        config = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 1), seed=3, iterations=60, lr=3e-3,
                             report_every=30)
        return StepAdaptation.for_training(config, k=10, rtol=0.1, atol=0.1)

    config, controller = start()
    states = {}
    full = train(config, controller=controller, on_report=lambda p, s: states.setdefault(p.iteration, s()))
    save_checkpoint(tmp_path / "c.pt", states[30])
    config2, fresh = start()
    resumed = train(config2, controller=fresh, resume_from=load_checkpoint(tmp_path / "c.pt"))
    assert fresh.history == controller.history and fresh.h == controller.h and len(fresh.history) == 6
    assert resumed.check_nfe == full.check_nfe and resumed.total_nfe_forward == full.total_nfe_forward
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))


class DataScripted(Scripted):
    """A :class:`Scripted` evaluator that also records the data each pass was given."""

    def __init__(self, accuracies: dict):
        super().__init__(accuracies)
        self.data = []

    def __call__(self, model, x, y, setting):
        self.data.append((x, y))
        return super().__call__(model, x, y, setting)


def test_check_data_evaluates_both_solvers_on_the_fixed_data_and_counts_the_extra_pass():
    x_fixed, y_fixed = torch.zeros(7, 2), torch.tensor([0, 1, 0, 1, 0, 1, 0])
    # The training logits say 0.90; the fixed data say 0.95 under Euler(20), 0.70 under the test solver.
    evaluator = DataScripted({euler(20): 0.95, midpoint_test_of(20): 0.70})
    c = StepAdaptation("euler", 0.05, "midpoint", evaluate=evaluator, check_data=(x_fixed, y_fixed))
    new, spent = check_once(c, 0.90)
    assert c.h == pytest.approx(0.025) and new == euler(40)
    check = c.history[-1]
    assert check.train_solver_accuracy == 0.95 and check.test_solver_accuracy == 0.70
    assert evaluator.calls == [euler(20), midpoint_test_of(20)] and spent == 20 + 2 * midpoint_test_of(20).steps
    assert all(x is x_fixed and y is y_fixed for x, y in evaluator.data)


def test_check_data_growth_trial_and_same_steps_shortcut():
    fixed = (torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]))
    # h = 0.1 grows to 0.11, still 10 steps: the trial is the fixed data's own train pass.
    evaluator = DataScripted({euler(10): 0.80, midpoint_test_of(10): 0.85})
    c = StepAdaptation("euler", 0.1, "midpoint", evaluate=evaluator, check_data=fixed)
    _, spent = check_once(c, 0.10)  # the training logits' 0.10 would disagree: they must be ignored
    assert c.h == pytest.approx(0.11) and c.history[-1].candidate_accuracy == 0.80
    assert evaluator.calls == [euler(10), midpoint_test_of(10)] and spent == evaluator.nfe
    # h = 0.05 -> 0.055 (19 steps): a trial pass on the fixed data decides.
    evaluator = DataScripted({euler(20): 0.9, midpoint_test_of(20): 0.9, euler(19): 0.75})
    c = StepAdaptation("euler", 0.05, "midpoint", evaluate=evaluator, check_data=fixed)
    check_once(c, 0.9)
    assert c.h == 0.05 and not c.history[-1].accepted and evaluator.calls == [euler(20), midpoint_test_of(20), euler(19)]


def test_default_checks_use_the_batch_and_bad_check_data_fails():
    assert StepAdaptation("euler", 0.05).check_data is None
    with pytest.raises(ValueError, match="check_data must be None or a non-empty"):
        StepAdaptation("euler", 0.05, check_data=(torch.zeros(3, 2), torch.zeros(2)))
    with pytest.raises(ValueError, match="check_data must be None or a non-empty"):
        StepAdaptation("euler", 0.05, check_data=torch.zeros(3))


def test_check_subset_is_fixed_by_the_seed_and_leaves_the_global_random_state():
    config = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 1), seed=4, iterations=1)
    data = config.load_data()
    state = torch.get_rng_state()
    x, y = check_subset(data, 100, 4)
    assert torch.equal(torch.get_rng_state(), state)
    x2, y2 = check_subset(data, 100, 4)
    assert x.shape[0] == len(y) == 100 and torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(check_subset(data, 100, 5)[0], x)
    whole = check_subset(data, 10 ** 6, 4)
    assert whole[0] is data.x_train and whole[1] is data.y_train
    with pytest.raises(ValueError, match="check_size must be an integer >= 1, got 0"):
        check_subset(data, 0, 4)


def test_for_training_check_size_keeps_the_starting_step_and_the_default_checks_on_batches():
    config = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 1), seed=1, iterations=1)
    plain_config, plain = StepAdaptation.for_training(config, rtol=0.1, atol=0.1)
    fixed_config, fixed = StepAdaptation.for_training(config, rtol=0.1, atol=0.1, check_size=50)
    assert plain.check_data is None and plain.h == fixed.h and plain_config == fixed_config
    assert len(fixed.check_data[1]) == 50 and torch.equal(fixed.check_data[0], check_subset(config.load_data(), 50, 1)[0])
    # The starting step's norm weights are an option too (the paper states none): tighter weights, smaller step.
    _, tight = StepAdaptation.for_training(config, rtol=1e-6, atol=1e-6)
    assert tight.h < plain.h
