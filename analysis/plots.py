"""The paper's figures drawn with matplotlib from data in memory, and their rendering.

Every ``*_figure`` function returns a :class:`matplotlib.figure.Figure` on its own Agg
canvas and reads no file. The grid figures take tables or computed results (from
:mod:`analysis.figure_data` and :mod:`analysis.trajectories`); the hand-made examples'
figures get their numbers from :mod:`analysis.examples`. :func:`save_figure` and
:func:`png_bytes` render a figure.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import matplotlib
import matplotlib.patches
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from . import examples
from .figure_data import HISTORY_COLUMNS, critical_for, require_columns

if TYPE_CHECKING:  # for annotations only: drawing needs no model or solver
    from .trajectories import ModelTrajectories, SolverTrajectories

__all__ = [
    "CLASS_COLOURS",
    "REGION_COLOURS",
    "METHOD_MARKERS",
    "METHOD_NAMES",
    "OKABE_ITO",
    "SETTING_COLOURS",
    "SETTING_MARKERS",
    "setting_styles",
    "png_bytes",
    "save_figure",
    "accuracy_figure",
    "adaptation_figure",
    "model_trajectories_figure",
    "crossing_vs_steps_figure",
    "xor_figure",
    "appendix_a_figure",
]

# Okabe & Ito's colour-blind-safe palette (its yellow left out: too faint on white).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000")
SETTING_COLOURS = OKABE_ITO
SETTING_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<")
CLASS_COLOURS = ("#0072B2", "#E69F00")  # class 0 blue, class 1 orange, as in the paper (Okabe-Ito)
REGION_COLOURS = ("#d3e5f2", "#fbe8c6")
METHOD_MARKERS = {"euler": "o", "midpoint": "X", "rk4": "^", "fehlberg2": "o", "dopri5": "^"}
METHOD_NAMES = {"euler": "Euler", "midpoint": "Midpoint", "rk4": "RK4", "fehlberg2": "Fehlberg21", "dopri5": "Dopri54"}


def _name(method: str) -> str:
    from tune_node.solvers import METHODS

    return METHOD_NAMES.get(method) or (METHODS[method].paper_name if method in METHODS else method)


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


# ------------------------------------------------------- accuracy vs steps / tolerance


def _panel_keys(df: pd.DataFrame) -> list[tuple]:
    keys = df[["dataset", "train_method", "gradient"]].drop_duplicates().itertuples(index=False, name=None)
    return sorted(keys)


def _method_order(method: str) -> tuple:
    names = list(METHOD_NAMES)
    return (names.index(method) if method in names else len(names), method)


def setting_styles(values) -> dict:
    """A colour and a marker per training setting, ``values`` ordered coarse to fine: the
    colour-blind-safe :data:`SETTING_COLOURS` in turn, with :data:`SETTING_MARKERS`, so that no
    two of up to 56 settings share both."""
    return {v: (SETTING_COLOURS[i % len(SETTING_COLOURS)], SETTING_MARKERS[i % len(SETTING_MARKERS)]) for i, v in enumerate(values)}


def accuracy_figure(results: pd.DataFrame, adaptive: bool = False, critical: Mapping | None = None):
    """Figure 4 style: test accuracy against the test solver's steps (or tolerance).

    Arguments:
        results: the grid's results table (see :func:`analysis.figure_data.load_results`).
        adaptive: draw adaptive train solvers against tolerance instead of fixed-step
            ones against steps.
        critical: the critical train setting per row, keyed by
            ``(dataset, train_method, gradient)`` or ``(dataset, train_method)``: a
            number of steps (fixed) or a tolerance (adaptive). Marked by a dashed line
            and named in the panel titles.

    One row of panels per dataset, train method and gradient, one panel per test method it was
    tested with (left to right, lower order first); all panels share their axes. In each panel
    one line per training setting (its own colour and marker, :func:`setting_styles`) joins the
    mean accuracy over seeds at each of the test method's steps (tolerances); the train solver's
    own point is drawn large and edged in black, with a bar of +- one standard deviation over
    seeds. The legend lists each training setting once. Returns None when the table has no such
    trials.
    """
    train_col, test_col = ("train_tol", "test_tol") if adaptive else ("train_steps", "test_steps")
    df = results[results[train_col].notna() & results[test_col].notna()]
    if df.empty:
        return None
    keys = _panel_keys(df)
    tests_of = {k: sorted(df[(df.dataset == k[0]) & (df.train_method == k[1]) & (df.gradient == k[2])].test_method.unique(),
                          key=_method_order) for k in keys}
    train_values = sorted(df[train_col].unique(), reverse=adaptive)  # coarse -> fine
    style = setting_styles(train_values)
    nrows, ncols = len(keys), max(len(t) for t in tests_of.values())
    # The legend goes into the last row's empty panels when there are two, else right of the panels.
    legend_inside = ncols - len(tests_of[keys[-1]]) >= 2
    width = 3.9 * ncols + (0.0 if legend_inside else 2.3)
    fig, axes = _subplots(nrows, ncols, figsize=(width, 3.3 * nrows + 0.7), squeeze=False, sharex=True, sharey=True)
    for row, key in enumerate(keys):
        for col in range(len(tests_of[key]), ncols):
            axes[row, col].set_visible(False)
    lowest = 100.0
    for row, (dataset, method, gradient) in enumerate(keys):
        panel = df[(df.dataset == dataset) & (df.train_method == method) & (df.gradient == gradient)]
        seeds = panel.seed.nunique()
        crit = critical_for(critical, dataset, method, gradient)
        for col, test_method in enumerate(tests_of[(dataset, method, gradient)]):
            ax = axes[row, col]
            tested = panel[panel.test_method == test_method]
            for value in sorted(tested[train_col].unique(), reverse=adaptive):
                colour, marker = style[value]
                trained = tested[tested[train_col] == value]
                line = trained.groupby(test_col).accuracy.mean().sort_index()
                ax.plot(line.index, 100 * line.values, color=colour, marker=marker, ms=4.5, lw=1.3, zorder=2)
                lowest = min(lowest, float(100 * line.min()))
                own = trained[trained.is_train_solver]
                if own.empty:
                    continue
                stats = own.groupby(test_col).accuracy.agg(["mean", "std"])
                ax.errorbar(stats.index, 100 * stats["mean"], yerr=100 * stats["std"].fillna(0), fmt=marker, color=colour, ms=9,
                            mec="black", mew=1.0, ecolor="black", elinewidth=1.0, capsize=2.5, zorder=4)
                lowest = min(lowest, float((100 * (stats["mean"] - stats["std"].fillna(0))).min()))
            if crit is not None:
                ax.axvline(crit, color="0.3", ls="--", lw=1.1, zorder=1)
            grad = "" if gradient == "backprop" else f", {gradient}"
            second = f"{dataset}, {seeds} seed{'s' if seeds != 1 else ''}"
            if crit is not None:
                second += f"; critical: tol {crit:g}" if adaptive else f"; critical: {crit:g} steps"
            ax.set_title(f"trained with {_name(method)}{grad}, tested with {_name(test_method)}\n{second}", fontsize=9.5)
            ax.grid(alpha=0.3, lw=0.6)
            if col == 0:
                ax.set_ylabel("test accuracy (%)")
            if row == nrows - 1 or not axes[row + 1, col].get_visible():  # the lowest panel of its column
                ax.xaxis.set_tick_params(labelbottom=True)
                ax.set_xlabel("test tolerance (finer to the right)" if adaptive else "test solver: number of steps")
    first = axes[0, 0]
    if adaptive:
        first.set_xscale("log")
        first.invert_xaxis()  # finer solvers to the right, as with steps
    else:
        first.set_xscale("log", base=2)
        first.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    first.set_ylim(min(45.0, 5 * math.floor((lowest - 2) / 5)), 102)
    unit = (lambda v: f"tol {v:g}") if adaptive else (lambda v: f"{v:g} step{'s' if v != 1 else ''}")
    handles = [Line2D([], [], color=style[v][0], marker=style[v][1], ms=6, lw=1.3, label=f"trained with {unit(v)}") for v in train_values]
    handles.append(Line2D([], [], ls="", marker="o", color="0.6", mec="black", mew=1.0, ms=9,
                          label="the train solver itself\n(mean ± 1 std over seeds)"))
    if any(critical_for(critical, *k) is not None for k in keys):
        handles.append(Line2D([], [], color="0.3", ls="--", lw=1.1, label="critical train setting"))
    what = "tolerance" if adaptive else "number of steps"
    fig.suptitle(f"Test accuracy against the test solver's {what} (means over seeds)", fontsize=11)
    fig.tight_layout()
    if legend_inside:
        empty = [axes[-1, col].get_position() for col in range(len(tests_of[keys[-1]]), ncols)]
        centre = ((empty[0].x0 + empty[-1].x1) / 2, (empty[0].y0 + empty[0].y1) / 2)
        fig.legend(handles=handles, loc="center", bbox_to_anchor=centre, frameon=False, fontsize=9, ncol=2)
    else:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=9)
    return fig


# ----------------------------------------------------------------- adaptation


def adaptation_figure(history: pd.DataFrame):
    """Figure 5 style: test accuracy, number of steps (or tolerance) and the check cost
    against iteration, one line per seed (``trial_id``), one marker per check.

    A filled marker is a check that moved the setting to its proposal (halved, or grew
    and was confirmed), an open one a check whose proposal was rejected (all filled without an
    ``accepted`` column); the legend names only the kinds present. Rows without ``test_accuracy`` are left out of
    the accuracy panel (the batch accuracy under the train solver is drawn instead
    when no row has it).
    """
    require_columns(history, HISTORY_COLUMNS, "adaptation history")
    history = history.sort_values(["trial_id", "iteration"])
    tolerance_mode = history["step_size"].isna().all() and history["tol"].notna().any()
    has_test = history["test_accuracy"].notna().any()
    acc_col = "test_accuracy" if has_test else "train_solver_accuracy"
    fig, axes = _subplots(3, 1, figsize=(7.5, 8.2), sharex=True)
    colours = matplotlib.colormaps["tab10"]
    n_runs = history["trial_id"].nunique()
    for k, (trial, run) in enumerate(history.groupby("trial_id", sort=True)):
        c = colours(k % 10)
        # Without an accepted column every check is drawn filled (as one that changed the setting).
        accepted = run["accepted"].astype(str).str.lower().eq("true") if "accepted" in run else pd.Series(True, index=run.index)
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
    # A legend entry for each kind of check the history holds: none for a kind that never happened.
    kinds = history["accepted"].astype(str).str.lower().eq("true") if "accepted" in history else pd.Series(True, index=history.index)
    markers = []
    if kinds.any():
        label = "check: setting changed" if "accepted" in history else "check"
        markers.append(Line2D([], [], marker="o", ls="", color="0.3", label=label))
    if (~kinds).any():
        markers.append(Line2D([], [], marker="o", ls="", mfc="white", color="0.3", label="check: proposal rejected"))
    fig.suptitle("Step adaptation over training" if not tolerance_mode else "Tolerance adaptation over training", fontsize=11)
    handles = axes[0].get_legend_handles_labels()[0] + markers
    fig.legend(handles=handles, fontsize=8, loc="upper center", ncol=min(6, len(handles)), frameon=False, bbox_to_anchor=(0.5, 0.965))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


# ------------------------------------------------------ phase-space trajectories


def _draw_paths(ax, paths: np.ndarray, labels: np.ndarray, show: np.ndarray):
    for c in (0, 1):
        idx = show[labels[show] == c]
        segments = paths[:, idx].transpose(1, 0, 2)
        ax.add_collection(LineCollection(segments, colors=CLASS_COLOURS[c], linewidths=0.6, alpha=0.45, rasterized=True))
        ax.scatter(paths[-1, idx, 0], paths[-1, idx, 1], s=5, color=CLASS_COLOURS[c], zorder=3, rasterized=True)
    ax.scatter(paths[0, show, 0], paths[0, show, 1], s=1.5, color="0.25", alpha=0.7, zorder=3, rasterized=True)
    ax.autoscale()


def _draw_regions(ax, solver: SolverTrajectories, labels: np.ndarray):
    ax.contourf(solver.region_x, solver.region_y, solver.region_class, levels=[-0.5, 0.5, 1.5], colors=REGION_COLOURS)
    z_end = solver.paths[-1]
    for c in (0, 1):
        ax.scatter(z_end[labels == c, 0], z_end[labels == c, 1], s=5, color=CLASS_COLOURS[c], rasterized=True)
    ax.set_xlim(solver.region_x.min(), solver.region_x.max())
    ax.set_ylim(solver.region_y.min(), solver.region_y.max())


def _h_label(setting) -> str:
    steps = setting.steps
    return (f"{_name(setting.method)}, {steps} step{'s' if steps != 1 else ''} (h = 1/{steps})" if steps != 1
            else f"{_name(setting.method)}, 1 step (h = 1)")


def model_trajectories_figure(trajectories: ModelTrajectories):
    """Figures 1 and 2 for a 2-D model, from :func:`analysis.trajectories.model_trajectories`.

    Top row: paths of the shown test points under the train solver and under the finer
    one, coloured by true class; bottom row: the ODE block's outputs with the
    classifier's decision regions (light) under each. Titles give accuracy and
    crossing fraction.
    """
    labels, show = trajectories.labels, trajectories.shown
    fig, axes = _subplots(2, 2, figsize=(10.5, 10))
    for col, solver in enumerate((trajectories.train, trajectories.finer)):
        role = "train solver" if col == 0 else "finer solver"
        label = _h_label(solver.setting)
        _draw_paths(axes[0, col], solver.paths, labels, show)
        axes[0, col].set_title(f"{role}: {label}\ncrossing: {100 * solver.crossing.fraction:.1f} % of different-class pairs", fontsize=10)
        _draw_regions(axes[1, col], solver, labels)
        axes[1, col].set_title(f"outputs z(T) under {label}\ntest accuracy {100 * solver.accuracy:.1f} %", fontsize=10)
        axes[0, col].set_aspect("equal", adjustable="datalim")
        for ax in axes[:, col]:
            ax.set_xlabel("$z_1$")
            ax.set_ylabel("$z_2$")
    handles = [Line2D([], [], color=CLASS_COLOURS[c], lw=2, label=f"class {c}") for c in (0, 1)]
    handles.append(Line2D([], [], marker="o", ls="", color="0.25", ms=3, label="initial value"))
    handles += [matplotlib.patches.Patch(color=REGION_COLOURS[c], label=f"classified as {c}") for c in (0, 1)]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False, fontsize=9, bbox_to_anchor=(0.5, -0.01))
    fig.suptitle(f"{trajectories.dataset}, seed {trajectories.seed}: model trained with {_h_label(trajectories.train.setting)}",
                 fontsize=12)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def crossing_vs_steps_figure(table: pd.DataFrame):
    """Crossing fraction against training steps, one marker per trial (from
    :func:`analysis.trajectories.crossing_table`); None for an empty table."""
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
    """Figure 3: Euler on the XOR flow (default :data:`analysis.examples.XOR_FLOW`) at the
    step sizes ``10**exponents``, and separability against log10 h."""
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
        "XOR flow (our reading of Eq. 4): $\\dot z_1 = \\gamma z_1 - \\alpha |z|^\\delta z_2$, "
        "$\\dot z_2 = \\beta |z|^\\delta z_1 + \\gamma z_2$"
        f" with $\\gamma$ = {flow.gamma:g}, $\\alpha$ = {flow.alpha:g}, $\\beta$ = {flow.beta:g}, "
        f"$\\delta$ = {flow.delta:g}, t in [0, {flow.T:g}]",
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
            paths, groups, stats = examples.appendix_a_crossing(h, extra)
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
