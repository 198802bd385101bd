"""Ray Tune callbacks of the grid experiment: TensorBoard runs with hparams, and progress lines.

:class:`TensorBoardCallback` is Ray's TensorBoardX logger (one event file per
trial directory, scalars under ``ray/tune/``, x axis = training iterations via
``timesteps_total``) with the hparams replaced by the trial's solver setting, so
TensorBoard's HParams tab compares trials by dataset, method, steps or tolerance,
gradient and seed. :class:`ProgressCallback` prints one line per finished trial
and a status line every ``every`` seconds.
"""

from __future__ import annotations

import time

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

__all__ = ["TensorBoardCallback", "ProgressCallback", "trial_label", "HPARAM_KEYS"]

HPARAM_KEYS = ("dataset", "method", "steps", "tol", "gradient", "seed", "lr", "iterations", "mode", "test_method", "k", "threshold")
HPARAM_METRICS = ("test_accuracy", "train_accuracy", "nfe_per_iteration", "cross_solver_min_accuracy", "adaptation_nfe_per_iteration")


def trial_label(trial_config: dict) -> str:
    """``euler(steps=4) seed 0``-style name of one trial config; ``euler/midpoint step adaptation seed 0`` for adaptation."""
    c = trial_config
    if c.get("mode") is not None:  # an adaptation trial (tune_node.adapt)
        return f"{c['method']}/{c['test_method']} {c['mode']} adaptation seed {c['seed']}"
    setting = f"tol={c['tol']:g}" if c.get("tol") is not None else f"steps={c['steps']}"
    gradient = "" if c.get("gradient", "backprop") == "backprop" else f", {c['gradient']}"
    return f"{c['method']}({setting}{gradient}) seed {c['seed']}"


class TensorBoardCallback(TBXLoggerCallback):
    """Ray's TensorBoardX logger with the trial's solver setting as hparams."""

    def _try_log_hparams(self, trial, result: dict) -> None:
        from tensorboardX.summary import hparams

        config = trial.config.get("trial", {})
        params = {k: config[k] for k in HPARAM_KEYS if config.get(k) is not None}
        metrics = {f"ray/tune/{k}": result[f"ray/tune/{k}"] for k in HPARAM_METRICS if f"ray/tune/{k}" in result}
        writer = self._trial_writer[trial]
        for summary in hparams(hparam_dict=params, metric_dict=metrics):
            writer.file_writer.add_summary(summary)


class ProgressCallback(Callback):
    """Concise progress on stdout: a line per finished or failed trial, a status line every ``every`` s."""

    def __init__(self, total: int, every: float = 30.0, out=print):
        self.total, self.every, self.out = total, every, out
        self.start = time.monotonic()
        self.last_status = self.start
        self.latest: dict[str, dict] = {}

    def setup(self, **info):
        # A restored experiment unpickles this callback: restart the clock.
        self.start = self.last_status = time.monotonic()

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.start:7.1f}s"

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.latest[trial.trial_id] = result

    def on_trial_complete(self, iteration, trials, trial, **info):
        # This trial's status becomes TERMINATED only after the callbacks ran.
        done = sum(t.status == "TERMINATED" for t in trials if t is not trial) + 1
        r = self.latest.get(trial.trial_id) or trial.last_result or {}
        numbers = ""
        if "test_accuracy" in r:
            numbers = (f": test acc {r['test_accuracy']:.3f}, train acc {r.get('train_accuracy', float('nan')):.3f}, "
                       f"lowest acc under other test solvers {r.get('cross_solver_min_accuracy', float('nan')):.3f}, "
                       f"NFE/iter {r.get('nfe_per_iteration', float('nan')):.1f}")
        self.out(f"[{self._elapsed()}] done {done}/{self.total}  {trial_label(trial.config['trial'])}{numbers}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.out(f"[{self._elapsed()}] FAILED {trial_label(trial.config['trial'])} (trial {trial.trial_id}); "
                 f"see {trial.local_path}/error.txt", flush=True)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last_status < self.every:
            return
        self.last_status = now
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        running = [
            f"{trial_label(t.config['trial'])} it {self.latest.get(t.trial_id, {}).get('iteration', 0)}/{t.config['trial']['iterations']}"
            for t in trials if t.status == "RUNNING"
        ]
        status = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        self.out(f"[{self._elapsed()}] {status} of {self.total}" + (f"; running: {'; '.join(running)}" if running else ""), flush=True)
