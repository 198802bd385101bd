"""What a researcher sees while an experiment runs and when it ends: progress on a terminal and
in a log, the C++ build's announcement, Ray's notices that this project's output replaces, the
labels of a partial run's summary and of a demo's, and one NFE per iteration in the adaptation."""

import io
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tune_node.experiments import experiment
from tune_node.experiments.progress import ProgressCallback, iteration_cost, planned_seeds
from tune_node.fast import native

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _seed(steps, seed, method="euler", iterations=100, **extra):
    return {"method": method, "steps": steps, "tol": None, "seed": seed, "iterations": iterations, "gradient": "backprop", **extra}


class _Trial(SimpleNamespace):
    """What the progress callback reads of a Ray trial (hashable, as Ray's)."""

    __hash__ = object.__hash__


def _trial(trial_id, config, status="PENDING", path="/tmp/none"):
    return _Trial(trial_id=trial_id, config={"trial": config}, status=status, last_result={}, path=path,
                  storage=SimpleNamespace(storage_filesystem=SimpleNamespace(type_name="local")))


def _callback(plan, total, **kwargs):
    lines = []
    callback = ProgressCallback(total, out=lambda text, flush=True: lines.append(text), plan=plan, **kwargs)
    callback.setup()
    return callback, lines


def _plan():
    group = [_seed(4, 0), _seed(4, 1)]
    return [group, _seed(1, 0)], group


def test_plain_output_is_lines_with_the_share_done_and_the_time_left():
    plan, group = _plan()
    callback, lines = _callback(plan, 3, tty=False, every=0.05)
    big, small = _trial("a", group, "RUNNING"), _trial("b", plan[1])
    trials = [big, small]
    callback.on_step_end(0, trials)
    assert len(lines) == 1 and lines[0].endswith("running: euler(steps=4) seeds 0,1 it 0/100")  # shown at once
    assert "1 pending, 2 running of 3 seeds; 0% of the work" in lines[0]
    time.sleep(0.06)
    callback.on_trial_result(0, trials, big, {"iteration": 50})
    callback.on_step_end(1, trials)
    # Work is weighted by cost, steps x stages + 1: the group's 2 x 50 iterations at 5 of 2 x 100 x 5 + 100 x 2.
    assert "42% of the work, about 00:00 left" in lines[-1]
    for line in lines:
        assert "\r" not in line and "\x1b" not in line and "done " not in line


def test_a_finished_seed_gets_a_done_line_and_a_failed_trial_its_error_file(tmp_path):
    plan, group = _plan()
    callback, lines = _callback(plan, 3, tty=False)
    big, small = _trial("a", group, "RUNNING"), _trial("b", plan[1], "RUNNING", path=str(tmp_path / "b"))
    metrics = {"test_accuracy": 0.9, "train_accuracy": 0.95, "cross_solver_min_accuracy": 0.5, "nfe_per_iteration": 8.0}
    callback.on_trial_result(0, [big, small], big, {"iteration": 100, "seeds": {"0": metrics, "1": metrics}})
    callback.on_trial_complete(0, [big, small], big)
    callback.on_trial_error(0, [big, small], small)
    assert [line.split("]", 1)[1] for line in lines[:2]] == [
        " done 1/3  euler(steps=4) seed 0: test acc 0.900, train acc 0.950, lowest acc under other test solvers 0.500, NFE/iter 8.0",
        " done 2/3  euler(steps=4) seed 1: test acc 0.900, train acc 0.950, lowest acc under other test solvers 0.500, NFE/iter 8.0"]
    assert "FAILED euler(steps=1) seed 0 (trial b)" in lines[2] and lines[2].endswith(f"see {tmp_path / 'b' / 'error.txt'}")


def test_a_terminal_gets_a_live_bar_and_no_status_lines():
    plan, group = _plan()
    bar = io.StringIO()
    callback, lines = _callback(plan, 3, tty=True, file=bar, every=0.0)
    big = _trial("a", group, "RUNNING")
    trials = [big, _trial("b", plan[1])]
    callback.on_step_end(0, trials)
    time.sleep(0.02)
    callback.on_trial_result(0, trials, big, {"iteration": 100})
    callback.on_trial_complete(0, trials, big)
    big.status = "TERMINATED"
    callback.on_step_end(1, trials)
    out, callback.out = callback.out, print
    restored = pickle.loads(pickle.dumps(callback))  # Ray pickles its callbacks mid-run: the open bar stays behind
    callback.out = out
    assert callback._bar is not None and restored._bar is None
    callback.on_experiment_end(trials)
    drawn = bar.getvalue()
    assert "training" in drawn and "83%|" in drawn and "elapsed" in drawn and " left, 2/3 seeds finished" in drawn
    assert [line.split("] ", 1)[1][:9] for line in lines] == ["done 1/3 ", "done 2/3 "]  # lines only for seeds


