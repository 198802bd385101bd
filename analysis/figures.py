"""The paper's figures, drawn from results on disk.

``python -m analysis.figures RESULTS_DIR [--out DIR]`` writes every figure the results
allow (PNG, and SVG unless ``--no-svg``) and prints a note for each it has to skip;
``python -m analysis.figures --checkpoint PATH`` draws one 2-D model's trajectories.

- ``accuracy_vs_steps`` (Figure 4, Appendix B/E): per dataset and train method, test
  accuracy against the test solver's number of steps; one colour per training step
  count, the train solver's own point dark, other test solvers and factors light,
  markers by test method; the critical setting marked when known.
- ``accuracy_vs_tolerance``: the same for adaptive train solvers, against tolerance.
- ``adaptation`` (Figure 5): test accuracy, number of steps (or tolerance) and check
  cost against iteration, one line per seed, checks marked.
- ``trajectories_*`` (Figures 1 and 2): for 2-D models, the ODE block's paths of test
  points under the train solver and a finer one, and the classifier's decision regions
  over the block's outputs; ``crossing_vs_steps``: the crossing fraction of every 2-D
  fixed-step trial.
- ``xor`` (Figure 3) and ``appendix_a`` (Figures 6 and 7): the hand-made examples
  (also ``python -m analysis.examples``).

Nothing here trains; trajectory figures load trial checkpoints and run the solver.
"""

from __future__ import annotations

import argparse
import io
import math
from pathlib import Path
from typing import Mapping

import matplotlib
import matplotlib.patches
import matplotlib.ticker
import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import examples
from .crossing import crossing_stats, solver_paths

__all__ = [
    "RESULT_COLUMNS",
    "HISTORY_COLUMNS",
    "load_results",
    "load_adaptation_history",
    "accuracy_figure",
    "adaptation_figure",
    "trajectory_figure",
    "crossing_vs_steps_figure",
    "xor_figure",
    "save_figure",
    "png_bytes",
    "trajectory_trials",
    "crossing_table",
    "critical_from_summary",
    "appendix_a_figure",
    "write_all",
]

RESULT_COLUMNS = (
    "trial_id", "dataset", "train_method", "train_steps", "train_tol", "gradient", "seed",
    "checkpoint", "test_method", "test_steps", "test_tol", "factor", "accuracy", "is_train_solver",
)
HISTORY_COLUMNS = ("trial_id", "seed", "iteration", "step_size", "tol", "steps", "check_nfe", "test_accuracy")
CLASS_COLOURS = ("#1f5fa8", "#e8731a")  # class 0 blue, class 1 orange, as in the paper
REGION_COLOURS = ("#d6e4f5", "#fbe1cc")
METHOD_MARKERS = {"euler": "o", "midpoint": "X", "rk4": "^", "fehlberg2": "o", "dopri5": "^"}
METHOD_NAMES = {"euler": "Euler", "midpoint": "Midpoint", "rk4": "RK4", "fehlberg2": "Fehlberg21", "dopri5": "Dopri54"}
# Crossing checks cost pairs x steps^2 segment tests; figures keep each under ~1e8.
_CROSSING_BUDGET = 100_000_000


def _name(method: str) -> str:
    return METHOD_NAMES.get(method, method)


