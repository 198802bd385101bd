"""tune-node's adjoint for adaptive solves of the sphere field against torchdiffeq's, side by side.

Run: ``python benchmarks/bench_adjoint.py`` (a minute or two on a 2-core machine; ``--tol``,
``--repeats``, ``--trained RUN_DIR`` for the weights a backprop grid trained, e.g.
``runs/sphere2_adaptive_backprop``, whose solves are far longer than at initialisation). One thread.

One solve of ``[0, 1]`` and its backward pass by the adjoint method, batch 128, float32, the
Sphere2 models of seeds 0..4 on their own training data, the loss ``sum(z(T)^2)``. Cost in
microseconds per evaluation (forward and backward evaluations both counted) per seed:

- ours: :func:`tune_node.integrate.integrate` of the model's field (its default solver:
  :mod:`tune_node.fast.dense_adjoint`), one seed, and :func:`tune_node.integrate.integrate_seeds`
  of 5 stacked seeds (per-seed step control, forward and backward);
- torchdiffeq: the same with ``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq`` (``odeint_adjoint`` on the
  Conv1d field, as before tune-node's adjoint); its "group" is 5 separate solves.

The variants run interleaved, one solve each in turn in a rotating order, and each reports its
median, so a neighbour's load hits all alike. Both make the same forward solve; their backward
solves take the same steps up to rounding (NFE printed: where they differ, an error ratio lay
within rounding of a decision).
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import torch

from tune_node.datasets import load_dataset
from tune_node.dense import StackedSphereClassifier
from tune_node.integrate import integrate, integrate_seeds
from tune_node.models import build_model
from tune_node.ode.integrate import use_adaptive_solver
from tune_node.solvers import SolverSetting

SEEDS = 5
BATCH = 128


def _models(method: str, tol: float, trained: str | None):
    models = [build_model("sphere", (1, 2), seed=s) for s in range(SEEDS)]
    if trained:
        for s, model in enumerate(models):
            pattern = os.path.join(trained, f"{method}_tol{tol:.0e}_seeds*", "checkpoint_*", f"seed{s}", "checkpoint.pt")
            paths = sorted(glob.glob(pattern))
            if not paths:
                raise SystemExit(f"no checkpoint matches {pattern}")
            model.load_state_dict(torch.load(paths[-1], weights_only=False)["model"])
    return models


def _with_solver(name: str, run):
    def wrapped():
        with use_adaptive_solver(name):
            return run()
    return wrapped


def _variants(method: str, tol: float, trained: str | None):
    """name -> run: ``run()`` does the solves and backward passes and returns (forward, backward) NFE summed over seeds."""
    models = _models(method, tol, trained)
    xs = [load_dataset("sphere2", s).x_train[:BATCH] for s in range(SEEDS)]
    stacked = StackedSphereClassifier(models)
    x_stacked = torch.stack(xs)
    setting = SolverSetting.adaptive(method, tol, gradient="adjoint")

    def separate(seeds):
        def run():
            forward = backward = 0
            for model, x in zip(models[:seeds], xs):
                sol = integrate(model.field, x, setting)
                sol.z.square().sum().backward()
                forward, backward = forward + sol.nfe_forward, backward + sol.nfe_backward
            return forward, backward
        return run

    def group():
        sol = integrate_seeds(stacked.field, x_stacked, setting)
        sol.z.square().sum().backward()
        counts = sol.seed_counts(SEEDS)
        return sum(c[0] for c in counts), sum(c[1] for c in counts)

    return {
        "ours, one seed": (1, _with_solver("tune_node", separate(1))),
        f"ours, {SEEDS} seeds grouped": (SEEDS, _with_solver("tune_node", group)),
        "torchdiffeq, one seed": (1, _with_solver("torchdiffeq", separate(1))),
        f"torchdiffeq, {SEEDS} seeds": (SEEDS, _with_solver("torchdiffeq", separate(SEEDS))),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, nargs="+", default=[1e-3, 1e-5])
    parser.add_argument("--methods", nargs="+", default=["fehlberg2", "dopri5"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--trained", default=None, help="a backprop grid's run folder: start from its final weights")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, one thread, batch {BATCH}, float32; weights: {args.trained or 'initial'}; "
          f"median of {args.repeats}; us per evaluation per seed (forward + backward)")
    for method in args.methods:
        for tol in args.tol:
            variants = _variants(method, tol, args.trained)
            names = list(variants)
            times = {n: [] for n in names}
            counts = {}
            for name in names:  # warm-up: builds, first-touch allocations
                counts[name] = variants[name][1]()
            for r in range(args.repeats):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    start = time.perf_counter()
                    variants[name][1]()
                    times[name].append(time.perf_counter() - start)
            reference = {1: "torchdiffeq, one seed", SEEDS: f"torchdiffeq, {SEEDS} seeds"}
            per_nfe = {n: statistics.median(times[n]) / sum(counts[n]) * 1e6 for n in names}
            print(f"\n{method}, tol {tol:g}")
            for name in names:
                seeds = variants[name][0]
                forward, backward = counts[name]
                ratio = per_nfe[name] / per_nfe[reference[seeds]]
                print(f"  {name:28s} {per_nfe[name]:8.1f} us/NFE/seed  NFE per seed fwd {forward / seeds:7.1f} bwd {backward / seeds:8.1f}"
                      f"  {ratio:5.2f}x torchdiffeq's")


if __name__ == "__main__":
    main()