def test_auto_mode_draws_no_bar_where_standard_error_is_no_terminal(monkeypatch):
    plan, group = _plan()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    callback, lines = _callback(plan, 3)
    callback.on_step_end(0, [_trial("a", group, "RUNNING")])
    assert callback._bar is None and sys.stderr.getvalue() == "" and len(lines) == 1


def test_cost_weights_come_from_steps_and_stages_and_fall_back_to_iterations():
    assert iteration_cost(_seed(8, 0, method="rk4")) == 8 * 4 + 1
    assert iteration_cost({**_seed(None, 0), "tol": 1e-3, "method": "dopri5"}) is None
    assert iteration_cost(_seed(1, 0, mode="step", test_method="midpoint")) is None
    assert len(planned_seeds(_plan()[0])) == 3
    mixed = [_seed(64, 0), {**_seed(None, 1), "tol": 1e-3, "method": "dopri5"}]
    assert ProgressCallback(2, plan=mixed)._work_total == 200  # an unknown cost: every iteration weighs 1


def test_an_adaptation_seed_line_shows_the_nfe_per_iteration_of_its_summary():
    from tune_node.results.adaptation import NFE_LABEL

    config = _seed(1, 3, mode="step", test_method="midpoint")
    callback, lines = _callback([config], 1, tty=False)
    trial = _trial("t", config, "RUNNING")
    callback.on_trial_result(0, [trial], trial, {"iteration": 100, "test_accuracy": 0.8, "nfe_per_iteration": 99.0,
                                                 "adaptation_nfe_per_iteration": 12.25})
    callback.on_trial_complete(0, [trial], trial)
    assert lines[0].endswith(f"{NFE_LABEL} 12.2 (training forward + checks)") and "99.0" not in lines[0]


def test_the_adaptation_table_names_the_summary_s_nfe_per_iteration_and_its_parts():
    from tune_node.results.adaptation import NFE_LABEL, describe, per_seed_rows

    summary = pd.DataFrame([{"experiment": "a", "trial_id": "t0", "dataset": "sphere2", "mode": "step", "train_method": "euler",
                             "test_method": "midpoint", "gradient": "backprop", "seed": 0, "iterations": 10, "test_accuracy": 0.9,
                             "nfe_per_iteration": 7.0, "train_nfe_forward": 50, "train_nfe_backward": 50, "check_nfe": 20,
                             "total_nfe": 120, "wall_time": 1.0, "final_steps": 5, "final_tol": None, "status": "trained",
                             "diverged_iteration": None, "diverged_reason": None}])
    history = pd.DataFrame({"trial_id": ["t0"], "step_size": [0.2], "tol": [None]})
    (row,) = per_seed_rows(summary, history)
    assert row[NFE_LABEL] == 7.0 and row["= training fwd"] + row["+ checks"] == 7.0
    assert not any("NFE" in key for key in row if key != NFE_LABEL)  # one quantity by that name
    text = describe(summary, history)
    assert f"  {NFE_LABEL}    7.0 +- -" in text and "PARTIAL" not in text
    assert "1 seed (sphere2, 10 iterations) -- PARTIAL: 1 of 2 seeds finished:" in describe(summary, history, planned=2)


def test_partial_and_demo_labels():
    assert experiment.partial_label(22, 22) == ""
    assert experiment.partial_label(3, 22) == " -- PARTIAL: 3 of 22 seeds finished"
    note = experiment.demo_note("quick", [[_seed(4, 0, iterations=400, lr=3e-3)]])
    assert "under-trained" in note and "400 iterations at lr 0.003" in note and "--space sphere2_fixed" in note
    assert experiment.demo_note("sphere2_fixed", [_seed(4, 0, iterations=10000, lr=1e-4)]) is None


# --- the C++ build ------------------------------------------------------------------------

def _builds(monkeypatch, events, fixed_pending: bool, adaptive_pending: bool):
    from tune_node.fast import adaptive_native

    monkeypatch.setattr(native, "build_pending", lambda: fixed_pending)
    monkeypatch.setattr(native, "dense_loops", lambda: events.append("fixed") or object())
    monkeypatch.setattr(adaptive_native, "build_pending", lambda: adaptive_pending)
    monkeypatch.setattr(adaptive_native, "adaptive_loops", lambda: events.append("adaptive") or object())
    return adaptive_native


def test_the_cpp_build_is_announced_before_it_starts(monkeypatch):
    events = []
    _builds(monkeypatch, events, True, False)
    experiment.prepare_native_loops(out=lambda text, flush=True: events.append(text))
    assert events[1] == "fixed"
    assert events[0].startswith("building the C++ solver loops") and f"about {native.BUILD_SECONDS} s" in events[0]
    assert events[2].startswith("built the C++ solver loops in ")


