"""GPU scheduling as Ray models it, without a GPU: the checks of ``--gpus`` against this machine's
CUDA (a local Ray) or the cluster's nodes (``--address``), the fractional packing, the dry run's
GPU lines, and a trial given a GPU whose process sees no CUDA. Ray's logical GPUs stand in for
cards: a 2-node local cluster whose head has no GPU. Tests marked ``gpu`` need a CUDA GPU."""

import json
import os
import socket
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tune_node.cli.common import UsageError, check_cluster_resources, check_gpus, gpu_trials_at_once
from tune_node.experiments import experiment, grid
from tune_node.experiments.trainable import trial_device

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

#: One Ray trial of one seed, two iterations: a real trial that starts and ends in seconds.
ONE_TRIAL = """description = "one Euler trial of one seed"
dataset = "sphere2"
seeds = 1

[training]
iterations = 2
lr = 3e-3
report_every = 1
test_every = 1

[[solvers]]
method = "euler"
steps = [1]
"""


def node(ip, cpus, gpus=0.0, alive=True, node_id="a" * 40):
    """A node as ``ray.nodes()`` gives it (the keys the checks read)."""
    resources = {"CPU": float(cpus), f"node:{ip}": 1.0, **({"GPU": float(gpus)} if gpus else {})}
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": ip, "NodeManagerHostname": "h", "Resources": resources}


def run(main, argv, capsys):
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(autouse=True)
def _no_native_build(monkeypatch):
    monkeypatch.setenv("TUNE_NODE_NATIVE", "0")  # these tests are about scheduling, not the C++ loops
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("TUNE_NODE_LOGICAL_GPUS", raising=False)


# --- trials at once and the checks against a cluster's nodes (no Ray) ---------------------------------------

@pytest.mark.parametrize("gpus, per_trial, at_once", [
    (4, 0.25, 16), (1, 0.25, 4), (0.5, 0.25, 2),  # a fractional --gpus: its share of one card
    (4, 0.3, 12), (1, 0.3, 3),  # 0.3 packs 3 to a GPU (0.1 idle), not 4 / 0.3 = 13
    (4, 2, 2), (3, 2, 1), (1, 1, 1), (0, 0.25, 0),
])
def test_trials_at_once(gpus, per_trial, at_once):
    assert gpu_trials_at_once(gpus, per_trial) == at_once


def check(nodes, gpus=1, gpus_per_trial=0.25, cpus_per_trial=1):
    check_cluster_resources(nodes, gpus=gpus, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial, where="the cluster")


def test_requests_no_node_can_meet_are_refused_with_the_numbers():
    cpu_head, gpu_node = node("10.0.0.4", 8), node("10.0.0.5", 4, gpus=1)
    check([cpu_head, gpu_node])  # a CPU-only head is no obstacle
    with pytest.raises(UsageError, match=r"^--gpus 1 requested, but the cluster has no GPUs \(node 10\.0\.0\.4: 8 CPU\); "
                                         r"run with --gpus 0"):
        check([cpu_head])
    with pytest.raises(UsageError, match=r"^--gpus-per-trial 2 exceeds the most GPUs on any node \(1: node 10\.0\.0\.5\)"):
        check([cpu_head, gpu_node], gpus=2, gpus_per_trial=2)
    with pytest.raises(UsageError, match=r"^--gpus 4 exceeds the 1 GPU of the cluster \(node 10\.0\.0\.5: 1\); use --gpus 1 or less"):
        check([cpu_head, gpu_node], gpus=4)
    # CPUs count on the nodes with GPUs only: the head's 8 do not help a GPU trial.
    with pytest.raises(UsageError, match=r"^--cpus-per-trial 6 exceeds the most CPUs on any node with 0\.25 GPU \(4: node 10\.0\.0\.5\)"):
        check([cpu_head, gpu_node], cpus_per_trial=6)
    check([cpu_head, gpu_node], gpus=0, cpus_per_trial=6)  # a CPU trial fits the head
    with pytest.raises(UsageError, match=r"^--cpus-per-trial 9 exceeds the most CPUs on any node \(8: node 10\.0\.0\.4\)"):
        check([cpu_head, gpu_node], gpus=0, cpus_per_trial=9)


