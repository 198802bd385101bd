"""The tidy results table of a grid experiment: ``python -m tune_node.results EXPERIMENT_DIR``.

One row per (trial, test setting), read from the ``final.json`` that every
finished trial leaves beside its final ``checkpoint.pt`` (see
:mod:`tune_node.trainable`). A seed-group trial leaves one per seed, so the table
is per seed either way: ``trial_id`` is then the Ray trial's id plus ``_seed<N>``,
and ``wall_time`` the group's (its seeds trained together). Unfinished trials have
no rows, so the table can be (re)built at any time, also from an interrupted
experiment. Columns are :data:`COLUMNS`, in that order.

A trial whose loss stopped being finite has ``status`` ``"diverged"``, the iteration
and the reason in ``diverged_iteration`` and ``diverged_reason``, NaN accuracies and
no checkpoint (``status`` is ``"trained"`` otherwise). A ``final.json`` that cannot be
read (truncated, corrupt) costs only its own trial's rows: the table holds every
readable trial and names the others (a warning each, and ``table.attrs["unreadable"]``).
``chance_accuracy`` is the trial's chance level as its ``final.json`` records it
(:func:`tune_node.datasets.chance_accuracy`); trials from before it was
recorded get :data:`~tune_node.results.critical_step.CHANCE` by dataset name (NaN for
a name not there).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..experiments.experiment_folder import CHECKPOINT_FILE, FINAL_FILE, GRID_FILE, describe_contents, experiment_kind
from ..experiments.storage import is_uri, local_experiment
from .critical_step import CHANCE

__all__ = ["COLUMNS", "collect", "write_results", "read_results", "read_result_parts", "combine_parts", "TRAINING_SETTING",
           "RESULTS_CSV", "RESULTS_PARQUET", "NotAnExperimentError"]

# New columns go at the end: tables read by position keep their meaning.
COLUMNS = [
    "experiment", "trial_id", "dataset", "train_method", "train_steps", "train_tol", "gradient", "seed",
    "iterations", "lr", "train_accuracy", "test_accuracy", "nfe_per_iteration", "nfe_forward_per_iteration",
    "total_nfe_forward", "total_nfe_backward", "wall_time", "checkpoint",
    "test_method", "test_steps", "test_tol", "factor", "accuracy", "nfe", "is_train_solver",
    "status", "diverged_iteration", "diverged_reason", "chance_accuracy",
]
RESULTS_CSV = "results.csv"
# The columns that name one training (a seed at a training setting); combine_parts keeps each in one part.
TRAINING_SETTING = ["dataset", "train_method", "train_steps", "train_tol", "gradient", "seed"]
RESULTS_PARQUET = "results.parquet"


def _final_files(experiment_dir: Path) -> list[Path]:
    # Several checkpoints of one trial may hold a final.json (a restored trial reports
    # its end again); the newest checkpoint of each trial directory wins, per seed for a
    # seed-group trial (whose checkpoints hold one seed<N>/ subdirectory per seed).
    newest: dict[tuple[Path, str], Path] = {}
    for path in sorted(experiment_dir.glob(f"*/checkpoint_*/{FINAL_FILE}")):
        newest[(path.parent.parent, "")] = path
    for path in sorted(experiment_dir.glob(f"*/checkpoint_*/seed*/{FINAL_FILE}")):
        newest[(path.parent.parent.parent, path.parent.name)] = path
    return [newest[k] for k in sorted(newest)]


def _trial_dir_name(final_file: Path) -> str:
    """Fallback trial id: the trial directory's name (``..._seed<N>`` for a group's seed)."""
    parent = final_file.parent
    if parent.name.startswith("checkpoint_"):
        return parent.parent.name
    return f"{parent.parent.parent.name}_{parent.name}"


def collect(experiment_dir: str | Path) -> pd.DataFrame:
    """The results table of every finished trial under ``experiment_dir``.

    Guarantees: columns exactly :data:`COLUMNS`; rows sorted by trial settings, seed
    and test setting; ``checkpoint`` is the absolute path of the trial's final
    ``checkpoint.pt`` (empty for a diverged trial, which keeps none). An experiment
    without finished trials gives an empty table. Unreadable ``final.json`` files are
    skipped with a warning naming each; ``table.attrs["unreadable"]`` lists them.
    """
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise FileNotFoundError(f"experiment directory {str(experiment_dir)!r} does not exist")
    rows, unreadable = [], []
    for path in _final_files(experiment_dir):
        try:
            rows += _trial_rows(path)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            unreadable.append(str(path))
            warnings.warn(f"skipped the unreadable {path} ({type(err).__name__}: {err}); that trial has no rows",
                          RuntimeWarning, stacklevel=2)
    table = pd.DataFrame(rows, columns=COLUMNS)
    for column in ("train_steps", "test_steps", "diverged_iteration"):
        table[column] = table[column].astype("Int64")
    for column in ("train_tol", "test_tol", "chance_accuracy"):
        table[column] = table[column].astype("float64")
    table["is_train_solver"] = table["is_train_solver"].astype(bool)
    keys = ["dataset", "train_method", "gradient", "train_steps", "train_tol", "seed", "test_method", "test_steps", "test_tol", "factor"]
    table = table.sort_values(keys, kind="stable", na_position="first").reset_index(drop=True)
    table.attrs["unreadable"] = unreadable
    return table


def _chance(final: dict, dataset: str) -> float:
    recorded = final.get("chance_accuracy")  # absent in trials from before it was recorded
    if recorded is None:
        return CHANCE.get(dataset, math.nan)
    # A value that is no share of the labels makes the file unreadable, like any other bad field.
    value = float(recorded)
    if not (math.isnan(value) or 0 < value <= 1):
        raise ValueError(f"chance_accuracy {recorded!r} is not in (0, 1]")
    return value


def _trial_rows(path: Path) -> list[dict]:
    """The rows of one trial's ``final.json`` (raises on a file that is not one)."""
    final = json.loads(path.read_text())
    c = final["config"]
    iterations = max(1, final["iterations"])
    diverged = final.get("diverged")  # absent in trials from before divergence was recorded
    checkpoint = path.parent / CHECKPOINT_FILE
    trial = {
        "experiment": c["experiment"],
        "trial_id": final["trial_id"] or _trial_dir_name(path),
        "dataset": c["dataset"],
        "train_method": c["method"],
        "train_steps": c["steps"],
        "train_tol": c["tol"],
        "gradient": c["gradient"],
        "seed": c["seed"],
        "iterations": final["iterations"],
        "lr": c["lr"],
        "train_accuracy": final["train_accuracy"],
        "test_accuracy": final["test_accuracy"],
        "nfe_per_iteration": (final["total_nfe_forward"] + final["total_nfe_backward"]) / iterations,
        "nfe_forward_per_iteration": final["total_nfe_forward"] / iterations,
        "total_nfe_forward": final["total_nfe_forward"],
        "total_nfe_backward": final["total_nfe_backward"],
        "wall_time": final["wall_time"],
        "checkpoint": str(checkpoint.resolve()) if diverged is None else None,
        "status": final.get("status", "trained"),
        "diverged_iteration": None if diverged is None else diverged["iteration"],
        "diverged_reason": None if diverged is None else diverged["reason"],
        "chance_accuracy": _chance(final, c["dataset"]),
    }
    return [{**trial, **{k: test[k] for k in ("test_method", "test_steps", "test_tol", "factor", "accuracy", "nfe", "is_train_solver")}}
            for test in final["cross_solver"]]


