"""TrainConfig's GPU flags (cuda_graph, channels_last, tf32, amp) set for an experiment: ``--set FLAG=VALUE``
parsed strictly, a search space's ``[training]`` table, a trial's record (a flag only where it is not
at its default, so earlier records stay byte for byte), and the TrainConfig the trainable builds.

No test here starts Ray or trains (the CLIs run as dry runs, or stop where training would start)."""

import argparse
import json

import pytest

from tune_node.cli import options
from tune_node.cli.common import UsageError
from tune_node.experiments import search_space as search_space_module
from tune_node.experiments import trial as trial_module
from tune_node.experiments.search_space import SearchSpaceError, load_space, train_config_from_trial
from tune_node.experiments.trial import Adaptation, Trial
from tune_node.solvers import SolverSetting
from tune_node.train import training
from tune_node.training import TrainConfig

FLAGS = dict(training.GPU_FLAGS)
EULER = SolverSetting.fixed("euler", 4)

# What earlier versions recorded for these trials (grid.json, adapt.json, a Ray trial config): a
# trial at the default flags must still give exactly this, key order included.
OLD_GRID_RECORD = ('{"experiment": "e", "dataset": "sphere2", "method": "euler", "steps": 4, "tol": null, "gradient": '
                   '"backprop", "seed": 1, "iterations": 10000, "lr": 0.0001, "batch_size": 128, "optimizer": "adam", '
                   '"report_every": 100, "test_every": 0, "eval_batch_size": 1000, "data_root": "data", "download": false}')
OLD_ADAPT_RECORD = ('{"experiment": "e", "dataset": "sphere2", "steps": null, "tol": null, "threshold": 0.1, "k": 50, '
                    '"initial_tol": 1e-06, "gradient": "backprop", "mode": "step", "method": "euler", "test_method": "rk4", '
                    '"seed": 2, "iterations": 10000, "lr": 0.0001, "batch_size": 128, "optimizer": "adam", "report_every": 100, '
                    '"test_every": 0, "eval_batch_size": 1000, "data_root": "data", "download": false}')
ADAPTATION = Adaptation("step", "euler", "rk4", 50, 0.1, 1e-6)


def grid_trial(**flags) -> Trial:
    return Trial.of("e", TrainConfig(dataset="sphere2", solver=EULER, seed=1, **flags))


def adapt_trial(**flags) -> Trial:
    return Trial.of("e", TrainConfig(dataset="sphere2", solver=ADAPTATION.starting_setting(), seed=2, **flags), ADAPTATION)


# ---------------------------------------------------------------- --set FLAG=VALUE

@pytest.mark.parametrize("text,expected", [
    ("amp=true", ("amp", True)), ("amp=TRUE", ("amp", True)), ("cuda_graph=false", ("cuda_graph", False)),
    ("cuda_graph=0", ("cuda_graph", False)), ("tf32=1", ("tf32", True)), ("tf32=Yes", ("tf32", True)),
    ("channels_last=no", ("channels_last", False)), ("channels_last=Off", ("channels_last", False)),
    ("amp=on", ("amp", True)), (" amp = false ", ("amp", False)),
])
def test_set_reads_a_flag_as_a_boolean(text, expected):
    key, value = options.training_setting(text)
    assert (key, value) == expected and type(value) is bool


@pytest.mark.parametrize("text", ["amp=maybe", "amp=", "amp=2", "amp=-1", "amp=truee", "tf32=t", "cuda_graph=none",
                                  "channels_last=1.0"])
def test_set_refuses_anything_else_naming_key_value_and_what_is_allowed(text):
    key, _, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    with pytest.raises(argparse.ArgumentTypeError) as err:
        options.training_setting(text)
    message = str(err.value)
    assert f"{key}={raw!r}" in message and "true or false" in message and "yes/no" in message and "on/off" in message, message


@pytest.mark.parametrize("build", [options.grid_parser, options.adapt_parser, options.search_parser, options.train_one_parser])
def test_every_cli_refuses_a_bad_flag_with_a_usage_error(build, capsys):
    with pytest.raises(SystemExit) as exit:
        build().parse_args(["--set", "amp=maybe"])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "argument --set: amp='maybe' is not a boolean; amp takes true or false" in err, err
    args = build().parse_args(["--set", "amp=Yes", "--set", "cuda_graph=off"])
    assert args.set == [("amp", True), ("cuda_graph", False)]