def test_both_builds_are_announced_as_one(monkeypatch):
    events = []
    adaptive_native = _builds(monkeypatch, events, True, True)
    experiment.prepare_native_loops(out=lambda text, flush=True: events.append(text))
    assert f"about {native.BUILD_SECONDS + adaptive_native.BUILD_SECONDS} s" in events[0]
    assert events[1:3] == ["fixed", "adaptive"] and events[3].startswith("built the C++ solver loops in ")


def test_a_cached_build_is_loaded_without_a_word(monkeypatch):
    events = []
    _builds(monkeypatch, events, False, False)
    experiment.prepare_native_loops(out=lambda text, flush=True: events.append(text))
    assert events == ["fixed", "adaptive"]


def test_build_pending_reads_torch_s_extension_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_loaded", native._UNSET)  # as in a fresh process
    assert native.build_pending()
    library = tmp_path / native._EXTENSION_NAME / f"{native._EXTENSION_NAME}.so"
    library.parent.mkdir(exist_ok=True)
    library.write_bytes(b"")
    source_time = native.SOURCE.stat().st_mtime
    os.utime(library, (source_time + 10, source_time + 10))
    assert not native.build_pending()
    os.utime(library, (source_time - 10, source_time - 10))  # older than the source: rebuilt
    assert native.build_pending()
    monkeypatch.setenv("TUNE_NODE_NATIVE", "0")
    assert not native.build_pending()


# --- Ray's notices ------------------------------------------------------------------------

class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def ray_loggers():
    handlers = {}
    for name, _ in experiment.RAY_NOTICES:
        handlers[name] = _Collect()
        logging.getLogger(name).addHandler(handlers[name])
    yield {name: (logging.getLogger(name), h) for name, h in handlers.items()}
    for name, h in handlers.items():
        logging.getLogger(name).removeHandler(h)


def test_ray_notices_that_contradict_our_output_are_dropped_and_real_problems_kept(ray_loggers):
    tune, _ = ray_loggers["ray.tune.tune"]
    analysis, _ = ray_loggers["ray.tune.analysis.experiment_analysis"]
    auth, _ = ray_loggers["ray._private.authentication.authentication_token_setup"]
    unreported = ("Failed to fetch metrics for 2 trial(s):\n- t_1: FileNotFoundError('Could not fetch metrics for t_1: both "
                  "result.json and progress.csv were not found at /x')\n- t_2: FileNotFoundError('Could not fetch ...')")
    broken = "Failed to fetch metrics for 1 trial(s):\n- t_1: JSONDecodeError('Expecting value: line 1 column 1 (char 0)')"
    with experiment.ray_noise_filtered():
        tune.warning('Experiment has been interrupted, but the most recent state was saved.\nResume experiment with: '
                     'Tuner.restore(path="/x", trainable=...)')
        tune.warning("Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.")
        tune.error("Trials did not complete: [t_1]")
        analysis.warning(unreported)
        analysis.warning(broken)
        auth.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
        auth.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    tune.warning("Resume experiment with: Tuner.restore(...)")  # outside: Ray's output as it is
    assert ray_loggers["ray.tune.tune"][1].messages == ["Stop signal received (e.g. via SIGINT/Ctrl+C), ending Ray Tune run.",
                                                        "Trials did not complete: [t_1]",
                                                        "Resume experiment with: Tuner.restore(...)"]
    assert ray_loggers["ray.tune.analysis.experiment_analysis"][1].messages == [broken]
    assert ray_loggers["ray._private.authentication.authentication_token_setup"][1].messages == [
        "Token authentication is disabled for this Ray cluster. Anyone with network access ..."]


def test_an_interrupted_grid_says_partial_and_only_its_own_resume_line(tmp_path):
    """A real run, interrupted after its first finished seed: Ray's restore hint, its metrics
    complaints and its token notice do not show; the summary is labelled partial and a demo."""
    command = [sys.executable, "-m", "tune_node.grid", "--quick", "--seeds", "1", "--iterations", "20", "--cpus", "2",
               "--storage", str(tmp_path), "--name", "cut"]
    process = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    try:
        for line in process.stdout:
            seen.append(line)
            if " done 1/11 " in line:
                process.send_signal(signal.SIGINT)
                break
        out, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    text = "".join(seen) + out
    assert process.returncode == 1, text
    assert "critical step per train solver -- PARTIAL: " in text and " of 11 seeds finished" in text
    assert "under-trained" in text
    assert f"continue with: python -m tune_node.grid --storage {tmp_path} --name cut --resume" in text
    for noise in ("Tuner.restore", "Failed to fetch metrics", "Token authentication is enabled"):
        assert noise not in text, text