def test_dead_nodes_do_not_count_and_nodes_of_one_host_are_told_apart():
    dead = node("10.0.0.6", 4, gpus=8, alive=False)
    with pytest.raises(UsageError, match="has no GPUs"):
        check([node("10.0.0.4", 8), dead])
    one_host = [node("127.0.0.1", 2, node_id="1234abcd" + "0" * 32), node("127.0.0.1", 2, gpus=1, node_id="9876fedc" + "0" * 32)]
    with pytest.raises(UsageError, match=r"\(1: node 127\.0\.0\.1 \(9876fedc\)\)"):
        check(one_host, gpus=2, gpus_per_trial=2)


# --- a local Ray: this machine's CUDA ----------------------------------------------------------------------

def test_a_local_ray_needs_cuda_and_enough_cards(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"^--gpus 1 requested, but CUDA is not available on this machine"):
        check_gpus(1)
    check_gpus(1, need_cuda=False)  # a joined cluster is asked instead
    monkeypatch.setenv("TUNE_NODE_LOGICAL_GPUS", "1")
    check_gpus(1)  # logical GPUs: told so, not refused
    monkeypatch.delenv("TUNE_NODE_LOGICAL_GPUS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_gpus(2)
    check_gpus(1.5)
    with pytest.raises(UsageError, match=r"^--gpus 2\.5 exceeds the 2 CUDA GPU\(s\) of this machine; use --gpus 2 or less"):
        check_gpus(2.5)


@NO_CUDA
def test_address_skips_this_machines_cuda_check(tmp_path, capsys):
    rc, _, err = run(grid.main, ["--space", "tiny", "--gpus", "4", "--storage", str(tmp_path), "--address", "127.0.0.1:9"], capsys)
    assert rc == 2 and err.startswith("error: no Ray cluster reachable at --address 127.0.0.1:9"), err  # got past the GPU check
    rc, _, err = run(grid.main, ["--space", "tiny", "--gpus", "4", "--storage", str(tmp_path)], capsys)
    assert rc == 2 and err.startswith("error: --gpus 4 requested, but CUDA is not available on this machine"), err


def test_a_local_ray_gets_whole_gpus_and_workers_the_logical_flag(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    assert experiment.init_ray(Namespace(address=None, cpus=2, gpus=0.5)) is None
    assert calls[-1]["num_gpus"] == 1  # int(0.5) == 0 would leave every GPU trial pending forever
    assert "TUNE_NODE_LOGICAL_GPUS" not in calls[-1]["runtime_env"]["env_vars"]
    assert experiment.init_ray(Namespace(address=None, cpus=2, gpus=2)) is None
    assert calls[-1]["num_gpus"] == 2
    monkeypatch.setenv("TUNE_NODE_LOGICAL_GPUS", "1")
    assert experiment.init_ray(Namespace(address="10.9.9.9:6379", cpus=None, gpus=1)) is None
    assert calls[-1]["runtime_env"]["env_vars"]["TUNE_NODE_LOGICAL_GPUS"] == "1"  # a cluster's workers do not inherit it


# --- the dry run -------------------------------------------------------------------------------------------

def test_dry_run_shows_the_share_and_the_packing(tmp_path, capsys):
    rc, out, _ = run(grid.main, ["--space", "tiny", "--dry-run", "--gpus", "4", "--storage", str(tmp_path)], capsys)
    assert rc == 0 and "0.25 GPU per trial: 4 trials per GPU, 16 at once on --gpus 4" in out, out
    if not torch.cuda.is_available():  # noted, not refused
        assert "note: a real run would stop here: --gpus 4 requested, but CUDA is not available on this machine" in out
    rc, out, _ = run(grid.main, ["--space", "tiny", "--dry-run", "--gpus", "0.5", "--gpus-per-trial", "0.3",
                                 "--storage", str(tmp_path), "--address", "127.0.0.1:9"], capsys)
    assert rc == 0 and "0.3 GPU per trial: 3 trials per GPU, 1 at once on --gpus 0.5 (0.1 of each GPU stays idle" in out, out
    assert "note: the GPUs of the Ray cluster at --address 127.0.0.1:9 are checked when the run joins it" in out
    rc, out, _ = run(grid.main, ["--space", "tiny", "--dry-run", "--gpus", "4", "--gpus-per-trial", "2", "--storage", str(tmp_path)],
                     capsys)
    assert rc == 0 and "2 GPU per trial (whole GPUs of one node): 2 at once on --gpus 4" in out, out


# --- the trial's device ------------------------------------------------------------------------------------

@NO_CUDA
def test_a_trial_without_cuda_uses_cpu_or_fails_when_given_a_gpu():
    assert trial_device(0) == "cpu"
    with pytest.raises(RuntimeError, match=r"was given 0\.5 GPU .* but its process sees no CUDA .* or run with --gpus 0"):
        trial_device(0.5)
    assert trial_device(0.5, logical=True) == "cpu"


@pytest.mark.gpu
@NEEDS_CUDA
def test_a_trial_given_a_gpu_trains_on_cuda():
    assert trial_device(0.5) == "cuda" and trial_device(0) == "cpu"
    check_gpus(1)


# --- a 2-node local Ray cluster whose head has no GPU ------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_cluster():
    """A local Ray cluster: a head of 2 CPUs without GPUs, a worker of 4 CPUs and 1 (logical) GPU;
    this process is connected to it. Yields ``(address, worker's node record)``."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNE_NODE_NATIVE", "0")  # the nodes' workers inherit it
        mp.delenv("TUNE_NODE_LOGICAL_GPUS", raising=False)
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False})
        worker = cluster.add_node(num_cpus=4, num_gpus=1)
        cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    gpu_node = next(n for n in ray.nodes() if n["NodeID"] == worker.node_id)
    yield cluster.address, gpu_node
    ray.shutdown()
    cluster.shutdown()


def test_the_cluster_is_asked_not_this_machine(gpu_cluster, tmp_path, capsys):
    address, gpu_node = gpu_cluster
    import ray

    name = f"node {gpu_node['NodeManagerAddress']} ({gpu_node['NodeID'][:8]})"
    argv = ["--space", "tiny", "--storage", str(tmp_path / "runs"), "--address", address]
    rc, _, err = run(grid.main, [*argv, "--gpus", "2", "--gpus-per-trial", "2"], capsys)
    assert rc == 2 and err == (f"error: --gpus-per-trial 2 exceeds the most GPUs on any node (1: {name}) of the Ray cluster at "
                               f"--address {address}: no trial could start\n"), err
    rc, _, err = run(grid.main, [*argv, "--gpus", "3"], capsys)
    assert rc == 2 and err.startswith(f"error: --gpus 3 exceeds the 1 GPU of the Ray cluster at --address {address} ({name}: 1)")
    # No --address, but a Ray running in this process (the Python API after ray.init): asked too, not this machine's CUDA.
    rc, _, err = run(grid.main, [*argv[:-2], "--gpus", "3"], capsys)
    assert rc == 2 and err.startswith(f"error: --gpus 3 exceeds the 1 GPU of the Ray this process is connected to ({address})"), err
    rc, _, err = run(grid.main, [*argv, "--gpus", "1", "--cpus-per-trial", "5"], capsys)
    assert rc == 2 and err.startswith(f"error: --cpus-per-trial 5 exceeds the most CPUs on any node with 0.25 GPU (4: {name})"), err
    assert not (tmp_path / "runs").exists()  # refused before any trial: nothing left behind
    head = [n for n in ray.nodes() if n["NodeID"] != gpu_node["NodeID"]]
    with pytest.raises(UsageError, match=r"^--gpus 1 requested, but the head has no GPUs \(node .*: 2 CPU\)"):
        check_cluster_resources(head, gpus=1, gpus_per_trial=0.25, cpus_per_trial=1, where="the head")


def test_fractional_shares_pack_on_the_gpu_node(gpu_cluster, tmp_path):
    """5 trials of 0.25 GPU and 0.5 CPU: all on the worker (the head has no GPU), 4 at once on its
    one GPU though its CPUs would take 8, each given Ray's GPU 0."""
    from ray import tune

    _, gpu_node = gpu_cluster
    running, done = tmp_path / "running", tmp_path / "done"
    running.mkdir()
    done.mkdir()
    total = 5

    def trainable(config):
        import os
        import time

        import ray
        from ray import tune

        me = running / str(config["i"])
        me.touch()
        peak, deadline = 0, time.monotonic() + 20
        # Wait for 4 sharing the GPU, or for all that are left: the fifth trial runs alone.
        while peak < 4 and len(list(running.iterdir())) + len(list(done.iterdir())) < total and time.monotonic() < deadline:
            peak = max(peak, len(list(running.iterdir())))
            time.sleep(0.05)
        time.sleep(0.5)  # held while the others look: a fifth trial on the GPU would be seen
        peak = max(peak, len(list(running.iterdir())))
        (done / me.name).touch()
        me.unlink()
        tune.report({"peak": peak, "node": ray.get_runtime_context().get_node_id(), "gpu_ids": [int(g) for g in ray.get_gpu_ids()],
                     "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")})

    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 0.5, "gpu": 0.25}),  # as experiment.fit passes a trial's request
                       param_space={"i": tune.grid_search(list(range(total)))},
                       tune_config=tune.TuneConfig(reuse_actors=True),
                       run_config=tune.RunConfig(name="pack", storage_path=str(tmp_path / "runs"), verbose=0))
    results = [r.metrics for r in tuner.fit()]
    assert len(results) == total and all("peak" in r for r in results), results
    assert {r["node"] for r in results} == {gpu_node["NodeID"]}
    peaks = [r["peak"] for r in results]
    assert max(peaks) == 4 and peaks.count(4) >= 4, results  # 4 share the GPU at once, never 5: the fifth waits for a share
    assert all(r["gpu_ids"] == [0] and r["cuda_visible"] == "0" for r in results), results


