"""Ray Tune callbacks of the grid experiment: TensorBoard runs with hparams, and progress lines.

:class:`TensorBoardCallback` is Ray's TensorBoardX logger (one event file per
trial directory, scalars under ``ray/tune/``, x axis = training iterations via
``timesteps_total``) with the hparams replaced by the trial's solver setting, so
TensorBoard's HParams tab compares trials by dataset, method, steps or tolerance,
gradient and seed. A seed-group trial (config ``{"trial": [...]}``) gets one run per
seed instead, in ``<trial dir>/seed<N>/``, with the same tags as a one-seed trial.
:class:`ProgressCallback` prints one line per finished seed (trial or group member)
and a status line every ``every`` seconds.
"""

from __future__ import annotations

import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback

from .trainable import is_group, trial_seeds

__all__ = ["TensorBoardCallback", "ProgressCallback", "trial_label", "group_label", "HPARAM_KEYS"]

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


def group_label(trial_configs: list[dict]) -> str:
    """``euler(steps=4) seeds 0,1,2``-style name of a seed group (one seed: :func:`trial_label`)."""
    if len(trial_configs) == 1:
        return trial_label(trial_configs[0])
    head = trial_label(trial_configs[0]).rsplit(" seed ", 1)[0]
    return f"{head} seeds {','.join(str(c['seed']) for c in trial_configs)}"


def _hparams(writer, config: dict, result: dict) -> None:
    from tensorboardX.summary import hparams

    params = {k: config[k] for k in HPARAM_KEYS if config.get(k) is not None}
    metrics = {f"ray/tune/{k}": result[f"ray/tune/{k}"] for k in HPARAM_METRICS if f"ray/tune/{k}" in result}
    for summary in hparams(hparam_dict=params, metric_dict=metrics):
        writer.file_writer.add_summary(summary)


class TensorBoardCallback(TBXLoggerCallback):
    """Ray's TensorBoardX logger with the trial's solver setting as hparams, one run per seed."""

    def __init__(self):
        super().__init__()
        self._seed_writers: dict = {}  # group trial -> {seed: SummaryWriter}
        self._seed_results: dict = {}  # group trial -> {seed: last logged scalars}

    def _try_log_hparams(self, trial, result: dict) -> None:
        _hparams(self._trial_writer[trial], trial.config.get("trial", {}), result)

    def log_trial_start(self, trial) -> None:
        if not is_group(trial.config):
            return super().log_trial_start(trial)
        for writer in self._seed_writers.pop(trial, {}).values():
            writer.close()
        trial.init_local_path()
        self._seed_writers[trial] = {c["seed"]: self._summary_writer_cls(str(Path(trial.local_path) / f"seed{c['seed']}"), flush_secs=30)
                                     for c in trial_seeds(trial.config)}
        self._seed_results[trial] = {}

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if not is_group(trial.config):
            return super().log_trial_result(iteration, trial, result)
        if trial not in self._seed_writers:
            self.log_trial_start(trial)
        for seed, writer in self._seed_writers[trial].items():
            metrics = result.get("seeds", {}).get(str(seed))
            if not metrics:
                continue
            step = metrics.get("timesteps_total", result.get("timesteps_total"))
            scalars = {f"ray/tune/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v}
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, global_step=step)
            writer.flush()
            self._seed_results[trial][seed] = scalars

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if not is_group(trial.config):
            return super().log_trial_end(trial, failed)
        writers = self._seed_writers.pop(trial, {})
        results = self._seed_results.pop(trial, {})
        for config in trial_seeds(trial.config):
            writer = writers.get(config["seed"])
            if writer is None:
                continue
            if results.get(config["seed"]):
                _hparams(writer, config, results[config["seed"]])
            writer.close()


class ProgressCallback(Callback):
    """Concise progress on stdout: a line per finished seed or failed trial, a status line every ``every`` s.

    ``total`` counts seeds (a seed-group trial finishes several at once).
    """

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
        done = sum(len(trial_seeds(t.config)) for t in trials if t is not trial and t.status == "TERMINATED")
        result = self.latest.get(trial.trial_id) or trial.last_result or {}
        for config in trial_seeds(trial.config):
            r = result.get("seeds", {}).get(str(config["seed"]), {}) if is_group(trial.config) else result
            done += 1
            numbers = ""
            if "test_accuracy" in r:
                numbers = (f": test acc {r['test_accuracy']:.3f}, train acc {r.get('train_accuracy', float('nan')):.3f}, "
                           f"lowest acc under other test solvers {r.get('cross_solver_min_accuracy', float('nan')):.3f}, "
                           f"NFE/iter {r.get('nfe_per_iteration', float('nan')):.1f}")
            self.out(f"[{self._elapsed()}] done {done}/{self.total}  {trial_label(config)}{numbers}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.out(f"[{self._elapsed()}] FAILED {group_label(trial_seeds(trial.config))} (trial {trial.trial_id}); "
                 f"see {trial.local_path}/error.txt", flush=True)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last_status < self.every:
            return
        self.last_status = now
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + len(trial_seeds(t.config))
        running = [
            f"{group_label(trial_seeds(t.config))} it {self.latest.get(t.trial_id, {}).get('iteration', 0)}/{trial_seeds(t.config)[0]['iterations']}"
            for t in trials if t.status == "RUNNING"
        ]
        status = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        self.out(f"[{self._elapsed()}] {status} of {self.total} seeds" + (f"; running: {'; '.join(running)}" if running else ""), flush=True)
