"""A small but real grid-results directory, made with the core library.

Trains a few tiny Sphere2 models, evaluates each with the paper's cross-solver test
matrix and writes ``results.csv`` in the grid's schema (one row per trial and test
setting) with every trial's final checkpoint; optionally an adaptation history
written by a real (minimal) step-halving controller. Shared by the figure and
notebook tests; nothing in it is a hard-coded result.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from tune_node.datasets import load_dataset
from tune_node.evaluation import accuracy
from tune_node.solvers import SolverSetting, test_solver_for
from tune_node.training import TrainConfig, save_checkpoint, train

RESULT_COLUMNS = [
    "experiment", "trial_id", "dataset", "train_method", "train_steps", "train_tol", "gradient", "seed",
    "iterations", "lr", "train_accuracy", "test_accuracy", "nfe_per_iteration", "nfe_forward_per_iteration",
    "total_nfe_forward", "total_nfe_backward", "wall_time", "checkpoint", "test_method", "test_steps",
    "test_tol", "factor", "accuracy", "nfe", "is_train_solver",
]
DEFAULT_SETTINGS = (
    SolverSetting.fixed("euler", 1), SolverSetting.fixed("euler", 2), SolverSetting.fixed("euler", 4),
    SolverSetting.fixed("rk4", 1), SolverSetting.fixed("rk4", 2),
    SolverSetting.adaptive("fehlberg2", 1e-2), SolverSetting.adaptive("fehlberg2", 1e-3),
)


def make_results(root: Path, settings=DEFAULT_SETTINGS, seeds=(0, 1), iterations: int = 40, lr: float = 3e-3) -> Path:
    """Train ``settings x seeds`` on Sphere2 and write ``root/results.csv``; returns its path."""
    torch.set_num_threads(1)
    root = Path(root)
    rows = []
    data = {seed: load_dataset("sphere2", seed) for seed in seeds}
    for setting in settings:
        for seed in seeds:
            trial_id = f"{setting.method}_{setting.steps or setting.tol:g}_s{seed}"
            config = TrainConfig(dataset="sphere2", solver=setting, seed=seed, iterations=iterations, lr=lr, report_every=iterations)
            states = {}
            result = train(config, on_report=lambda p, s: states.update(final=s()), data=data[seed])
            checkpoint = save_checkpoint(root / "trials" / trial_id / "checkpoint.pt", states["final"])
            trial = {
                "experiment": "fixture", "trial_id": trial_id, "dataset": "sphere2", "train_method": setting.method,
                "train_steps": setting.steps, "train_tol": setting.tol, "gradient": setting.gradient, "seed": seed,
                "iterations": iterations, "lr": lr, "train_accuracy": result.train_accuracy,
                "test_accuracy": result.test_accuracy, "nfe_per_iteration": result.nfe_per_iteration,
                "nfe_forward_per_iteration": result.forward_nfe_per_iteration,
                "total_nfe_forward": result.total_nfe_forward, "total_nfe_backward": result.total_nfe_backward,
                "wall_time": result.wall_time, "checkpoint": str(checkpoint),
            }
            for test in result.cross_solver_table(data[seed]):
                rows.append({**trial, **test})
    path = root / "results.csv"
    pd.DataFrame(rows, columns=RESULT_COLUMNS).to_csv(path, index=False)
    return path


class HalvingController:
    """A minimal step controller for the fixture: every ``every`` iterations compare the
    batch accuracy under the train solver with the factor-50 test solver; halve h on
    disagreement > 0.1, else propose 1.1 h and keep it if the test solver agrees.
    Records one history row per check (``accepted``: the setting moved to ``proposed``;
    a halving always does)."""

    def __init__(self, trial_id: str, seed: int, every: int = 10):
        self.trial_id, self.seed, self.every = trial_id, seed, every
        self.rows: list[dict] = []

    def update(self, iteration, model, x, y, logits, setting):
        if iteration % self.every:
            return setting, 0
        test = test_solver_for(setting)
        acc_train, nfe_a = accuracy(model, x, y, setting, len(y))
        acc_test, nfe_b = accuracy(model, x, y, test, len(y))
        spent = nfe_a + nfe_b
        if abs(acc_train - acc_test) > 0.1:
            new = proposed = SolverSetting.from_step_size(setting.method, setting.step_size / 2)
            accepted = True
        else:
            proposed = SolverSetting.from_step_size(setting.method, min(setting.T, setting.step_size * 1.1))
            acc_new, nfe_c = accuracy(model, x, y, proposed, len(y))
            spent += nfe_c
            accepted = abs(acc_new - acc_test) <= 0.1
            new = proposed if accepted else setting
        self.rows.append({
            "trial_id": self.trial_id, "seed": self.seed, "iteration": iteration, "step_size": new.step_size,
            "tol": None, "steps": new.steps, "train_solver_accuracy": acc_train, "test_solver_accuracy": acc_test,
            "proposed": proposed.step_size, "accepted": accepted, "check_nfe": spent,
            "test_accuracy": None,
        })
        return new, spent

    def state_dict(self):
        return {"rows": list(self.rows)}

    def load_state_dict(self, state):
        self.rows = list(state["rows"])


def make_adaptation(root: Path, seeds=(0, 1), iterations: int = 60, every: int = 10, lr: float = 3e-3) -> Path:
    """Run the minimal controller on Sphere2 (Euler from h = 1/2) for ``seeds``; writes
    ``root/adaptation_history.csv`` (test accuracy filled in at each check) and
    ``root/adaptation.csv`` (one row per seed). Returns the history's path."""
    torch.set_num_threads(1)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    history, summary = [], []
    for seed in seeds:
        data = load_dataset("sphere2", seed)
        controller = HalvingController(f"adapt_s{seed}", seed, every)
        config = TrainConfig(dataset="sphere2", solver=SolverSetting.fixed("euler", 2), seed=seed, iterations=iterations, lr=lr,
                             report_every=every, test_every=every)
        tests = {}
        result = train(config, controller=controller, data=data, on_report=lambda p, s: tests.update({p.iteration: p.test_accuracy}))
        for row in controller.rows:
            row["test_accuracy"] = tests.get(row["iteration"])
        history += controller.rows
        summary.append({
            "experiment": "fixture", "trial_id": controller.trial_id, "dataset": "sphere2", "mode": "step",
            "train_method": "euler", "test_method": test_solver_for(result.setting).method, "gradient": "backprop",
            "seed": seed, "iterations": iterations, "test_accuracy": result.test_accuracy,
            "nfe_per_iteration": result.forward_nfe_per_iteration, "train_nfe_forward": result.total_nfe_forward,
            "train_nfe_backward": result.total_nfe_backward, "check_nfe": result.check_nfe,
            "total_nfe": result.total_nfe_forward + result.total_nfe_backward + result.check_nfe,
            "wall_time": result.wall_time, "final_steps": result.setting.steps, "final_tol": None,
        })
    pd.DataFrame(summary).to_csv(root / "adaptation.csv", index=False)
    path = root / "adaptation_history.csv"
    pd.DataFrame(history).to_csv(path, index=False)
    return path


def shared_results(tmp_path_factory) -> Path:
    """One fixture results directory per test session (grid results plus an adaptation
    history), built on first use and reused by every test module that asks."""
    root = tmp_path_factory.getbasetemp() / "grid_results_fixture"
    if not (root / "adaptation_history.csv").is_file():
        make_results(root)
        make_adaptation(root / "adaptation")
    return root
