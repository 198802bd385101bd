"""Ray Tune callbacks of the experiments: TensorBoard runs with hparams, progress.csv, and progress lines.

:class:`TensorBoardCallback` replaces Ray's TensorBoardX logger: one TensorBoard run per
trial directory (a seed-group trial, config ``{"trial": [...]}``, gets one run per seed in
``<trial dir>/seed<N>/``) with training iterations on the x axis. Scalars are grouped by
what they measure (:data:`TAGS`: ``loss/``, ``accuracy/``, ``nfe/``, ``solver/``, ``final/``,
``cross_solver/``); the end-of-training evaluation adds one ``cross_solver/<test solver>``
accuracy per test setting and an image of accuracy against the test solver
(:data:`CROSS_SOLVER_IMAGE`). The HParams tab gets each run's solver setting as typed
hparams (numbers stay numbers) and an experiment config in which the study's axes
(:data:`AXES`) and whatever else varies are flagged ``differs``, so TensorBoard shows
them first. :class:`ProgressCSVCallback` replaces Ray's ``progress.csv`` logger.

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
import io
import json
import math
import numbers
import os
import sys
import time
from pathlib import Path

from ray.tune.logger import CSVLoggerCallback, TBXLoggerCallback

from .progress import ProgressCallback  # noqa: F401  (it lived here; imports of it stay valid)
from .trainable import is_group, trial_seeds

__all__ = ["TensorBoardCallback", "ProgressCSVCallback", "ProgressCallback", "EventFile", "trial_label", "group_label",
           "HPARAM_KEYS", "HPARAM_METRICS", "AXES", "TAGS", "CROSS_SOLVER_IMAGE", "trial_storage_dir", "run_name",
           "solver_name", "experiment_config"]

#: The trial config keys written as hparams (those a trial has; None is left out).
HPARAM_KEYS = ("dataset", "method", "steps", "tol", "gradient", "seed", "lr", "iterations", "mode", "test_method", "k", "threshold")
#: The study's axes per trial kind: flagged ``differs`` in the experiment config even where one
#: run alone cannot tell, so TensorBoard's HParams tab (which shows the first five ``differs``
#: hparams, then the rest by name) shows them by default.
AXES = {"grid": ("method", "steps", "tol", "gradient", "seed"), "adaptation": ("method", "test_method", "mode", "gradient", "seed")}
#: The reported metrics that are the HParams tab's metric columns, in column order (the first five show).
HPARAM_METRICS = ("test_accuracy", "cross_solver_min_accuracy", "train_accuracy", "nfe_per_iteration", "nfe_forward_per_iteration",
                  "adaptation_nfe_per_iteration")
#: TensorBoard tag of each reported metric. ``final/`` holds numbers known only at the end of
#: training (one point each); ``cross_solver/`` the end-of-training evaluation.
TAGS = {
    "loss": "loss/train",
    "train_accuracy": "accuracy/train",  # the current batch's while training; the whole train set's at the end
    "test_accuracy": "accuracy/test",
    "train_solver_accuracy": "accuracy/check_train_solver",  # an adaptation's checks
    "test_solver_accuracy": "accuracy/check_test_solver",
    "nfe_forward": "nfe/forward",
    "nfe_backward": "nfe/backward",
    "nfe_per_iteration": "nfe/per_iteration",
    "total_nfe": "nfe/total",
    "check_nfe": "nfe/check",
    "train_forward_nfe_per_iteration": "nfe/train_forward_per_iteration",
    "check_nfe_per_iteration": "nfe/check_per_iteration",
    "solver_steps": "solver/steps",
    "tol": "solver/tol",
    "step_size": "solver/step_size",
    "check_accepted": "solver/check_accepted",
    "check_iteration": "solver/check_iteration",
    "nfe_forward_per_iteration": "final/nfe_forward_per_iteration",
    "adaptation_nfe_per_iteration": "final/adaptation_nfe_per_iteration",
    "diverged_at_iteration": "final/diverged_at_iteration",
    "cross_solver_min_accuracy": "cross_solver/min_accuracy",
}
#: The image tag of a run's accuracy against the test solver (written once its evaluation is known).
CROSS_SOLVER_IMAGE = "cross_solver/accuracy_by_test_solver"
#: Where a final report carries its test-matrix rows (``test_method``, ``test_steps``, ``test_tol``, ``accuracy``,
#: ``is_train_solver``, ...): see :mod:`tune_node.experiments.trainable`.
CROSS_SOLVER_KEY = "cross_solver"
# Ray's bookkeeping and the x axis: no curve of the training. Other numbers go under ``other/``.
_NOT_SCALARS = {"config", "pid", "timestamp", "time_total_s", "training_iteration", "seeds", "date", "hostname", "node_ip",
                "trial_id", "experiment_tag", "done", "timesteps_total", "iteration", "time_this_iter_s", "time_since_restore",
                "timesteps_since_restore", "iterations_since_restore", "episodes_total", "checkpoint_dir_name",
                "should_checkpoint", "done_training", CROSS_SOLVER_KEY}
_SESSION_START, _SESSION_END, _EXPERIMENT = "_hparams_/session_start_info", "_hparams_/session_end_info", "_hparams_/experiment"
PROGRESS_CSV = "progress.csv"
#: Zero-padded digits of step counts in run and tag names, so that names sort by steps.
STEP_DIGITS = 4


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


def solver_name(method: str, steps: int | None = None, tol: float | None = None) -> str:
    """``rk4_steps0008`` or ``dopri5_tol1e-04``: a solver setting as a name that sorts.

    Steps are zero-padded to :data:`STEP_DIGITS` digits (names sort by steps up to 9999);
    a tolerance is written in exponent form with up to six significant digits (decades sort
    from coarse to fine, like steps)."""
    if (steps is None) == (tol is None):
        raise ValueError(f"a solver name needs steps or tol, not both nor neither: steps={steps!r}, tol={tol!r}")
    if steps is not None:
        if isinstance(steps, bool) or int(steps) != steps or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return f"{method}_steps{int(steps):0{STEP_DIGITS}d}"
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol!r}")
    mantissa, exponent = f"{float(tol):.5e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{method}_tol{mantissa}e{exponent}"


def run_name(trial_configs: list[dict], number: int | None = None) -> str:
    """A Ray trial's directory (TensorBoard run) name: short, sortable, unique within its experiment.

    ``euler_steps0004_seed0`` (one seed), ``euler_steps0004_seeds0_1`` (a seed group),
    ``dopri5_tol1e-04_adjoint_seed2`` (gradient named unless backprop) and
    ``euler_midpoint_step_seed0`` (an adaptation: train and test method, mode). A grid's or an
    adaptation's settings and seeds are unique; a search may train one setting twice, so its
    names end in the search's trial ``number`` (``_n007``)."""
    if not trial_configs:
        raise ValueError("a run name needs at least one trial config")
    c = trial_configs[0]
    seeds = "seeds" + "_".join(str(t["seed"]) for t in trial_configs) if len(trial_configs) > 1 else f"seed{c['seed']}"
    if c.get("mode") is not None:
        name = f"{c['method']}_{c['test_method']}_{c['mode']}"
    else:
        name = solver_name(c["method"], c.get("steps"), c.get("tol"))
    gradient = c.get("gradient", "backprop")
    name += ("" if gradient == "backprop" else f"_{gradient}") + f"_{seeds}"
    return name if number is None else f"{name}_n{int(number):03d}"