def _subplots(nrows: int = 1, ncols: int = 1, figsize=None, **kwargs):
    # Figures on their own Agg canvas, outside pyplot: no global backend switch, nothing
    # to close, and notebooks keep their own backend.
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def png_bytes(fig, dpi: int = 110) -> bytes:
    """``fig`` rendered as PNG (for ``IPython.display.Image`` in notebooks)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(fig, out: str | Path, name: str, svg: bool = True, dpi: int = 130) -> list[Path]:
    """Write ``fig`` as ``out/name.png`` at ``dpi`` (and ``.svg``); returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png"]
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight")
    if svg:
        paths.append(out / f"{name}.svg")
        fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _check_columns(df: pd.DataFrame, needed, what: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; it has {list(df.columns)}")


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """The grid's results table under ``results_dir`` (``results.csv``, else
    ``results.parquet``) or the file itself, validated."""
    path = Path(results_dir)
    if path.is_dir():
        candidates = [path / "results.csv", path / "results.parquet"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise FileNotFoundError(f"no grid results at {str(path)!r} (expected results.csv or results.parquet written by the grid)")
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    _check_columns(df, RESULT_COLUMNS, str(path))
    df["is_train_solver"] = df["is_train_solver"].astype(str).str.lower().eq("true")
    return df


def load_adaptation_history(where: str | Path) -> pd.DataFrame | None:
    """Every ``adaptation_history.csv`` at or below ``where``, concatenated; None if there is none."""
    where = Path(where)
    files = [where] if where.is_file() else sorted(where.rglob("adaptation_history.csv"))
    if not files:
        return None
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    _check_columns(df, HISTORY_COLUMNS, ", ".join(map(str, files)))
    return df


# ------------------------------------------------------- accuracy vs steps / tolerance


def _panel_keys(df: pd.DataFrame) -> list[tuple]:
    keys = df[["dataset", "train_method", "gradient"]].drop_duplicates().itertuples(index=False, name=None)
    return sorted(keys)


def _critical_for(critical: Mapping | None, dataset: str, method: str, gradient: str):
    if not critical:
        return None
    for key in ((dataset, method, gradient), (dataset, method)):
        if key in critical and critical[key] is not None and not pd.isna(critical[key]):
            return float(critical[key])
    return None


def critical_from_summary(summary: pd.DataFrame) -> dict:
    """The ``critical`` mapping of :func:`accuracy_figure` from a critical-step summary
    (one row per ``dataset, train_method, gradient`` with ``critical_steps`` and/or
    ``critical_tol``, as ``analysis.critical_step`` reports it); rows without a
    critical setting are left out."""
    _check_columns(summary, ("dataset", "train_method", "gradient"), "critical-step summary")
    critical = {}
    for row in summary.to_dict("records"):
        for column in ("critical_steps", "critical_tol"):
            value = row.get(column)
            if value is not None and not pd.isna(value):
                critical[(row["dataset"], row["train_method"], row["gradient"])] = float(value)
    return critical


def _critical_from_module(results: pd.DataFrame, log) -> dict | None:
    # analysis.critical_step belongs to the grid experiment; draw without it when absent.
    try:
        from . import critical_step
    except ImportError:
        log("no critical step marked: analysis.critical_step is not available")
        return None
    finder = getattr(critical_step, "critical_steps", None)
    if finder is None:
        log("no critical step marked: analysis.critical_step has no critical_steps()")
        return None
    return critical_from_summary(finder(results))


def accuracy_figure(results: pd.DataFrame, adaptive: bool = False, critical: Mapping | None = None):
    """Figure 4 style: test accuracy against the test solver's steps (or tolerance).

    Arguments:
        results: the grid's results table (see :func:`load_results`).
        adaptive: draw adaptive train solvers against tolerance instead of fixed-step
            ones against steps.
        critical: the critical train setting per panel, keyed by
            ``(dataset, train_method, gradient)`` or ``(dataset, train_method)``: a
            number of steps (fixed) or a tolerance (adaptive). Marked by a dashed line.

    Each point is the mean over seeds of one (train setting, test setting); error bars
    span +- one standard deviation. Returns None when the table has no such trials.
    """
    train_col, test_col = ("train_tol", "test_tol") if adaptive else ("train_steps", "test_steps")
    df = results[results[train_col].notna()]
    if df.empty:
        return None
    keys = _panel_keys(df)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = _subplots(nrows, ncols, figsize=(5.0 * ncols + 1.6, 4.0 * nrows), squeeze=False)
    train_values = sorted(df[train_col].unique(), reverse=adaptive)  # coarse -> fine
    cmap = matplotlib.colormaps["plasma"]  # dark to bright, stopping before the pale yellow end
    colour = {v: cmap(0.85 * i / max(1, len(train_values) - 1)) for i, v in enumerate(train_values)}
    for ax, (dataset, method, gradient) in zip(axes.flat, keys):
        panel = df[(df.dataset == dataset) & (df.train_method == method) & (df.gradient == gradient)]
        seeds = panel.seed.nunique()
        for value in sorted(panel[train_col].unique()):
            trained = panel[panel[train_col] == value]
            stats = trained.groupby(["test_method", test_col, "is_train_solver"]).accuracy.agg(["mean", "std"]).reset_index()
            for test_method, by_method in stats.groupby("test_method"):
                marker = METHOD_MARKERS.get(test_method, "s")
                line = by_method.groupby(test_col)["mean"].mean().sort_index()
                ax.plot(line.index, 100 * line.values, color=colour[value], alpha=0.3, lw=1)
                light = by_method[~by_method.is_train_solver]
                ax.scatter(light[test_col], 100 * light["mean"], marker=marker, color=colour[value], alpha=0.45, s=30, zorder=2, lw=0)
                dark = by_method[by_method.is_train_solver]
                if dark.empty:
                    continue
                ax.errorbar(dark[test_col], 100 * dark["mean"], yerr=100 * dark["std"].fillna(0), fmt=marker, color=colour[value],
                            ms=9, mec="black", mew=0.8, elinewidth=1.0, capsize=2, zorder=3)
        crit = _critical_for(critical, dataset, method, gradient)
        if crit is not None:
            ax.axvline(crit, color="crimson", ls="--", lw=1.2, zorder=1)
            label = f"critical: {crit:g} steps" if not adaptive else f"critical: tol {crit:g}"
            ax.annotate(label, (crit, 0.02), xycoords=("data", "axes fraction"), color="crimson", fontsize=8,
                        rotation=90, ha="right", va="bottom")
        if adaptive:
            ax.set_xscale("log")
            ax.invert_xaxis()  # finer solvers to the right, as with steps
            ax.set_xlabel("test tolerance (finer to the right)")
        else:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.set_xlabel("test solver: number of steps")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(min(45.0, float(100 * panel.accuracy.min()) - 3), 101)
        grad = "" if gradient == "backprop" else f", {gradient}"
        ax.set_title(f"{dataset}: trained with {_name(method)}{grad} ({seeds} seed{'s' if seeds != 1 else ''})", fontsize=10)
        ax.grid(alpha=0.25)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    unit_of = (lambda v: "tol") if adaptive else (lambda v: "step" if v == 1 else "steps")
    handles = [Line2D([], [], marker="s", ls="", color=colour[v], ms=8, label=f"trained with {v:g} {unit_of(v)}") for v in train_values]
    handles.append(Line2D([], [], ls="", label=""))
    methods = sorted(df.test_method.unique(), key=lambda m: list(METHOD_MARKERS).index(m) if m in METHOD_MARKERS else 99)
    handles += [Line2D([], [], marker=METHOD_MARKERS.get(m, "s"), ls="", color="0.35", label=f"test: {_name(m)}") for m in methods]
    handles.append(Line2D([], [], marker="o", ls="", color="0.2", mec="black", ms=9, label="train solver itself"))
    handles.append(Line2D([], [], marker="o", ls="", color="0.2", alpha=0.4, label="other test settings"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    what = "tolerance" if adaptive else "number of steps"
    sep = "\n" if ncols == 1 else " "
    fig.suptitle(f"Test accuracy against the test solver's {what}:{sep}means over seeds; dark: the train solver (bars +- 1 std)", fontsize=11)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------- adaptation


def adaptation_figure(history: pd.DataFrame):
    """Figure 5 style: test accuracy, number of steps (or tolerance) and the check cost
    against iteration, one line per seed (``trial_id``), one marker per check.

    A filled marker is a check that moved the setting to its proposal (halved, or grew
    and was confirmed), an open one a check whose proposal was rejected. Rows without ``test_accuracy`` are left out of
    the accuracy panel (the batch accuracy under the train solver is drawn instead
    when no row has it).
    """
    _check_columns(history, HISTORY_COLUMNS, "adaptation history")
    history = history.sort_values(["trial_id", "iteration"])
    tolerance_mode = history["step_size"].isna().all() and history["tol"].notna().any()
    has_test = history["test_accuracy"].notna().any()
    acc_col = "test_accuracy" if has_test else "train_solver_accuracy"
    fig, axes = _subplots(3, 1, figsize=(7.5, 8.2), sharex=True)
    colours = matplotlib.colormaps["tab10"]
    n_runs = history["trial_id"].nunique()
    for k, (trial, run) in enumerate(history.groupby("trial_id", sort=True)):
        c = colours(k % 10)
        accepted = run["accepted"].astype(str).str.lower().eq("true") if "accepted" in run else pd.Series(False, index=run.index)
        seed = run["seed"].iloc[0]
        acc = run[run[acc_col].notna()] if acc_col in run else run.iloc[0:0]
        axes[0].plot(acc.iteration, 100 * acc[acc_col], color=c, lw=1.4, label=f"seed {seed}")
        # Seeds often share a setting: offset each line by a few percent (log axis) to keep all visible.
        second = (run["tol"] if tolerance_mode else run["steps"]) * (1.0 + 0.03 * (k - (n_runs - 1) / 2))
        axes[1].plot(run.iteration, second, color=c, lw=1.4, drawstyle="steps-post")
        axes[2].plot(run.iteration, run.check_nfe, color=c, lw=1.0, alpha=0.7)
        for ax, ys in ((axes[0], 100 * run[acc_col] if acc_col in run else None), (axes[1], second), (axes[2], run.check_nfe)):
            if ys is None:
                continue
            ax.scatter(run.iteration[accepted], ys[accepted], color=c, s=22, zorder=3)
            ax.scatter(run.iteration[~accepted], ys[~accepted], facecolor="white", edgecolor=c, s=22, zorder=3)
    axes[0].set_ylabel("test accuracy (%)" if has_test else "batch accuracy,\ntrain solver (%)")
    if tolerance_mode:
        axes[1].set_yscale("log")
        axes[1].set_ylabel("tolerance")
    else:
        axes[1].set_yscale("log", base=2)
        axes[1].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axes[1].set_ylabel("number of steps")
    axes[2].set_ylabel("NFE of the check")
    axes[2].set_xlabel("training iteration")
    for ax in axes:
        ax.grid(alpha=0.25)
    markers = [
        Line2D([], [], marker="o", ls="", color="0.3", label="check: setting changed"),
        Line2D([], [], marker="o", ls="", mfc="white", color="0.3", label="check: proposal rejected"),
    ]
    fig.suptitle("Step adaptation over training" if not tolerance_mode else "Tolerance adaptation over training", fontsize=11)
    handles = axes[0].get_legend_handles_labels()[0] + markers
    fig.legend(handles=handles, fontsize=8, loc="upper center", ncol=min(6, len(handles)), frameon=False, bbox_to_anchor=(0.5, 0.965))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


# ------------------------------------------------------ phase-space trajectories


def _finer_setting(setting):
    from tune_node.solvers import SolverSetting

    # RK4 at 8x the steps (capped so crossing checks stay cheap): close to the exact flow.
    return SolverSetting.fixed("rk4", min(256, max(16, 8 * setting.steps)), setting.gradient, setting.T)


def _stratified_subset(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    if len(labels) <= count:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        picked.append(rng.choice(idx, size=max(1, round(count * len(idx) / len(labels))), replace=False))
    return np.sort(np.concatenate(picked))


def _draw_paths(ax, paths: np.ndarray, labels: np.ndarray, show: np.ndarray):
    for c in (0, 1):
        idx = show[labels[show] == c]
        segments = paths[:, idx].transpose(1, 0, 2)
        ax.add_collection(LineCollection(segments, colors=CLASS_COLOURS[c], linewidths=0.6, alpha=0.45, rasterized=True))
        ax.scatter(paths[-1, idx, 0], paths[-1, idx, 1], s=5, color=CLASS_COLOURS[c], zorder=3, rasterized=True)
    ax.scatter(paths[0, show, 0], paths[0, show, 1], s=1.5, color="0.25", alpha=0.7, zorder=3, rasterized=True)
    ax.autoscale()


@torch.no_grad()
def _draw_regions(ax, model, z_end: np.ndarray, labels: np.ndarray):
    lo, hi = z_end.min(0), z_end.max(0)
    pad = 0.08 * (hi - lo) + 1e-6
    gx, gy = np.meshgrid(np.linspace(lo[0] - pad[0], hi[0] + pad[0], 300), np.linspace(lo[1] - pad[1], hi[1] + pad[1], 300))
    grid = torch.tensor(np.stack([gx.ravel(), gy.ravel()], 1), dtype=torch.float32)
    pred = model.classify(grid).argmax(1).numpy().reshape(gx.shape)
    ax.contourf(gx, gy, pred, levels=[-0.5, 0.5, 1.5], colors=REGION_COLOURS)
    for c in (0, 1):
        ax.scatter(z_end[labels == c, 0], z_end[labels == c, 1], s=5, color=CLASS_COLOURS[c], rasterized=True)
    ax.set_xlim(gx.min(), gx.max())
    ax.set_ylim(gy.min(), gy.max())


def _h_label(setting) -> str:
    steps = setting.steps
    return f"{_name(setting.method)}, {steps} step{'s' if steps != 1 else ''} (h = 1/{steps})" if steps != 1 else f"{_name(setting.method)}, 1 step (h = 1)"


def trajectory_figure(checkpoint: str | Path, finer=None, max_paths: int = 300, max_pairs: int = 20_000, seed: int = 0):
    """Figures 1 and 2 for a 2-D model: paths and decision regions under two solvers.

    Arguments:
        checkpoint: a trial's ``checkpoint.pt`` (``tune_node.training`` format) of a
            model on 2-D data trained with a fixed-step solver.
        finer: the comparison setting; default RK4 at 8x the train steps (at most 256).
        max_paths: test points whose paths are drawn (a class-stratified, seeded subset;
            accuracy and crossing use the whole test set).
        max_pairs, seed: passed to :func:`~analysis.crossing.crossing_stats`.

    Top row: paths of test points under the train solver and under ``finer``,
    coloured by true class; bottom row: the ODE block's outputs with the classifier's
    decision regions (light) under each. Titles give accuracy and crossing fraction.
    """
    from tune_node.datasets import load_dataset
    from tune_node.training import load_checkpoint, restore_model

    model, setting, config = restore_model(load_checkpoint(checkpoint))
    model.eval()
    if setting.is_adaptive:
        raise ValueError(f"trajectory figures need a fixed-step train solver; {checkpoint} was trained with {setting.label()}")
    data = load_dataset(config.dataset, config.seed, config.data_root)
    if tuple(data.input_shape) not in ((1, 2), (2,)):
        raise ValueError(f"trajectory figures need 2-D data; {config.dataset} has examples of shape {data.input_shape}")
    finer = finer or _finer_setting(setting)
    labels = data.y_test.numpy()
    show = _stratified_subset(labels, max_paths, seed)
    fig, axes = _subplots(2, 2, figsize=(10.5, 10))
    for col, s in enumerate((setting, finer)):
        paths = solver_paths(model, data.x_test, s)
        budget_pairs = max(200, _CROSSING_BUDGET // (s.steps * s.steps))
        stats = crossing_stats(paths, labels, min(max_pairs, budget_pairs), seed)
        with torch.no_grad():
            acc = float((model.classify(torch.tensor(paths[-1], dtype=torch.float32)).argmax(1).numpy() == labels).mean())
        role = "train solver" if col == 0 else "finer solver"
        _draw_paths(axes[0, col], paths, labels, show)
        axes[0, col].set_title(f"{role}: {_h_label(s)}\ncrossing: {100 * stats.fraction:.1f} % of different-class pairs", fontsize=10)
        _draw_regions(axes[1, col], model, paths[-1], labels)
        axes[1, col].set_title(f"outputs z(T) under {_h_label(s)}\ntest accuracy {100 * acc:.1f} %", fontsize=10)
        axes[0, col].set_aspect("equal", adjustable="datalim")
        for ax in axes[:, col]:
            ax.set_xlabel("$z_1$")
            ax.set_ylabel("$z_2$")
    handles = [Line2D([], [], color=CLASS_COLOURS[c], lw=2, label=f"class {c}") for c in (0, 1)]
    handles.append(Line2D([], [], marker="o", ls="", color="0.25", ms=3, label="initial value"))
    handles += [matplotlib.patches.Patch(color=REGION_COLOURS[c], label=f"classified as {c}") for c in (0, 1)]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False, fontsize=9, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"{config.dataset}, seed {config.seed}: model trained with {_h_label(setting)}", fontsize=12)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def crossing_table(results: pd.DataFrame, max_pairs: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Crossing fraction of the train solver's test-point paths, per 2-D fixed-step trial.

    One row per trial: ``trial_id, dataset, train_method, train_steps, seed, crossing``.
    Each uses at most ``max_pairs`` different-class pairs (fewer for many steps: at
    most ~1e8 segment tests per trial), drawn with ``seed``.
    """
    from tune_node.training import load_checkpoint, restore_model
    from tune_node.datasets import load_dataset

    trials = results[results.train_steps.notna()].drop_duplicates("trial_id")
    rows = []
    for t in trials.itertuples(index=False):
        if not Path(t.checkpoint).is_file():
            continue
        model, setting, config = restore_model(load_checkpoint(t.checkpoint))
        data = load_dataset(config.dataset, config.seed, config.data_root)
        if tuple(data.input_shape) != (1, 2):
            continue
        pairs = min(max_pairs, max(100, _CROSSING_BUDGET // (setting.steps * setting.steps)))
        stats = crossing_stats(solver_paths(model, data.x_test, setting), data.y_test.numpy(), pairs, seed)
        rows.append({"trial_id": t.trial_id, "dataset": t.dataset, "train_method": t.train_method,
                     "train_steps": int(t.train_steps), "seed": t.seed, "crossing": stats.fraction})
    return pd.DataFrame(rows, columns=["trial_id", "dataset", "train_method", "train_steps", "seed", "crossing"])


def crossing_vs_steps_figure(table: pd.DataFrame):
    """Crossing fraction against training steps, one marker per trial (from :func:`crossing_table`)."""
    if table.empty:
        return None
    fig, ax = _subplots(figsize=(6.4, 4.2))
    for k, (method, rows) in enumerate(table.groupby("train_method")):
        jitter = 1.0 + 0.04 * (k - 0.5)  # keep methods apart at equal step counts
        ax.scatter(rows.train_steps * jitter, 100 * rows.crossing, marker=METHOD_MARKERS.get(method, "s"), s=40,
                   alpha=0.75, label=f"trained with {_name(method)}")
        mean = rows.groupby("train_steps").crossing.mean()
        ax.plot(mean.index * jitter, 100 * mean.values, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("train solver: number of steps")
    ax.set_ylabel("crossing different-class pairs (%)")
    ax.set_title("Trajectory crossing under the train solver (one marker per trial)", fontsize=10)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


# -------------------------------------------------------- hand-made examples


def _xor_panel(ax, step_exponent: float, flow, letter: str) -> None:
    x, y = examples.xor_data()
    paths = flow.paths(10.0**step_exponent, x)
    for i in range(len(x)):
        ax.plot(paths[:, i, 0], paths[:, i, 1], color=CLASS_COLOURS[y[i]], lw=0.7, alpha=0.8)
    end = paths[-1]
    for c in (0, 1):
        ax.scatter(end[y == c, 0], end[y == c, 1], s=70, color=CLASS_COLOURS[c], edgecolor="black", zorder=4, label=f"class {c}")
    line = examples.separating_line(end, y)
    if line is not None:
        w, b = line
        # Two points of w . z + b = 0; axline leaves the axis limits to the data.
        p0 = -b * w / float(w @ w)
        ax.axline(tuple(p0), tuple(p0 + np.array([-w[1], w[0]])), color="black", ls=":", lw=1.6, label="widest separating line")
    verdict = "linearly separable" if line is not None else "not linearly separable"
    steps = max(1, round(flow.T / 10.0**step_exponent))
    ax.set_title(f"({letter}) Euler, h = $10^{{{step_exponent:g}}}$ ({steps} steps): {verdict}", fontsize=10)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_xlabel("$z_1$")
    ax.set_ylabel("$z_2$")
    ax.legend(fontsize=8, loc="upper right")


def xor_figure(flow=None, exponents=(-2.5, -3.5)):
    """Figure 3: Euler on the XOR flow at two step sizes, and separability against log10 h."""
    flow = flow or examples.XOR_FLOW
    fig, axes = _subplots(1, 3, figsize=(16, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.15]})
    for ax, e, letter in zip(axes, exponents, "ab"):
        _xor_panel(ax, e, flow, letter)
    grid = np.round(np.arange(-4.0, -1.0 + 1e-9, 0.05), 2)
    sep = examples.xor_separability_sweep(grid, flow)
    ok = np.array([s is not None for s in sep])
    values = np.array([1.0 if s else 0.0 for s in sep])
    ax = axes[2]
    ax.step(grid, np.where(ok, values, np.nan), where="mid", color="0.3", lw=1)
    ax.scatter(grid[ok], values[ok], s=14, color=np.where(values[ok] > 0, "#2a9d55", "#b23a48"), zorder=3)
    if (~ok).any():
        ax.scatter(grid[~ok], np.full((~ok).sum(), 0.5), marker="x", color="0.5", s=14, label="Euler diverged")
        ax.legend(fontsize=8, loc="center left")
    for letter, e in zip("ab", exponents):
        ax.axvline(e, color="0.6", ls="--", lw=0.8)
        ax.annotate(f"({letter})", (e, 1.18), ha="center", fontsize=9, color="0.4")
    ax.set_yticks([0, 1], ["not separable (0)", "separable (1)"])
    ax.set_ylim(-0.3, 1.3)
    ax.set_xlabel("$\\log_{10}$(step size)")
    ax.set_title("(c) Linear separability of Euler's outputs", fontsize=10)
    ax.grid(alpha=0.25)
    fig.suptitle(
        "XOR flow (our reading of Eq. 4): $\\dot z_1 = \\gamma z_1 - \\alpha |z|^\\delta z_2$, $\\dot z_2 = \\beta |z|^\\delta z_1 + \\gamma z_2$"
        f" with $\\gamma$ = {flow.gamma:g}, $\\alpha$ = {flow.alpha:g}, $\\beta$ = {flow.beta:g}, $\\delta$ = {flow.delta:g}, t in [0, {flow.T:g}]",
        fontsize=11)
    fig.tight_layout()
    return fig


def _appendix_a_background(ax) -> None:
    gx, gy = np.meshgrid(np.linspace(0, 3, 25), np.linspace(0, 2, 17))
    v = examples.appendix_a_field(np.stack([gx, gy], -1))
    ax.quiver(gx, gy, v[..., 0], v[..., 1], color="0.75", angles="xy", width=0.003, headwidth=3, zorder=1)
    ax.axvspan(1, 2, color="0.93", zorder=0)


def appendix_a_figure(extra_x0: float = 1.5):
    """Figures 6 and 7: the field, and Euler paths at h = 1, 1/2, 2^-5 without (top) and
    with (bottom) the extra IVPs at ``x(0) = extra_x0``; crossing pairs in the titles."""
    fig, axes = _subplots(2, 3, figsize=(15, 8.2), sharex=True, sharey=True)
    labels = {1.0: "h = 1", 0.5: "h = 1/2", 2.0**-5: "h = $2^{-5}$"}
    for row, extra in enumerate((None, extra_x0)):
        for ax, h in zip(axes[row], examples.APPENDIX_A_STEPS):
            _appendix_a_background(ax)
            paths, groups = examples.appendix_a_paths(h, extra)
            stats = crossing_stats(paths)
            for i in range(paths.shape[1]):
                colour = CLASS_COLOURS[groups[i]]
                ax.plot(paths[:, i, 0], paths[:, i, 1], color=colour, lw=1.1, marker="o" if h >= 0.5 else None, ms=3, zorder=2)
            ivps = "x(0) = 0" if extra is None else f"x(0) = 0 and {extra:g}"
            verdict = "no crossing" if stats.crossing == 0 else f"{stats.crossing} of {stats.tested} pairs cross"
            ax.set_title(f"Euler {labels[h]}, IVPs at {ivps}: {verdict}", fontsize=10)
            ax.set_xlim(-0.05, 3.05)
            ax.set_ylim(-0.2, 2.2)
    axes[1, 2].legend(handles=[Line2D([], [], color=CLASS_COLOURS[0], label="IVPs at x(0) = 0"),
                               Line2D([], [], color=CLASS_COLOURS[1], label=f"extra IVPs at x(0) = {extra_x0:g}")],
                      loc="lower right", fontsize=8, framealpha=0.9)
    for ax in axes[1]:
        ax.set_xlabel("x")
    for ax in axes[:, 0]:
        ax.set_ylabel("y")
    fig.suptitle("Appendix A field (our reconstruction of Eq. 6): f = (1 - b(x), 6 b(x) (1 - y)); curved only for x in (1, 2] (shaded)",
                 fontsize=11)
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------ CLI


def trajectory_trials(results: pd.DataFrame) -> list:
    """Trials worth a trajectory figure, as result rows: per 2-D dataset, fixed train
    method and gradient, at the smallest seed, the trial trained with 2 steps (the
    paper's h = 1/2; else the fewest steps) and the one trained with the most."""
    fixed = results[results.train_steps.notna() & results.dataset.eq("sphere2")].drop_duplicates("trial_id")
    chosen = []
    for _, group in fixed.groupby(["dataset", "train_method", "gradient"]):
        group = group[group.seed == group.seed.min()]
        steps = sorted(group.train_steps.unique())
        picks = [2.0 if 2.0 in steps else steps[0], steps[-1]]
        for s in dict.fromkeys(picks):
            chosen.append(group[group.train_steps == s].iloc[0])
    return chosen


def write_all(results_dir: str | Path, out: str | Path, critical: Mapping | None = None, adaptation_dir: str | Path | None = None,
              svg: bool = True, examples_too: bool = True, log=print) -> list[Path]:
    """Write every figure the results allow to ``out``; ``log`` one note per skipped figure.

    Arguments:
        results_dir: folder holding the grid's ``results.csv``.
        out: folder for the images.
        critical: critical settings for :func:`accuracy_figure`; by default from
            ``analysis.critical_step`` when that module is available.
        adaptation_dir: where to look for ``adaptation_history.csv`` (default: ``results_dir``).
        svg: also write SVG.
        examples_too: also draw the XOR and Appendix A examples.
    """
    out = Path(out)
    results = load_results(results_dir)
    if critical is None:
        critical = _critical_from_module(results, log)
    written: list[Path] = []
    for adaptive, name in ((False, "accuracy_vs_steps"), (True, "accuracy_vs_tolerance")):
        fig = accuracy_figure(results, adaptive=adaptive, critical=critical)
        if fig is None:
            log(f"skipped {name}: the results hold no {'adaptive' if adaptive else 'fixed-step'} trials")
        else:
            written += save_figure(fig, out, name, svg)
    history = load_adaptation_history(adaptation_dir or results_dir)
    if history is None:
        log(f"skipped adaptation: no adaptation_history.csv under {adaptation_dir or results_dir}")
    else:
        written += save_figure(adaptation_figure(history), out, "adaptation", svg)
    trials = trajectory_trials(results)
    if not trials:
        log("skipped trajectories: no fixed-step trials on 2-D data (sphere2)")
    for t in trials:
        if not Path(t.checkpoint).is_file():
            log(f"skipped trajectories of {t.trial_id}: checkpoint {t.checkpoint} is missing")
            continue
        log(f"drawing trajectories of {t.trial_id} ...")
        fig = trajectory_figure(t.checkpoint)
        written += save_figure(fig, out, f"trajectories_{t.dataset}_{t.train_method}_{int(t.train_steps)}steps_seed{t.seed}", svg)
    if trials:
        log("measuring trajectory crossing of every 2-D fixed-step trial ...")
        table = crossing_table(results)
        fig = crossing_vs_steps_figure(table)
        if fig is not None:
            table.to_csv(out / "crossing.csv", index=False)
            written += save_figure(fig, out, "crossing_vs_steps", svg)
    if examples_too:
        written += save_figure(xor_figure(), out, "xor", svg)
        written += save_figure(appendix_a_figure(), out, "appendix_a", svg)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.figures", description="Write the paper's figures from grid (and adaptation) results, or the trajectory figure of one checkpoint.")
    parser.add_argument("results_dir", nargs="?", help="folder holding the grid's results.csv")
    parser.add_argument("--checkpoint", default=None, help="instead of results: draw the trajectory figure of this 2-D model's checkpoint.pt")
    parser.add_argument("--out", default=None, help="folder for the figures (default: RESULTS_DIR/figures, or . with --checkpoint)")
    parser.add_argument("--adaptation", default=None, help="folder with adaptation_history.csv (default: search RESULTS_DIR)")
    parser.add_argument("--no-svg", action="store_true", help="write PNG only")
    parser.add_argument("--dpi", type=int, default=130, help="PNG resolution with --checkpoint (default 130)")
    parser.add_argument("--no-examples", action="store_true", help="skip the XOR and Appendix A examples")
    args = parser.parse_args(argv)
    if (args.results_dir is None) == (args.checkpoint is None):
        parser.error("give either RESULTS_DIR or --checkpoint PATH")
    try:
        if args.checkpoint:
            name = f"trajectories_{Path(args.checkpoint).stem}"
            written = save_figure(trajectory_figure(args.checkpoint), Path(args.out or "."), name, svg=not args.no_svg, dpi=args.dpi)
        else:
            out = Path(args.out) if args.out else Path(args.results_dir) / "figures"
            written = write_all(args.results_dir, out, adaptation_dir=args.adaptation, svg=not args.no_svg, examples_too=not args.no_examples)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
