"""``python -m tune_node.results EXPERIMENT_DIR``: (re)write an experiment's results tables."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ..experiments.experiment_folder import GRID_FILE, experiment_kind
from ..experiments.storage import StorageError, is_uri, split_experiment_uri
from . import table as _table
from .table import NotAnExperimentError, write_results

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tune_node.results", description=_table.__doc__.splitlines()[0])
    parser.add_argument("experiment_dir", help="an experiment's directory, <storage>/<name> (grid or adaptation), or its URI "
                                               "(s3://bucket/prefix/name: tables written to its local copy and sent up)")
    args = parser.parse_args(argv)

    storage = name = None
    try:
        if is_uri(args.experiment_dir):  # opened once: it is probed over the network
            storage, name = split_experiment_uri(args.experiment_dir)
            storage.pull(name)
            experiment_dir = storage.local / name
        else:
            experiment_dir = Path(args.experiment_dir)
    except StorageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    status = _write_tables(experiment_dir)
    if storage is not None:
        try:
            storage.push(name)
        except StorageError as err:
            print(f"error: {err}", file=sys.stderr)
            return max(status, 1)
    return status


def _write_tables(experiment_dir: Path) -> int:
    if experiment_dir.is_dir() and experiment_kind(experiment_dir) == "adaptation":
        from .adaptation import HISTORY_CSV, SUMMARY_CSV, write_tables

        summary, history = write_tables(experiment_dir)
        print(f"adaptation experiment: {len(summary)} trials finished -> {experiment_dir / SUMMARY_CSV}, "
              f"{len(history)} checks -> {experiment_dir / HISTORY_CSV}")
        return 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            table, csv = write_results(experiment_dir)
    except (FileNotFoundError, NotAnExperimentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    grid_file = experiment_dir / GRID_FILE  # written by tune_node.grid at the start
    try:
        planned = f" of {len(json.loads(grid_file.read_text())['trials'])}"
    except (OSError, ValueError, KeyError, TypeError):
        planned = ""
    diverged = table.loc[table["status"] == "diverged", "trial_id"].nunique()
    print(f"{table['trial_id'].nunique()}{planned} trials finished"
          + (f" ({diverged} diverged)" if diverged else "") + f", {len(table)} rows -> {csv}")
    if table.attrs.get("unreadable"):
        print(f"{len(table.attrs['unreadable'])} unreadable final.json left out (named above)", file=sys.stderr)
        return 1
    return 0
