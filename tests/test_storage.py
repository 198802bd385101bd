"""Storage a cluster shares: ``--storage s3://...`` against moto's S3 server, on a 2-node local Ray cluster.

What moto's server does not cover: real S3's consistency and latency, multipart uploads of large
checkpoints, IAM permissions and credential chains other than environment variables, and other
URI schemes (gs://, hdfs://), which go through the same pyarrow calls.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("moto.server", reason="moto[server] (the dev extra) serves S3 for these tests")
pafs = pytest.importorskip("pyarrow.fs")

from tune_node.experiments.storage import StorageError, open_storage, split_experiment_uri  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "tune-node-tests"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free port with one bucket; yields ``uri(prefix)``, the storage URI of a
    prefix in the bucket. Sets the AWS credentials and the local-copies folder in the environment (Ray's
    nodes started afterwards inherit them)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in CREDENTIALS.items():
            mp.setenv(key, value)
        mp.setenv("TUNE_NODE_COPIES", str(tmp_path_factory.mktemp("copies")))
        query = f"endpoint_override=127.0.0.1:{port}&scheme=http"
        filesystem, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}?{query}&allow_bucket_creation=true")
        filesystem.create_dir(BUCKET)
        yield lambda prefix: f"s3://{BUCKET}/{prefix}?{query}"
    server.stop()


def _files(storage, name: str) -> dict[str, int]:
    base = f"{storage.root}/{name}"
    infos = storage.filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


def _read(storage, path: str) -> bytes:
    with storage.filesystem.open_input_stream(f"{storage.root}/{path}") as f:
        return f.read()


def test_bad_storage_uris_are_refused_naming_the_uri(s3):
    with pytest.raises(StorageError, match=r"'foo://bucket/runs': pyarrow cannot open this URI .*folder path or a URI"):
        open_storage("foo://bucket/runs")
    missing = s3("runs").replace(BUCKET, "no-such-bucket")
    with pytest.raises(StorageError, match=r"its bucket 'no-such-bucket' does not exist there"):
        open_storage(missing)
    storage = open_storage(s3("files"))
    with storage.filesystem.open_output_stream(f"{storage.root}/a_file") as f:
        f.write(b"x")
    with pytest.raises(StorageError, match=r"is a file, not a folder of experiments"):
        open_storage(s3("files/a_file"))


def test_a_cli_refuses_a_bad_storage_before_any_work(s3, tmp_path, capsys, monkeypatch):
    from tune_node import adapt, grid, search

    monkeypatch.chdir(tmp_path)
    missing = s3("runs").replace(BUCKET, "no-such-bucket")
    for main, extra in ((grid.main, []), (adapt.main, ["--k", "5"])):
        assert main(["--space", "tiny", *extra, "--storage", missing]) == 2
        err = capsys.readouterr().err
        assert "its bucket 'no-such-bucket' does not exist" in err, err
    assert search.main(["--space", "tiny", "--storage", s3("runs")]) == 2
    err = capsys.readouterr().err
    assert "is a URI: a search reads its trials' results while it runs" in err, err
    assert not any(tmp_path.iterdir())


def test_the_local_copy_follows_the_uri_and_keeps_the_lock(s3):
    storage = open_storage(s3("copies"))
    assert storage.remote and storage.where("e") == s3("copies/e")
    local = storage.local / "e"
    local.mkdir(parents=True)
    (local / "grid.json").write_text('{"trials": []}')
    (local / "tuner.pkl").write_bytes(b"old local state")  # Ray's own: never pushed over what Ray wrote
    (local / ".tune_node.lock").write_text("")
    storage.push("e")
    assert _files(storage, "e") == {"grid.json": 14}
    with storage.filesystem.open_output_stream(f"{storage.root}/e/trial_1/checkpoint_000000/final.json") as f:
        f.write(b"{}")
    with storage.filesystem.open_output_stream(f"{storage.root}/e/tuner.pkl") as f:
        f.write(b"ray")
    storage.pull("e")
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == [
        ".tune_node.lock", "grid.json", "trial_1/checkpoint_000000/final.json", "tuner.pkl"]
    assert (local / "tuner.pkl").read_bytes() == b"ray"
    storage.filesystem.delete_dir(f"{storage.root}/e/trial_1")
    storage.pull("e")
    assert not (local / "trial_1").exists() and (local / ".tune_node.lock").exists()
    # An experiment URI names its storage and name.
    again, name = split_experiment_uri(s3("copies/e"))
    assert (again.root, name, again.local) == (storage.root, "e", storage.local)


@pytest.fixture(scope="module")
def two_nodes(s3):
    """A local Ray cluster of two nodes of 1 CPU each (so two trials at once run one on each node),
    started after the S3 credentials are in the environment; yields its address."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNE_NODE_NATIVE", "0")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


