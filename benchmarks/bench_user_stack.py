"""Does stacking a user's model pay? S seeds through ``torch.func`` (FuncStack) against S separate runs.

Trains the seeds of each setting of ``examples/crescents`` (a time-dependent MLP field) once as one
:class:`~tune_node.seed_groups.FuncStack` group and once seed after seed with ``train``, interleaved
and repeated, on one thread, after a warm-up pass (the first ``vmap`` of a process pays a one-off
cost). Prints the ratio of the two times per setting first, then the absolute times.

    python benchmarks/bench_user_stack.py                 # ~1 min
    python benchmarks/bench_user_stack.py --seeds 3 --repeats 5
"""

import argparse
import time
from pathlib import Path

import torch

from tune_node.search_space import load_space, train_config_from_trial
from tune_node.seed_groups import train_seed_group
from tune_node.training import train

SPACE = Path(__file__).resolve().parent.parent / "examples" / "crescents" / "crescents.toml"
SETTINGS = (("euler", 1), ("euler", 4), ("euler", 16), ("rk4", 1), ("rk4", 2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds per group (default 5)")
    parser.add_argument("--iterations", type=int, default=100, help="training iterations per run (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats per setting (default 3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    space = load_space(str(SPACE)).with_overrides(seeds=args.seeds, iterations=args.iterations)
    trials = space.trials()
    warm = [train_config_from_trial(t) for t in trials if (t["method"], t["steps"]) == SETTINGS[0]]
    train_seed_group(warm)
    rows = []
    for method, steps in SETTINGS:
        configs = [train_config_from_trial(t) for t in trials if (t["method"], t["steps"]) == (method, steps)]
        grouped = separate = 0.0
        for _ in range(args.repeats):
            start = time.perf_counter()
            train_seed_group(configs)
            middle = time.perf_counter()
            for c in configs:
                train(c)
            grouped += middle - start
            separate += time.perf_counter() - middle
        rows.append((f"{method}, {steps} step{'s' * (steps > 1)}", grouped / args.repeats, separate / args.repeats))
    print(f"{args.seeds}-seed FuncStack group / {args.seeds} separate runs (one thread, {args.iterations} iterations):")
    for label, g, s in rows:
        print(f"  {label:<16} {g / s:.2f}")
    print("absolute (s per group / s for the separate runs):")
    for label, g, s in rows:
        print(f"  {label:<16} {g:.2f} / {s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
