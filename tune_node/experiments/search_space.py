"""Experiment definitions: which models a grid experiment trains.

A search space is a TOML file; the ones shipped with tune-node live in the
``search_spaces`` package (``search_spaces/*.toml``) and are found by name
(``--space sphere2_fixed``); any other file is found by path. Format::

    description = "Sphere2, fixed-step solvers (Section 2.4)"
    dataset = "sphere2"             # one of tune_node.datasets.DATASETS, or "module:function"
    model = "crescents:build"       # optional: a builder "module:function" (default: the paper's model)
    seeds = 5                       # a count (0..n-1) or a list of seeds

    [training]                      # optional; missing keys take the paper's values
    iterations = 10000
    lr = 1e-4
    batch_size = 128
    optimizer = "adam"
    report_every = 100              # iterations between reports and checkpoints
    test_every = 1000               # iterations between full test-set evaluations (0: end only)
    amp = true                      # GPU flags, true or false, no-ops on the CPU: cuda_graph, channels_last
                                    # (default true), tf32, amp (default false); see training.gpu_features

    [[solvers]]                     # one table per train method
    method = "euler"
    steps = [1, 2, 4, 8]            # fixed-step methods: numbers of steps
    gradient = "backprop"           # or "adjoint", or a list of both

    [[solvers]]
    method = "dopri5"
    tol = [1e-3, 1e-4]              # adaptive methods: tolerances
    max_steps = 20000               # adaptive methods, optional: step attempts per solve
                                    # (default: solvers.DEFAULT_MAX_ADAPTIVE_STEPS)
    lr = 1e-4                       # a solver table may override training keys

    [[solvers]]                     # a range instead of a list: a continuous parameter, for the
    method = "rk4"                  # Optuna study of python -m tune_node.search (not the grid)
    steps = {min = 1, max = 16}     # whole steps, sampled in log scale; tol = {min = 1e-6, max = 1e-2}

    [adaptation]                    # optional: python -m tune_node.adapt's defaults for this space
    train_solver = "euler"          # also: mode, test_solver, k, threshold, initial_tol, gradient
    test_solver = "rk4"

The trials are every (solver setting, seed) pair. Loading checks everything and
raises :class:`SearchSpaceError` naming the file and the problem; booleans are
never numbers, and an empty list of steps, tolerances or gradients is an error.

A user's dataset or model (``"module:function"``, see :mod:`tune_node.user_code`) is
looked for beside the search-space file first, then on ``PYTHONPATH``: loading checks
that the functions import; :func:`tune_node.user_study.check_user_study` then checks
what they return, before any training. A loader is called as ``load(seed)`` and
returns a :class:`~tune_node.datasets.Dataset`; a builder as ``build(dataset)`` and
returns a :class:`~tune_node.models.NeuralODEClassifier`, whose field may be
autonomous (``forward(z)``) or time-dependent (``forward(t, z)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import tomllib

from ..data.datasets import DATASETS
from ..data.user_code import is_reference, resolve_function
from ..ode.solvers import GRADIENT_MODES, METHODS, SolverSetting
from ..train.training import GPU_FLAGS, OPTIMIZERS, TrainConfig
from .trial import Trial

__all__ = ["SearchSpaceError", "SearchSpace", "ParameterRange", "available_spaces", "load_space", "parse_seeds"]

TOP_KEYS = {"description", "dataset", "model", "seeds", "training", "solvers", "adaptation"}
#: Keys of an ``[adaptation]`` table: the defaults of ``python -m tune_node.adapt``'s options.
ADAPTATION_KEYS = {"mode", "train_solver", "test_solver", "k", "threshold", "initial_tol", "gradient", "check_size", "initial_rtol",
                   "initial_atol"}
#: TrainConfig's GPU flags (booleans; a trial records one only where it is not at its default).
GPU_KEYS = {name for name, _ in GPU_FLAGS}
TRAINING_KEYS = {"iterations", "lr", "batch_size", "optimizer", "report_every", "test_every", "eval_batch_size"} | GPU_KEYS
SOLVER_KEYS = {"method", "steps", "tol", "gradient", "max_steps"} | TRAINING_KEYS


class SearchSpaceError(ValueError):
    """A search space that cannot be found or is malformed; the message says which and why."""


def _builtin_dir():
    return resources.files("search_spaces")


def available_spaces() -> list[str]:
    """Names of the search spaces shipped with tune-node."""
    return sorted(p.name[: -len(".toml")] for p in _builtin_dir().iterdir() if p.name.endswith(".toml"))


def parse_seeds(value) -> list[int]:
    """Seeds from a count (``5`` -> 0..4), a list, or a string ``"5"`` / ``"0,1,2"``.

    Raises ValueError naming the value for anything else: booleans, an empty entry
    in a string list (``"3,"``, ``"1,,2"``), repeated or negative seeds.
    """
    if isinstance(value, str):
        text = value.strip()
        try:
            # Every comma-separated entry must be a number: "3," is a typo, not [3].
            value = [int(s) for s in text.split(",")] if "," in text else int(text)
        except ValueError:
            raise ValueError(f"seeds must be a count like 5 or a list like 0,1,2 (no empty entries); got {text!r}") from None
    if isinstance(value, bool):
        raise ValueError(f"seeds must be a count or a list of integers, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"seed count must be >= 1, got {value}")
        return list(range(value))
    if isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return list(value)
    raise ValueError(f"seeds must be a count >= 1 or a non-empty list of integers >= 0, got {value!r}")


@dataclass(frozen=True)
class ParameterRange:
    """A continuous accuracy parameter of one train method: ``steps`` (whole, log scale) or ``tol``
    (log scale) between ``low`` and ``high``, for the Optuna study of :mod:`tune_node.search`."""

    method: str
    key: str
    low: float
    high: float
    gradient: str = "backprop"
    max_steps: int | None = None
    overrides: dict = field(default_factory=dict)

    def setting(self, value: float) -> SolverSetting:
        value = int(round(value)) if self.key == "steps" else float(value)
        return SolverSetting(self.method, **{self.key: value}, gradient=self.gradient, max_steps=self.max_steps)

    @property
    def label(self) -> str:
        return self.method if self.gradient == "backprop" else f"{self.method}_{self.gradient}"


@dataclass(frozen=True)
class SearchSpace:
    """A validated experiment definition.

    Arguments:
        name: the space's name (file stem).
        path: the file it was read from.
        description: one line for humans.
        dataset: the dataset every trial trains on.
        seeds: the seeds every solver setting is trained with.
        solvers: ``(setting, training overrides)`` pairs, one per train setting.
        training: training keys shared by all trials (missing ones: the paper's).
        model: a user's model builder ``"module:function"``, or None (the paper's model).
        code_dir: the folder of the space's file, where user modules are looked for
            first; None when the space names no user code.
        adaptation: the ``[adaptation]`` table: defaults of the adaptation CLI's options
            (checked when an adaptation starts); empty when absent.
        ranges: the solver tables that give a range (``steps = {min = 1, max = 64}``) instead
            of values: :class:`ParameterRange` each, for an Optuna study; they give no trials.
    """

    name: str
    path: str
    description: str
    dataset: str
    seeds: tuple[int, ...]
    solvers: tuple[tuple[SolverSetting, dict], ...]
    training: dict = field(default_factory=dict)
    model: str | None = None
    code_dir: str | None = None
    adaptation: dict = field(default_factory=dict)
    ranges: tuple[ParameterRange, ...] = ()

    def trials(self, data_root: str = "data", download: bool = False) -> list[dict]:
        """One flat, JSON-friendly config per (solver setting, seed), every value resolved:
        :meth:`~tune_node.trial.Trial.to_dict` of each trial. Ranges give none.

        Guarantees: each config builds a valid :class:`~tune_node.training.TrainConfig`
        via :func:`train_config_from_trial`.
        """
        return [t for setting, overrides in self.solvers
                for t in self.setting_trials(setting, overrides, data_root=data_root, download=download)]

    def setting_trials(self, setting: SolverSetting, overrides: dict | None = None, *, data_root: str = "data",
                       download: bool = False) -> list[dict]:
        """The per-seed trial configs of one solver setting (with a solver table's training ``overrides``)."""
        training = {**self.training, **(overrides or {})}
        return [Trial.of(self.name, TrainConfig(dataset=self.dataset, solver=setting, seed=seed, data_root=data_root,
                                                download=download, model=self.model, code_dir=self.code_dir, **training)).to_dict()
                for seed in self.seeds]

    def with_overrides(self, seeds=None, iterations=None, lr=None, report_every=None, **training) -> "SearchSpace":
        """This space with command-line overrides applied (``None``: keep), re-validated; ``training``:
        any other of :data:`TRAINING_KEYS` (``batch_size=64``; ``--set`` of the CLIs)."""
        _check_keys(training, TRAINING_KEYS, "the training overrides")
        _check_flags(training, "the training overrides")
        given = {"iterations": iterations, "lr": lr, "report_every": report_every, **training}
        given = {k: v for k, v in given.items() if v is not None}
        # A command-line override beats per-solver values (and a range's) too.
        solvers = tuple((s, {k: v for k, v in o.items() if k not in given}) for s, o in self.solvers)
        ranges = tuple(replace(r, overrides={k: v for k, v in r.overrides.items() if k not in given}) for r in self.ranges)
        space = replace(self, training={**self.training, **given}, solvers=solvers, ranges=ranges,
                        seeds=tuple(parse_seeds(seeds)) if seeds is not None else self.seeds)
        try:
            space.trials()
            for r in space.ranges:  # a range gives no trials: its lower end stands for it
                space.setting_trials(r.setting(r.low), r.overrides)
        except ValueError as err:
            raise SearchSpaceError(f"search space {self.name!r} with overrides: {err}") from None
        return space


def train_config_from_trial(trial: dict, device: str = "cpu") -> TrainConfig:
    """The :class:`TrainConfig` of one trial config from :meth:`SearchSpace.trials`
    (:meth:`~tune_node.trial.Trial.train_config` of its :class:`~tune_node.trial.Trial`)."""
    return Trial.from_dict(trial).train_config(device)


def _resolve(space: str) -> Path:
    path = Path(space)
    if path.suffix == ".toml" or path.is_file() or "/" in space:
        if not path.is_file():
            raise SearchSpaceError(f"search space file {space!r} does not exist")
        return path
    names = available_spaces()
    if space not in names:
        raise SearchSpaceError(f"unknown search space {space!r}; available: {', '.join(names)} (or give a path to a .toml file)")
    return Path(str(_builtin_dir() / f"{space}.toml"))


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def load_space(space) -> SearchSpace:
    """Read and validate a search space given by name or by path (a :class:`SearchSpace`
    is returned as it is).

    Raises:
        SearchSpaceError: unknown name (listing the available ones), missing file, bad TOML,
            unknown keys or invalid values; the message names the file.
    """
    if isinstance(space, SearchSpace):
        return space
    path = _resolve(space)
    where = f"search space {str(path)!r}"
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise SearchSpaceError(f"{where} is not valid TOML: {err}") from None
    try:
        return _validate(path, doc)
    except (ValueError, TypeError) as err:
        raise SearchSpaceError(f"{where}: {err}") from None


def _check_keys(table: dict, allowed: set, what: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in {what}; allowed: {', '.join(sorted(allowed))}")


def _check_flags(table: dict, what: str) -> None:
    """The GPU flags in ``table`` are booleans (TOML's ``true``/``false``; a string or a number is no flag)."""
    for name in sorted(GPU_KEYS & set(table)):
        if not isinstance(table[name], bool):
            raise ValueError(f"{what}: {name} = {table[name]!r} is not a boolean; allowed: true or false")


def _validate(path: Path, doc: dict) -> SearchSpace:
    _check_keys(doc, TOP_KEYS, "the top level")
    for key in ("dataset", "seeds", "solvers"):
        if key not in doc:
            raise ValueError(f"missing required key {key!r}")
    dataset, model = doc["dataset"], doc.get("model")
    if not is_reference(dataset) and dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {', '.join(DATASETS)}, or 'module:function' naming "
                         f"your loader (a function load(seed) -> tune_node.datasets.Dataset)")
    if model is not None and not is_reference(model):
        raise ValueError(f"model must be 'module:function' naming your builder (a function build(dataset) -> "
                         f"tune_node.models.NeuralODEClassifier), got {model!r}")
    if is_reference(dataset) and model is None:
        raise ValueError(f"dataset {dataset!r} is your own, so it has no default model: add model = 'module:function' "
                         f"naming a builder build(dataset) -> tune_node.models.NeuralODEClassifier")
    code_dir = str(path.parent.resolve()) if is_reference(dataset) or model is not None else None
    for reference, what in ((dataset, "dataset loader"), (model, "model builder")):
        if is_reference(reference):
            resolve_function(reference, code_dir=code_dir, what=what)
    seeds = tuple(parse_seeds(doc["seeds"]))
    training = doc.get("training", {})
    if not isinstance(training, dict):
        raise ValueError("[training] must be a table")
    _check_keys(training, TRAINING_KEYS, "[training]")
    _check_flags(training, "[training]")
    if "optimizer" in training and training["optimizer"] not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {training['optimizer']!r}; allowed: {', '.join(OPTIMIZERS)}")
    adaptation = doc.get("adaptation", {})
    if not isinstance(adaptation, dict):
        raise ValueError("[adaptation] must be a table")
    _check_keys(adaptation, ADAPTATION_KEYS, "[adaptation]")
    tables = doc["solvers"]
    if not isinstance(tables, list) or not tables or not all(isinstance(t, dict) for t in tables):
        raise ValueError("solvers must be a non-empty array of tables ([[solvers]])")
    solvers, ranges = [], []
    for i, table in enumerate(tables, 1):
        what = f"solver table {i}"
        _check_keys(table, SOLVER_KEYS, what)
        _check_flags(table, what)
        method = table.get("method")
        if method not in METHODS:
            raise ValueError(f"{what}: unknown method {method!r}; allowed: {', '.join(METHODS)}")
        adaptive = METHODS[method].adaptive
        key, other = ("tol", "steps") if adaptive else ("steps", "tol")
        if other in table:
            raise ValueError(f"{what}: {method} is {'adaptive' if adaptive else 'fixed-step'}: give {key!r}, not {other!r}")
        if key not in table:
            raise ValueError(f"{what}: {method} needs {key!r}")
        if "max_steps" in table and not adaptive:
            raise ValueError(f"{what}: {method} is fixed-step: 'max_steps' is for adaptive methods only "
                             f"({', '.join(m for m in METHODS if METHODS[m].adaptive)}), got max_steps={table['max_steps']!r}")
        gradients = _as_list(table.get("gradient", "backprop"))
        if not gradients:
            raise ValueError(f"{what}: gradient = [] gives no setting; allowed: {', '.join(GRADIENT_MODES)} or a non-empty list of them")
        for g in gradients:
            if g not in GRADIENT_MODES:
                raise ValueError(f"{what}: unknown gradient {g!r}; allowed: {', '.join(GRADIENT_MODES)}")
        if isinstance(table[key], dict):
            ranges.extend(_range(what, method, key, table, gradients))
            continue
        values = _as_list(table[key])
        if not values:
            raise ValueError(f"{what}: {key} = [] gives no {method} setting; allowed: one value or a non-empty list")
        overrides = {k: v for k, v in table.items() if k in TRAINING_KEYS}
        for gradient in gradients:
            for value in values:
                try:
                    setting = SolverSetting(method, **{key: value}, gradient=gradient, max_steps=table.get("max_steps"))
                except ValueError as err:
                    raise ValueError(f"{what}: {err}") from None
                solvers.append((setting, overrides))
    # max_steps is left out of the comparison: two trials differing only in their cap
    # would share one name and one row key in the results.
    if len({(s.method, s.steps, s.tol, s.gradient) for s, _ in solvers}) != len(solvers):
        raise ValueError("a solver setting appears twice")
    space = SearchSpace(
        name=path.stem,
        path=str(path),
        description=str(doc.get("description", "")),
        dataset=dataset,
        seeds=seeds,
        solvers=tuple(solvers),
        training=dict(training),
        model=model,
        code_dir=code_dir,
        adaptation=adaptation,
        ranges=tuple(ranges),
    )
    if ranges and solvers:
        raise ValueError("a space gives either ranges (steps = {min = ..., max = ...}: an Optuna study) or values "
                         "(a grid, a search ladder), not both")
    space.trials()  # builds every TrainConfig: bad training values fail here, before any work
    return space


def _range(what: str, method: str, key: str, table: dict, gradients: list) -> list[ParameterRange]:
    bounds = table[key]
    _check_keys(bounds, {"min", "max"}, f"{what}'s {key} range")
    low, high = bounds.get("min"), bounds.get("max")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    if not numbers or not 0 < low < high or (key == "steps" and not (float(low).is_integer() and float(high).is_integer())):
        kind = "whole numbers 1 <= min < max" if key == "steps" else "numbers 0 < min < max"
        raise ValueError(f"{what}: {key} = {bounds!r} is no range; allowed: {{min = ..., max = ...}} with {kind}")
    out = []
    for gradient in gradients:
        r = ParameterRange(method, key, float(low), float(high), gradient, table.get("max_steps"),
                           {k: v for k, v in table.items() if k in TRAINING_KEYS})
        r.setting(low), r.setting(high)  # both ends must be valid settings
        out.append(r)
    return out