def trial_storage_dir(trial) -> Path:
    """The trial's directory in the experiment's storage (where its checkpoints are), when that
    storage is a local or mounted file system; otherwise Ray's driver staging folder, which Ray
    uploads to the storage, holding the trial's earlier logs (see :func:`_restore_logs`)."""
    storage = getattr(trial, "storage", None)
    filesystem = getattr(storage, "storage_filesystem", None)
    if filesystem is not None and getattr(filesystem, "type_name", "") == "local":
        return Path(trial.path)
    trial.init_local_path()
    directory = Path(trial.local_path)
    if filesystem is not None:
        _restore_logs(filesystem, storage.trial_fs_path, directory)
    return directory


_RESTORED: set[str] = set()


def _restore_logs(filesystem, trial_path: str, directory: Path) -> None:
    """Copy a trial's TensorBoard event files and progress.csv from remote storage into Ray's staging
    folder where that lacks them (once per folder and process). A resumed run starts a new staging
    folder, which Ray uploads over the trial's files: without the earlier lines, it would cut them short."""
    if str(directory) in _RESTORED:
        return
    _RESTORED.add(str(directory))
    import pyarrow.fs as pafs

    try:
        infos = filesystem.get_file_info(pafs.FileSelector(trial_path, recursive=True, allow_not_found=True))
        for info in infos:
            relative = info.path[len(trial_path):].lstrip("/")
            logs = info.base_name == PROGRESS_CSV or info.base_name.startswith("events.out.tfevents.")
            if info.type != pafs.FileType.File or not logs or relative.startswith("checkpoint_"):
                continue
            target = directory / relative
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(info.path) as source, open(target, "wb") as sink:
                sink.write(source.read())
    except OSError as err:  # the logs go on from here; the checkpoints, which matter for the results, are Ray's
        print(f"warning: could not restore the earlier logs of {trial_path}: {err}", file=sys.stderr)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _tag(key: str) -> str:
    return TAGS.get(key, f"other/{key}")


