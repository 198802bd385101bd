"""Command-line pieces shared by the tune-node CLIs: argument groups and input checks.

Every check runs before any work starts and names the bad value and what is allowed. This module
imports neither torch nor Ray (the command lines of :mod:`.options` use it before either loads).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..ode.solvers import METHODS, SolverSetting

__all__ = ["add_data_arguments", "add_solver_arguments", "solver_from_args", "check_gpus", "check_cluster_resources",
           "gpu_trials_at_once", "logical_gpus", "LOGICAL_GPUS_ENV", "format_table", "UsageError", "fail"]


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


#: Set to 1: Ray's GPUs are logical only, to rehearse a GPU run's scheduling where no CUDA is: ``--gpus`` is not
#: refused for a missing CUDA, and a trial given a GPU whose process sees no CUDA trains on CPU instead of failing.
LOGICAL_GPUS_ENV = "TUNE_NODE_LOGICAL_GPUS"


def logical_gpus() -> bool:
    """Whether ``TUNE_NODE_LOGICAL_GPUS=1`` (:data:`LOGICAL_GPUS_ENV`) is set here."""
    return os.environ.get(LOGICAL_GPUS_ENV, "").strip() == "1"


def check_gpus(gpus: float, *, need_cuda: bool = True) -> None:
    """Refuse a bad GPU request, or (``need_cuda``: a local Ray) one this machine's CUDA cannot
    meet, before anything starts. ``TUNE_NODE_LOGICAL_GPUS=1`` lifts the CUDA part.

    Raises :class:`UsageError` (exit status 2 in the CLIs) naming the value and what is allowed.
    """
    if not (math.isfinite(gpus) and gpus >= 0):
        raise UsageError(f"--gpus must be a finite number >= 0, got {gpus:g}")
    if not (need_cuda and gpus > 0) or logical_gpus():
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(
            f"--gpus {gpus:g} requested, but CUDA is not available on this machine "
            f"(torch {torch.__version__}, torch.cuda.is_available() is False); run with --gpus 0 to use CPUs, "
            f"or --address to join a Ray cluster with GPU nodes"
        )
    count = torch.cuda.device_count()
    if math.ceil(gpus) > count:
        # A local Ray would hand out GPU ids this machine lacks: those trials would see no CUDA device.
        raise UsageError(f"--gpus {gpus:g} exceeds the {count} CUDA GPU(s) of this machine; use --gpus {count} or less, "
                         f"or --address to join a Ray cluster with more")


def gpu_trials_at_once(gpus: float, per_trial: float) -> int:
    """How many trials of ``per_trial`` GPU run at once on ``gpus`` GPUs in all (``--gpus``), placed
    as Ray places them: a fraction on one GPU (``floor(1 / per_trial)`` trials per GPU), a whole
    number on that many GPUs of one node (assumed here to hold them all); 0 without GPUs."""
    if gpus <= 0 or per_trial <= 0:
        return 0
    budget = math.floor(gpus / per_trial + 1e-9)
    if per_trial >= 1:
        return budget
    return min(budget, math.floor(1 / per_trial + 1e-9) * math.ceil(gpus - 1e-9))


def _resource(node: dict, key: str) -> float:
    return float((node.get("Resources") or {}).get(key, 0.0))


def _node_name(node: dict, nodes: list[dict]) -> str:
    ip = node.get("NodeManagerAddress") or "?"
    if sum(n.get("NodeManagerAddress") == ip for n in nodes) > 1:  # nodes on one host (a local test cluster)
        return f"node {ip} ({str(node.get('NodeID', '?'))[:8]})"
    return f"node {ip}"


def check_cluster_resources(nodes: list[dict], *, gpus: float, gpus_per_trial: float, cpus_per_trial: float,
                            where: str) -> None:
    """Refuse a trial request that no live node of a Ray cluster can ever meet, once Ray runs and
    before any trial: ``nodes`` as ``ray.nodes()`` gives them, ``where`` names the cluster in the message.

    With ``gpus`` > 0: the cluster has GPUs, some node holds ``gpus_per_trial`` of them, and ``gpus``
    is at most the cluster's total; always: some node (with that GPU share) holds ``cpus_per_trial``
    CPUs. Ray would otherwise keep such trials pending forever. Raises :class:`UsageError`.
    """
    alive = [n for n in nodes if n.get("Alive", True)]
    if not alive:
        raise UsageError(f"{where} has no live nodes")
    shares = f"--gpus-per-trial {gpus_per_trial:g}"
    if gpus > 0:
        total = sum(_resource(n, "GPU") for n in alive)
        if total <= 0:
            listing = ", ".join(f"{_node_name(n, alive)}: {_resource(n, 'CPU'):g} CPU" for n in alive)
            raise UsageError(f"--gpus {gpus:g} requested, but {where} has no GPUs ({listing}); run with --gpus 0 to use "
                             f"CPUs, or add GPU nodes to the cluster")
        most = max(alive, key=lambda n: _resource(n, "GPU"))
        if gpus_per_trial > _resource(most, "GPU") + 1e-9:
            raise UsageError(f"{shares} exceeds the most GPUs on any node ({_resource(most, 'GPU'):g}: "
                             f"{_node_name(most, alive)}) of {where}: no trial could start")
        if gpus > total + 1e-9:
            listing = ", ".join(f"{_node_name(n, alive)}: {_resource(n, 'GPU'):g}" for n in alive if _resource(n, "GPU") > 0)
            raise UsageError(f"--gpus {gpus:g} exceeds the {total:g} GPU{'' if total == 1 else 's'} of {where} ({listing}); "
                             f"use --gpus {total:g} or less")
        hosts = [n for n in alive if _resource(n, "GPU") >= gpus_per_trial - 1e-9]
    else:
        hosts = alive
    most = max(hosts, key=lambda n: _resource(n, "CPU"))
    if cpus_per_trial > _resource(most, "CPU") + 1e-9:
        which = f"any node with {gpus_per_trial:g} GPU" if gpus > 0 else "any node"
        raise UsageError(f"--cpus-per-trial {cpus_per_trial:g} exceeds the most CPUs on {which} ({_resource(most, 'CPU'):g}: "
                         f"{_node_name(most, alive)}) of {where}: no trial could start")


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
