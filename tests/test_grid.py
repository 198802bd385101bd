"""The grid experiment end to end through real Ray Tune (a tiny grid), its errors, and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from tune_node.evaluation import accuracy, test_matrix
from tune_node.grid import main
from tune_node.results import COLUMNS, RESULTS_CSV, collect
from tune_node.results import main as results_main
from tune_node.search_space import load_space
from tune_node.datasets import load_dataset
from tune_node.solvers import METHODS, SolverSetting
from tune_node.training import load_checkpoint, restore_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_run(ray_cluster, tmp_path_factory):
    """One real grid run of the ``tiny`` space, shared by the tests below."""
    storage = tmp_path_factory.mktemp("runs")
    import io
    from contextlib import redirect_stdout

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["--space", "tiny", "--storage", str(storage), "--name", "tiny"])
    return rc, out.getvalue(), storage / "tiny"


def trial_key(row):
    return (row["train_method"], row["train_steps"], row["seed"])


def test_tiny_grid_results_table_matches_search_space(tiny_run):
    rc, out, exp = tiny_run
    assert rc == 0, out
    table = pd.read_csv(exp / RESULTS_CSV)
    assert list(table.columns) == COLUMNS
    space = load_space("tiny")
    expected = {(t["method"], t["steps"], t["seed"]) for t in space.trials()}
    assert {trial_key(r) for _, r in table.iterrows()} == expected
    assert table["trial_id"].nunique() == len(expected)
    for trial_id, rows in table.groupby("trial_id"):
        first = rows.iloc[0]
        setting = SolverSetting.fixed(first.train_method, int(first.train_steps))
        matrix = [(c.setting.method, c.setting.steps, c.factor) for c in test_matrix(setting)]
        assert sorted(zip(rows.test_method, rows.test_steps, rows.factor)) == sorted(matrix)
        assert rows["is_train_solver"].sum() == 1
        per_iter = 2 * setting.steps * METHODS[setting.method].stages_per_step  # backprop: bwd NFE = fwd NFE
        assert first.nfe_per_iteration == per_iter and first.nfe_forward_per_iteration == per_iter / 2
        assert (first.experiment, first.dataset, first.iterations, first.lr) == ("tiny", "sphere2", 20, 3e-3)
        assert 0 <= first.train_accuracy <= 1 and first.wall_time > 0


def test_checkpoint_column_reloads_the_trained_model(tiny_run):
    _, _, exp = tiny_run
    table = pd.read_csv(exp / RESULTS_CSV)
    row = table[table.is_train_solver].iloc[0]
    model, setting, config = restore_model(load_checkpoint(row.checkpoint))
    assert (setting.method, setting.steps, config.seed) == (row.train_method, row.train_steps, row.seed)
    data = load_dataset("sphere2", int(row.seed))
    torch.set_num_threads(1)
    acc, _ = accuracy(model, data.x_test, data.y_test, setting)
    assert acc == pytest.approx(row.accuracy) and acc == pytest.approx(row.test_accuracy)


def test_tensorboard_runs_have_scalars_and_hparams(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, _, exp = tiny_run
    trial_dirs = sorted(p.parent for p in exp.glob("*/events.out.tfevents.*"))
    assert len(trial_dirs) == len(load_space("tiny").trials())
    for d in trial_dirs:
        ea = EventAccumulator(str(d))
        ea.Reload()
        scalars = ea.Tags()["scalars"]
        for tag in ("loss", "train_accuracy", "test_accuracy", "nfe_per_iteration", "solver_steps"):
            assert f"ray/tune/{tag}" in scalars
        assert [e.step for e in ea.Scalars("ray/tune/loss")] == [10, 20]  # iterations on the x axis
        start = plugin_data_pb2.HParamsPluginData.FromString(ea.PluginTagToContent("hparams")["_hparams_/session_start_info"])
        hp = start.session_start_info.hparams
        config = json.loads(next(d.glob("checkpoint_*/final.json")).read_text())["config"]
        assert hp["method"].string_value == config["method"] and hp["dataset"].string_value == "sphere2"
        assert hp["steps"].number_value == config["steps"] and hp["seed"].number_value == config["seed"]


def test_summary_and_locations_printed(tiny_run):
    _, out, exp = tiny_run
    assert "critical step per train solver" in out
    assert "sphere2  euler" in out and "sphere2  rk4" in out
    assert str(exp / RESULTS_CSV) in out and f"tensorboard --logdir {exp}" in out
    assert out.count("done ") == len(load_space("tiny").trials())  # one progress line per trial


def test_results_cli_rebuilds_the_same_table(tiny_run, capsys):
    _, _, exp = tiny_run
    before = pd.read_csv(exp / RESULTS_CSV)
    (exp / RESULTS_CSV).unlink()
    assert results_main([str(exp)]) == 0
    assert "6 of 6 trials finished" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(exp / RESULTS_CSV), before)


def test_existing_experiment_needs_resume(tiny_run, capsys):
    _, _, exp = tiny_run
    assert main(["--space", "tiny", "--storage", str(exp.parent), "--name", "tiny"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_dry_run_prints_trials_and_resources(tmp_path, capsys):
    assert main(["--space", "tiny", "--dry-run", "--cpus-per-trial", "2", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "6 trials" in out and "2 CPU and 0 GPU" in out
    for t in load_space("tiny").trials():
        assert f"{t['method']}(steps={t['steps']}) seed {t['seed']}" in out
    assert not any(tmp_path.iterdir())  # started nothing, wrote nothing


def test_dry_run_shows_gpu_fraction_per_trial(tmp_path, capsys):
    assert main(["--space", "tiny", "--dry-run", "--gpus", "4", "--gpus-per-trial", "0.25", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 CPU and 0.25 GPU" in out and out.count("0.25") >= len(load_space("tiny").trials())
    if not torch.cuda.is_available():
        assert "a real run would stop here" in out and "CUDA is not available" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_without_cuda_exits_at_once():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "tune_node.grid", "--gpus", "4"], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode != 0
    assert "--gpus 4" in proc.stderr and "CUDA is not available" in proc.stderr
    assert time.monotonic() - start < 60  # no Ray start, no training


@pytest.mark.parametrize("argv, message", [
    (["--space", "sphere7"], "unknown search space 'sphere7'; available:"),
    (["--space", "tiny", "--address", "127.0.0.1:9"], "no Ray cluster reachable at --address 127.0.0.1:9"),
    (["--space", "tiny", "--cpus", "2", "--cpus-per-trial", "4"], "--cpus-per-trial 4 exceeds --cpus 2"),
    (["--space", "tiny", "--seeds", "0,0"], "seeds must be distinct"),
    (["--resume", "--name", "never_ran"], "nothing to resume"),
    (["--resume", "--name", "tiny", "--iterations", "5"], "drop --iterations"),
])
def test_clear_errors_before_any_work(tmp_path, capsys, argv, message):
    start = time.monotonic()
    assert main(argv + ["--storage", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert time.monotonic() - start < 15


def test_malformed_space_file_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('dataset = "sphere2"\nseeds = 1\n[[solvers]]\nmethod = "euler"\n')
    assert main(["--space", str(path), "--storage", str(tmp_path)]) == 2
    assert str(path) in capsys.readouterr().err


def _finals(exp: Path) -> dict[str, str]:
    """Trial directory -> text of its newest final.json (wall time included: a retrained trial differs)."""
    return {p.parent.parent.name: p.read_text() for p in sorted(exp.glob("*/checkpoint_*/final.json"))}


def interrupt_and_resume(ray_cluster, storage: Path, sig: int):
    """Start a grid in a subprocess (its own local Ray, as a user would), send ``sig`` once a
    trial has finished, then resume in this process; returns (finished before, finished after, exp dir)."""
    exp = storage / "interrupted"
    cmd = [sys.executable, "-m", "tune_node.grid", "--space", "tiny", "--iterations", "300", "--report-every", "20",
           "--storage", str(storage), "--name", "interrupted", "--cpus", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    deadline = time.monotonic() + 240
    while not _finals(exp) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    before = _finals(exp)
    total = len(load_space("tiny").trials())
    assert 1 <= len(before) < total, out  # interrupted mid-way
    assert results_main([str(exp)]) == 0  # the table of a partial run
    assert pd.read_csv(exp / RESULTS_CSV)["trial_id"].nunique() == len(before)
    assert main(["--storage", str(storage), "--name", "interrupted", "--resume"]) == 0
    return before, _finals(exp), exp


def test_interrupted_experiment_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    before, after, exp = interrupt_and_resume(ray_cluster, tmp_path, signal.SIGINT)
    assert len(after) == len(load_space("tiny").trials())
    for trial_dir, text in before.items():
        # Finished trials keep their results byte for byte. One that finished just before the
        # interrupt was recorded may be re-reported from its final checkpoint (new file, same text).
        assert after[trial_dir] == text
    table = collect(exp)
    assert table["trial_id"].nunique() == len(after)
    assert set(table.iterations) == {300}
    assert_no_iteration_trained_twice(exp)


def assert_no_iteration_trained_twice(exp: Path):
    """A restored trial continues after its last checkpoint: its reported iterations only grow
    (Ray logs the last result once more on restore; a restart from scratch would report 20 again)."""
    for result_log in exp.glob("*/result.json"):
        iterations = [json.loads(line)["iteration"] for line in result_log.read_text().splitlines() if line.strip()]
        deduplicated = [it for i, it in enumerate(iterations) if i == 0 or it != iterations[i - 1]]
        assert deduplicated == sorted(set(iterations)), (result_log, iterations)


@pytest.mark.slow
def test_killed_driver_resumes(ray_cluster, tmp_path):
    before, after, exp = interrupt_and_resume(ray_cluster, tmp_path, signal.SIGKILL)
    assert len(after) == len(load_space("tiny").trials())
    for trial_dir, text in before.items():
        assert after[trial_dir] == text
    assert_no_iteration_trained_twice(exp)


def test_notebook_runs_on_the_tiny_real_grid(tiny_run, tmp_path, monkeypatch):
    from test_notebook import execute_notebook, outputs_of

    rc, _, exp = tiny_run
    nb, text, html, _ = execute_notebook(exp, tmp_path, monkeypatch)
    assert f"6 trials, 70 test rows from {exp}" in text  # 2 seeds x (2 Euler x 15 + 1 RK4 x 5 rows)
    assert "critical_steps" in html
    assert f"no adaptation.csv under {exp}" in text  # a grid alone: no Table 1, said plainly
    assert outputs_of(nb, lambda o: "image/png" in o.get("data", {}))
    saved = list(tmp_path.glob("*.png"))
    assert any("accuracy_vs_steps" in p.name for p in saved) and any("trajectories" in p.name for p in saved)
    assert all(p.stat().st_size > 5000 for p in saved)
