"""What a researcher sees before any work: ``--help`` without torch or Ray, examples and defaults
in it, one exit-status convention (0 done, 1 the run did not complete, 2 refused before any work),
``--set KEY=VALUE`` for the training keys, and the dry run's wall-time estimate.

No test here starts Ray.
"""

import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from tune_node.cli import options

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
ENV.pop("RAY_ADDRESS", None)
CLIS = ["grid", "adapt", "search", "train_one"]

# Runs ``python -m tune_node.<cli> ARGS`` in this interpreter, then prints the exit status and
# every torch or Ray module it loaded.
PROBE = """
import json, runpy, sys
module, args = sys.argv[1], sys.argv[2:]
sys.argv = [module, *args]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    status = 0
except SystemExit as exit:
    status = exit.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "ray"))
print("\\nPROBE " + json.dumps({"status": status, "loaded": loaded}))
"""


def probe(cli: str, *args: str) -> tuple[dict, str, str]:
    """``python -m tune_node.<cli> args`` in a fresh interpreter: (its exit status and loaded
    torch/Ray modules, stdout before that, stderr)."""
    proc = subprocess.run([sys.executable, "-c", PROBE, f"tune_node.{cli}", *args], capture_output=True, text=True,
                          env=ENV, timeout=120, cwd=ROOT)
    out, _, result = proc.stdout.rpartition("\nPROBE ")
    assert result, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(result), out, proc.stderr


@pytest.mark.parametrize("cli", CLIS)
def test_help_imports_neither_torch_nor_ray(cli):
    result, out, err = probe(cli, "--help")
    assert result == {"status": 0, "loaded": []}, (result, err[-2000:])
    assert f"usage: python -m tune_node.{cli}" in out and "examples:" in out and "exit status: 0 done; 1 " in out


def test_a_usage_error_is_refused_before_torch_and_ray_load():
    result, _, err = probe("grid", "--set", "momentum=0.9")
    assert result == {"status": 2, "loaded": []}, result
    assert "unknown training key 'momentum'" in err and "allowed: iterations, lr, batch_size" in err, err


def test_the_import_of_a_shim_is_the_moved_module():
    import tune_node.experiments.grid
    import tune_node.grid
    from tune_node.grid import GRID_FILE, build_parser, main, run_grid  # noqa: F401

    assert tune_node.grid is tune_node.experiments.grid
    assert build_parser().prog == "python -m tune_node.grid"


@pytest.mark.parametrize("build", [options.grid_parser, options.adapt_parser, options.search_parser, options.train_one_parser])
def test_every_option_with_a_default_says_it(build):
    parser = build()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.dest == "help":
            continue  # flags (store_true, --seed-groups) default to off
        text = formatter._expand_help(action) if action.help else ""
        assert "default" in text, f"{action.option_strings[0]}: {text!r}"
    assert "examples:" in parser.epilog and "exit status" in parser.epilog


def test_the_light_lists_match_the_modules_that_own_them():
    from tune_node.datasets import DATASETS
    from tune_node.experiments.adapt import DEFAULTS, MODES
    from tune_node.experiments.optuna_study import OBJECTIVES, SAMPLERS
    from tune_node.search_space import TRAINING_KEYS
    from tune_node.solvers import SolverSetting
    from tune_node.training import OPTIMIZERS, TrainConfig

    assert options.DATASET_NAMES == DATASETS and options.OPTIMIZER_NAMES == OPTIMIZERS
    assert set(options.TRAINING_KEYS) == TRAINING_KEYS
    assert (options.SAMPLER_NAMES, options.OBJECTIVE_NAMES) == (SAMPLERS, OBJECTIVES)
    assert (options.ADAPT_MODES, options.ADAPT_DEFAULTS) == (MODES, DEFAULTS)
    euler = SolverSetting("euler", steps=2)
    for key, (kind, least) in options.TRAINING_KEYS.items():
        if kind is int:  # --set refuses what TrainConfig refuses, and no more
            TrainConfig(dataset="sphere2", solver=euler, **{key: least})
            with pytest.raises(ValueError, match=key):
                TrainConfig(dataset="sphere2", solver=euler, **{key: least - 1})


# --- exit status: one case of each kind ---------------------------------------------------------

def test_exit_status_0_a_dry_run_that_checked_everything(tmp_path):
    result, out, err = probe("grid", "--space", "tiny", "--dry-run", "--storage", str(tmp_path))
    assert result["status"] == 0, err
    assert "3 Ray trials" in out and "estimated wall time: ~" in out and not any(tmp_path.iterdir())


def test_exit_status_1_a_run_whose_trials_failed(tmp_path, monkeypatch, capsys):
    from tune_node.experiments import experiment, grid

    class Failed:
        def __init__(self, trial):
            self.config, self.error = {"trial": trial}, RuntimeError("the trial raised")

    def no_ray(args, folder, trials, record, announce):  # what start_experiment does, less Ray
        folder.write_record(record())
        return None

    monkeypatch.setattr(grid, "start_experiment", no_ray)
    monkeypatch.setattr(experiment, "fit", lambda trainable, trials, **kw: [Failed(t) for t in trials])
    status = grid.main(["--space", "tiny", "--storage", str(tmp_path), "--name", "failed"])
    err = capsys.readouterr().err
    assert status == 1, err
    assert "6 of 6 seeds did not finish (6 seeds in 3 failed Ray trials)" in err and "--resume" in err, err


