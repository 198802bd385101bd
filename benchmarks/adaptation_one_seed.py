"""Time one step-adaptation run without Ray, to size the full runs.

    python benchmarks/adaptation_one_seed.py --iterations 2000 --out runs/adapt_bench

Trains Sphere2 (by default) with the paper's settings (Adam 1e-4, batch 128) under
:class:`~tune_node.adaptation.StepAdaptation`, prints progress, and writes
``adaptation.csv`` and ``adaptation_history.csv`` (the rows of
:mod:`tune_node.adaptation_results`) to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from tune_node.adaptation import StepAdaptation
from tune_node.adaptation_results import HISTORY_COLUMNS, SUMMARY_COLUMNS, history_rows, summary_row
from tune_node.solvers import SolverSetting
from tune_node.training import TrainConfig, train


def write_csv(path: Path, columns, rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="sphere2")
    p.add_argument("--train-method", default="euler")
    p.add_argument("--test-method", default="midpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--lr", type=float, default=None, help="default: the paper's for the dataset")
    p.add_argument("--test-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/adaptation_benchmark"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    config = TrainConfig(dataset=a.dataset, solver=SolverSetting.fixed(a.train_method, 1), seed=a.seed,
                         iterations=a.iterations, lr=a.lr, report_every=100, test_every=a.test_every)
    config, controller = StepAdaptation.for_training(config, test_method=a.test_method)
    print(f"starting step {controller.h:.4g}: {controller.setting.label()}", flush=True)

    def report(progress, _state):
        test = "" if progress.test_accuracy is None else f" test acc {progress.test_accuracy:.3f}"
        print(f"it {progress.iteration}: steps {progress.steps}, total NFE {progress.total_nfe}, "
              f"check NFE {progress.check_nfe}, {progress.elapsed:.0f} s{test}", flush=True)

    result = train(config, on_report=report, controller=controller)
    trial = f"{a.dataset}-{a.train_method}-{a.test_method}-seed{a.seed}"
    row = summary_row(result, controller, "benchmark", trial)
    a.out.mkdir(parents=True, exist_ok=True)
    write_csv(a.out / "adaptation.csv", SUMMARY_COLUMNS, [row])
    write_csv(a.out / "adaptation_history.csv", HISTORY_COLUMNS, history_rows(result, controller, trial))
    print(f"test accuracy {row['test_accuracy']:.4f}, NFE per iteration {row['nfe_per_iteration']:.1f} "
          f"(checks {row['check_nfe']}), wall time {row['wall_time']:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