def _scalars(metrics: dict) -> dict[str, float]:
    """The finite real numbers of one seed's result by TensorBoard tag (:data:`TAGS`; unknown keys,
    flattened with ``/``, under ``other/``), with one ``cross_solver/<test solver>`` accuracy per
    evaluated test setting of a final report."""
    scalars = {_tag(key): float(value) for key, value in _flatten(metrics, skip=_NOT_SCALARS).items()
               if _is_number(value) and math.isfinite(value)}
    for row in _test_solvers(metrics):
        if math.isfinite(row["accuracy"]):
            scalars[f"cross_solver/{row['name']}"] = float(row["accuracy"])
    return scalars


def _test_solvers(metrics: dict) -> list[dict]:
    """A final report's test settings, each once (several factors may reach one), in the matrix's order:
    ``name`` (:func:`solver_name`), ``method``, ``steps``, ``tol``, ``accuracy``, ``train`` (the train solver)."""
    rows = metrics.get(CROSS_SOLVER_KEY)
    if not isinstance(rows, list):
        return []
    out: dict[str, dict] = {}
    for r in rows:
        name = solver_name(r["test_method"], r.get("test_steps"), r.get("test_tol"))
        accuracy = float(r["accuracy"]) if _is_number(r.get("accuracy")) else float("nan")
        entry = out.setdefault(name, {"name": name, "method": r["test_method"], "steps": r.get("test_steps"),
                                      "tol": r.get("test_tol"), "accuracy": accuracy, "train": False})
        entry["train"] = entry["train"] or bool(r.get("is_train_solver"))
    return list(out.values())


def _step(result: dict, fallback: dict | None = None) -> int | None:
    for source in (result, fallback or {}):
        for key in ("timesteps_total", "training_iteration"):
            if source.get(key) is not None:
                return int(source[key])
    return None


def _kind(config: dict) -> str:
    return "adaptation" if config.get("mode") is not None else "grid"


