"""Ray Tune's scheduling efficiency: the grid CLI against the same trainings in plain processes.

Run: ``python benchmarks/bench_ray.py`` (trials of about 70 s: about 9 minutes on 2
cores; ``--quick``: trials of a few seconds, under 2 minutes).

It builds a search space of ``--trials`` equal Ray trials (Sphere2, Euler, one step
count, seed groups of ``--seeds-per-trial`` seeds, iterations calibrated so one trial
trains for about ``--trial-seconds``) and measures, in one run on this machine:

- plain: each trial's work (``train_seed_group`` plus every seed's cross-solver test
  matrix) back to back in this one process, one thread; ideal = sum / cores;
- grid: ``python -m tune_node.grid`` on that space with ``--cpus cores``, wall time
  from process start to exit (Ray start-up, scheduling, checkpoints every report,
  TensorBoard, results table and summary included);
- pool: the same trials in ``cores`` plain worker processes without Ray (a
  multiprocessing pool, timed once its workers are up): what the machine itself
  allows, other users' load included.

Ratios first (grid / ideal is the issue's criterion: <= 1.15 with trials of at least a
minute), absolute times after. On a shared machine compare grid with pool too: both
run in parallel and meet the same neighbours, while the plain sum runs alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from estimate_grid import makespan, run_grid  # noqa: E402  (benchmarks/, this script's folder)

from tune_node.grid import plan_trials  # noqa: E402
from tune_node.search_space import load_space, train_config_from_trial  # noqa: E402
from tune_node.seed_groups import train_seed_group  # noqa: E402

SPACE = """description = "bench_ray: equal seed-group trials"
dataset = "sphere2"
seeds = {seeds}

[training]
iterations = {iterations}
lr = 1e-3
report_every = {report_every}
test_every = 0

[[solvers]]
method = "{method}"
steps = [{steps}]
"""


def run_unit(unit: list[dict]) -> tuple[float, float]:
    """Wall and CPU seconds one Ray trial's work takes in a plain process: training and the test matrices."""
    torch.set_num_threads(1)
    start, cpu = time.perf_counter(), time.process_time()
    configs = [train_config_from_trial(t) for t in unit]
    for result in train_seed_group(configs):
        result.cross_solver_table()
    return time.perf_counter() - start, time.process_time() - cpu


def _ready(_) -> None:
    time.sleep(0.5)  # keep this worker busy so every worker gets one