class NotAnExperimentError(ValueError):
    """A folder that holds no grid experiment, where a results table was to be written."""


def write_results(experiment_dir: str | Path) -> tuple[pd.DataFrame, Path]:
    """Rebuild ``results.csv`` (and ``results.parquet``) in ``experiment_dir``; returns the table and the CSV path.

    Raises :class:`NotAnExperimentError`, writing nothing, when the folder is neither a grid
    experiment's nor a critical-step search's (:mod:`tune_node.search`): an adaptation
    experiment, or any other folder.
    """
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise FileNotFoundError(f"experiment directory {str(experiment_dir)!r} does not exist")
    if experiment_kind(experiment_dir) not in ("grid", "search"):
        raise NotAnExperimentError(f"{experiment_dir} holds {describe_contents(experiment_dir)}, not a grid experiment "
                                   f"(no {GRID_FILE}) or a critical-step search: no results table written there")
    table = collect(experiment_dir)
    csv = experiment_dir / RESULTS_CSV
    table.to_csv(csv, index=False)
    try:
        table.to_parquet(experiment_dir / RESULTS_PARQUET, index=False)
    except ImportError:  # pyarrow missing: the CSV is the table of record
        pass
    return table, csv


def read_results(path: str | Path) -> pd.DataFrame:
    """A results table from a CSV/Parquet file or an experiment directory (rebuilt when it has no table yet),
    also an experiment's URI (``s3://bucket/prefix/name``: read from its local copy, brought up to date first)."""
    if is_uri(path):
        # Its results.csv names checkpoints in the local copy of the machine that wrote it: rebuilt here.
        return collect(local_experiment(path))
    path = Path(path)
    if path.is_dir():
        csv = path / RESULTS_CSV
        return pd.read_csv(csv) if csv.is_file() else collect(path)
    if not path.is_file():
        raise FileNotFoundError(f"no results table or experiment directory at {str(path)!r}")
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)


def combine_parts(parts: Sequence[tuple[str, pd.DataFrame]]) -> pd.DataFrame:
    """The results tables of a study run in parts (e.g. one experiment per tolerance range) as one table.

    Arguments:
        parts: ``(name, table)`` pairs; the names only label errors.

    Raises ValueError where there is no part, or where one training (:data:`TRAINING_SETTING`: a
    seed at a training setting) has rows in two parts, since the critical-step rule would then
    count it twice.
    """
    if not parts:
        raise ValueError("no results given: name at least one results table or experiment directory")
    if len(parts) == 1:
        return parts[0][1]
    key = [c for c in TRAINING_SETTING if all(c in table.columns for _, table in parts)]
    first_part: dict[tuple, str] = {}
    for name, table in parts:
        # Numbers as floats before they become text: a part with only fixed-step trials reads
        # train_steps as integers (8), one that also has adaptive trials as floats (8.0).
        settings = table[key].apply(lambda column: column.astype(float) if pd.api.types.is_numeric_dtype(column) else column)
        for setting in settings.astype(str).drop_duplicates().itertuples(index=False, name=None):
            if setting in first_part:
                described = ", ".join(f"{c}={v}" for c, v in zip(key, setting) if v != "nan")
                raise ValueError(f"the results overlap: the training {described} has rows in both {first_part[setting]!r} and "
                                 f"{name!r}; give each training setting in one part only")
            first_part[setting] = name
    return pd.concat([table for _, table in parts], ignore_index=True)


def read_result_parts(paths: Sequence[str | Path]) -> pd.DataFrame:
    """:func:`read_results` of each path, as one table (:func:`combine_parts`)."""
    return combine_parts([(str(path), read_results(path)) for path in paths])
