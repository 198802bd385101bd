"""A researcher's own Neural ODE: time-dependent fields in every solver, a dataset and model named
as ``module:function`` in a search space, the checks before training, and ``check_model``."""

import math
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from tune_node.check import check_model
from tune_node.datasets import Dataset, load_dataset
from tune_node.integrate import FieldSignatureError, integrate, takes_time
from tune_node.search_space import SearchSpaceError, load_space, train_config_from_trial
from tune_node.solvers import SolverSetting
from tune_node.training import TrainConfig, load_checkpoint, restore_model, save_checkpoint, train
from tune_node.user_code import UserCodeError
from tune_node.user_study import check_user_study

ROOT = Path(__file__).resolve().parent.parent


class DecayInTime(nn.Module):
    """dz/dt = -t z, so z(T) = z0 exp(-T^2 / 2); ``rate`` scales it (a parameter to differentiate)."""

    def __init__(self):
        super().__init__()
        self.rate = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, t, z):
        return -self.rate * t * z


SETTINGS = [
    SolverSetting.fixed("euler", 400),
    SolverSetting.fixed("midpoint", 50),
    SolverSetting.fixed("rk4", 10),
    SolverSetting.adaptive("fehlberg2", 1e-8),
    SolverSetting.adaptive("dopri5", 1e-8),
    SolverSetting.fixed("rk4", 10, gradient="adjoint"),
    SolverSetting.adaptive("dopri5", 1e-8, gradient="adjoint"),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.label())
def test_every_solver_gives_a_time_dependent_field_its_time(setting):
    z0 = torch.tensor([[1.0], [2.0]], dtype=torch.float64, requires_grad=True)
    field = DecayInTime()
    sol = integrate(field, z0, setting)
    exact = z0.detach() * math.exp(-0.5)
    tolerance = {"euler": 2e-3, "midpoint": 2e-4}.get(setting.method, 1e-5)  # h = 1/400, 1/50: O(h), O(h^2)
    assert torch.allclose(sol.z.detach(), exact, atol=tolerance)
    # d z(1) / d rate = -z0 exp(-rate / 2) / 2 at rate 1, through backprop and the adjoint alike.
    sol.z.sum().backward()
    assert field.rate.grad.item() == pytest.approx(-0.5 * 3.0 * math.exp(-0.5), abs=10 * tolerance)


def test_fixed_step_stage_times_are_t_n_plus_c_i_h():
    seen = []

    def field(t, z):
        seen.append(float(t))
        return torch.zeros_like(z)

    integrate(field, torch.zeros(1, 1), SolverSetting.fixed("rk4", 2))
    assert seen == pytest.approx([0.0, 1 / 6, 1 / 3, 0.5, 0.5, 2 / 3, 5 / 6, 1.0])


def test_takes_time_reads_the_signature_or_the_field_s_own_word():
    class Autonomous(nn.Module):
        def forward(self, z):
            return z

    class Declared(nn.Module):
        time_dependent = True

        def forward(self, *args):
            return args[-1]

    assert not takes_time(Autonomous()) and takes_time(DecayInTime()) and takes_time(Declared())
    assert takes_time(lambda t, z: z) and not takes_time(lambda z: z)
    with pytest.raises(FieldSignatureError, match=r"forward\(z\).*forward\(t, z\).*3 required"):
        takes_time(lambda a, b, c: a)


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    sys.modules.pop(name, None)


USER_MODULE = """
    import torch
    from torch import nn
    from tune_node.datasets import Dataset
    from tune_node.models import NeuralODEClassifier

    def load(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(300, 2, generator=g)
        y = (x[:, 0] * x[:, 1] > 0).long()
        return Dataset("quadrants", x[:200], y[:200], x[200:], y[200:], 2)

    class Field(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2))

        def forward(self, t, z):
            return self.net(torch.cat([z, t.expand(len(z), 1)], 1))

    def build(data):
        return NeuralODEClassifier(Field(), 2, data.classes)

    def not_a_dataset(seed):
        return {"x": 1}

    def bad_labels(seed):
        d = load(seed)
        return Dataset("bad", d.x_train, d.y_train + 1, d.x_test, d.y_test, 2)

    def three_logits(data):
        return NeuralODEClassifier(Field(), 2, 3)

    def not_a_model(data):
        return nn.Linear(2, 2)

    class BufferedField(Field):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(1))

    def buffered(data):
        return NeuralODEClassifier(BufferedField(), 2, data.classes)

    class DropoutField(Field):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.1)

        def forward(self, t, z):
            return self.drop(super().forward(t, z))

    def dropout(data):
        return NeuralODEClassifier(DropoutField(), 2, data.classes)
"""


