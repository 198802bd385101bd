"""Where the time of a finished grid run went: per Ray trial and for the whole run.

Run: ``python benchmarks/grid_run_costs.py runs/sphere2_fixed [--cpus 2] [--wall SECONDS] [--json FILE]``.

Reads the experiment folder that ``python -m tune_node.grid`` wrote (``grid.json``, each
trial's ``result.json`` and per-seed ``final.json``) and prints, per Ray trial in the
grid's start order: NFE per iteration (forward and backward), Ray's total time, the
group's training wall and CPU time, and the cost per NFE per seed. Then for the run:
the first trial's start to the last trial's end, how busy the cores were in between
(sum of trial times / (cores x span)), CPU-hours, and the per-NFE cost a given wall
time (default 90 minutes) would have needed. ``--wall`` is the CLI's own wall time
(process start to exit), for the time spent outside trials.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_grid import read_trials  # noqa: E402


def trial_span(trial_dir: Path) -> tuple[float, float]:
    """(start, end) Unix time of a Ray trial, from its last result."""
    last = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()][-1]
    return last["timestamp"] - last["time_total_s"], last["timestamp"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the grid's experiment folder (holds grid.json)")
    parser.add_argument("--cpus", type=int, default=2, help="cores the run had (default 2)")
    parser.add_argument("--wall", type=float, default=None, help="the CLI's wall seconds, if measured")
    parser.add_argument("--target-minutes", type=float, default=90.0, help="wall time to compare against (default 90)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    exp = args.experiment
    if not (exp / "grid.json").is_file():
        parser.error(f"{exp} holds no grid.json: not a grid experiment folder")
    iterations = json.loads((exp / "grid.json").read_text())["trials"][0]["iterations"]
    trials = read_trials(exp, iterations)
    spans = [trial_span(d) for d in exp.iterdir() if (d / "result.json").is_file()]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    span = last - first
    busy = sum(t["total_s"] for t in trials) / (args.cpus * span)
    nfe_seed = sum(t["nfe_per_iteration"] * iterations * len(t["seeds"]) for t in trials)
    train_cpu = sum(t["train_cpu_s"] for t in trials)
    train_wall = sum(t["train_wall_s"] for t in trials)
    outside = sum(t["total_s"] - t["train_wall_s"] for t in trials)
    target = args.target_minutes * 60
    needed = (target - (args.wall - span if args.wall else 0.0)) * args.cpus * busy - outside

    print(f"{'trial':<18} {'NFE/it':>7} {'Ray s':>8} {'train s':>8} {'CPU s':>8} {'us/NFE/seed':>12} {'(CPU)':>6}")
    for t in trials:
        print(f"{t['label']:<18} {t['nfe_per_iteration']:7.0f} {t['total_s']:8.0f} {t['train_wall_s']:8.0f} "
              f"{t['train_cpu_s']:8.0f} {t['us_per_nfe_seed_wall']:12.1f} {t['us_per_nfe_seed_cpu']:6.1f}")
    print(f"\n{len(trials)} Ray trials, {nfe_seed / 1e6:.1f} million NFE over all seeds, {iterations} iterations each")
    print(f"first trial start to last trial end: {span / 60:.1f} min; cores busy {busy:.1%} of it ({args.cpus} cores)")
    if args.wall:
        print(f"CLI wall time: {args.wall / 60:.1f} min, of which {(args.wall - span):.0f} s outside trials")
    print(f"training: {train_wall / 3600:.2f} h wall, {train_cpu / 3600:.2f} CPU-hours summed over trials "
          f"({train_wall / nfe_seed * 1e6:.1f} us wall, {train_cpu / nfe_seed * 1e6:.1f} us CPU per NFE per seed); "
          f"outside training inside trials: {outside:.0f} s")
    print(f"{args.target_minutes:.0f} min wall at this schedule and overhead needs <= "
          f"{needed / nfe_seed * 1e6:.1f} us wall per NFE per seed")
    if args.json:
        args.json.write_text(json.dumps({"experiment": str(exp), "cpus": args.cpus, "cli_wall_s": args.wall, "span_s": span,
                                         "busy": busy, "nfe_seed": nfe_seed, "train_wall_s": train_wall,
                                         "train_cpu_s": train_cpu, "outside_training_s": outside, "trials": trials}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
