"""Time one step-adaptation run without Ray, to size the full runs, and diagnose its final model.

    python benchmarks/adaptation_one_seed.py --iterations 2000 --out runs/adapt_bench

Trains Sphere2 (by default) with the paper's settings (Adam 1e-4, batch 128) under
:class:`~tune_node.adaptation.StepAdaptation`, prints progress, and writes
``adaptation.csv`` and ``adaptation_history.csv`` (the rows of
:mod:`tune_node.adaptation_results`) to ``--out``.

With ``--diagnose-every N`` it also writes ``diagnosis.csv``: every ``N`` iterations
(after the check, before the optimizer step) the test-set accuracy under the setting
the model trained with, the check's test solver, RK4 at the same steps and, every
``--fine-every`` iterations, RK4 at ``--fine-steps`` steps (a stand-in for the exact
ODE flow). ``final.json`` holds the final model's test accuracies under the same
solvers. The diagnosis reads the model without gradients and draws no random
numbers, so training is the same with or without it.

    python benchmarks/adaptation_one_seed.py --summarize runs/gap/base_s* --csv summary.csv

summarizes finished runs instead: final accuracies per solver, NFE, and the train/test
solver gap on the test set from iteration 3000 on.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from tune_node.adaptation import StepAdaptation
from tune_node.adaptation_results import HISTORY_COLUMNS, SUMMARY_COLUMNS, history_rows, summary_row
from tune_node.solvers import SolverSetting, test_solver_for
from tune_node.train.evaluation import accuracy
from tune_node.training import TrainConfig, train

DIAGNOSIS_COLUMNS = ["iteration", "step_size_after_check", "trained_steps", "train_solver", "test_solver", "test_steps",
                     "rk4_same_steps", "rk4_fine", "fine_steps"]


def write_csv(path: Path, columns, rows) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def solver_accuracies(model, data, trained: SolverSetting, test_method: str, fine_steps: int | None, batch_size: int = 1000) -> dict:
    """Test-set accuracies of ``model`` under its train setting, the check's test solver, RK4 at the
    same steps and (when ``fine_steps``) RK4 at ``fine_steps`` steps."""
    test = test_solver_for(trained, test_method)
    rk4 = SolverSetting.fixed("rk4", trained.steps, trained.gradient, trained.T)
    out = {
        "trained_steps": trained.steps,
        "train_solver": accuracy(model, data.x_test, data.y_test, trained, batch_size)[0],
        "test_solver": accuracy(model, data.x_test, data.y_test, test, batch_size)[0],
        "test_steps": test.steps,
        "rk4_same_steps": accuracy(model, data.x_test, data.y_test, rk4, batch_size)[0],
        "rk4_fine": None,
        "fine_steps": fine_steps,
    }
    if fine_steps:
        fine = SolverSetting.fixed("rk4", fine_steps, trained.gradient, trained.T)
        out["rk4_fine"] = accuracy(model, data.x_test, data.y_test, fine, batch_size)[0]
    return out


class Diagnosed:
    """A controller that delegates to ``inner`` and evaluates the model on the test set now and then."""

    def __init__(self, inner, data, every: int, fine_every: int, fine_steps: int):
        self.inner, self.data, self.every, self.fine_every, self.fine_steps = inner, data, every, fine_every, fine_steps
        self.rows: list[dict] = []
        self.last_trained: SolverSetting | None = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def update(self, iteration, model, x, y, logits, setting):
        out = self.inner.update(iteration, model, x, y, logits, setting)
        self.last_trained = setting
        if self.every and iteration % self.every == 0:
            fine = self.fine_steps if self.fine_every and iteration % self.fine_every == 0 else None
            row = {"iteration": iteration, "step_size_after_check": self.inner.h}
            row.update(solver_accuracies(model, self.data, setting, self.inner.test_method, fine))
            self.rows.append(row)
            print(f"  diag it {iteration}: steps {setting.steps} euler {row['train_solver']:.3f} "
                  f"{self.inner.test_method} {row['test_solver']:.3f} rk4 {row['rk4_same_steps']:.3f}"
                  + ("" if fine is None else f" rk4@{fine} {row['rk4_fine']:.3f}"), flush=True)
        return out

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)


SUMMARY = ["run", "seed", "options", "final_steps", "euler", "test_solver", "rk4_same_steps", "rk4_fine", "gap_rk4_fine",
           "nfe_per_iteration", "train_fwd_nfe_per_iteration", "check_nfe_per_iteration", "halvings",
           "late_mean_gap", "late_max_gap", "late_share_gap_over_0.1", "late_mean_batch_gap", "late_sd_batch_minus_test_gap", "wall_time"]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def summarize(run: Path, late_from: int = 3000) -> dict:
    """One row of ``--summarize``: a finished run's final accuracies, NFE and how its train/test-solver
    gap behaved from iteration ``late_from`` on (test-set gaps from ``diagnosis.csv``, batch gaps from
    the checks at the same iterations)."""
    with (run / "adaptation.csv").open() as f:
        row = next(csv.DictReader(f))
    with (run / "adaptation_history.csv").open() as f:
        checks = {int(r["iteration"]): r for r in csv.DictReader(f)}
    diagnosis = []
    if (run / "diagnosis.csv").exists():
        with (run / "diagnosis.csv").open() as f:
            diagnosis = [r for r in csv.DictReader(f) if int(r["iteration"]) >= late_from]
    final = json.loads((run / "final.json").read_text())
    args = final["args"]
    defaults = {"init_rtol": 0.001, "init_atol": 0.001, "check_size": None, "threshold": 0.1, "test_method": "midpoint"}
    options = " ".join(f"{k}={args[k]}" for k in defaults if args.get(k) != defaults[k])
    iterations = int(row["iterations"])
    gaps = [float(r["train_solver"]) - float(r["test_solver"]) for r in diagnosis]
    pairs = [(float(checks[int(r["iteration"])]["train_solver_accuracy"]) - float(checks[int(r["iteration"])]["test_solver_accuracy"]),
              float(r["train_solver"]) - float(r["test_solver"])) for r in diagnosis if int(r["iteration"]) in checks]
    batch_gaps = [b for b, _ in pairs]
    noise = [b - t for b, t in pairs]
    f = final["final"]
    return {
        "run": run.name, "seed": int(row["seed"]), "options": options or "paper/default",
        "final_steps": f["trained_steps"], "euler": f["train_solver"], "test_solver": f["test_solver"],
        "rk4_same_steps": f["rk4_same_steps"], "rk4_fine": f["rk4_fine"], "gap_rk4_fine": f["train_solver"] - f["rk4_fine"],
        "nfe_per_iteration": float(row["nfe_per_iteration"]),
        "train_fwd_nfe_per_iteration": int(row["train_nfe_forward"]) / iterations,
        "check_nfe_per_iteration": int(row["check_nfe"]) / iterations,
        "halvings": sum(float(c["proposed"]) < float(c["step_size"]) for c in checks.values()),
        "late_mean_gap": _mean(gaps), "late_max_gap": max(gaps, default=float("nan")),
        "late_share_gap_over_0.1": _mean(g > 0.1 for g in gaps), "late_mean_batch_gap": _mean(batch_gaps),
        "late_sd_batch_minus_test_gap": _mean((v - _mean(noise)) ** 2 for v in noise) ** 0.5,
        "wall_time": float(row["wall_time"]),
    }


def write_summary(runs: list[Path], out: Path | None) -> None:
    rows = [summarize(r) for r in runs if (r / "final.json").exists()]
    for r in rows:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if out is not None:
        rounded = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows]
        write_csv(out, SUMMARY, rounded)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--summarize", type=Path, nargs="+", default=None,
                   help="instead of training: one summary row per finished --out folder given")
    p.add_argument("--csv", type=Path, default=None, help="with --summarize: write the rows to this csv")
    p.add_argument("--dataset", default="sphere2")
    p.add_argument("--train-method", default="euler")
    p.add_argument("--test-method", default="midpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--lr", type=float, default=None, help="default: the paper's for the dataset")
    p.add_argument("--test-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init-rtol", type=float, default=1e-3, help="norm weight rtol of the starting-step algorithm")
    p.add_argument("--init-atol", type=float, default=1e-3, help="norm weight atol of the starting-step algorithm")
    p.add_argument("--check-size", type=int, default=None,
                   help="checks on a fixed subset of this many training points (default: the iteration's batch, the paper's)")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--diagnose-every", type=int, default=0, help="test-set accuracies under several solvers every N iterations")
    p.add_argument("--fine-every", type=int, default=1000)
    p.add_argument("--fine-steps", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("runs/adaptation_benchmark"))
    a = p.parse_args()
    if a.summarize:
        write_summary(a.summarize, a.csv)
        return
    torch.set_num_threads(a.threads)
    config = TrainConfig(dataset=a.dataset, solver=SolverSetting.fixed(a.train_method, 1), seed=a.seed,
                         iterations=a.iterations, lr=a.lr, report_every=100, test_every=a.test_every)
    data = config.load_data()
    extra = {} if a.check_size is None else {"check_size": a.check_size}
    config, controller = StepAdaptation.for_training(config, data, rtol=a.init_rtol, atol=a.init_atol,
                                                     test_method=a.test_method, threshold=a.threshold, **extra)
    print(f"starting step {controller.h:.4g}: {controller.setting.label()}", flush=True)
    diagnosed = Diagnosed(controller, data, a.diagnose_every, a.fine_every, a.fine_steps)

    def report(progress, _state):
        test = "" if progress.test_accuracy is None else f" test acc {progress.test_accuracy:.3f}"
        print(f"it {progress.iteration}: steps {progress.steps}, total NFE {progress.total_nfe}, "
              f"check NFE {progress.check_nfe}, {progress.elapsed:.0f} s{test}", flush=True)

    result = train(config, on_report=report, controller=diagnosed, data=data)
    trial = f"{a.dataset}-{a.train_method}-{a.test_method}-seed{a.seed}"
    row = summary_row(result, controller, "benchmark", trial)
    a.out.mkdir(parents=True, exist_ok=True)
    write_csv(a.out / "adaptation.csv", SUMMARY_COLUMNS, [row])
    write_csv(a.out / "adaptation_history.csv", HISTORY_COLUMNS, history_rows(result, controller, trial))
    if a.diagnose_every:
        write_csv(a.out / "diagnosis.csv", DIAGNOSIS_COLUMNS, diagnosed.rows)
    if result.diverged is None:
        model = result.model
        final = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                 "nfe_per_iteration": row["nfe_per_iteration"], "check_nfe": row["check_nfe"],
                 "final": solver_accuracies(model, data, result.setting, controller.test_method, a.fine_steps),
                 "last_trained": None, "last_check": controller.history[-1].to_dict() if controller.history else None}
        if diagnosed.last_trained is not None and diagnosed.last_trained != result.setting:
            final["last_trained"] = solver_accuracies(model, data, diagnosed.last_trained, controller.test_method, None)
        (a.out / "final.json").write_text(json.dumps(final, indent=1))
        f = final["final"]
        print(f"final ({f['trained_steps']} steps): euler {f['train_solver']:.4f} {controller.test_method}@{f['test_steps']} "
              f"{f['test_solver']:.4f} rk4 {f['rk4_same_steps']:.4f} rk4@{a.fine_steps} {f['rk4_fine']:.4f}", flush=True)
    print(f"test accuracy {row['test_accuracy']:.4f}, NFE per iteration {row['nfe_per_iteration']:.1f} "
          f"(checks {row['check_nfe']}), wall time {row['wall_time']:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