@pytest.fixture
def user_folder(tmp_path):
    module = f"user_study_{tmp_path.name.replace('-', '_')}"
    write_module(tmp_path, module, USER_MODULE)
    return tmp_path, module


def space_file(folder: Path, module: str, dataset="load", model="build", extra="") -> Path:
    path = folder / "study.toml"
    path.write_text(textwrap.dedent(f"""
        dataset = "{module}:{dataset}"
        model = "{module}:{model}"
        seeds = 2
        {extra}
        [training]
        iterations = 30
        lr = 1e-2
        batch_size = 50
        report_every = 10

        [[solvers]]
        method = "euler"
        steps = [2]
        """))
    return path


def test_a_search_space_finds_the_user_s_module_beside_it_and_trains_it(user_folder):
    folder, module = user_folder
    space = load_space(str(space_file(folder, module)))
    assert space.code_dir == str(folder.resolve())
    trials = space.trials()
    assert {t["model"] for t in trials} == {f"{module}:build"} and {t["code_dir"] for t in trials} == {str(folder.resolve())}
    config = train_config_from_trial(trials[0])
    check_user_study(config)
    first, again = train(config), train(config)
    assert first.iterations == 30 and 0 <= first.test_accuracy <= 1
    for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)  # the seed alone fixes data, initial weights and batch order
    other = train(train_config_from_trial(trials[1]))
    assert not torch.equal(other.model.classifier.weight, first.model.classifier.weight)


def test_the_seed_fixes_a_user_model_s_initial_weights_and_leaves_torch_s_generator_alone(user_folder):
    folder, module = user_folder
    config = train_config_from_trial(load_space(str(space_file(folder, module))).trials()[0])
    data = config.load_data()
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = config.build_model(data), config.build_model(data)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_user_model_s_checkpoint_restores(user_folder, tmp_path):
    folder, module = user_folder
    config = train_config_from_trial(load_space(str(space_file(folder, module))).trials()[0])
    states = []
    result = train(config, on_report=lambda progress, state: states.append(state()))
    model, setting, restored = restore_model(load_checkpoint(save_checkpoint(tmp_path / "c.pt", states[-1])))
    assert restored.model == config.model and setting == config.solver
    x = config.load_data().x_test
    assert torch.equal(model(x, setting)[0], result.model(x, setting)[0])


@pytest.mark.parametrize("dataset, model, message", [
    ("nowhere", "build", r"module 'nowhere_module' does not import"),
    ("missing", "build", r"has no 'missing'"),
    ("load", "absent", r"model builder .*:absent.*has no 'absent'"),
])
def test_a_user_function_that_does_not_resolve_stops_the_space_from_loading(user_folder, dataset, model, message):
    folder, module = user_folder
    path = space_file(folder, module, dataset, model)
    if dataset == "nowhere":
        path.write_text(path.read_text().replace(f"{module}:nowhere", "nowhere_module:load"))
    with pytest.raises(SearchSpaceError, match=message) as err:
        load_space(str(path))
    assert str(path) in str(err.value)


def test_a_user_dataset_needs_a_model(user_folder):
    folder, module = user_folder
    path = space_file(folder, module)
    path.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("model")))
    with pytest.raises(SearchSpaceError, match=r"has no default model: add model = 'module:function'"):
        load_space(str(path))


@pytest.mark.parametrize("dataset, model, error, message", [
    ("not_a_dataset", "build", TypeError, r"not_a_dataset' returned a dict, expected a tune_node.datasets.Dataset"),
    ("bad_labels", "build", ValueError, r"y_train holds labels 1..2; allowed: 0..1"),
    ("load", "three_logits", ValueError, r"logits of shape \(2, 3\) for 2 examples; expected \(2, 2\)"),
    ("load", "not_a_model", UserCodeError, r"returned a Linear, expected a tune_node.models.NeuralODEClassifier"),
])
def test_what_user_functions_return_is_checked_before_training(user_folder, dataset, model, error, message):
    folder, module = user_folder
    config = train_config_from_trial(load_space(str(space_file(folder, module, dataset, model))).trials()[0])
    with pytest.raises(error, match=message):
        check_user_study(config)