@NO_CUDA
def test_a_gpu_trial_without_cuda_fails_naming_its_node(gpu_cluster, tmp_path, capsys):
    address, gpu_node = gpu_cluster
    space = tmp_path / "one.toml"
    space.write_text(ONE_TRIAL)
    argv = ["--space", str(space), "--gpus", "1", "--gpus-per-trial", "0.5", "--address", address, "--storage", str(tmp_path)]
    rc, out, err = run(grid.main, [*argv, "--name", "real"], capsys)
    assert rc == 1 and "1 of 1 seeds did not finish (1 seeds in 1 failed Ray trials)" in err, out + err
    errors = [p.read_text() for p in (tmp_path / "real").rglob("error.txt")]
    where = f"this trial on node {gpu_node['NodeManagerAddress']} ({socket.gethostname()}, Ray node {gpu_node['NodeID'][:8]})"
    assert errors and all(f"{where} was given 0.5 GPU (Ray GPU ids [0], CUDA_VISIBLE_DEVICES='0'), but its process sees no CUDA"
                          in e for e in errors), errors


@pytest.mark.slow
@NO_CUDA
def test_logical_gpus_train_on_cpu_in_a_joined_cluster(gpu_cluster, tmp_path):
    address, _ = gpu_cluster
    space = tmp_path / "one.toml"
    space.write_text(ONE_TRIAL)
    # Another driver: the flag reaches the cluster's workers through init_ray's runtime_env, not their environment.
    env = {**os.environ, "TUNE_NODE_LOGICAL_GPUS": "1", "TUNE_NODE_NATIVE": "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-m", "tune_node.grid", "--space", str(space), "--gpus", "1", "--gpus-per-trial", "0.5",
                           "--address", address, "--storage", str(tmp_path), "--name", "logical"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1/1 trials finished" in proc.stdout and (tmp_path / "logical" / "results.csv").is_file()
    finals = [json.loads(p.read_text()) for p in (tmp_path / "logical").rglob("final.json")]
    assert finals and {f["device"] for f in finals} == {"cpu"}


@pytest.mark.gpu
@NEEDS_CUDA
def test_a_local_gpu_run_trains_on_cuda(tmp_path):
    space = tmp_path / "one.toml"
    space.write_text(ONE_TRIAL)
    env = {**os.environ, "TUNE_NODE_NATIVE": "0", "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("RAY_ADDRESS", None)
    env.pop("TUNE_NODE_LOGICAL_GPUS", None)
    proc = subprocess.run([sys.executable, "-m", "tune_node.grid", "--space", str(space), "--gpus", "1", "--gpus-per-trial", "0.5",
                           "--storage", str(tmp_path), "--name", "cuda"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    finals = [json.loads(p.read_text()) for p in (tmp_path / "cuda").rglob("final.json")]
    assert finals and {f["device"] for f in finals} == {"cuda"}