def _cli(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _env() -> dict:
    return {**os.environ, "TUNE_NODE_NATIVE": "0",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def _killed_once_then_resumed(start: list[str], resume: list[str], storage, name: str, finals: str, cwd: Path) -> dict:
    """Start ``start``, SIGKILL its driver once a trial has finished on the URI, drop the local copy (as if
    resuming on another machine), run ``resume`` to the end; returns the finished files' bytes as first seen."""
    proc = subprocess.Popen(start, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        # Finished: the final numbers with the model beside them (Ray uploads a checkpoint file by file;
        # a final.json without its checkpoint.pt is not finished, and its trial trains its last stretch again).
        files = set(_files(storage, name))
        done = [p for p in files if p.endswith(finals) and p[:-len(finals)] + "checkpoint.pt" in files]
        if done:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"the run ended before it could be interrupted:\n{proc.stdout.read()}"
    first = {p: _read(storage, f"{name}/{p}") for p in done}
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    import shutil

    shutil.rmtree(storage.local / name)
    resumed = subprocess.run(resume, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming" in resumed.stdout
    return first


COMMON = ["--seeds", "2", "--iterations", "100", "--set", "report_every=50"]


def test_a_grid_on_two_nodes_writes_to_s3_resumes_and_reads_back(s3, two_nodes, tmp_path):
    uri = s3("cluster")
    storage = open_storage(uri)
    common = ["--storage", uri, "--address", two_nodes, *COMMON]

    grid = ["--space", "tiny", "--name", "grid", "--no-seed-groups", *common]
    first = _killed_once_then_resumed(_cli("tune_node.grid", *grid), _cli("tune_node.grid", "--storage", uri, "--address", two_nodes,
                                                                          "--name", "grid", "--resume"),
                                      storage, "grid", "final.json", tmp_path)
    files = _files(storage, "grid")
    # The URI holds it all: the record and results table (tune-node's), Ray's state, every trial's
    # checkpoints and final numbers, and the TensorBoard event files.
    assert {"grid.json", "results.csv", "tuner.pkl"} <= set(files)
    assert len([p for p in files if p.endswith("final.json")]) >= 6
    assert len({p.split("/")[0] for p in files if "events.out.tfevents" in p}) == 6  # a resumed trial has a file per run
    # What finished before the kill was not trained again.
    assert {p: _read(storage, f"grid/{p}") for p in first} == first
    # Every trial's progress.csv on the URI holds each report once, also where a run was cut and resumed
    # (a resumed run's staging folder starts empty: its earlier lines are brought back first).
    for path in (p for p in files if p.endswith("/progress.csv")):
        progress = pd.read_csv(pd.io.common.BytesIO(_read(storage, f"grid/{path}")))
        assert progress["timesteps_total"].tolist() == [50, 100], path
    # Read back from the URI alone (a fresh local copy): the table the run wrote.
    shutil_copy = storage.local / "grid"
    import shutil

    shutil.rmtree(shutil_copy)
    from tune_node.results import read_results

    table = read_results(f"{uri.split('?')[0]}/grid?{uri.split('?')[1]}")
    written = pd.read_csv(pd.io.common.BytesIO(_read(storage, "grid/results.csv")))
    assert len(table) == len(written) and table["trial_id"].nunique() == 6
    assert sorted(table["train_steps"].unique().tolist()) == [1, 2]
    assert table["seed"].nunique() == 2
    assert set(table["checkpoint"].map(lambda p: Path(p).is_file())) == {True}  # brought down into the local copy


@pytest.mark.slow  # the grid's test above runs the same storage path; this one adds the adaptation's tables
def test_an_adaptation_on_two_nodes_writes_to_s3_resumes_and_reads_back(s3, two_nodes, tmp_path):
    uri = s3("cluster")
    storage = open_storage(uri)
    common = ["--storage", uri, "--address", two_nodes, *COMMON]
    adapt = ["--space", "tiny", "--name", "adapt", "--mode", "step", "--train-solver", "euler", "--test-solver", "rk4",
             "--k", "50", *common]
    _killed_once_then_resumed(_cli("tune_node.adapt", *adapt), _cli("tune_node.adapt", "--storage", uri, "--address", two_nodes,
                                                                    "--name", "adapt", "--resume"),
                              storage, "adapt", "final.json", tmp_path)
    files = _files(storage, "adapt")
    assert {"adapt.json", "adaptation.csv"} <= set(files)
    summary = pd.read_csv(pd.io.common.BytesIO(_read(storage, "adapt/adaptation.csv")))
    assert len(summary) == 2 and sorted(summary["seed"]) == [0, 1]
    record = json.loads(_read(storage, "adapt/adapt.json"))
    assert len(record["trials"]) == 2


def test_a_name_that_is_no_folder_name_never_touches_the_copies(s3):
    storage = open_storage(s3("names"))
    other = storage.local / "running"
    other.mkdir(parents=True)
    (other / ".tune_node.lock").write_text("")
    (other / "grid.json").write_text("{}")
    for name in ("..", ".", "a/b"):
        with pytest.raises(StorageError, match="is not an experiment name"):
            storage.pull(name)
    with pytest.raises(StorageError, match="is not an experiment name"):
        split_experiment_uri(s3("names/.."))
    assert sorted(p.name for p in other.iterdir()) == [".tune_node.lock", "grid.json"]


def test_refusals_name_the_uri_not_the_local_copy(s3, tmp_path, capsys, monkeypatch):
    from tune_node import grid

    monkeypatch.chdir(tmp_path)
    uri = s3("refusals")
    storage = open_storage(uri)
    with storage.filesystem.open_output_stream(f"{storage.root}/taken/adapt.json") as f:
        f.write(b'{"trials": [{"seed": 0}]}')
    assert grid.main(["--space", "tiny", "--storage", uri, "--name", "taken", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"python -m tune_node.adapt --storage '{uri}' --name taken --resume" in err, err
    assert grid.main(["--space", "tiny", "--storage", uri, "--name", "absent", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"no experiment 'absent' in '{uri}'" in err and str(storage.local) not in err.split("(")[0], err
