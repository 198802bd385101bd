"""The project's adaptive solve against torchdiffeq's on the dense Sphere2 field, side by side.

Run: ``python benchmarks/bench_adaptive.py`` (about a minute on a 2-core machine, much
of it start-up; ``--quick``: 5 repeats; ``--tol``: the tolerance; ``--methods``: fehlberg2,
dopri5 or both). One thread throughout.

One solve of ``[0, 1]`` plus its backward pass (backprop), batch 128, float32, the
Sphere2 models of seeds 0..4 on their own training data, the dense matrices rebuilt per
solve as training does. Costs are microseconds per function evaluation (forward and
backward evaluations both counted) per seed, for:

- ours fused: :func:`tune_node.ode.adaptive.integrate_adaptive` (its default,
  :func:`tune_node.fast.adaptive_solve.dense_adaptive_solve`: one autograd node, hand-written
  backward), one seed and a 5-seed group (stacked, per-seed step control);
- ours fused, stepped from Python: the same fused solve with the step control in Python between
  the C++ per-attempt loops and a group's finished seeds computed (masked) until its last ends:
  the fused solve before its whole stepping moved into C++ (same steps, NFE and bits; it shares
  the per-attempt loops, so their own speed-ups, but builds the dense matrices with autograd);
- ours eager: the same with ``fused=False`` (eager autograd, the reference);
- torchdiffeq: :func:`tune_node.integrate.integrate` with ``TUNE_NODE_ADAPTIVE_SOLVER=torchdiffeq``
  (torchdiffeq's stepping on the same dense field); a "group" is 5 separate solves, as
  torchdiffeq has no per-seed step control;
- fixed: the fused fixed-step RK4 solve (``--fixed-steps`` steps), one seed and
  5 stacked, the reference cost per NFE.

Each variant is timed in two orders, both printed (``--order`` picks one):

- interleaved: one solve of each variant in turn, in a rotating order, so a neighbour's load
  hits all alike; every solve starts with caches another variant has just used, a cost that
  weighs most on solves with few evaluations (Fehlberg21 one seed at tol 1e-3: 16 NFE);
- in blocks: ``--block`` solves of one variant back to back, the variants' blocks in a rotating
  order, as a training loop runs its solves (the cost per NFE a trial pays).

Each reports the median over its solves. Both adaptive solves take the same steps (tested in
``tests/test_adaptive_solver.py`` and ``tests/test_adaptive_fused.py``; NFE checked here too).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tune_node.datasets import load_dataset
from tune_node.dense import StackedSphereClassifier
from tune_node.fast.adaptive_native import adaptive_loops
from tune_node.fast.adaptive_solve import attempt_loops, dense_adaptive_solve
from tune_node.fast.dense import dense_conv_weights
from tune_node.integrate import integrate
from tune_node.models import build_model
from tune_node.ode.adaptive import IController, integrate_adaptive
from tune_node.ode.integrate import use_adaptive_solver
from tune_node.solvers import METHODS, SolverSetting

SEEDS = 5
BATCH = 128


def _loss(z: torch.Tensor) -> torch.Tensor:
    return z.square().sum()


def _variants(method: str, tol: float, fixed_steps: int):
    """name -> (seeds, run): ``run()`` does one solve and its backward pass and returns
    the forward NFE summed over seeds."""
    models = [build_model("sphere", (1, 2), seed=s) for s in range(SEEDS)]
    xs = [load_dataset("sphere2", s).x_train[:BATCH] for s in range(SEEDS)]
    stacked = StackedSphereClassifier(models)
    x_stacked = torch.stack(xs)
    adaptive, fixed = SolverSetting.adaptive(method, tol), SolverSetting.fixed("rk4", fixed_steps)

    def ours_one(fused):
        def run():
            sol = integrate_adaptive(models[0].field, xs[0], adaptive, fused=fused)
            _loss(sol.z).backward()
            return sum(sol.nfe)
        return run

    def ours_group(fused):
        def run():
            sol = integrate_adaptive(stacked.field, x_stacked, adaptive, seeded=True, fused=fused)
            _loss(sol.z).backward()
            return sum(sol.nfe)
        return run

    native = attempt_loops()
    # The C++ per-attempt loops without their whole solve: dense_adaptive_solve steps from Python.
    per_attempt = type("PerAttemptLoops", (), {name: staticmethod(getattr(native, name)) for name in
                                               ("attempt_forward", "attempt_backward", "first_step_forward", "first_step_backward",
                                                "interpolate_at", "interpolant_backward", "eval_backward")})
    spec = METHODS[method]
    controller = IController(rtol=tol, atol=tol, order=spec.order)

    def stepped_from_python(field, x, seeded):
        def run():
            # fused_adaptive_solve's call, with the per-attempt loops.
            conv = field.weights if seeded else [getattr(getattr(field, f"conv{i}"), p) for i in (1, 2, 3) for p in ("weight", "bias")]
            weights = dense_conv_weights(*conv, x.shape[-1])
            sol = dense_adaptive_solve(weights, x.reshape(*x.shape[:-2], -1), spec.embedded, 1.0, controller, seeded=seeded,
                                       loops=per_attempt)
            _loss(sol.z).backward()
            return sum(sol.nfe)
        return run

    def torchdiffeq_seeds(seeds):
        def run():
            nfe = 0
            # integrate's adaptive backprop solves of the dense field go to tune_node's solver
            # unless TUNE_NODE_ADAPTIVE_SOLVER asks for torchdiffeq (read at every solve).
            with use_adaptive_solver("torchdiffeq"):
                for model, x in zip(models[:seeds], xs):
                    sol = integrate(model.field, x, adaptive)
                    _loss(sol.z).backward()
                    nfe += sol.nfe_forward
            return nfe
        return run

    def fixed_one():
        sol = integrate(models[0].field, xs[0], fixed)
        _loss(sol.z).backward()
        return sol.nfe_forward

    def fixed_group():
        sol = stacked.solve(x_stacked, fixed)
        _loss(sol.z).backward()
        return sol.nfe_forward * SEEDS

    return {
        "ours fused, one seed": ours_one(True),
        f"ours fused, {SEEDS} seeds grouped": ours_group(True),
        "ours fused stepped from Python, one seed": stepped_from_python(models[0].field, xs[0], False),
        f"ours fused stepped from Python, {SEEDS} seeds": stepped_from_python(stacked.field, x_stacked, True),
        "ours eager, one seed": ours_one(False),
        f"ours eager, {SEEDS} seeds grouped": ours_group(False),
        "torchdiffeq, one seed": torchdiffeq_seeds(1),
        f"torchdiffeq, {SEEDS} seeds": torchdiffeq_seeds(SEEDS),
        f"fixed rk4-{fixed_steps} fused, one seed": fixed_one,
        f"fixed rk4-{fixed_steps} fused, {SEEDS} seeds": fixed_group,
    }


ORDERS = ("interleaved", "blocks")


def bench(method: str, tol: float, fixed_steps: int, repeats: int, orders=ORDERS, block: int = 10) -> dict[str, tuple[dict, dict]]:
    """Per order: the us per NFE (fwd+bwd) per seed of every timed solve, and forward NFE per solve, by variant.
    ``repeats`` solves per variant and order (in blocks: rounded up to whole blocks)."""
    runs = _variants(method, tol, fixed_steps)
    names = list(runs)
    nfe = {name: runs[name]() for name in names}  # warm-up (and the C++ loops' first load), untimed
    results = {}
    for order in orders:
        samples = {name: [] for name in names}
        size = 1 if order == "interleaved" else block
        for r in range(-(-repeats // size)):
            for name in names[r % len(names):] + names[:r % len(names)]:
                for _ in range(size):
                    start = time.perf_counter()
                    count = runs[name]()
                    elapsed = time.perf_counter() - start
                    if count != nfe[name]:
                        raise RuntimeError(f"{name}: NFE changed between solves ({nfe[name]} then {count})")
                    samples[name].append(elapsed / (2 * count) * 1e6)
        results[order] = (samples, nfe)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tol", type=float, default=1e-3, help="rtol = atol of the adaptive solves (default 1e-3)")
    parser.add_argument("--fixed-steps", type=int, default=8, help="steps of the fixed-step RK4 reference (default 8)")
    parser.add_argument("--repeats", type=int, default=30, help="timed solves per variant (default 30)")
    parser.add_argument("--quick", action="store_true", help="5 repeats")
    parser.add_argument("--methods", nargs="+", choices=("fehlberg2", "dopri5"), default=["fehlberg2", "dopri5"],
                        help="the adaptive methods to time (default both)")
    parser.add_argument("--order", choices=(*ORDERS, "both"), default="both",
                        help="interleaved (one solve of each variant in turn), blocks (--block solves of a variant back to back, "
                             "as training runs them) or both (default)")
    parser.add_argument("--block", type=int, default=10, help="solves per block in the blocks order (default 10)")
    parser.add_argument("--stat", choices=("median", "min", "both"), default="both",
                        help="per variant, the median of its solves, the fastest (least disturbed by a loaded machine), "
                             "or both: median (min) (default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 5 if args.quick else args.repeats
    stats = {"median": [statistics.median], "min": [min], "both": [statistics.median, min]}[args.stat]
    orders = ORDERS if args.order == "both" else (args.order,)
    timed = {m: bench(m, args.tol, args.fixed_steps, repeats, orders, args.block) for m in args.methods}
    for order in orders:
        heading = "interleaved, one solve of each variant in turn" if order == "interleaved" else \
            f"in blocks of {args.block} solves of a variant back to back (as training runs them)"
        _report({m: timed[m][order] for m in args.methods}, args, repeats, stats, heading)
    loops = adaptive_loops()
    if loops is not None and hasattr(loops, "narrow_product_outcomes"):
        # The fused solve's narrow products run as loops only where they matched ATen's bits here.
        outcomes = loops.narrow_product_outcomes()
        print("narrow products of the fused solves above, calls that ran the loop / all calls: " + ", ".join(
            f"{kind} {counts['taken']}/{sum(counts.values())}" for kind, counts in outcomes.items()))


def _report(results: dict, args, repeats: int, stats: list, heading: str) -> None:
    """Prints one order's ratios and absolute costs (``results``: method -> (samples, nfe))."""

    def show(a, b=None):
        """``a``'s stat(s) per method, or its ratio to ``b``'s, as "median (min)"."""
        cells = []
        for m in results:
            samples = results[m][0]
            values = [stat(samples[a]) / (stat(samples[b]) if b else 1) for stat in stats]
            fmt = "{:.2f}" if b else "{:.1f}"
            text = fmt.format(values[0]) + (" (" + fmt.format(values[1]) + ")" if len(values) > 1 else "")
            cells.append(f"{text:>15s}" + ("" if b else f" [{results[m][1][a]:4d}]"))
        return " ".join(cells)

    one, group = "one seed", f"{SEEDS} seeds"
    fixed_one, fixed_group = f"fixed rk4-{args.fixed_steps} fused, one seed", f"fixed rk4-{args.fixed_steps} fused, {SEEDS} seeds"
    print(f"Sphere2 dense field, batch {BATCH}, float32, tol {args.tol:g}, one solve + backward; us per NFE (fwd+bwd) per seed, "
          f"{' (' .join(s.__name__ for s in stats)}{')' if len(stats) > 1 else ''} of {repeats}; {heading}")
    print("ratios (targets: fused / torchdiffeq <= 0.25, fused / fixed fused <= 1.5)")
    print(f"  {'':42s} " + " ".join(f"{m:>15s}" for m in results))
    rows = [
        ("fused / torchdiffeq, one seed", "ours fused, one seed", "torchdiffeq, one seed"),
        (f"fused / torchdiffeq, {group}", f"ours fused, {SEEDS} seeds grouped", f"torchdiffeq, {SEEDS} seeds"),
        ("fused / fixed fused, one seed", "ours fused, one seed", fixed_one),
        (f"fused / fixed fused, {group}", f"ours fused, {SEEDS} seeds grouped", fixed_group),
        ("fused / stepped from Python, one seed", "ours fused, one seed", "ours fused stepped from Python, one seed"),
        (f"fused / stepped from Python, {group}", f"ours fused, {SEEDS} seeds grouped", f"ours fused stepped from Python, {SEEDS} seeds"),
        ("fused / eager, one seed", "ours fused, one seed", "ours eager, one seed"),
        (f"fused / eager, {group}", f"ours fused, {SEEDS} seeds grouped", f"ours eager, {SEEDS} seeds grouped"),
        (f"fused {group} / fused {one}", f"ours fused, {SEEDS} seeds grouped", "ours fused, one seed"),
    ]
    for label, a, b in rows:
        print(f"  {label:42s} {show(a, b)}")
    print("absolute, us per NFE per seed [forward NFE per solve, all seeds]")
    for name in next(iter(results.values()))[0]:
        print(f"  {name:42s} {show(name)}")


if __name__ == "__main__":
    main()
