"""Ray Tune callbacks of the experiments: TensorBoard runs with hparams, progress.csv, and progress lines.

:class:`TensorBoardCallback` replaces Ray's TensorBoardX logger: one TensorBoard run per
trial directory (a seed-group trial, config ``{"trial": [...]}``, gets one run per seed in
``<trial dir>/seed<N>/``), scalars under ``ray/tune/`` with training iterations
(``timesteps_total``) on the x axis, and hparams from the trial's solver setting, so
TensorBoard's HParams tab compares trials by dataset, method, steps or tolerance,
gradient and seed. :class:`ProgressCSVCallback` replaces Ray's ``progress.csv`` logger.

Both write straight into the trial's directory in the experiment's storage, each
line on disk before the driver goes on, and write every iteration once: a resumed
trial that reports an iteration again (it restarts from its last registered
checkpoint; a finished trial is re-reported once) adds nothing for it. Ray's own
loggers write into a driver staging folder that reaches storage only at Ray's next
sync, through an asynchronous TensorBoard writer, so a killed driver lost the last
step of each running trial, and a re-reported trial got a ``progress.csv`` row wider
than its header. :class:`ProgressCallback` prints one line per finished seed (trial
or group member) and a status line every ``every`` seconds.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import time
from pathlib import Path

from ray.tune import Callback
from ray.tune.logger import CSVLoggerCallback, TBXLoggerCallback

from .trainable import is_group, trial_seeds

__all__ = ["TensorBoardCallback", "ProgressCSVCallback", "ProgressCallback", "EventFile", "trial_label", "group_label",
           "HPARAM_KEYS", "trial_storage_dir"]

HPARAM_KEYS = ("dataset", "method", "steps", "tol", "gradient", "seed", "lr", "iterations", "mode", "test_method", "k", "threshold")
HPARAM_METRICS = ("test_accuracy", "train_accuracy", "nfe_per_iteration", "cross_solver_min_accuracy", "adaptation_nfe_per_iteration")
# Ray's bookkeeping keys that are no curve of the training.
_NOT_SCALARS = {"config", "pid", "timestamp", "time_total_s", "training_iteration", "seeds", "date", "hostname", "node_ip",
                "trial_id", "experiment_tag", "done"}
PROGRESS_CSV = "progress.csv"


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


def trial_storage_dir(trial) -> Path:
    """The trial's directory in the experiment's storage (where its checkpoints are), when that
    storage is a local or mounted file system; otherwise Ray's driver staging folder."""
    storage = getattr(trial, "storage", None)
    filesystem = getattr(storage, "storage_filesystem", None)
    if filesystem is not None and getattr(filesystem, "type_name", "") == "local":
        return Path(trial.path)
    trial.init_local_path()
    return Path(trial.local_path)


def _scalars(metrics: dict) -> dict[str, float]:
    """The finite real numbers of a result, flattened with ``/``, under ``ray/tune/``."""
    return {f"ray/tune/{key}": float(value) for key, value in _flatten(metrics, skip=_NOT_SCALARS).items()
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)}


def _step(result: dict, fallback: dict | None = None) -> int | None:
    for source in (result, fallback or {}):
        for key in ("timesteps_total", "training_iteration"):
            if source.get(key) is not None:
                return int(source[key])
    return None


