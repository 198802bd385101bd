"""Command-line pieces shared by the tune-node CLIs: argument groups and input checks.

Every check runs before any work starts and names the bad value and what is allowed. This module
imports neither torch nor Ray (the command lines of :mod:`.options` use it before either loads).
"""

from __future__ import annotations

import argparse
import math
import sys

from ..ode.solvers import METHODS, SolverSetting

__all__ = ["add_data_arguments", "add_solver_arguments", "solver_from_args", "check_gpus", "format_table", "UsageError", "fail"]


class UsageError(ValueError):
    """An input error found before any work starts. The CLIs print it as one ``error: ...``
    line on stderr and exit with status 2 (argparse's status for usage errors)."""


def fail(message) -> int:
    """Report an input error the CLI way: one ``error: ...`` line on stderr; returns the exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--dataset``, ``--data-root``, ``--download`` (:func:`tune_node.cli.options.add_data_arguments`)."""
    from .options import add_data_arguments

    add_data_arguments(parser)


def add_solver_arguments(parser: argparse.ArgumentParser, default_method: str = "euler") -> None:
    """``--method``, ``--steps``, ``--tol``, ``--gradient`` (:func:`tune_node.cli.options.add_solver_arguments`)."""
    from .options import add_solver_arguments

    add_solver_arguments(parser, default_method)


def solver_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> SolverSetting:
    """The solver setting the arguments describe; ``parser.error`` (exit 2) when invalid."""
    try:
        spec = METHODS.get(args.method)
        steps, tol = args.steps, args.tol
        if spec is not None and spec.adaptive and tol is None:
            tol = 1e-3
        if spec is not None and not spec.adaptive and steps is None:
            steps = 8
        return SolverSetting(args.method, steps=steps, tol=tol, gradient=args.gradient)
    except ValueError as err:
        parser.error(str(err))


def check_gpus(gpus: float, *, need_cuda: bool = True) -> None:
    """Refuse a bad GPU request, or (``need_cuda``) one on a machine without CUDA, before
    anything starts.

    Raises :class:`UsageError` (exit status 2 in the CLIs) naming the value and what is allowed.
    """
    if not (math.isfinite(gpus) and gpus >= 0):
        raise UsageError(f"--gpus must be a finite number >= 0, got {gpus:g}")
    if not (need_cuda and gpus > 0):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            f"--gpus {gpus:g} requested, but CUDA is not available on this machine "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); run with --gpus 0 to use CPUs"
        )


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """Rows of dicts as an aligned plain-text table."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