def experiment_config(trial_configs: list[dict]) -> dict:
    """The HParams experiment config of runs with these per-seed trial configs, as plain data:
    ``{"hparams": [{"name", "type", "domain", "differs"}...], "metrics": [tag...]}``.

    An hparam's ``type`` is ``"number"`` (its ``domain``: ``[min, max]``), ``"string"`` or
    ``"bool"`` (``domain``: the sorted distinct values); it ``differs`` when its values do or it
    is one of the kind's :data:`AXES`. Order: differing first, then by name (TensorBoard's own).
    Raises ValueError for a key whose values mix types."""
    values: dict[str, list] = {}
    axes: set[str] = set()
    kinds = set()
    for c in trial_configs:
        kinds.add(_kind(c))
        axes.update(AXES[_kind(c)])
        for key in HPARAM_KEYS:
            if c.get(key) is not None:
                values.setdefault(key, []).append(c[key])
    hparams = []
    for key, vs in values.items():
        types = {"bool" if isinstance(v, bool) else "number" if _is_number(v) else "string" if isinstance(v, str) else "other"
                 for v in vs}
        if len(types) != 1 or "other" in types:
            raise ValueError(f"hparam {key!r} needs values of one type (number, string or bool), got {sorted(set(map(repr, vs)))}")
        kind = types.pop()
        distinct = sorted(set(vs))
        domain = [float(distinct[0]), float(distinct[-1])] if kind == "number" else distinct
        hparams.append({"name": key, "type": kind, "domain": domain, "differs": len(distinct) > 1 or key in axes})
    hparams.sort(key=lambda h: (not h["differs"], h["name"]))
    wanted = [k for k in HPARAM_METRICS
              if not (k == "nfe_forward_per_iteration" and "grid" not in kinds)
              and not (k == "adaptation_nfe_per_iteration" and "adaptation" not in kinds)]
    return {"hparams": hparams, "metrics": [_tag(k) for k in wanted]}


def _hparam_value(value):
    from google.protobuf import struct_pb2

    if isinstance(value, bool):
        return struct_pb2.Value(bool_value=value)
    if _is_number(value):
        return struct_pb2.Value(number_value=float(value))
    if isinstance(value, str):
        return struct_pb2.Value(string_value=value)
    raise ValueError(f"an hparam is a number, a string or a bool, got {value!r}")


def _experiment_proto(config: dict):
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import api_pb2

    types = {"number": api_pb2.DATA_TYPE_FLOAT64, "string": api_pb2.DATA_TYPE_STRING, "bool": api_pb2.DATA_TYPE_BOOL}
    infos = []
    for h in config["hparams"]:
        info = api_pb2.HParamInfo(name=h["name"], type=types[h["type"]], differs=h["differs"])
        if h["type"] == "number":
            info.domain_interval.min_value, info.domain_interval.max_value = h["domain"]
        else:
            info.domain_discrete.CopyFrom(struct_pb2.ListValue(values=[_hparam_value(v) for v in h["domain"]]))
        infos.append(info)
    metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in config["metrics"]]
    return api_pb2.Experiment(hparam_infos=infos, metric_infos=metrics)