class EventFile:
    """One TensorBoard run, written synchronously into ``logdir``.

    Every write is flushed and fsynced before it returns (tensorboardX's SummaryWriter
    hands events to a writer thread, and its ``flush`` does not wait for that queue).
    Opening a run that already holds event files (a resumed trial) reads the last step
    logged there: a later step at or below it is skipped, and hparams are written once.
    """

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.last_step, self.has_hparams = self._scan(self.logdir)
        self._writer = None  # opened on the first write: a run with nothing new gets no empty file

    @staticmethod
    def _scan(logdir: Path) -> tuple[int | None, bool]:
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        last, hparams = None, False
        for path in sorted(logdir.glob("events.out.tfevents.*")):
            try:
                for event in EventFileLoader(str(path)).Load():
                    if not event.HasField("summary"):
                        continue
                    for value in event.summary.value:
                        if value.metadata.plugin_data.plugin_name == "hparams":
                            hparams = True
                        elif value.tag.startswith("ray/tune/"):
                            last = event.step if last is None else max(last, event.step)
            except Exception:  # a truncated last record (killed mid-write): what was read counts
                continue
        return last, hparams

    def _write(self, event) -> None:
        if self._writer is None:
            from tensorboardX.event_file_writer import EventsWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            # The file name has whole seconds only: the nanosecond suffix keeps two writers of one
            # run apart (a new file is opened with "wb") and in the order TensorBoard reads them.
            self._writer = EventsWriter(str(self.logdir / "events"), filename_suffix=f".{time.time_ns():020d}")
        self._writer.write_event(event)
        self._writer.flush()  # flushes and fsyncs

    def add_scalars(self, scalars: dict[str, float], step: int) -> bool:
        """Log ``scalars`` at ``step``; False (nothing written) when the run already has that step."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if not scalars or (self.last_step is not None and step <= self.last_step):
            return False
        summary = Summary(value=[Summary.Value(tag=tag, simple_value=value) for tag, value in scalars.items()])
        self._write(Event(wall_time=time.time(), step=int(step), summary=summary))
        self.last_step = int(step)
        return True

    def add_hparams(self, params: dict, metrics: dict) -> None:
        """The HParams tab's record of this run (once per run)."""
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import hparams

        if self.has_hparams:
            return
        for summary in hparams(hparam_dict=params, metric_dict=metrics):
            self._write(Event(wall_time=time.time(), summary=summary))
        self.has_hparams = True

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TensorBoardCallback(TBXLoggerCallback):
    """TensorBoard runs of every trial, one per seed, with the trial's solver setting as hparams.

    A subclass of Ray's TensorBoardX logger so that Ray does not add its own; it shares none
    of its writing (see the module's docstring).
    """

    def __init__(self):
        super().__init__()
        self._runs: dict = {}  # trial -> {seed or None: EventFile}
        self._last: dict = {}  # trial -> {seed or None: last logged scalars}

    def __getstate__(self):  # pickled into the Tuner's state: open files stay behind
        return {**self.__dict__, "_runs": {}, "_last": {}, "_trial_writer": {}, "_trial_result": {}}

    def _open(self, trial) -> None:
        for run in self._runs.pop(trial, {}).values():
            run.close()
        directory = trial_storage_dir(trial)
        if is_group(trial.config):
            self._runs[trial] = {c["seed"]: EventFile(directory / f"seed{c['seed']}") for c in trial_seeds(trial.config)}
        else:
            self._runs[trial] = {None: EventFile(directory)}
        self._last[trial] = {}

    def log_trial_start(self, trial) -> None:
        self._open(trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        if trial not in self._runs:
            self._open(trial)
        for seed, run in self._runs[trial].items():
            metrics = result if seed is None else result.get("seeds", {}).get(str(seed))
            if not metrics:
                continue
            step = _step(metrics, result)
            scalars = _scalars(metrics)
            if step is not None and run.add_scalars(scalars, step):
                self._last[trial][seed] = scalars

    def log_trial_end(self, trial, failed: bool = False) -> None:
        runs = self._runs.pop(trial, {})
        last = self._last.pop(trial, {})
        configs = {c["seed"]: c for c in trial_seeds(trial.config)} if is_group(trial.config) else {None: trial.config.get("trial", {})}
        for seed, run in runs.items():
            if last.get(seed):
                config = configs.get(seed, {})
                params = {k: config[k] for k in HPARAM_KEYS if config.get(k) is not None}
                metrics = {f"ray/tune/{k}": last[seed][f"ray/tune/{k}"] for k in HPARAM_METRICS if f"ray/tune/{k}" in last[seed]}
                run.add_hparams(params, metrics)
            run.close()


class ProgressCSVCallback(CSVLoggerCallback):
    """``progress.csv`` of every trial: one row per reported iteration, each iteration once.

    Columns are those of the trial's first report (flattened with ``/``); a resumed trial
    appends under the header already in the file, and a later report's extra keys are left
    out of the CSV (``result.json`` keeps every key).
    """

    def __init__(self):
        super().__init__()
        self._files: dict = {}  # trial -> (file, columns or None, last iteration written)

    def __getstate__(self):
        return {**self.__dict__, "_files": {}, "_trial_files": {}, "_trial_csv": {}, "_trial_continue": {}}

    def _open(self, trial):
        path = trial_storage_dir(trial) / PROGRESS_CSV
        path.parent.mkdir(parents=True, exist_ok=True)
        columns, last = None, None
        if path.is_file() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                rows = list(csv.reader(f))
            columns = rows[0] if rows else None
            if columns and "timesteps_total" in columns:
                at = columns.index("timesteps_total")
                steps = [int(float(r[at])) for r in rows[1:] if len(r) == len(columns) and r[at] not in ("", "nan")]
                last = max(steps) if steps else None
        handle = path.open("a", newline="")
        self._files[trial] = [handle, columns, last]
        return self._files[trial]

    def log_trial_start(self, trial) -> None:
        if trial in self._files:
            self._files.pop(trial)[0].close()
        self._open(trial)

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        entry = self._files.get(trial) or self._open(trial)
        handle, columns, last = entry
        row = _flatten(result)
        step = _step(result)
        if step is not None and last is not None and step <= last:
            return
        if columns is None:
            columns = entry[1] = list(row)
            csv.writer(handle).writerow(columns)
        csv.DictWriter(handle, columns, extrasaction="ignore").writerow(row)
        handle.flush()
        os.fsync(handle.fileno())
        entry[2] = step

    def log_trial_end(self, trial, failed: bool = False) -> None:
        if trial in self._files:
            self._files.pop(trial)[0].close()


def _flatten(result: dict, prefix: str = "", skip=frozenset({"config"})) -> dict:
    """A result's values by ``/``-joined key path; keys in ``skip`` are left out at every depth."""
    out = {}
    for key, value in result.items():
        if key in skip:
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/", skip))
        else:
            out[f"{prefix}{key}"] = value
    return out


class ProgressCallback(Callback):
    """Concise progress on stdout: a line per finished seed or failed trial, a status line every ``every`` s.

    ``total`` counts seeds (a seed-group trial finishes several at once); 0 when unknown (a search).
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
            of = f"/{self.total}" if self.total else ""  # a search does not know its total beforehand
            self.out(f"[{self._elapsed()}] done {done}{of}  {trial_label(config)}{numbers}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.out(f"[{self._elapsed()}] FAILED {group_label(trial_seeds(trial.config))} (trial {trial.trial_id}); "
                 f"see {trial_storage_dir(trial) / 'error.txt'}", flush=True)

    def on_step_end(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self.last_status < self.every:
            return
        self.last_status = now
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + len(trial_seeds(t.config))
        running = [
            f"{group_label(trial_seeds(t.config))} it {self.latest.get(t.trial_id, {}).get('iteration', 0)}"
            f"/{trial_seeds(t.config)[0]['iterations']}"
            for t in trials if t.status == "RUNNING"
        ]
        status = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        of = f" of {self.total}" if self.total else ""
        self.out(f"[{self._elapsed()}] {status}{of} seeds" + (f"; running: {'; '.join(running)}" if running else ""), flush=True)