def test_a_batch_larger_than_a_user_training_set_is_refused_before_training(user_folder):
    folder, module = user_folder
    path = space_file(folder, module)
    path.write_text(path.read_text().replace("batch_size = 50", "batch_size = 500"))
    config = train_config_from_trial(load_space(str(path)).trials()[0])
    with pytest.raises(ValueError, match=r"batch_size 500 is larger than the training set .* \(200 examples\); allowed: 1..200"):
        check_user_study(config)


def test_load_dataset_takes_a_module_function_and_a_bad_model_name_is_refused(user_folder):
    folder, module = user_folder
    data = load_dataset(f"{module}:load", seed=3, code_dir=str(folder))
    assert isinstance(data, Dataset) and data.family is None and data.input_shape == (2,)
    with pytest.raises(ValueError, match=r"model must be None .* or 'module:function'"):
        TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 1), model="build")


def test_check_model_passes_an_ode_and_names_the_solver_that_breaks_a_resnet():
    # dz/dt = -z from x: a field whose flow every solver resolves; the head compares z(T) to 0.
    class Decay(nn.Module):
        def forward(self, t, z):
            return -z

    x = torch.tensor([[1.0], [-1.0], [2.0], [-2.0]])
    y = torch.tensor([1, 0, 1, 0])
    head = lambda z: torch.cat([-z, z], 1)  # noqa: E731
    check = check_model(Decay(), x, y, SolverSetting.fixed("euler", 4), head=head)
    assert check.independent and check.train_accuracy == 1.0 and str(check).startswith("solver-independent")
    assert set(check.table.columns) >= {"test_method", "test_steps", "accuracy", "qualifies", "difference"}

    # Euler with h = 1 on dz/dt = -2 z maps z to -z: the sign flips, every finer solver keeps it.
    class Fast(nn.Module):
        def forward(self, t, z):
            return -2 * z

    check = check_model(Fast(), x, y, SolverSetting.fixed("euler", 1), head=lambda z: torch.cat([z, -z], 1))
    assert not check.independent and check.train_accuracy == 1.0 and check.worst_accuracy == 0.0
    assert check.worst_test is not None and check.accuracy_drop == 1.0
    assert "solver-dependent" in str(check) and check.worst_test.label() in str(check)
    with pytest.raises(ValueError, match="threshold must be in"):
        check_model(Fast(), x, y, SolverSetting.fixed("euler", 1), threshold=0)


def readme_snippet(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, re.S)
    assert match, f"README has no python block after <!-- {marker} -->"
    return match.group(1)


