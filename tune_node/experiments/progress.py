"""Progress of an experiment on the console: a live bar with ETA on a terminal, plain lines elsewhere.

:class:`ProgressCallback` is the Ray Tune callback that :func:`~tune_node.experiments.experiment.fit`
adds to every experiment. Whatever the output, each finished seed (a trial, or a member of a
seed group) gets one ``done i/n`` line with its accuracies and NFE, and each failed Ray trial
one ``FAILED`` line naming its ``error.txt``. Where standard error is a terminal, a tqdm bar
below those lines shows the share of the training done, elapsed time and the time left;
elsewhere (a log file, a pipe, a notebook's captured output) a status line every ``every``
seconds says the same in plain text, so a log holds no carriage returns or escape codes.

The share of the work counts training iterations, each weighted by an estimate of its cost
(:func:`iteration_cost`): an iteration at 64 Euler steps costs about 64 at one step, and the
grid starts its longest trials first, so counting trials or plain iterations would make
the time left swing by a factor of several.
"""

from __future__ import annotations

import os
import sys
import time

from ray.tune import Callback

__all__ = ["ProgressCallback", "iteration_cost", "planned_seeds"]

# A solver evaluation's share of one iteration's cost, against the batch, loss and optimizer
# work every iteration does whatever the solver: one evaluation's worth (measured on Sphere2).
_OVERHEAD = 1.0


def planned_seeds(plan) -> list[dict]:
    """The per-seed trial configs of a plan: Ray ``trial`` values, each one seed's dict or a seed group's list."""
    seeds = []
    for entry in plan or ():
        seeds += list(entry) if isinstance(entry, list) else [entry]
    return seeds


def iteration_cost(seed_config: dict) -> float | None:
    """Estimated cost of one training iteration of a seed, in solver evaluations (plus overhead):
    ``steps x stages`` for a fixed-step grid setting; None where it is not known beforehand
    (an adaptive solver, an adaptation trial, an unknown method)."""
    from ..ode.solvers import METHODS

    c = seed_config
    if c.get("mode") is not None or c.get("tol") is not None or c.get("steps") is None or c.get("method") not in METHODS:
        return None
    return float(c["steps"]) * METHODS[c["method"]].stages_per_step + _OVERHEAD


def _labels():
    # Imported on use: tune_callbacks re-exports this module's callback, so a module-level
    # import of it here would be circular.
    from . import tune_callbacks

    return tune_callbacks


def _seeds_of(trial) -> list[dict]:
    from .trainable import trial_seeds

    return trial_seeds(trial.config)


def _format_duration(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))


