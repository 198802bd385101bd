"""The grid experiment end to end through real Ray Tune (a tiny grid), its errors, and resume;
in both trial modes: seed groups (the default) and one seed per trial (``--no-seed-groups``)."""

import io
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

from tune_node.datasets import load_dataset
from tune_node.evaluation import accuracy, test_matrix
from tune_node.grid import estimated_nfe, main, plan_trials
from tune_node.results import COLUMNS, RESULTS_CSV, collect
from tune_node.results import main as results_main
from tune_node.search_space import load_space
from tune_node.solvers import METHODS, SolverSetting
from tune_node.training import load_checkpoint, restore_model

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


MODES = {"seed-groups": [], "one-seed": ["--no-seed-groups"]}


@pytest.fixture(scope="module")
def tiny_runs(ray_cluster, tmp_path_factory):
    """Real grid runs of the ``tiny`` space, one per trial mode, made on first use and shared."""
    from contextlib import redirect_stdout

    runs = {}

    def run(mode):
        if mode not in runs:
            storage = tmp_path_factory.mktemp(f"runs_{mode}")
            out = io.StringIO()
            with redirect_stdout(out):
                rc = main(["--space", "tiny", "--storage", str(storage), "--name", "tiny", *MODES[mode]])
            runs[mode] = rc, out.getvalue(), storage / "tiny"
        return runs[mode]

    return run


@pytest.fixture(scope="module", params=list(MODES))
def tiny_run(request, tiny_runs):
    """One real grid run of the ``tiny`` space in each trial mode."""
    return tiny_runs(request.param)


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


def _final_of_run(run_dir: Path) -> dict:
    """The final.json of a TensorBoard run directory: a trial's, or a group seed's (``<trial>/seed<N>``)."""
    pattern = f"checkpoint_*/{run_dir.name}/final.json" if run_dir.name.startswith("seed") else "checkpoint_*/final.json"
    base = run_dir.parent if run_dir.name.startswith("seed") else run_dir
    return json.loads(sorted(base.glob(pattern))[-1].read_text())


