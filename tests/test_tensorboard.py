"""What a researcher sees in TensorBoard: run names that sort and stay unique, the HParams tab
(the study's axes shown by default, numbers sorted as numbers, as TensorBoard's own hparams
backend reads the event files), grouped scalars, per-test-solver accuracies and the
accuracy-against-test-solver image, each written once across a driver restart."""

import io
from pathlib import Path
from types import SimpleNamespace

import pytest

from tune_node.tune_callbacks import (
    CROSS_SOLVER_IMAGE,
    HPARAM_KEYS,
    TensorBoardCallback,
    cross_solver_png,
    experiment_config,
    run_name,
    solver_name,
)

STEPS = (1, 2, 4, 8, 16, 32, 64)


class _Trial:
    """What the callback reads of a Ray trial: config, storage path, a local file system (hashable, as Ray's)."""

    def __init__(self, root: Path, config, trial_id: str = "abcde_00000", experiment_tag: str = "0_trial=x"):
        configs = config if isinstance(config, list) else [config]
        self.config, self.trial_id, self.experiment_tag = {"trial": config}, trial_id, experiment_tag
        self.path = str(root / run_name(configs))
        self.storage = SimpleNamespace(storage_filesystem=SimpleNamespace(type_name="local"))


def _config(method="euler", steps=None, tol=None, seed=0, gradient="backprop"):
    return {"experiment": "t", "dataset": "sphere2", "method": method, "steps": steps, "tol": tol, "gradient": gradient,
            "seed": seed, "iterations": 20, "lr": 3e-3, "batch_size": 64, "optimizer": "sgd", "report_every": 10}


def _rows(config, accuracy=lambda method, steps: 0.5 + steps / 1000):
    """Test-matrix rows as a final report carries them (one setting reached by two factors, as the matrix can)."""
    s = config["steps"]
    rows = []
    for method in ("euler", "rk4"):
        for factor in (0.5, 0.75, 1.0, 1.5, 2.0):
            steps = max(1, int(s * factor + 0.5))
            rows.append({"test_method": method, "test_steps": steps, "test_tol": None, "factor": factor, "nfe": steps,
                         "accuracy": accuracy(method, steps), "is_train_solver": method == config["method"] and factor == 1.0})
    return rows


def _run_grid(root: Path, configs: list[dict], callback: TensorBoardCallback | None = None) -> list[_Trial]:
    """Report two training iterations and the end (with the test matrix) of every trial, as Ray would."""
    callback = callback or TensorBoardCallback()
    trials = [_Trial(root, c) for c in configs]
    for t in trials:
        callback.on_trial_start(0, trials, t)
        c = t.config["trial"]
        callback.log_trial_result(1, t, {"timesteps_total": 10, "iteration": 10, "loss": 0.5, "train_accuracy": 0.6,
                                         "nfe_forward": c["steps"], "nfe_per_iteration": 2.0 * c["steps"], "solver_steps": c["steps"]})
        callback.log_trial_result(2, t, {"timesteps_total": 20, "iteration": 20, "loss": 0.4, "train_accuracy": 0.7,
                                         "test_accuracy": 0.8, "nfe_per_iteration": 2.0 * c["steps"],
                                         "nfe_forward_per_iteration": float(c["steps"]), "cross_solver_min_accuracy": 0.5,
                                         "cross_solver": _rows(c), "done_training": True})
        callback.on_trial_complete(2, trials, t)
    return trials