class ProgressCallback(Callback):
    """Concise progress: a line per finished seed or failed trial, and a live bar (terminal) or a
    status line every ``every`` seconds (elsewhere).

    Arguments:
        total: seeds the ``done i/n`` lines count to (a seed-group trial finishes several at
            once); 0 when unknown beforehand (a search).
        every: seconds between two plain status lines.
        out: ``out(text, flush=True)`` writes one line (default: print to standard output).
        plan: the Ray trial configs' ``trial`` values (:func:`planned_seeds`); with it the bar
            and the status lines show the share of the work done and the time left.
        tty: show the bar (True) or plain status lines (False); default: whether ``file`` (standard
            error when None) is a terminal when the experiment starts.
        file: where the bar is drawn (default: standard error).
    """

    def __init__(self, total: int, every: float = 30.0, out=print, *, plan: list | None = None, tty: bool | None = None,
                 file=None):
        self.total, self.every, self.out = total, every, out
        self.plan, self.tty, self.file = plan, tty, file
        self._reset()

    def _reset(self) -> None:
        self.start = self.last_status = time.monotonic()
        self.latest: dict[str, dict] = {}
        self._bar = None
        self._use_bar = None
        self._done_iterations: dict[str, int] = {}  # trial id -> iterations trained, as last reported
        self._work_total, self._costs = self._planned_work()
        self._initial = None  # work done before this run started (a resumed experiment); None: not yet seen
        self._dropped = 0.0  # planned work of trials that failed for good
        self._status_shown = False
        self._rate_start = self.start
        self._last_refresh = 0.0

    def __getstate__(self):
        # Ray pickles its callbacks into the experiment's state; a bar (open stream, lock) stays behind.
        return {k: v for k, v in self.__dict__.items() if k not in ("_bar", "file")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.file, self._bar = None, None

    def setup(self, **info):
        # A restored experiment unpickles this callback (perhaps from an older version of it): start afresh.
        for name, default in (("plan", None), ("tty", None), ("file", None)):
            if not hasattr(self, name):
                setattr(self, name, default)
        self._reset()

    # -- the work model ----------------------------------------------------------------------------------------------

    def _planned_work(self) -> tuple[float | None, dict]:
        seeds = planned_seeds(getattr(self, "plan", None))
        if not seeds:
            return None, {}
        costs = [iteration_cost(c) for c in seeds]
        # One unknown cost (adaptive, adaptation) makes them all unknown: iterations then weigh alike.
        uniform = any(c is None for c in costs)
        by_setting = {self._setting_key(c): (1.0 if uniform else cost) for c, cost in zip(seeds, costs)}
        return sum(by_setting[self._setting_key(c)] * int(c.get("iterations", 1)) for c in seeds), by_setting

    @staticmethod
    def _setting_key(seed_config: dict) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in seed_config.items() if k != "seed"))

    def _cost(self, seed_config: dict) -> float:
        return self._costs.get(self._setting_key(seed_config), 1.0) if self._costs else 1.0

    def _trial_work(self, trial, iterations: int | None = None) -> float:
        """Work of ``trial``'s seeds after ``iterations`` iterations each (default: all of them)."""
        return sum(self._cost(c) * (c.get("iterations", 0) if iterations is None else min(iterations, c.get("iterations", 0)))
                   for c in _seeds_of(trial))

    def _work_done(self, trials) -> float:
        work = 0.0
        for t in trials:
            if t.status == "TERMINATED":
                work += self._trial_work(t)
            else:
                iteration = self._done_iterations.get(t.trial_id)
                if iteration is None:
                    iteration = (t.last_result or {}).get("iteration", 0) or 0
                work += self._trial_work(t, int(iteration))
        return work

    def _seconds_left(self, work: float) -> float | None:
        """Time left at the average rate of this run so far (None: no rate yet, or no plan)."""
        if self._work_total is None or self._initial is None:
            return None
        elapsed, gained = time.monotonic() - self._rate_start, work - self._initial
        if gained <= 0 or elapsed <= 0:
            return None
        return max(0.0, self._work_total - self._dropped - work) * elapsed / gained

    # -- output ------------------------------------------------------------------------------------------------------

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.start:7.1f}s"

    def _wants_bar(self) -> bool:
        if self._use_bar is None:
            if self.tty is not None:
                self._use_bar = bool(self.tty)
            else:
                stream = self.file if self.file is not None else sys.stderr
                try:
                    # tqdm draws nothing on a terminal that reports no size (a pty nobody sized).
                    size = os.get_terminal_size(stream.fileno()) if stream.isatty() else None
                    self._use_bar = size is not None and size.columns >= 40 and size.lines >= 2
                except (AttributeError, ValueError, OSError):  # no isatty or fileno, a closed stream
                    self._use_bar = False
        return self._use_bar

    def _line(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stdout):  # the bar steps aside for the line, then redraws
                self.out(text, flush=True)
        else:
            self.out(text, flush=True)

    def _open_bar(self) -> None:
        from tqdm import tqdm

        stream = self.file if self.file is not None else sys.stderr
        if self._work_total is not None:
            self._bar = tqdm(total=self._work_total, initial=self._initial or 0.0, file=stream, desc="training",
                             bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, {remaining} left{postfix}",
                             smoothing=0, dynamic_ncols=True, leave=True)
        else:  # a search: no plan, so no share of the work; seeds finished and time elapsed
            self._bar = tqdm(total=self.total or None, file=stream, desc="training", unit=" seeds finished",
                             bar_format="{desc}: {n_fmt} seeds finished [{elapsed}{postfix}]", dynamic_ncols=True, leave=True)

    def _counts(self, trials) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + len(_seeds_of(t))
        return counts

    def _update_bar(self, trials) -> None:
        counts = self._counts(trials)
        finished = counts.get("TERMINATED", 0)
        parts = [f"{finished}{f'/{self.total}' if self.total else ''} seeds finished", f"{counts.get('RUNNING', 0)} running"]
        if counts.get("ERROR"):
            parts.append(f"{counts['ERROR']} failed")
        self._bar.set_postfix_str(", ".join(parts), refresh=False)
        if self._work_total is not None:
            self._bar.total = self._work_total - self._dropped
        gained = (self._work_done(trials) if self._work_total is not None else finished) - self._bar.n
        if gained:
            self._bar.update(gained)  # redraws at most every tqdm mininterval
        now = time.monotonic()
        if now - self._last_refresh >= 1.0:  # elapsed and time left tick on between two reports
            self._last_refresh = now
            self._bar.refresh()

    def _status_line(self, trials) -> None:
        counts = self._counts(trials)
        running = [
            f"{_labels().group_label(_seeds_of(t))} it {self.latest.get(t.trial_id, {}).get('iteration', 0)}"
            f"/{_seeds_of(t)[0]['iterations']}"
            for t in trials if t.status == "RUNNING"
        ]
        status = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        of = f" of {self.total}" if self.total else ""
        eta = ""
        if self._work_total is not None:
            work = self._work_done(trials)
            share = work / max(self._work_total - self._dropped, 1e-12)
            left = self._seconds_left(work)
            eta = f"; {100 * share:.0f}% of the work" + (f", about {_format_duration(left)} left" if left is not None else "")
        self._line(f"[{self._elapsed()}] {status}{of} seeds{eta}" + (f"; running: {'; '.join(running)}" if running else ""))

    # -- Ray Tune's hooks --------------------------------------------------------------------------------------------

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self.latest[trial.trial_id] = result
        if result.get("iteration") is not None:
            self._done_iterations[trial.trial_id] = int(result["iteration"])

    def on_trial_complete(self, iteration, trials, trial, **info):
        labels = _labels()
        seeds = _seeds_of(trial)
        # This trial's status becomes TERMINATED only after the callbacks ran.
        done = sum(len(_seeds_of(t)) for t in trials if t is not trial and t.status == "TERMINATED")
        result = self.latest.get(trial.trial_id) or trial.last_result or {}
        self._done_iterations[trial.trial_id] = max(int(c.get("iterations", 0)) for c in seeds)
        group = isinstance(trial.config.get("trial"), list)
        for config in seeds:
            r = result.get("seeds", {}).get(str(config["seed"]), {}) if group else result
            done += 1
            numbers = ""
            if "test_accuracy" in r:
                numbers = (f": test acc {r['test_accuracy']:.3f}, train acc {r.get('train_accuracy', float('nan')):.3f}, "
                           f"lowest acc under other test solvers {r.get('cross_solver_min_accuracy', float('nan')):.3f}, "
                           + self._nfe_text(config, r))
            of = f"/{self.total}" if self.total else ""  # a search does not know its total beforehand
            self._line(f"[{self._elapsed()}] done {done}{of}  {labels.trial_label(config)}{numbers}")

    @staticmethod
    def _nfe_text(config: dict, r: dict) -> str:
        if config.get("mode") is not None:
            from ..results.adaptation import NFE_LABEL

            # An adaptation seed: the number (and name) of its summary and table, the paper's Table 1 NFE.
            return f"{NFE_LABEL} {r.get('adaptation_nfe_per_iteration', float('nan')):.1f} (training forward + checks)"
        return f"NFE/iter {r.get('nfe_per_iteration', float('nan')):.1f}"

    def on_trial_error(self, iteration, trials, trial, **info):
        labels = _labels()
        if self._work_total is not None:
            self._dropped += self._trial_work(trial) - self._trial_work(trial, self._done_iterations.get(trial.trial_id, 0))
        self._line(f"[{self._elapsed()}] FAILED {labels.group_label(_seeds_of(trial))} (trial {trial.trial_id}); "
                   f"see {labels.trial_storage_dir(trial) / 'error.txt'}")

    def on_step_end(self, iteration, trials, **info):
        if self._initial is None and trials:
            # The first step sees the trials a resumed experiment brings: their work is not this run's rate.
            self._initial = self._work_done(trials) if self._work_total is not None else 0.0
            self._rate_start = time.monotonic()
        if self._wants_bar():
            if self._bar is None:
                self._open_bar()
            self._update_bar(trials)
            return
        now = time.monotonic()
        first = not self._status_shown and any(t.status == "RUNNING" for t in trials)
        if not first and now - self.last_status < self.every:
            return
        self._status_shown = True
        self.last_status = now
        self._status_line(trials)

    def on_experiment_end(self, trials, **info):
        if self._bar is not None:
            self._update_bar(trials)
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Close the bar, if one is drawn (the experiment's end does; an interrupted driver may not get there)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