def _hparams_value(tag: str, **plugin_data):
    """A summary value of TensorBoard's hparams plugin (``experiment``, ``session_start_info`` or
    ``session_end_info``), as TensorBoard's own hparams summaries write it."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2
    from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboardX.proto.tensor_pb2 import TensorProto

    content = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**plugin_data))
    return Summary.Value(tag=tag, metadata=SummaryMetadata.FromString(content.SerializeToString()),
                         tensor=TensorProto.FromString(metadata.NULL_TENSOR.SerializeToString()))


def cross_solver_png(metrics: dict, title: str = "") -> bytes | None:
    """A PNG of a final report's accuracy against the test solver: one line per test method over its
    test steps (fixed step) or tolerances (adaptive, finer to the right), the train solver ringed;
    None when nothing was evaluated (a diverged run)."""
    rows = [r for r in _test_solvers(metrics) if math.isfinite(r["accuracy"])]
    if not rows:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    adaptive = rows[0]["tol"] is not None
    fig = Figure(figsize=(5, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tol"] if adaptive else r["steps"])
        ax.plot([r["tol"] if adaptive else r["steps"] for r in mine], [r["accuracy"] for r in mine], marker="o", label=method)
    for r in rows:
        if r["train"]:
            ax.plot(r["tol"] if adaptive else r["steps"], r["accuracy"], "o", markersize=12, markerfacecolor="none",
                    markeredgecolor="black", label="train solver")
    ax.set_xscale("log")
    if adaptive:
        ax.invert_xaxis()
    else:
        steps = sorted({r["steps"] for r in rows})
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.minorticks_off()
    ax.set_xlabel("test tolerance" if adaptive else "test steps")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


class EventFile:
    """One TensorBoard run, written synchronously into ``logdir``.

    Every write is flushed and fsynced before it returns (tensorboardX's SummaryWriter
    hands events to a writer thread, and its ``flush`` does not wait for that queue).
    Opening a run that already holds event files (a resumed trial) reads what is logged
    there: a later scalar step at or below the last one is skipped, and the hparams
    session (start and end) and each image tag are written once.
    """

    def __init__(self, logdir: str | Path):
        self.logdir = Path(logdir)
        self.last_step, self.tags = self._scan(self.logdir)
        self._writer = None  # opened on the first write: a run with nothing new gets no empty file

    @property
    def has_hparams(self) -> bool:
        """Whether the run has its hparams session (start) already."""
        return _SESSION_START in self.tags

    @staticmethod
    def _scan(logdir: Path) -> tuple[int | None, set[str]]:
        # The legacy loader yields the events as written (the newer one turns scalars into tensors).
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        last, tags = None, set()
        for path in sorted(logdir.glob("events.out.tfevents.*")):
            try:
                for event in LegacyEventFileLoader(str(path)).Load():
                    if not event.HasField("summary"):
                        continue
                    for value in event.summary.value:
                        if value.HasField("simple_value"):
                            last = event.step if last is None else max(last, event.step)
                        else:
                            tags.add(value.tag)
            except Exception:  # a truncated last record (killed mid-write): what was read counts
                continue
        return last, tags

    def _write(self, event) -> None:
        if self._writer is None:
            from tensorboardX.event_file_writer import EventsWriter

            self.logdir.mkdir(parents=True, exist_ok=True)
            # The file name has whole seconds only: the nanosecond suffix keeps two writers of one
            # run apart (a new file is opened with "wb") and in the order TensorBoard reads them.
            self._writer = EventsWriter(str(self.logdir / "events"), filename_suffix=f".{time.time_ns():020d}")
        self._writer.write_event(event)
        self._writer.flush()  # flushes and fsyncs

    def _write_values(self, values: list, step: int = 0) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        self._write(Event(wall_time=time.time(), step=int(step), summary=Summary(value=values)))
        self.tags.update(v.tag for v in values)

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

    def add_image(self, tag: str, png: bytes, step: int) -> bool:
        """Log a PNG image under ``tag`` at ``step``, once per tag; False when the run has that tag already."""
        from tensorboardX.proto.summary_pb2 import Summary

        if tag in self.tags:
            return False
        if png[:8] != b"\x89PNG\r\n\x1a\n":
            raise ValueError(f"image {tag!r}: expected PNG bytes")
        width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=png)
        self._write_values([Summary.Value(tag=tag, image=image)], step)
        return True

    def start_session(self, params: dict, config: dict | None = None) -> bool:
        """The HParams tab's record of this run: ``params`` (name -> number, string or bool) and the
        experiment config (:func:`experiment_config`; default: these params alone), once per run."""
        from tensorboard.plugins.hparams import plugin_data_pb2

        if self.has_hparams:
            return False
        config = config if config is not None else experiment_config([params])
        start = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
        for key, value in params.items():
            if value is not None:
                start.hparams[key].CopyFrom(_hparam_value(value))
        self._write_values([_hparams_value(_EXPERIMENT, experiment=_experiment_proto(config)),
                            _hparams_value(_SESSION_START, session_start_info=start)])
        return True

    def end_session(self, success: bool = True) -> bool:
        """Mark the run's session ended (successfully or not), once per run; False when it was already."""
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

        if _SESSION_END in self.tags:
            return False
        status = api_pb2.STATUS_SUCCESS if success else api_pb2.STATUS_FAILURE
        self._write_values([_hparams_value(_SESSION_END, session_end_info=plugin_data_pb2.SessionEndInfo(
            status=status, end_time_secs=time.time()))])
        return True

    def add_hparams(self, params: dict, metrics: dict | None = None) -> None:
        """A whole session at once (start and successful end), with ``params``' own experiment config;
        ``metrics`` names its metric columns (TensorBoard reads their values from the scalars)."""
        config = experiment_config([params]) if set(params) <= set(HPARAM_KEYS) else _plain_config(params)
        if metrics is not None:
            config["metrics"] = list(metrics)
        self.start_session(params, config)
        self.end_session(True)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _plain_config(params: dict) -> dict:
    """The experiment config of arbitrary params (no trial config): each one as it is, nothing flagged."""
    hparams = []
    for key, value in sorted(params.items()):
        if value is None:
            continue
        kind = "bool" if isinstance(value, bool) else "number" if _is_number(value) else "string"
        hparams.append({"name": key, "type": kind, "domain": [float(value)] * 2 if kind == "number" else [value], "differs": False})
    return {"hparams": hparams, "metrics": []}