def calibrate(method: str, steps: int, seeds: int, seconds: float) -> int:
    """Iterations for one trial of ``seeds`` seeds to train about ``seconds``: the rate is
    timed as the difference of a 300- and a 100-iteration run, so set-up and final
    evaluations do not count as iterations."""
    from tune_node.solvers import SolverSetting
    from tune_node.training import TrainConfig

    torch.set_num_threads(1)

    def timed(iterations: int) -> float:
        configs = [TrainConfig(dataset="sphere2", solver=SolverSetting.fixed(method, steps), seed=s, iterations=iterations,
                               report_every=iterations, lr=1e-3) for s in range(seeds)]
        start = time.perf_counter()
        train_seed_group(configs)
        return time.perf_counter() - start

    timed(20)  # warm-up: first-call costs are no part of the rate
    per_iteration = max(1e-6, (timed(300) - timed(100)) / 200)
    return max(100, int(round(seconds / per_iteration / 100)) * 100)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="trials of ~4 s instead of ~70 s")
    parser.add_argument("--trials", type=int, default=4, help="Ray trials (default 4)")
    parser.add_argument("--seeds-per-trial", type=int, default=2, help="seeds in one seed-group trial (default 2)")
    parser.add_argument("--trial-seconds", type=float, default=None, help="target training time of one trial (default 70, --quick 4)")
    parser.add_argument("--method", default="euler")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2, help="cores the grid and the pool use (default 2)")
    parser.add_argument("--no-pool", action="store_true", help="skip the plain multi-process run")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    seconds = args.trial_seconds or (4.0 if args.quick else 70.0)
    load_start = os.getloadavg()

    iterations = calibrate(args.method, args.steps, args.seeds_per_trial, seconds)
    work = Path(tempfile.mkdtemp(prefix="bench_ray_"))
    space_file = work / "bench_ray.toml"
    space_file.write_text(SPACE.format(seeds=args.trials * args.seeds_per_trial, iterations=iterations,
                                       report_every=max(1, iterations // 10), method=args.method, steps=args.steps))
    units = plan_trials(load_space(str(space_file)).trials(), seeds_per_trial=args.seeds_per_trial)
    print(f"{len(units)} Ray trials of {args.seeds_per_trial} seeds, {args.method} {args.steps} steps, {iterations} iterations, "
          f"{args.cpus} cores; load average at start {load_start[0]:.2f}", flush=True)

    plain, plain_cpu = [], []
    for i, unit in enumerate(units):
        wall, cpu = run_unit(unit)
        plain.append(wall)
        plain_cpu.append(cpu)
        print(f"  plain trial {i + 1}/{len(units)}: {wall:.1f} s ({cpu:.1f} s CPU)", flush=True)

    grid_wall = run_grid(["--space", str(space_file), "--storage", str(work / "runs"), "--name", "bench",
                          "--cpus", str(args.cpus), "--seeds-per-trial", str(args.seeds_per_trial)])
    trial_times, trial_cpu = [], []
    for trial_dir in sorted((work / "runs" / "bench").glob("*/")):
        if not (trial_dir / "result.json").is_file():
            continue
        lines = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        trial_times.append(lines[-1]["time_total_s"])
        trial_cpu.append(json.loads(sorted(trial_dir.glob("checkpoint_*/seed*/final.json"))[-1].read_text())["cpu_time"])
    print(f"  grid: {grid_wall:.1f} s", flush=True)

    pool_wall = None
    if not args.no_pool:
        with multiprocessing.get_context("spawn").Pool(args.cpus) as pool:
            pool.map(_ready, range(args.cpus), chunksize=1)  # workers up and torch imported: like the ideal, no start-up
            start = time.perf_counter()
            pool_times = [wall for wall, _ in pool.map(run_unit, units, chunksize=1)]
            pool_wall = time.perf_counter() - start
        print(f"  pool: {pool_wall:.1f} s", flush=True)
    load_end = os.getloadavg()

    ideal = sum(plain) / args.cpus
    print("\nratios")
    print(f"  grid wall / ideal (sum of plain / {args.cpus} cores)   {grid_wall / ideal:6.3f}   (criterion 4: <= 1.15)")
    if pool_wall is not None:
        print(f"  grid wall / pool wall ({args.cpus} plain processes)    {grid_wall / pool_wall:6.3f}")
        print(f"  pool wall / ideal                          {pool_wall / ideal:6.3f}   (the machine's own share of the gap)")
    print(f"  mean trial time inside Ray / mean plain    {sum(trial_times) / len(trial_times) / (sum(plain) / len(plain)):6.3f}")
    # Load-blind view: CPU seconds inside Ray trials vs plain, and the CLI's time outside any trial.
    outside = grid_wall - makespan(trial_times, args.cpus)
    print(f"  trial CPU inside Ray / plain CPU           {sum(trial_cpu) / sum(plain_cpu):6.3f}")
    print(f"  (CPU-time ideal + CLI time outside trials) / CPU-time ideal  "
          f"{(sum(trial_cpu) / args.cpus + outside) / (sum(plain_cpu) / args.cpus):6.3f}")
    print("\nabsolute (seconds)")
    print(f"  plain trials     {', '.join(f'{t:.1f}' for t in plain)}   sum {sum(plain):.1f}   ideal {ideal:.1f}")
    print(f"  plain CPU        {', '.join(f'{t:.1f}' for t in plain_cpu)}   "
          f"trial CPU inside Ray {', '.join(f'{t:.1f}' for t in trial_cpu)}")
    print(f"  grid time outside trials (start-up, scheduling gaps, summary) ~ {outside:.1f}")
    print(f"  grid wall        {grid_wall:.1f}   trials inside Ray: {', '.join(f'{t:.1f}' for t in sorted(trial_times))}")
    if pool_wall is not None:
        print(f"  pool wall        {pool_wall:.1f}   trials: {', '.join(f'{t:.1f}' for t in pool_times)}")
    print(f"  load average     start {load_start[0]:.2f}, end {load_end[0]:.2f} (1 min; {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "units": len(units), "seeds_per_trial": args.seeds_per_trial, "iterations": iterations, "cpus": args.cpus,
            "plain": plain, "plain_cpu": plain_cpu, "trial_cpu_in_ray": trial_cpu, "ideal": ideal, "grid_wall": grid_wall,
            "trials_in_ray": trial_times,
            "pool_wall": pool_wall, "load_start": load_start, "load_end": load_end}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