def _accumulator(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    return ea


def _hparams_backend(logdir: Path):
    """TensorBoard's hparams plugin backend over ``logdir`` (what its HParams tab asks for)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.data import provider
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    backend = backend_context.Context(base_plugin.TBContext(data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)),
                                                            multiplexer=multiplexer, logdir=str(logdir)))
    request = context.RequestContext()
    experiment = backend.experiment_from_metadata(request, "", True, backend.hparams_metadata(request, ""),
                                                  provider.ListHyperparametersResult(hyperparameters=[], session_groups=[]))

    def session_groups(**sort):
        col_params = [api_pb2.ColParams(hparam=name, order=getattr(api_pb2, f"ORDER_{order}")) for name, order in sort.items()]
        statuses = [api_pb2.STATUS_UNKNOWN, api_pb2.STATUS_SUCCESS, api_pb2.STATUS_FAILURE, api_pb2.STATUS_RUNNING]
        req = api_pb2.ListSessionGroupsRequest(allowed_statuses=statuses, col_params=col_params, slice_size=1000)
        return list(list_session_groups.Handler(request, backend, "", req).run().session_groups)

    return experiment, session_groups


# --- run names ------------------------------------------------------------------------------

def test_run_names_are_short_sort_by_steps_and_carry_no_ray_hash():
    from tune_node.experiments.adapt import _trial_dirname as adapt_dirname
    from tune_node.experiments.grid import _search_trial_dirname, _trial_dirname

    names = [run_name([_config(steps=s)]) for s in STEPS]
    assert names[0] == "euler_steps0001_seed0" and names[-1] == "euler_steps0064_seed0"
    assert sorted(names) == names  # text order is step order
    trial = SimpleNamespace(config={"trial": [_config(steps=16, seed=0), _config(steps=16, seed=1)]}, trial_id="a1b2c_00003",
                            experiment_tag="3_trial=...")
    assert _trial_dirname(trial) == "euler_steps0016_seeds0_1"
    # A search may train one setting twice: its names end in Ray's trial number, which it keeps counting.
    assert _search_trial_dirname(trial) == "euler_steps0016_seeds0_1_n003"
    assert _search_trial_dirname(SimpleNamespace(**{**vars(trial), "experiment_tag": "12_trial=..."})).endswith("_n012")
    assert _search_trial_dirname(SimpleNamespace(**{**vars(trial), "experiment_tag": ""})).endswith("_a1b2c_00003")
    assert run_name([_config("dopri5", tol=1e-4, gradient="adjoint", seed=2)]) == "dopri5_tol1e-04_adjoint_seed2"
    tols = [run_name([_config("dopri5", tol=t)]) for t in (1e-1, 1e-2, 1e-3, 1e-6)]
    assert sorted(tols) == tols  # coarse to fine, as steps
    adaptation = {**_config(), "steps": None, "mode": "step", "test_method": "midpoint", "k": 10, "threshold": 0.1}
    assert adapt_dirname(SimpleNamespace(config={"trial": adaptation}, trial_id="x_00001")) == "euler_midpoint_step_seed0"
    # Every setting and seed of a grid gets a name of its own.
    grid = [_config(m, steps=s, seed=seed, gradient=g) for m in ("euler", "rk4") for s in STEPS for seed in range(3)
            for g in ("backprop", "adjoint")]
    assert len({run_name([c]) for c in grid}) == len(grid)


@pytest.mark.parametrize("steps, tol, message", [(None, None, "steps or tol"), (2, 1e-3, "steps or tol"), (0, None, "positive integer"),
                                                 (1.5, None, "positive integer"), (None, -1.0, "finite number > 0"),
                                                 (None, float("nan"), "finite number > 0")])
def test_a_bad_solver_setting_has_no_name(steps, tol, message):
    with pytest.raises(ValueError, match=message):
        solver_name("euler", steps, tol)
    with pytest.raises(ValueError, match="at least one"):
        run_name([])


# --- the HParams tab ------------------------------------------------------------------------

def test_hparams_show_the_varying_keys_first_as_numbers_and_rows_sort_numerically(tmp_path):
    configs = [_config(m, steps=s, seed=seed) for m in ("euler", "rk4") for s in STEPS for seed in (0, 1)]
    _run_grid(tmp_path, configs)
    experiment, session_groups = _hparams_backend(tmp_path)
    infos = {h.name: h for h in experiment.hparam_infos}
    # TensorBoard shows the first five hparams by default: differing ones first, then by name.
    shown = [h.name for h in experiment.hparam_infos][:5]
    assert set(shown) == {"method", "steps", "seed", "gradient", "dataset"} and shown[:4] == ["gradient", "method", "seed", "steps"]
    assert all(infos[k].differs for k in ("method", "steps", "seed", "gradient"))
    assert not any(infos[k].differs for k in ("dataset", "lr", "iterations"))
    from tensorboard.plugins.hparams import api_pb2

    assert infos["steps"].type == infos["seed"].type == infos["iterations"].type == api_pb2.DATA_TYPE_FLOAT64
    assert (infos["steps"].domain_interval.min_value, infos["steps"].domain_interval.max_value) == (1, 64)
    assert infos["method"].type == api_pb2.DATA_TYPE_STRING and sorted(v.string_value for v in infos["method"].domain_discrete.values) == [
        "euler", "rk4"]
    assert [m.name.tag for m in experiment.metric_infos][:2] == ["accuracy/test", "cross_solver/min_accuracy"]
    # Rows: by run name (TensorBoard's default), steps ascend numerically within a method and seed ...
    groups = session_groups()
    euler_seed0 = [g.hparams["steps"].number_value for g in groups if g.name.startswith("euler") and g.name.endswith("seed0")]
    assert euler_seed0 == sorted(euler_seed0) == [float(s) for s in STEPS]
    assert len(groups) == len(configs) and all(len(g.sessions) == 1 for g in groups)
    # ... and sorting by the steps column is numeric, not textual.
    by_steps = [g.hparams["steps"].number_value for g in session_groups(steps="DESC")]
    assert by_steps == sorted(by_steps, reverse=True) and by_steps[0] == 64
    row = next(g for g in groups if g.name == "rk4_steps0008_seed1")
    assert {m.name.tag: m.value for m in row.metric_values}["accuracy/test"] == pytest.approx(0.8)


def test_the_experiment_config_covers_every_trial_seen_and_refuses_mixed_types():
    configs = [_config("dopri5", tol=t, seed=s, gradient=g) for t in (1e-3, 1e-5) for s in (0, 1) for g in ("backprop", "adjoint")]
    config = experiment_config(configs)
    names = [h["name"] for h in config["hparams"]]
    assert names[:4] == ["gradient", "method", "seed", "tol"] and "steps" not in names
    tol = next(h for h in config["hparams"] if h["name"] == "tol")
    assert tol["type"] == "number" and tol["domain"] == [1e-5, 1e-3] and tol["differs"]
    assert next(h for h in config["hparams"] if h["name"] == "gradient")["domain"] == ["adjoint", "backprop"]
    assert "final/nfe_forward_per_iteration" in config["metrics"] and "final/adaptation_nfe_per_iteration" not in config["metrics"]
    adaptation = {**_config(), "mode": "step", "test_method": "midpoint", "k": 10, "threshold": 0.1}
    shown = [h["name"] for h in experiment_config([adaptation])["hparams"]][:5]
    assert shown == ["gradient", "method", "mode", "seed", "test_method"]
    with pytest.raises(ValueError, match="'seed' needs values of one type"):
        experiment_config([_config(seed=0), _config(seed="0")])


# --- scalars and the image ------------------------------------------------------------------

def test_scalars_are_grouped_with_an_accuracy_per_test_solver_and_an_image(tmp_path):
    from PIL import Image

    trial = _run_grid(tmp_path, [_config(steps=2, seed=1)])[0]
    ea = _accumulator(Path(trial.path))
    tags = set(ea.Tags()["scalars"])
    assert {"loss/train", "accuracy/train", "accuracy/test", "nfe/forward", "nfe/per_iteration", "solver/steps",
            "final/nfe_forward_per_iteration", "cross_solver/min_accuracy"} <= tags
    assert not [t for t in tags if t.startswith("ray/") or t.split("/")[-1] in ("iteration", "timesteps_total", "done_training")]
    # The test matrix of Euler at 2 steps: Euler and RK4 at 1, 2, 3, 4 steps (two factors meet at 2), each once.
    per_solver = {t.split("/", 1)[1]: ea.Scalars(t) for t in tags if t.startswith("cross_solver/") and t != "cross_solver/min_accuracy"}
    assert sorted(per_solver) == [f"{m}_steps000{s}" for m in ("euler", "rk4") for s in (1, 2, 3, 4)]
    for name, events in per_solver.items():
        method, steps = name.split("_steps")
        assert [e.step for e in events] == [20] and events[0].value == pytest.approx(0.5 + int(steps) / 1000)
    assert [e.step for e in ea.Scalars("loss/train")] == [10, 20]
    images = ea.Images(CROSS_SOLVER_IMAGE)
    assert len(images) == 1 and images[0].step == 20
    png = Image.open(io.BytesIO(images[0].encoded_image_string))
    assert png.format == "PNG" and png.size == (images[0].width, images[0].height) and png.size[0] > 300


def test_a_restarted_driver_writes_nothing_twice_and_a_diverged_run_gets_no_image(tmp_path):
    config = _config(steps=4)
    trial = _run_grid(tmp_path, [config])[0]
    run = Path(trial.path)
    before = sorted(p.name for p in run.iterdir())
    again = TensorBoardCallback()  # the restored driver re-reports the finished trial
    again.on_trial_start(0, [trial], trial)
    again.log_trial_result(2, trial, {"timesteps_total": 20, "test_accuracy": 0.8, "cross_solver": _rows(config)})
    again.on_trial_complete(2, [trial], trial)
    assert sorted(p.name for p in run.iterdir()) == before  # not even an empty event file
    ea = _accumulator(run)
    assert len(ea.Images(CROSS_SOLVER_IMAGE)) == 1 and len(ea.Scalars("cross_solver/rk4_steps0004")) == 1
    assert set(ea.Tags()["tensors"]) == {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"}

    # A diverged seed reports NaN accuracies for its whole matrix: no per-solver scalar, no image.
    diverged = _Trial(tmp_path, _config(steps=8))
    callback = TensorBoardCallback()
    callback.log_trial_start(diverged)
    nan_rows = [{**r, "accuracy": float("nan")} for r in _rows(_config(steps=8))]
    callback.log_trial_result(1, diverged, {"timesteps_total": 5, "diverged_at_iteration": 5, "cross_solver": nan_rows})
    callback.log_trial_end(diverged, failed=True)
    ea = _accumulator(Path(diverged.path))
    assert ea.Tags()["images"] == [] and [e.value for e in ea.Scalars("final/diverged_at_iteration")] == [5]
    assert not [t for t in ea.Tags()["scalars"] if t.startswith("cross_solver/")]
    assert "_hparams_/session_end_info" not in ea.Tags()["tensors"]  # a failed trial may yet be retried
    assert cross_solver_png({"cross_solver": nan_rows}) is None


def test_the_image_is_written_once_the_evaluation_is_known_even_after_a_kill(tmp_path):
    config = _config(steps=2)
    trial = _Trial(tmp_path, config)
    callback = TensorBoardCallback()
    callback.log_trial_start(trial)
    final = {"timesteps_total": 20, "test_accuracy": 0.8}
    callback.log_trial_result(2, trial, final)  # a report without the matrix (as an older final report)
    assert _accumulator(Path(trial.path)).Tags()["images"] == []
    TensorBoardCallback().log_trial_result(2, trial, {**final, "cross_solver": _rows(config)})
    ea = _accumulator(Path(trial.path))
    assert ea.Tags()["images"] == [CROSS_SOLVER_IMAGE]
    assert not [t for t in ea.Tags()["scalars"] if t.startswith("cross_solver/")]  # step 20 was on disk: scalars not again


def test_a_seed_group_gets_a_run_per_seed_with_its_own_hparams(tmp_path):
    configs = [_config("rk4", steps=1, seed=s) for s in (3, 4)]
    trial = _Trial(tmp_path, configs)
    callback = TensorBoardCallback()
    callback.on_trial_start(0, [trial], trial)
    seeds = {"3": {"loss": 0.3, "timesteps_total": 10, "cross_solver": _rows(configs[0])}, "4": {"loss": 0.4, "timesteps_total": 10}}
    callback.log_trial_result(1, trial, {"timesteps_total": 10, "seeds": seeds})
    callback.on_trial_complete(1, [trial], trial)
    assert Path(trial.path).name == "rk4_steps0001_seeds3_4"
    experiment, session_groups = _hparams_backend(tmp_path)
    seeds = {g.name: g.hparams["seed"].number_value for g in session_groups()}
    assert seeds == {"rk4_steps0001_seeds3_4/seed3": 3.0, "rk4_steps0001_seeds3_4/seed4": 4.0}
    assert _accumulator(Path(trial.path) / "seed3").Tags()["images"] == [CROSS_SOLVER_IMAGE]
    assert _accumulator(Path(trial.path) / "seed4").Tags()["images"] == []
    assert set(HPARAM_KEYS) >= {h.name for h in experiment.hparam_infos}


def test_progress_csv_leaves_the_test_matrix_out(tmp_path):
    import pandas as pd

    from tune_node.tune_callbacks import ProgressCSVCallback

    trial = _Trial(tmp_path, _config(steps=2))
    callback = ProgressCSVCallback()
    callback.log_trial_result(1, trial, {"timesteps_total": 20, "loss": 0.4, "cross_solver": _rows(_config(steps=2))})
    callback.log_trial_end(trial)
    table = pd.read_csv(Path(trial.path) / "progress.csv")
    assert list(table.columns) == ["timesteps_total", "loss"]
