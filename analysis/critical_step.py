"""The critical step of a grid experiment: ``python -m analysis.critical_step RESULTS_DIR_OR_CSV``.

The rule lives in the library, :mod:`tune_node.results.critical_step` (its docstring
states it; ``--help`` prints it); this module re-exports its names for notebooks and
scripts and adds the command line.
"""

from __future__ import annotations

import argparse
import sys

from tune_node.results import critical_step as _rule
from tune_node.results.critical_step import (  # noqa: F401  (GROUP, SETTING, TEST: the table's key columns)
    CHANCE,
    GROUP,
    SETTING,
    SUMMARY_COLUMNS,
    TEST,
    chance_accuracy,
    critical_steps,
    display_rows,
    qualifying_tests,
    solver_independence,
    trial_table,
)

__all__ = [
    "CHANCE",
    "SUMMARY_COLUMNS",
    "chance_accuracy",
    "trial_table",
    "qualifying_tests",
    "solver_independence",
    "critical_steps",
    "display_rows",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    from tune_node.cli import format_table
    from tune_node.results import read_result_parts

    # The rule's docstring: its title, then (after the paragraph on where to call it) the rule.
    parser = argparse.ArgumentParser(prog="python -m analysis.critical_step", description=_rule.__doc__.split("\n\n")[0],
                                     epilog=_rule.__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+",
                        help="results.csv/.parquet or an experiment directory; several for a study run in parts (their rows together)")
    parser.add_argument("--threshold", type=float, default=0.1,
                        help="largest accuracy difference of a solver-independent setting (default 0.1)")
    parser.add_argument("--margin", type=float, default=0.1, help="a seed trained when train accuracy >= chance + margin (default 0.1)")
    parser.add_argument("--settings", action="store_true", help="also print the per-setting table")
    parser.add_argument("--csv", default=None, help="write the summary to this CSV file")
    args = parser.parse_args(argv)
    try:
        results = read_result_parts(args.results)
        summary = critical_steps(results, args.threshold, args.margin)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.settings:
        print(format_table(solver_independence(results, args.threshold, args.margin).to_dict("records")))
        print()
    print(format_table(display_rows(summary)))
    if args.csv:
        summary.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
