"""The package's layout: subpackages as the README's table lists them, the names of earlier
versions still importable (the same modules), and the fast path plugged in from outside models."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tune_node"

# name a user imports today -> where it lives now
MOVED = {
    "solvers": "ode.solvers", "integrate": "ode.integrate", "dense": "fast.dense", "dense_solve": "fast.dense_solve",
    "native": "fast.native", "datasets": "data.datasets", "user_code": "data.user_code", "models": "train.models",
    "training": "train.training", "seed_groups": "train.seed_groups", "evaluation": "train.evaluation",
    "adaptation": "train.adaptation", "user_study": "train.user_study", "check": "train.check",
    "search_space": "experiments.search_space", "trial": "experiments.trial", "trainable": "experiments.trainable",
    "adapt_trainable": "experiments.adapt_trainable", "experiment": "experiments.experiment",
    "experiment_folder": "experiments.experiment_folder", "tune_callbacks": "experiments.tune_callbacks",
    "grid": "experiments.grid", "adapt": "experiments.adapt", "adaptation_results": "results.adaptation",
    "train_one": "cli.train_one",
}


def subpackages() -> set[str]:
    return {p.parent.name for p in PACKAGE.glob("*/__init__.py")}


def test_the_readme_table_has_one_line_per_subpackage():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| package | what it is |"):].split("\n\n")[0]
    listed = re.findall(r"^\| `tune_node\.(\w+)` \|", table, re.M)
    assert sorted(listed) == sorted(subpackages())


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_an_old_module_name_is_the_moved_module(old, new):
    assert importlib.import_module(f"tune_node.{old}") is importlib.import_module(f"tune_node.{new}")


def test_what_the_readme_of_earlier_versions_imported_keeps_its_signature():
    from tune_node.datasets import Dataset, load_dataset
    from tune_node.models import NeuralODEClassifier, build_model
    from tune_node.seed_groups import train_seed_group
    from tune_node.training import TrainConfig, train

    assert list(inspect.signature(train).parameters) == ["config", "on_report", "controller", "resume_from", "data"]
    assert list(inspect.signature(build_model).parameters) == ["family", "input_shape", "seed"]
    assert list(inspect.signature(load_dataset).parameters)[:4] == ["name", "seed", "data_root", "download"]
    assert list(inspect.signature(train_seed_group).parameters) == ["configs", "on_report", "resume_from", "data"]
    assert list(inspect.signature(NeuralODEClassifier).parameters) == ["field", "features", "classes"]
    assert {"name", "x_train", "y_train", "x_test", "y_test", "classes"} <= set(Dataset.__dataclass_fields__)
    assert "solver" in TrainConfig.__dataclass_fields__


def imported_modules(path: Path) -> set[str]:
    """Absolute names of what a library file imports (relative imports resolved)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


def test_models_do_not_import_the_fast_path_which_plugs_itself_in():
    assert not any(n.startswith("tune_node.fast") for n in imported_modules(PACKAGE / "train" / "models.py"))
    from tune_node.models import build_model
    from tune_node.ode.integrate import fast_form

    assert fast_form(type(build_model("sphere", (1, 2)).field)) is not None


def test_the_core_knows_nothing_of_ray():
    core = [p for sub in ("ode", "fast", "data", "train", "results") for p in (PACKAGE / sub).glob("*.py")]
    for path in core:
        assert not any(n == "ray" or n.startswith("ray.") for n in imported_modules(path)), path
