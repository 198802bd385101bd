"""Expected wall time of a full grid run, from a short run of the same grid through the CLI.

Run: ``python benchmarks/estimate_grid.py --space sphere2_fixed --iterations 200``.

It runs ``python -m tune_node.grid`` on the space with ``--iterations`` overridden
(every trial, seed groups and cross-solver test matrices as in the real run), then,
per Ray trial, reads from the per-seed ``final.json``: the training wall time and the
worker's training CPU time (blind to other jobs' load), and from Ray's ``result.json``
the trial's total time. It extrapolates each trial to the space's iterations

    T_full = (training time / short iterations) * full iterations + (trial total - training wall time)

(the test matrix, data loading and trial start do not grow with iterations; training
time includes the final train/test accuracy passes, so this errs high), replays
Ray's schedule (trials start in the grid's order on the first free of ``--cpus``
slots) and adds the CLI's own start-up and summary time measured in the short run.
It prints the cost per NFE per seed of every trial and the estimate twice: from wall
times (as loaded as this machine was) and from CPU times (free cores).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tune_node.search_space import load_space  # noqa: E402


def run_grid(argv: list[str]) -> float:
    """Wall seconds of ``python -m tune_node.grid ARGV`` in a subprocess (this checkout's
    tune_node first on its path); exits with the run's output tail if it fails.

    Ray starts its workers at niceness 15 by default; here they get this process's
    niceness, so that on a shared machine the trials meet other jobs as the plain
    runs they are compared with do.
    """
    cmd = [sys.executable, "-m", "tune_node.grid", *argv]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "RAY_worker_niceness": str(os.nice(0))}
    print(" ".join(cmd), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"grid run failed (exit {proc.returncode})")
    return wall


def makespan(durations: list[float], slots: int) -> float:
    """Finish time of jobs started in order on the first free of ``slots`` (Ray's FIFO grid)."""
    free = [0.0] * slots
    for d in durations:
        heapq.heapreplace(free, free[0] + d)
    return max(free)


def read_trials(exp: Path, full: int) -> list[dict]:
    """Per Ray trial of the finished experiment ``exp``, in the grid's start order: its
    label, seeds, NFE per iteration, Ray's total time, the group's training wall and
    CPU time (``final.json``), the cost per NFE per seed, and ``full_*_s``: the trial
    extrapolated to ``full`` iterations (equal to the measured times when it ran ``full``)."""
    order = json.loads((exp / "grid.json").read_text())
    trials = []
    for trial_dir in sorted(p for p in exp.iterdir() if (p / "result.json").is_file()):
        last = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()][-1]
        finals = sorted(trial_dir.glob("checkpoint_*/final.json")) or sorted(trial_dir.glob("checkpoint_*/seed*/final.json"))
        newest = max(p.parent.name if p.parent.name.startswith("checkpoint_") else p.parent.parent.name for p in finals)
        finals = [json.loads(p.read_text()) for p in finals if newest in p.parts]
        f = finals[0]
        seeds, nfe = len(finals), (f["total_nfe_forward"] + f["total_nfe_backward"]) / f["iterations"]
        total = last["time_total_s"]
        fixed = total - f["wall_time"]  # trial start, data, test matrix: as measured (conservative)
        trials.append({
            "label": f"{f['config']['method']}({f['config']['steps'] or f['config']['tol']}) x{seeds}",
            "seeds": [x["config"]["seed"] for x in finals], "nfe_per_iteration": nfe, "total_s": total,
            "train_wall_s": f["wall_time"], "train_cpu_s": f["train_cpu_time"],
            "us_per_nfe_seed_wall": f["wall_time"] / (f["iterations"] * nfe * seeds) * 1e6,
            "us_per_nfe_seed_cpu": f["train_cpu_time"] / (f["iterations"] * nfe * seeds) * 1e6,
            "full_wall_s": f["wall_time"] / f["iterations"] * full + fixed,
            "full_cpu_s": f["train_cpu_time"] / f["iterations"] * full + fixed,
            "config": f["config"],
        })
    # The grid's start order: grid.json's units, each a list of indices into its trials.
    key = lambda c: (c["method"], c["steps"], c["tol"], c["gradient"], c["seed"])  # noqa: E731
    position = {key(order["trials"][u[0]]): i for i, u in enumerate(order["units"])}
    trials.sort(key=lambda t: position[key(t["config"])])
    return trials


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="sphere2_fixed")
    parser.add_argument("--iterations", type=int, default=200, help="iterations of the short run (default 200)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--storage", default=None, help="where the short run goes (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    space = load_space(args.space)
    full = space.trials()[0]["iterations"]
    storage = Path(args.storage or tempfile.mkdtemp(prefix="estimate_grid_"))
    argv = ["--space", args.space, "--iterations", str(args.iterations), "--storage", str(storage), "--name", "estimate",
            "--cpus", str(args.cpus)]
    load_start = os.getloadavg()
    wall = run_grid(argv)
    load_end = os.getloadavg()
    trials = read_trials(storage / "estimate", full)
    cli_overhead = wall - makespan([t["total_s"] for t in trials], args.cpus)
    estimate_wall = makespan([t["full_wall_s"] for t in trials], args.cpus) + cli_overhead
    estimate_cpu = makespan([t["full_cpu_s"] for t in trials], args.cpus) + cli_overhead
    cpu_hours = sum(t["full_cpu_s"] for t in trials) / 3600

    print(f"\nshort run: {len(trials)} Ray trials, {args.iterations} iterations, {wall:.0f} s wall "
          f"(CLI start-up and summary outside trials: {cli_overhead:.0f} s); load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(f"\n{'trial':<18} {'NFE/it':>7} {'us/NFE/seed wall':>17} {'cpu':>6} {'short s':>8} {'full s (wall)':>14} {'full s (cpu)':>13}")
    for t in trials:
        print(f"{t['label']:<18} {t['nfe_per_iteration']:7.0f} {t['us_per_nfe_seed_wall']:17.1f} {t['us_per_nfe_seed_cpu']:6.1f} "
              f"{t['total_s']:8.1f} {t['full_wall_s']:14.0f} {t['full_cpu_s']:13.0f}")
    print(f"\nexpected wall time of the full run ({full} iterations) on {args.cpus} cores: "
          f"{estimate_cpu / 60:.0f} min from CPU times (free cores), {estimate_wall / 60:.0f} min from wall times "
          f"(this load); {cpu_hours:.2f} CPU-hours of trials")
    if args.json:
        Path(args.json).write_text(json.dumps({"argv": argv, "short_wall_s": wall, "cli_overhead_s": cli_overhead,
                                               "estimate_cpu_s": estimate_cpu, "estimate_wall_s": estimate_wall,
                                               "load": [load_start, load_end], "trials": trials}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