class TensorBoardCallback(TBXLoggerCallback):
    """TensorBoard runs of every trial, one per seed, with the trial's solver setting as hparams.

    A subclass of Ray's TensorBoardX logger so that Ray does not add its own; it shares none
    of its writing (see the module's docstring). A run's hparams session starts with the
    trial (running trials show in the HParams tab) and ends when the trial completes; its
    experiment config covers every trial config this driver has seen by then (a grid's
    are all created before the first one starts).
    """

    def __init__(self):
        super().__init__()
        self._runs: dict = {}  # trial -> {seed or None: EventFile}
        self._configs: dict[str, dict] = {}  # every per-seed trial config seen, by its JSON

    def __getstate__(self):  # pickled into the Tuner's state: open files stay behind
        return {**self.__dict__, "_runs": {}, "_configs": {}, "_trial_writer": {}, "_trial_result": {}}

    def _remember(self, trials) -> None:
        for t in trials:
            config = getattr(t, "config", None)
            if isinstance(config, dict) and "trial" in config:
                for c in trial_seeds(config):
                    self._configs.setdefault(json.dumps(c, sort_keys=True, default=str), c)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._remember(trials)
        super().on_trial_start(iteration, trials, trial, **info)

    def _open(self, trial) -> None:
        for run in self._runs.pop(trial, {}).values():
            run.close()
        self._remember([trial])
        directory = trial_storage_dir(trial)
        if is_group(trial.config):
            runs = {c["seed"]: EventFile(directory / f"seed{c['seed']}") for c in trial_seeds(trial.config)}
        else:
            runs = {None: EventFile(directory)}
        self._runs[trial] = runs
        configs = {c["seed"]: c for c in trial_seeds(trial.config)} if is_group(trial.config) else {None: trial.config["trial"]}
        experiment = experiment_config(list(self._configs.values()))
        for seed, run in runs.items():
            config = configs[seed]
            run.start_session({k: config[k] for k in HPARAM_KEYS if config.get(k) is not None}, experiment)

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
            if step is None:
                continue
            run.add_scalars(_scalars(metrics), step)
            if CROSS_SOLVER_IMAGE not in run.tags and _test_solvers(metrics):
                config = trial_seeds(trial.config)[0] if seed is None else next(c for c in trial_seeds(trial.config) if c["seed"] == seed)
                png = cross_solver_png(metrics, title=trial_label(config))
                if png is not None:
                    run.add_image(CROSS_SOLVER_IMAGE, png, step)

    def log_trial_end(self, trial, failed: bool = False) -> None:
        # A failed trial may be retried and still succeed: only a completed one ends its session.
        for run in self._runs.pop(trial, {}).values():
            if not failed:
                run.end_session(True)
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
        row = _flatten(result, skip=_CSV_SKIP)
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


# The test-matrix rows of a final report are final.json's and TensorBoard's, no CSV column.
_CSV_SKIP = frozenset({"config", CROSS_SOLVER_KEY})


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