def test_exit_status_2_refused_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tune_node.grid", "--space", "tiny", "--set", "batch_size=5000",
                           "--storage", str(tmp_path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and "batch_size 5000 is larger than the sphere2 training set" in proc.stderr
    assert not any(tmp_path.iterdir())


# --- --set KEY=VALUE -------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--set", "momentum=0.9"], "unknown training key 'momentum' in 'momentum=0.9'; allowed: iterations, lr, batch_size, "
                                "optimizer, report_every, test_every, eval_batch_size"),
    (["--set", "lr"], "expected KEY=VALUE, got 'lr'"),
    (["--set", "lr=fast"], "lr='fast' is not a number"),
    (["--set", "lr=-1"], "lr=-1: lr must be a finite number > 0"),
    (["--set", "iterations=2.5"], "iterations='2.5' is not an integer"),
    (["--set", "test_every=-1"], "test_every=-1: test_every must be an integer >= 0"),
    (["--set", "optimizer=rmsprop"], "unknown optimizer 'rmsprop' in 'optimizer=rmsprop'; allowed: adam, sgd"),
])
def test_a_bad_set_is_a_usage_error_naming_it(argv, message, capsys):
    for build in (options.grid_parser, options.adapt_parser, options.search_parser, options.train_one_parser):
        with pytest.raises(SystemExit) as exit:
            build().parse_args(argv)
        assert exit.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "5", "--set", "iterations=6"], "training key iterations given twice (--iterations 5 and --set iterations=6)"),
    (["--set", "lr=0.1", "--set", "lr=0.2"], "training key lr given twice (--set lr=0.1 and --set lr=0.2)"),
])
def test_a_training_key_given_twice_is_refused(tmp_path, capsys, argv, message):
    from tune_node import adapt, grid, search

    for main in (grid.main, adapt.main, search.main):
        assert main(["--space", "tiny", *argv, "--storage", str(tmp_path), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_set_reaches_every_trial(tmp_path, capsys):
    from tune_node import adapt, grid, search
    from tune_node.grid import run_grid

    argv = ["--space", "tiny", "--set", "batch_size=16", "--set", "optimizer=sgd", "--set", "test_every=5",
            "--storage", str(tmp_path), "--dry-run"]
    assert grid.main(argv) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "seeds 0,1" in line]
    assert len(rows) == 3 and all("16" in r and "sgd" in r for r in rows)
    assert adapt.main([*argv, "--k", "5"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if "adaptation seed" in line]
    assert len(rows) == 2 and all("16" in r for r in rows)
    assert search.main([a if a != "tiny" else "quick" for a in argv]) == 0  # tiny has one-rung ladders
    capsys.readouterr()
    space = options.training_overrides(Namespace(iterations=None, lr=None, report_every=7, set=[("test_every", 5)]))
    assert space == {"report_every": 7, "test_every": 5}
    from tune_node.search_space import load_space

    trials = load_space("tiny").with_overrides(**space).trials()
    assert {(t["report_every"], t["test_every"]) for t in trials} == {(7, 5)}
    assert run_grid("tiny", set={"batch_size": 8}, storage=str(tmp_path), dry_run=True) is None
    assert " 8 " in capsys.readouterr().out


def test_resume_refuses_set(tmp_path, capsys):
    from tune_node import grid

    assert grid.main(["--resume", "--name", "tiny", "--set", "lr=0.1", "--storage", str(tmp_path)]) == 2
    assert "drop --set" in capsys.readouterr().err


def test_adapt_refuses_the_seed_group_options_it_would_ignore(capsys):
    for flag in (["--seed-groups"], ["--no-seed-groups"], ["--seeds-per-trial", "2"]):
        with pytest.raises(SystemExit) as exit:
            options.adapt_parser().parse_args(flag)
        assert exit.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


# --- the dry run's wall-time estimate --------------------------------------------------------------

def resources(**kw) -> Namespace:
    return Namespace(**{"address": None, "cpus": 2, "cpus_per_trial": 1, "gpus": 0, "gpus_per_trial": 0.25, **kw})


def test_the_estimate_of_the_sphere2_grid_is_near_its_measured_wall_time(monkeypatch):
    """docs/results/performance.md: the Sphere2 fixed-step grid took 78.8 minutes on the 2-core machine."""
    from tune_node.cli.estimate import estimate_wall_time
    from tune_node.grid import estimated_nfe, plan_trials
    from tune_node.search_space import load_space

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    units = plan_trials(load_space("sphere2_fixed").trials())
    estimate = estimate_wall_time(units, estimated_nfe, resources())
    assert estimate.unknown == 0 and abs(estimate.total_s / 60 - 78.8) < 0.15 * 78.8, estimate.total_s / 60
    four = estimate_wall_time(units, estimated_nfe, resources(cpus=4))
    assert max(four.per_trial) + 15 <= four.total_s < estimate.total_s  # the longest trial bounds it
    one_seed = estimate_wall_time(plan_trials(load_space("sphere2_fixed").trials(), seed_groups=False), estimated_nfe, resources())
    assert one_seed.total_s > estimate.total_s  # one seed per trial costs more per NFE (performance.md)


def test_the_estimate_says_what_it_leaves_out(tmp_path, capsys, monkeypatch):
    from tune_node import grid

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert grid.main(["--space", "sphere2_adaptive", "--dry-run", "--storage", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "estimated wall time: none (adaptive methods, whose NFE is unknown before training" in out
    assert grid.main(["--space", "tiny", "--dry-run", "--storage", str(tmp_path), "--cpus", "2"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "with 2 trials at once (2 CPUs / 1 per trial)" in out
    assert "an estimate, not a measurement" in out and "docs/results/performance.md" in out
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    from tune_node.cli.estimate import parallel_trials

    assert parallel_trials(resources(cpus=None))[0] is None  # a cluster's size is unknown before Ray starts
