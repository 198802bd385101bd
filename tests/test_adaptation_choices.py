"""Step adaptation's choices the paper leaves open, from the command line to the controller: the data of
the checks (--check-size) and the starting step's norm weights (--initial-rtol, --initial-atol)."""

from __future__ import annotations

import inspect

import pytest

from tune_node import adapt
from tune_node.cli.options import STEP_CHOICES
from tune_node.experiments import trial as trial_module
from tune_node.experiments.adapt import adaptation_trials
from tune_node.experiments.search_space import load_space
from tune_node.experiments.trial import Adaptation, Trial
from tune_node.train.adaptation import StepAdaptation


def test_the_defaults_agree_everywhere():
    defaults = {k: p.default for k, p in inspect.signature(StepAdaptation.for_training).parameters.items()}
    assert STEP_CHOICES == trial_module._STEP_CHOICES == {"check_size": defaults["check_size"], "initial_rtol": defaults["rtol"],
                                                         "initial_atol": defaults["atol"]}
    assert {f: getattr(Adaptation("step", "euler", "midpoint", 50, 0.1, 1e-6), f) for f in STEP_CHOICES} == STEP_CHOICES


def _settings(capsys, *argv):
    args = adapt.build_parser().parse_args(["--quick", *argv])
    return adapt._adaptation_settings(args)


def test_a_default_trial_records_as_before_and_choices_travel(capsys):
    space = load_space("tiny")
    plain = adaptation_trials(space, _settings(capsys), "a", "data", False)[0]
    assert not set(STEP_CHOICES) & set(plain)  # earlier records and trial names unchanged
    chosen = adaptation_trials(space, _settings(capsys, "--check-size", "500", "--initial-rtol", "0", "--initial-atol", "1"),
                               "a", "data", False)[0]
    assert {k: chosen[k] for k in STEP_CHOICES} == {"check_size": 500, "initial_rtol": 0.0, "initial_atol": 1.0}
    back = Trial.from_dict(chosen)
    assert (back.adaptation.check_size, back.adaptation.initial_rtol, back.adaptation.initial_atol) == (500, 0.0, 1.0)
    assert back.to_dict() == chosen and Trial.from_dict(plain).adaptation.check_size is None


def test_the_controller_is_built_with_them(monkeypatch):
    seen = {}

    def for_training(cls, config, data=None, rtol=None, atol=None, check_size=None, **kwargs):
        seen.update(rtol=rtol, atol=atol, check_size=check_size)
        return config, None

    monkeypatch.setattr(StepAdaptation, "for_training", classmethod(for_training))
    adaptation = Adaptation("step", "euler", "midpoint", 50, 0.1, 1e-6, check_size=64, initial_rtol=0.0, initial_atol=1.0)
    adaptation.controller(object())
    assert seen == {"rtol": 0.0, "atol": 1.0, "check_size": 64}


@pytest.mark.parametrize("argv, message", [
    (["--check-size", "0"], "--check-size must be an integer >= 1"),
    (["--initial-atol", "0"], "--initial-atol must be a finite number > 0, got 0.0"),
    (["--initial-rtol", "-1"], "--initial-rtol must be a finite number >= 0, got -1.0"),
    (["--mode", "tolerance", "--train-solver", "fehlberg2", "--check-size", "10"], "--check-size configure step mode"),
])
def test_bad_choices_are_refused_before_any_work(argv, message, tmp_path, capsys):
    assert adapt.main(["--quick", "--storage", str(tmp_path / "runs"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