def test_tensorboard_runs_have_scalars_and_hparams(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    _, _, exp = tiny_run
    run_dirs = sorted({p.parent for p in exp.glob("**/events.out.tfevents.*")})
    trials = load_space("tiny").trials()
    assert len(run_dirs) == len(trials)  # one run per seed in either mode
    seen = set()
    for d in run_dirs:
        ea = EventAccumulator(str(d))
        ea.Reload()
        scalars = ea.Tags()["scalars"]
        for tag in ("loss/train", "accuracy/train", "accuracy/test", "nfe/per_iteration", "solver/steps", "cross_solver/min_accuracy",
                    "final/nfe_forward_per_iteration"):
            assert tag in scalars
        assert not [t for t in scalars if t.startswith("ray/") or t.endswith(("/iteration", "/timesteps_total"))]
        assert [e.step for e in ea.Scalars("loss/train")] == [10, 20]  # iterations on the x axis
        final = _final_of_run(d)
        assert ea.Scalars("accuracy/test")[-1].value == pytest.approx(final["test_accuracy"])
        # One accuracy per test setting of the trial's matrix, at its last iteration, and the image of them all.
        matrix = {f"cross_solver/{r['test_method']}_steps{r['test_steps']:04d}": r["accuracy"] for r in final["cross_solver"]}
        assert {t for t in scalars if t.startswith("cross_solver/") and t != "cross_solver/min_accuracy"} == set(matrix)
        for tag, expected in matrix.items():
            assert [(e.step, e.value) for e in ea.Scalars(tag)] == [(20, pytest.approx(expected))]
        assert [i.step for i in ea.Images("cross_solver/accuracy_by_test_solver")] == [20]
        content = ea.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
        hp = start.session_start_info.hparams
        config = final["config"]
        assert hp["method"].string_value == config["method"] and hp["dataset"].string_value == "sphere2"
        assert hp["steps"].number_value == config["steps"] and hp["seed"].number_value == config["seed"]
        # Every run carries the whole grid's experiment config: the varying keys flagged, as numbers where numbers.
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        infos = {h.name: h for h in experiment.hparam_infos}
        assert {k for k, h in infos.items() if h.differs} == {"method", "steps", "seed", "gradient"}
        assert (infos["steps"].domain_interval.min_value, infos["steps"].domain_interval.max_value) == (1, 2)
        assert infos["seed"].type == api_pb2.DATA_TYPE_FLOAT64
        seen.add((config["method"], config["steps"], config["seed"]))
        assert d.relative_to(exp).parts[0].startswith(f"{config['method']}_steps{config['steps']:04d}_seed")  # short, no Ray id
    assert seen == {(t["method"], t["steps"], t["seed"]) for t in trials}


def test_seed_groups_give_the_results_of_one_seed_trials(tiny_runs):
    """Grouped seeds train as one batched model yet give each seed's own results (CPU: bit-identical)."""
    tables = {mode: collect(tiny_runs(mode)[2]) for mode in MODES}
    grouped, single = tables["seed-groups"], tables["one-seed"]
    assert grouped["trial_id"].nunique() == single["trial_id"].nunique() == len(load_space("tiny").trials())
    assert grouped["trial_id"].str.contains("_seed").all() and not single["trial_id"].str.contains("_seed").any()
    assert {Path(c).parent.name for c in grouped.checkpoint} == {"seed0", "seed1"}  # per-seed checkpoints
    same = ["train_method", "train_steps", "seed", "test_method", "test_steps", "factor", "accuracy", "nfe",
            "train_accuracy", "test_accuracy", "nfe_per_iteration", "total_nfe_forward", "total_nfe_backward"]
    pd.testing.assert_frame_equal(grouped[same], single[same])
    grid = json.loads((tiny_runs("seed-groups")[2] / "grid.json").read_text())
    assert sorted(map(len, grid["units"])) == [2, 2, 2]


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
    assert main(["--space", "tiny", "--dry-run", "--cpus-per-trial", "2", "--storage", str(tmp_path), "--no-seed-groups"]) == 0
    out = capsys.readouterr().out
    assert "6 trials" in out and "6 Ray trials of one seed each" in out and "2 CPU and 0 GPU" in out
    for t in load_space("tiny").trials():
        assert f"{t['method']}(steps={t['steps']}) seed {t['seed']}" in out
    assert not any(tmp_path.iterdir())  # started nothing, wrote nothing


def test_dry_run_shows_seed_groups_longest_first(tmp_path, capsys):
    assert main(["--space", "tiny", "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "6 trials" in out and "3 Ray trials (6 seeds in 3 seed groups)" in out and "1 CPU and 0 GPU" in out
    labels = ["rk4(steps=1) seeds 0,1", "euler(steps=2) seeds 0,1", "euler(steps=1) seeds 0,1"]  # by train NFE
    positions = [out.index(label) for label in labels]
    assert positions == sorted(positions)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("space, grouped", [("sphere2_fixed", True), ("sphere10_fixed", True), ("sphere2_adaptive", "adaptive"),
                                            ("sphere900_fixed", False), ("mnist_fixed", False)])
def test_plan_groups_only_where_it_pays(space, grouped, monkeypatch):
    """Seeds stack where the stacked solve serves them: fixed-step backprop on short spheres, and adaptive
    backprop and adjoint (per-seed step control), but not long spheres or images."""
    trials = load_space(space).trials()
    units = plan_trials(trials)
    assert sorted(json.dumps(t, sort_keys=True) for u in units for t in u) == sorted(json.dumps(t, sort_keys=True) for t in trials)
    for unit in units:
        assert len({json.dumps({k: v for k, v in t.items() if k != "seed"}, sort_keys=True) for t in unit}) == 1
    if grouped == "adaptive":
        assert all(len(u) == 5 for u in units) and {u[0]["gradient"] for u in units} == {"backprop", "adjoint"}
        monkeypatch.setenv("TUNE_NODE_ADAPTIVE_SOLVER", "torchdiffeq")  # one step control for all seeds: no stacking
        assert all(len(u) == 1 for u in plan_trials(trials))
    else:
        assert all(len(u) == (5 if grouped else 1) for u in units)
    costs = [estimated_nfe(u) for u in units]
    assert costs == sorted(costs, reverse=True)
    assert all(len(u) == 1 for u in plan_trials(trials, seed_groups=False))


def test_plan_caps_group_size():
    trials = load_space("sphere2_fixed").trials()
    units = plan_trials(trials, seeds_per_trial=2)
    assert sorted(len(u) for u in units if u[0]["steps"] == 4 and u[0]["method"] == "euler") == [1, 2, 2]
    assert sum(map(len, units)) == len(trials)


def test_dry_run_shows_gpu_fraction_per_trial(tmp_path, capsys):
    assert main(["--space", "tiny", "--dry-run", "--gpus", "4", "--gpus-per-trial", "0.25", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 CPU and 0.25 GPU" in out and out.count("0.25") >= len(plan_trials(load_space("tiny").trials()))  # a row per Ray trial
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
    (["--resume", "--name", "tiny", "--no-seed-groups"], "drop --seed-groups"),
    (["--space", "tiny", "--seeds-per-trial", "0"], "--seeds-per-trial must be >= 1, got 0"),
    (["--space", "tiny", "--seeds-per-trial", "2", "--no-seed-groups"], "--seeds-per-trial sizes seed groups"),
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
    """Trial directory (plus ``/seed<N>`` for a group's seed) -> text of its newest final.json
    (wall time included: a retrained trial differs)."""
    finals = {p.parent.parent.name: p.read_text() for p in sorted(exp.glob("*/checkpoint_*/final.json"))}
    finals.update({f"{p.parent.parent.parent.name}/{p.parent.name}": p.read_text()
                   for p in sorted(exp.glob("*/checkpoint_*/seed*/final.json"))})
    return finals


def interrupt_and_resume(ray_cluster, storage: Path, sig: int, mode: str):
    """Start a grid in a subprocess (its own local Ray, as a user would), send ``sig`` once a
    trial has finished, then resume in this process; returns (finished before, finished after, exp dir)."""
    exp = storage / "interrupted"
    cmd = [sys.executable, "-m", "tune_node.grid", "--space", "tiny", "--iterations", "300", "--report-every", "20",
           "--storage", str(storage), "--name", "interrupted", "--cpus", "2", *MODES[mode]]
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


def assert_resumed_without_rerunning(before: dict, after: dict, exp: Path):
    assert len(after) == len(load_space("tiny").trials())
    for trial_dir, text in before.items():
        # Finished trials keep their results byte for byte. One that finished just before the
        # interrupt was recorded may be re-reported from its final checkpoint (new file, same text).
        assert after[trial_dir] == text
    table = collect(exp)
    assert table["trial_id"].nunique() == len(after)
    assert set(table.iterations) == {300}
    assert_no_iteration_trained_twice(exp)


@pytest.mark.parametrize("mode", [
    "seed-groups",
    pytest.param("one-seed", marks=pytest.mark.slow),  # the same path as groups of one seed; slow: ~40 s
])
def test_interrupted_experiment_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path, mode):
    before, after, exp = interrupt_and_resume(ray_cluster, tmp_path, signal.SIGINT, mode)
    assert_resumed_without_rerunning(before, after, exp)


def assert_no_iteration_trained_twice(exp: Path):
    """A restored trial continues after its last checkpoint: its reported iterations only grow
    (Ray logs the last result once more on restore; a restart from scratch would report 20 again)."""
    for result_log in exp.glob("*/result.json"):
        iterations = [json.loads(line)["iteration"] for line in result_log.read_text().splitlines() if line.strip()]
        deduplicated = [it for i, it in enumerate(iterations) if i == 0 or it != iterations[i - 1]]
        assert deduplicated == sorted(set(iterations)), (result_log, iterations)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_killed_driver_resumes(ray_cluster, tmp_path, mode):
    before, after, exp = interrupt_and_resume(ray_cluster, tmp_path, signal.SIGKILL, mode)
    assert_resumed_without_rerunning(before, after, exp)


def test_notebook_runs_on_the_tiny_real_grid(tiny_runs, tmp_path, monkeypatch):
    from test_notebook import execute_notebook, outputs_of

    rc, _, exp = tiny_runs("seed-groups")  # the default mode; per-seed files are alike in both
    nb, text, html, _ = execute_notebook(exp, tmp_path, monkeypatch)
    assert f"results:    {exp}" in text and "6 trials, 70 test rows" in text  # 2 seeds x (2 Euler x 15 + 1 RK4 x 5 rows)
    assert "critical_steps" in html
    # A chosen grid alone: no Table 1, said plainly (not paired with some other adaptation run).
    assert "adaptation: none found" in text and "no adaptation run found (adaptation.csv)" in text
    assert outputs_of(nb, lambda o: "image/png" in o.get("data", {}))
    saved = list(tmp_path.glob("*.png"))
    assert any("accuracy_vs_steps" in p.name for p in saved) and any("trajectories" in p.name for p in saved)
    assert all(p.stat().st_size > 5000 for p in saved)


STORED_TINY_TABLE = Path(__file__).parent / "data" / "tiny_grid_results.csv"


@pytest.mark.parametrize("mode", list(MODES))
def test_tiny_grid_table_is_bit_identical_to_the_stored_one(tiny_runs, mode):
    """The tiny grid's results, stored from a run at a67e539 (before the library opened to
    users' models), are what a run gives today, value for value and bit for bit, in both trial
    modes. Left out: what differs between runs (trial ids, wall time, checkpoint paths) and
    columns added since (they must not change the stored ones)."""
    stored = pd.read_csv(STORED_TINY_TABLE)
    table = collect(tiny_runs(mode)[2])
    assert set(stored.columns) <= set(table.columns)
    # Through CSV as the stored table went: float repr round-trips exactly.
    buffer = io.StringIO()
    table[list(stored.columns)].to_csv(buffer, index=False)
    buffer.seek(0)
    pd.testing.assert_frame_equal(pd.read_csv(buffer), stored, check_exact=True)


def test_run_grid_from_python_returns_the_cli_s_table(tiny_runs, tmp_path):
    from tune_node.cli import UsageError
    from tune_node.grid import run_grid

    table = run_grid(load_space("tiny"), storage=str(tmp_path), name="tiny_api")
    cli = collect(tiny_runs("seed-groups")[2])
    same = [c for c in COLUMNS if c not in ("trial_id", "wall_time", "checkpoint")]
    pd.testing.assert_frame_equal(table[same], cli[same])
    assert (tmp_path / "tiny_api" / RESULTS_CSV).is_file()
    with pytest.raises(UsageError, match="seeds must be distinct"):
        run_grid("tiny", storage=str(tmp_path), name="bad", seeds="0,0")
    with pytest.raises(TypeError, match="unknown option.*colour"):
        run_grid("tiny", colour="red")
