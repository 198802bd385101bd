"""Search spaces: the shipped studies carry the paper's settings; bad files give clear errors."""

import pytest

from tune_node.search_space import SearchSpaceError, available_spaces, load_space, parse_seeds, train_config_from_trial

POWERS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
PAPER_STUDIES = ["sphere2_fixed", "sphere2_adaptive", "sphere3_fixed", "sphere10_fixed", "sphere900_fixed",
                 "mnist_fixed", "mnist_adaptive", "cifar10_fixed", "cifar10_adaptive"]


def settings(space):
    return {(s.method, s.steps, s.tol, s.gradient) for s, _ in space.solvers}


@pytest.mark.parametrize("name", available_spaces())
def test_every_shipped_space_builds_valid_train_configs(name):
    space = load_space(name)
    trials = space.trials()
    assert len(trials) == len(space.solvers) * len(space.seeds)
    for trial in trials:
        config = train_config_from_trial(trial)
        assert (config.dataset, config.solver.method, config.seed) == (trial["dataset"], trial["method"], trial["seed"])


@pytest.mark.parametrize("name", PAPER_STUDIES)
def test_paper_studies_have_five_seeds(name):
    assert load_space(name).seeds == (0, 1, 2, 3, 4)


def test_sphere_fixed_studies_are_the_papers_grid():
    for dim in (2, 3, 10, 900):
        space = load_space(f"sphere{dim}_fixed")
        assert space.dataset == f"sphere{dim}"
        assert settings(space) == {(m, s, None, "backprop") for m in ("euler", "rk4") for s in POWERS}
        t = space.trials()[0]
        assert (t["iterations"], t["lr"], t["batch_size"], t["optimizer"]) == (10000, 1e-4, 128, "adam")


def test_sphere2_adaptive_has_both_gradients_and_a_tolerance_ladder():
    space = load_space("sphere2_adaptive")
    assert {s.gradient for s, _ in space.solvers} == {"backprop", "adjoint"}
    assert {s.method for s, _ in space.solvers} == {"fehlberg2", "dopri5"}
    assert len({s.tol for s, _ in space.solvers}) >= 4


@pytest.mark.parametrize("name, iterations, batch, optimizer, lr", [
    ("mnist_fixed", 7020, 256, "sgd", 1e-2),
    ("mnist_adaptive", 7020, 256, "adam", 1e-4),
    ("cifar10_fixed", 7800, 256, "adam", 1e-3),
    ("cifar10_adaptive", 7800, 256, "adam", 1e-3),
])
def test_image_studies_use_appendix_d_hyperparameters(name, iterations, batch, optimizer, lr):
    for t in load_space(name).trials():
        assert (t["iterations"], t["batch_size"], t["optimizer"], t["lr"]) == (iterations, batch, optimizer, lr)


def test_unknown_name_lists_available_spaces():
    with pytest.raises(SearchSpaceError) as err:
        load_space("sphere7_fixed")
    assert "'sphere7_fixed'" in str(err.value) and "quick" in str(err.value) and "sphere2_fixed" in str(err.value)


GOOD = 'dataset = "sphere2"\nseeds = 2\n[[solvers]]\nmethod = "euler"\nsteps = [1, 2]\n'


@pytest.mark.parametrize("text, problem", [
    ('dataset = "sphere2"\nseeds = [1, 2\n', "not valid TOML"),
    (GOOD + 'colour = "red"\n', "unknown key(s) 'colour'"),
    ('dataset = "sphere7"\nseeds = 2\n[[solvers]]\nmethod = "euler"\nsteps = [1]\n', "unknown dataset 'sphere7'"),
    ('dataset = "sphere2"\nseeds = 2\n[[solvers]]\nmethod = "ralston"\nsteps = [1]\n', "unknown method 'ralston'"),
    ('dataset = "sphere2"\nseeds = 2\n[[solvers]]\nmethod = "dopri5"\nsteps = [1]\n', "give 'tol', not 'steps'"),
    ('dataset = "sphere2"\nseeds = 2\n[[solvers]]\nmethod = "euler"\nsteps = [0]\n', "steps=0"),
    ('dataset = "sphere2"\nseeds = 0\n[[solvers]]\nmethod = "euler"\nsteps = [1]\n', "seed count must be >= 1"),
    ('dataset = "sphere2"\n[[solvers]]\nmethod = "euler"\nsteps = [1]\n', "missing required key 'seeds'"),
    (GOOD + '[training]\nlr = -1.0\n', "lr must be > 0"),
    (GOOD + '[training]\noptimizer = "rmsprop"\n', "unknown optimizer 'rmsprop'"),
    ('dataset = "sphere2"\nseeds = 2\n[[solvers]]\nmethod = "euler"\nsteps = [1]\ngradient = "reverse"\n', "unknown gradient 'reverse'"),
])
def test_malformed_file_names_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(SearchSpaceError) as err:
        load_space(str(path))
    assert str(path) in str(err.value) and problem in str(err.value)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(SearchSpaceError, match="does not exist"):
        load_space(str(tmp_path / "nope.toml"))


def test_user_file_adds_an_experiment(tmp_path):
    path = tmp_path / "my_study.toml"
    path.write_text(GOOD + '[[solvers]]\nmethod = "fehlberg2"\ntol = [1e-2]\ngradient = ["backprop", "adjoint"]\nlr = 5e-4\n')
    space = load_space(str(path))
    assert space.name == "my_study"
    trials = space.trials()
    assert len(trials) == (2 + 2) * 2
    assert {t["lr"] for t in trials if t["method"] == "fehlberg2"} == {5e-4}
    assert {t["lr"] for t in trials if t["method"] == "euler"} == {1e-4}  # paper default for spheres


def test_overrides_apply_to_every_trial():
    space = load_space("mnist_fixed").with_overrides(seeds="0,3", iterations=50, lr=0.5, report_every=10)
    trials = space.trials()
    assert {t["seed"] for t in trials} == {0, 3}
    assert {(t["iterations"], t["lr"], t["report_every"]) for t in trials} == {(50, 0.5, 10)}


@pytest.mark.parametrize("value, seeds", [("3", [0, 1, 2]), ("0,1,7", [0, 1, 7]), (2, [0, 1]), ([4, 5], [4, 5])])
def test_parse_seeds(value, seeds):
    assert parse_seeds(value) == seeds


@pytest.mark.parametrize("value", ["x", "0", "1,1", -1, [], True])
def test_parse_seeds_rejects(value):
    with pytest.raises(ValueError, match="seed"):
        parse_seeds(value)


@pytest.mark.parametrize("name", available_spaces())
def test_a_trial_dict_round_trips_through_the_trial_type(name):
    from tune_node.trial import Trial

    for trial in load_space(name).trials():
        assert Trial.from_dict(trial).to_dict() == trial
        assert list(Trial.from_dict(trial).to_dict()) == list(trial)  # same keys in the same order


def test_an_adaptation_trial_round_trips_and_trains_its_starting_setting():
    from tune_node.trial import Adaptation, Trial

    adaptation = Adaptation("tolerance", "fehlberg2", "dopri5", k=50, threshold=0.1, initial_tol=1e-6)
    trial = Trial.of("demo", train_config_from_trial(load_space("tiny").trials()[0]), adaptation)
    again = Trial.from_dict(trial.to_dict())
    assert again == trial and again.adaptation == adaptation
    from tune_node.solvers import SolverSetting

    assert again.train_config().solver == SolverSetting.adaptive("fehlberg2", 1e-6)