def test_the_readme_checks_a_plain_torchdiffeq_model_and_prints_the_verdict(capsys):
    namespace = {}
    exec(compile(readme_snippet("check-model"), "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    check = namespace["check"]
    assert out.splitlines()[0] == str(check)
    assert re.match(r"solver-(in)?dependent", str(check))


def test_an_adaptation_table_in_the_search_space_gives_the_adapt_cli_its_defaults(tmp_path, capsys):
    from tune_node.adapt import main as adapt_main

    space = ROOT / "examples" / "crescents" / "crescents.toml"
    assert adapt_main(["--space", str(space), "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "adapt_crescents_euler_midpoint" in out and " 25 " in out  # test_solver and k from [adaptation]
    assert adapt_main(["--space", str(space), "--dry-run", "--storage", str(tmp_path), "--test-solver", "rk4", "--k", "10"]) == 0
    out = capsys.readouterr().out
    assert "adapt_crescents_euler_rk4" in out and " 10 " in out  # the command line wins
    bad = tmp_path / "bad.toml"
    bad.write_text(space.read_text().replace("k = 25", "checks = 25"))
    assert adapt_main(["--space", str(bad), "--dry-run", "--storage", str(tmp_path)]) == 2
    assert "unknown key(s) 'checks' in [adaptation]" in capsys.readouterr().err


def group_configs(user_folder, model="build"):
    folder, module = user_folder
    return [train_config_from_trial(t) for t in load_space(str(space_file(folder, module, model=model))).trials()]


def test_a_user_model_s_seeds_stack_through_torch_func_and_equal_separate_runs(user_folder):
    from tune_node.seed_groups import FuncStack, stack_for, train_seed_group

    configs = group_configs(user_folder)
    assert stack_for(configs[0], ()) is FuncStack
    grouped, separate = train_seed_group(configs), [train(c) for c in configs]
    for g, s in zip(grouped, separate):
        assert g.total_nfe_forward == s.total_nfe_forward and g.test_accuracy == s.test_accuracy
        for a, b in zip(g.model.state_dict().values(), s.model.state_dict().values()):
            # Bit-identical on the AMD EPYC machine; on an Intel Xeon the batched kernels round differently.
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_stacked_user_group_resumes_as_if_never_stopped(user_folder):
    from tune_node.seed_groups import train_seed_group

    configs = group_configs(user_folder)
    states = {}
    full = train_seed_group(configs, on_report=lambda i, p, state: states.setdefault((i, p.iteration), state()))
    resumed = train_seed_group(configs, resume_from=[states[(0, 20)], states[(1, 20)]])
    for a, b in zip(full, resumed):
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_a_user_model_with_buffers_trains_one_seed_per_trial(user_folder):
    from tune_node.grid import plan_trials
    from tune_node.seed_groups import FuncStack, stackable

    folder, module = user_folder
    trials = load_space(str(space_file(folder, module, model="buffered"))).trials()
    assert not stackable(train_config_from_trial(trials[0]))
    assert all(len(unit) == 1 for unit in plan_trials(trials))
    assert {len(u) for u in plan_trials(load_space(str(space_file(folder, module))).trials())} == {2}
    configs = [train_config_from_trial(t) for t in trials]
    with pytest.raises(ValueError, match="has buffers .* cannot be stacked"):
        FuncStack(configs, [c.load_data() for c in configs], torch.device("cpu"))


def test_a_user_model_that_vmap_cannot_run_trains_seed_by_seed(user_folder):
    from tune_node.grid import plan_trials
    from tune_node.seed_groups import stack_for, train_seed_group

    configs = group_configs(user_folder, model="dropout")  # vmap refuses dropout's random numbers
    assert stack_for(configs[0], ()) is None
    folder, module = user_folder
    assert all(len(u) == 1 for u in plan_trials(load_space(str(space_file(folder, module, model="dropout"))).trials()))
    assert [r.iterations for r in train_seed_group(configs)] == [30, 30]


def test_a_user_loader_that_raises_stops_the_grid_with_one_error_line(user_folder, capsys):
    from tune_node.grid import main as grid_main

    folder, module = user_folder
    (folder / f"{module}.py").write_text((folder / f"{module}.py").read_text() + """
def broken(seed):
    raise RuntimeError("no such file: crescents.npz")
""")
    sys.modules.pop(module, None)
    path = space_file(folder, module, dataset="broken")
    assert grid_main(["--space", str(path), "--storage", str(folder / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "RuntimeError: no such file: crescents.npz" in err and "Traceback" not in err


def test_chance_is_one_over_classes_for_built_in_data_and_the_majority_share_for_a_user_s():
    from tune_node.datasets import chance_accuracy

    assert chance_accuracy(load_dataset("sphere2")) == 0.5
    y = torch.tensor([0] * 9 + [1])
    imbalanced = Dataset("mine", torch.zeros(10, 2), y, torch.zeros(10, 2), y, 2)
    assert chance_accuracy(imbalanced) == 0.9


def test_run_grid_reads_options_as_the_command_line_does(tmp_path, capsys):
    from tune_node.cli import UsageError
    from tune_node.grid import run_grid

    assert run_grid("tiny", storage=str(tmp_path), dry_run=True, cpus_per_trial="2", seed_groups=False) is None
    assert "6 Ray trials of one seed each; each Ray trial requests 2 CPU" in capsys.readouterr().out
    with pytest.raises(UsageError, match=r"argument --cpus-per-trial: invalid float value: 'x'"):
        run_grid("tiny", storage=str(tmp_path), dry_run=True, cpus_per_trial="x")