def test_a_flag_given_twice_is_refused_as_written():
    args = options.grid_parser().parse_args(["--set", "amp=yes", "--set", "amp=off"])
    with pytest.raises(UsageError, match=r"training key amp given twice \(--set amp=true and --set amp=false\)"):
        options.training_overrides(args)


def test_the_light_flag_table_matches_train_config():
    """options.py (no torch) lists the flags itself: the same flags and defaults as TrainConfig, which
    takes True and False for each and refuses what --set would never give it."""
    assert options.GPU_FLAGS == training.GPU_FLAGS
    bools = {k for k, (kind, _) in options.TRAINING_KEYS.items() if kind is bool}
    assert bools == set(FLAGS) == search_space_module.GPU_KEYS == set(trial_module.GPU_KEYS)
    assert set(options.TRAINING_KEYS) == search_space_module.TRAINING_KEYS
    for key in bools:
        assert options.TRAINING_KEYS[key] == (bool, None)
        for value in (True, False):
            assert getattr(TrainConfig(dataset="sphere2", solver=EULER, **{key: value}), key) is value
        for wrong in (1, 0, "true", None):
            with pytest.raises(ValueError, match=key):
                TrainConfig(dataset="sphere2", solver=EULER, **{key: wrong})
    assert set(options.BOOLEAN_WORDS.values()) == {True, False}


# ---------------------------------------------------------------- a trial's record

def test_a_trial_at_the_default_flags_records_as_before_byte_for_byte():
    for trial, old in ((grid_trial(), OLD_GRID_RECORD), (adapt_trial(), OLD_ADAPT_RECORD)):
        assert json.dumps(trial.to_dict()) == old
        assert not set(trial.to_dict()) & set(FLAGS)
    # Flags given at their defaults are no flags: the same trial, the same record.
    explicit = grid_trial(**FLAGS)
    assert explicit == grid_trial() and json.dumps(explicit.to_dict()) == OLD_GRID_RECORD
    by_hand = Trial("e", "sphere2", 1, {**grid_trial().training, **FLAGS}, solver=EULER)
    assert by_hand == grid_trial() and not set(by_hand.training) & set(FLAGS)


def test_an_old_record_trains_at_the_default_flags():
    for old in (OLD_GRID_RECORD, OLD_ADAPT_RECORD):
        trial = Trial.from_dict(json.loads(old))
        config = trial.train_config()
        assert {k: getattr(config, k) for k in FLAGS} == FLAGS
        assert json.dumps(trial.to_dict()) == old


@pytest.mark.parametrize("make", [grid_trial, adapt_trial])
def test_a_trial_with_flags_off_their_defaults_round_trips_and_trains_with_them(make):
    trial = make(amp=True, cuda_graph=False)
    d = trial.to_dict()
    assert (d["amp"], d["cuda_graph"]) == (True, False) and "tf32" not in d and "channels_last" not in d
    # The record of the default trial plus the flags that differ, nothing else changed.
    default = make().to_dict()
    assert {k: v for k, v in d.items() if k not in FLAGS} == default
    again = Trial.from_dict(json.loads(json.dumps(d)))
    assert again == trial and again.to_dict() == d
    for config in (again.train_config(), train_config_from_trial(d)):
        assert (config.amp, config.cuda_graph, config.tf32, config.channels_last) == (True, False, False, True)


def test_a_recorded_flag_that_is_no_boolean_fails_when_the_config_is_built():
    d = {**json.loads(OLD_GRID_RECORD), "amp": "true"}
    with pytest.raises(ValueError, match="amp must be True or False, got 'true'"):
        Trial.from_dict(d).train_config()


# ---------------------------------------------------------------- a search space

SPACE = """\
dataset = "sphere2"
seeds = 2

[training]
iterations = 20
{training}

[[solvers]]
method = "euler"
steps = [1, 2]
{solver}
"""


def write_space(tmp_path, training: str = "", solver: str = ""):
    path = tmp_path / "flags.toml"
    path.write_text(SPACE.format(training=training, solver=solver))
    return path


