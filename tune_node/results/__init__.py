"""Grid results: the tidy results table (:mod:`.table`) and the critical-step rule on it (:mod:`.critical_step`).

``python -m tune_node.results EXPERIMENT_DIR`` (re)writes an experiment's tables (:func:`main`).
Nothing here imports Ray, so analyses and notebooks can use it on a machine without it.
"""

from .cli import main
from .critical_step import (
    CHANCE,
    SUMMARY_COLUMNS,
    chance_accuracy,
    critical_steps,
    display_rows,
    qualifying_tests,
    solver_independence,
    trial_table,
)
from .table import (
    COLUMNS,
    RESULTS_CSV,
    RESULTS_PARQUET,
    TRAINING_SETTING,
    NotAnExperimentError,
    _final_files,  # noqa: F401  (tune_node.results.adaptation reads the same final.json layout)
    collect,
    combine_parts,
    read_result_parts,
    read_results,
    write_results,
)

__all__ = [
    "COLUMNS", "collect", "write_results", "read_results", "read_result_parts", "combine_parts", "TRAINING_SETTING",
    "RESULTS_CSV", "RESULTS_PARQUET", "NotAnExperimentError",
    "CHANCE", "SUMMARY_COLUMNS", "chance_accuracy", "trial_table", "qualifying_tests", "solver_independence",
    "critical_steps", "display_rows", "main",
]
