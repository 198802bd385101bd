"""Command-line pieces shared by the CLIs: usage errors, checks and tables (:mod:`.common`), the
command lines, built without torch or Ray (:mod:`.options`), the dry run's wall-time estimate
(:mod:`.estimate`), and ``python -m tune_node.train_one`` (:mod:`.train_one`). The names of the
former ``tune_node.cli`` module are importable from here; importing this package loads neither
torch nor Ray."""

from .common import (  # noqa: F401
    UsageError,
    add_data_arguments,
    add_solver_arguments,
    check_gpus,
    fail,
    format_table,
    solver_from_args,
)

__all__ = ["add_data_arguments", "add_solver_arguments", "solver_from_args", "check_gpus", "format_table", "UsageError", "fail"]