def test_a_search_space_sets_flags_in_its_training_table_and_a_solver_table(tmp_path):
    space = load_space(str(write_space(tmp_path, "amp = true\ncuda_graph = false", "tf32 = true")))
    trials = space.trials()
    assert len(trials) == 4
    for t in trials:
        assert (t["amp"], t["cuda_graph"], t["tf32"]) == (True, False, True) and "channels_last" not in t
        config = train_config_from_trial(t)
        assert (config.amp, config.cuda_graph, config.tf32, config.channels_last) == (True, False, True, True)
    # Set to their defaults, the flags leave the trials as a space without them gives them.
    plain = load_space(str(write_space(tmp_path))).trials()
    assert load_space(str(write_space(tmp_path, "amp = false\nchannels_last = true"))).trials() == plain
    assert not any(set(t) & set(FLAGS) for t in plain)


@pytest.mark.parametrize("training,solver,where", [
    ('amp = "yes"', "", "[training]: amp = 'yes'"), ("tf32 = 1", "", "[training]: tf32 = 1"),
    ("", "cuda_graph = 0", "solver table 1: cuda_graph = 0"),
])
def test_a_search_space_refuses_a_flag_that_is_no_boolean(tmp_path, training, solver, where):
    with pytest.raises(SearchSpaceError) as err:
        load_space(str(write_space(tmp_path, training, solver)))
    assert "flags.toml" in str(err.value) and where in str(err.value) and "allowed: true or false" in str(err.value)


def test_overrides_set_flags_for_every_trial_and_refuse_a_non_boolean():
    space = load_space("tiny").with_overrides(amp=True, channels_last=False)
    assert all(t["amp"] is True and t["channels_last"] is False for t in space.trials())
    with pytest.raises(ValueError, match="the training overrides: amp = 'true' is not a boolean"):
        load_space("tiny").with_overrides(amp="true")


# ---------------------------------------------------------------- from the command line to the trial

def test_grid_set_reaches_every_trial_and_its_train_config(tmp_path, monkeypatch, capsys):
    from tune_node.experiments import grid

    seen = []
    plan = grid.plan_trials
    monkeypatch.setattr(grid, "plan_trials", lambda trials, **kw: seen.extend(trials) or plan(trials, **kw))
    status = grid.main(["--space", "tiny", "--dry-run", "--storage", str(tmp_path), "--set", "amp=true",
                        "--set", "cuda_graph=off"])
    assert status == 0, capsys.readouterr().err
    assert len(seen) == 6 and not any(tmp_path.iterdir())
    for t in seen:
        config = Trial.from_dict(t).train_config()
        assert (config.amp, config.cuda_graph) == (True, False)


def test_adapt_set_reaches_every_trial(tmp_path, monkeypatch, capsys):
    from tune_node.experiments import adapt

    seen = []
    build = adapt.adaptation_trials
    monkeypatch.setattr(adapt, "adaptation_trials", lambda *a, **kw: seen.extend(build(*a, **kw)) or list(seen))
    status = adapt.main(["--space", "tiny", "--dry-run", "--storage", str(tmp_path), "--set", "tf32=yes",
                         "--iterations", "100", "--k", "10"])
    assert status == 0, capsys.readouterr().err
    assert len(seen) == 2 and all(t["tf32"] is True and Trial.from_dict(t).train_config().tf32 for t in seen)


def test_search_set_reaches_every_trial(tmp_path, monkeypatch, capsys):
    from tune_node.experiments import search

    seen = []
    groups = search.search_groups
    monkeypatch.setattr(search, "search_groups", lambda trials, *a, **kw: seen.extend(trials) or groups(trials, *a, **kw))
    space = write_space(tmp_path)  # one ladder: euler at 1 and 2 steps
    status = search.main(["--space", str(space), "--dry-run", "--storage", str(tmp_path / "runs"), "--set", "amp=1"])
    assert status == 0, capsys.readouterr().err
    assert seen and all(Trial.from_dict(t).train_config().amp for t in seen) and not (tmp_path / "runs").exists()


def test_train_one_set_reaches_its_train_config(monkeypatch):
    from tune_node.cli import train_one

    class Started(Exception):
        pass

    def no_training(config, **kw):
        raise Started(config)

    monkeypatch.setattr(train_one, "train", no_training)
    with pytest.raises(Started) as started:
        train_one.main(["--iterations", "2", "--set", "amp=true", "--set", "channels_last=false"])
    config = started.value.args[0]
    assert (config.amp, config.channels_last, config.cuda_graph, config.tf32) == (True, False, True, False)
