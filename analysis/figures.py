"""The paper's figures, drawn from results on disk.

``python -m analysis.figures RESULTS_DIR [--out DIR]`` writes every figure the results
allow (PNG, and SVG unless ``--no-svg``) and prints a note for each it has to skip;
``python -m analysis.figures --checkpoint PATH`` draws one 2-D model's trajectories.

- ``accuracy_vs_steps`` (Figure 4, Appendix B/E): per dataset and train method a row of
  panels, one per test method, of test accuracy against the test solver's number of
  steps (shared axes); one colour-blind-safe colour and marker per training step count,
  the train solver's own point large and edged in black; the critical setting dashed and
  named in the titles when known.
- ``accuracy_vs_tolerance``: the same for adaptive train solvers, against tolerance.
- ``adaptation`` (Figure 5): test accuracy, number of steps (or tolerance) and check
  cost against iteration, one line per seed, checks marked.
- ``trajectories_*`` (Figures 1 and 2): for 2-D models, the ODE block's paths of test
  points under the train solver and a finer one, and the classifier's decision regions
  over the block's outputs, at a representative trained seed (not one left at chance);
  ``crossing_vs_steps``: the crossing fraction of every 2-D
  fixed-step trial.
- ``xor`` (Figure 3) and ``appendix_a`` (Figures 6 and 7): the hand-made examples
  (also ``python -m analysis.examples``).

Nothing here trains; trajectory figures load trial checkpoints and run the solver.
This module is the command line and the one import for scripts and notebooks: it
re-exports the reading (:mod:`analysis.figure_data`), the trajectory computations
(:mod:`analysis.trajectories`) and the drawing (:mod:`analysis.plots`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

from .figure_data import (
    HISTORY_COLUMNS,
    RESULT_COLUMNS,
    critical_from_results,
    critical_from_summary,
    find_run,
    load_adaptation_history,
    load_results,
    representative_seed,
    trajectory_trials,
)
from .plots import (
    CLASS_COLOURS,
    METHOD_MARKERS,
    METHOD_NAMES,
    OKABE_ITO,
    REGION_COLOURS,
    SETTING_COLOURS,
    SETTING_MARKERS,
    accuracy_figure,
    adaptation_figure,
    appendix_a_figure,
    crossing_vs_steps_figure,
    model_trajectories_figure,
    png_bytes,
    save_figure,
    setting_styles,
    xor_figure,
)
from .trajectories import crossing_table, model_trajectories

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
    "representative_seed",
    "find_run",
    "crossing_table",
    "critical_from_summary",
    "appendix_a_figure",
    "write_all",
    "CLASS_COLOURS",
    "REGION_COLOURS",
    "METHOD_MARKERS",
    "METHOD_NAMES",
    "OKABE_ITO",
    "SETTING_COLOURS",
    "SETTING_MARKERS",
    "setting_styles",
]


def trajectory_figure(checkpoint: str | Path, finer=None, max_paths: int = 300, max_pairs: int = 20_000, seed: int = 0):
    """Figures 1 and 2 for the 2-D model in ``checkpoint``: paths and decision regions
    under its train solver and a finer one.

    :func:`analysis.trajectories.model_trajectories` (which documents the arguments)
    drawn by :func:`analysis.plots.model_trajectories_figure`. Raises ValueError for an
    adaptive train solver or data that is not 2-D.
    """
    return model_trajectories_figure(model_trajectories(checkpoint, finer, max_paths, max_pairs, seed))


def write_all(results_dir: str | Path | Sequence[str | Path], out: str | Path, critical: Mapping | None = None,
              adaptation_dir: str | Path | None = None,
              svg: bool = True, examples_too: bool = True, log=print, dpi: int = 130) -> list[Path]:
    """Write every figure the results allow to ``out``; ``log`` one note per skipped figure.

    Arguments:
        results_dir: folder holding the grid's ``results.csv``, or several (a study run in parts: their
            rows together, each training in one part only).
        out: folder for the images.
        critical: critical settings for :func:`accuracy_figure`; by default from
            ``analysis.critical_step`` when that module is available.
        adaptation_dir: where to look for ``adaptation_history.csv`` (default: ``results_dir``).
        svg: also write SVG.
        examples_too: also draw the XOR and Appendix A examples.
        dpi: resolution of the PNG files.
    """
    out = Path(out)
    results = load_results(results_dir)
    if critical is None:
        critical = critical_from_results(results, log)
    written: list[Path] = []
    for adaptive, name in ((False, "accuracy_vs_steps"), (True, "accuracy_vs_tolerance")):
        fig = accuracy_figure(results, adaptive=adaptive, critical=critical)
        if fig is None:
            log(f"skipped {name}: the results hold no {'adaptive' if adaptive else 'fixed-step'} trials")
        else:
            written += save_figure(fig, out, name, svg, dpi)
    history = load_adaptation_history(adaptation_dir or results_dir)
    if history is None:
        where = adaptation_dir or (results_dir if isinstance(results_dir, (str, Path)) else ", ".join(map(str, results_dir)))
        log(f"skipped adaptation: no adaptation_history.csv under {where}")
    else:
        written += save_figure(adaptation_figure(history), out, "adaptation", svg, dpi)
    trials = trajectory_trials(results)
    if not trials:
        log("skipped trajectories: no fixed-step trials on 2-D data (sphere2)")
    for t in trials:
        if not Path(t.checkpoint).is_file():
            log(f"skipped trajectories of {t.trial_id}: checkpoint {t.checkpoint} is missing")
            continue
        log(f"drawing trajectories of {t.trial_id} ...")
        try:
            fig = trajectory_figure(t.checkpoint)
        except ValueError as err:  # a user's dataset that is not 2-D
            log(f"skipped trajectories of {t.trial_id}: {err}")
            continue
        # No ':' of a user's "module:function" in a file name.
        dataset = str(t.dataset).replace(":", "-")
        written += save_figure(fig, out, f"trajectories_{dataset}_{t.train_method}_{int(t.train_steps)}steps_seed{t.seed}", svg, dpi)
    if trials:
        log("measuring trajectory crossing of every 2-D fixed-step trial ...")
        table = crossing_table(results)
        fig = crossing_vs_steps_figure(table)
        if fig is not None:
            table.to_csv(out / "crossing.csv", index=False)
            written += save_figure(fig, out, "crossing_vs_steps", svg, dpi)
    if examples_too:
        written += save_figure(xor_figure(), out, "xor", svg, dpi)
        written += save_figure(appendix_a_figure(), out, "appendix_a", svg, dpi)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.figures",
                                     description="Write the paper's figures from grid (and adaptation) results, "
                                                 "or the trajectory figure of one checkpoint.")
    parser.add_argument("results_dir", nargs="*",
                        help="folder holding the grid's results.csv; several for a study run in parts (their rows together)")
    parser.add_argument("--checkpoint", default=None,
                        help="instead of results: draw the trajectory figure of this 2-D model's checkpoint.pt")
    parser.add_argument("--out", default=None,
                        help="folder for the figures (default: the first RESULTS_DIR/figures, or . with --checkpoint)")
    parser.add_argument("--adaptation", default=None, help="folder with adaptation_history.csv (default: search RESULTS_DIR)")
    parser.add_argument("--no-svg", action="store_true", help="write PNG only")
    parser.add_argument("--dpi", type=int, default=130, help="PNG resolution (default 130)")
    parser.add_argument("--no-examples", action="store_true", help="skip the XOR and Appendix A examples")
    args = parser.parse_args(argv)
    if (not args.results_dir) == (args.checkpoint is None):
        parser.error("give either RESULTS_DIR or --checkpoint PATH")
    try:
        if args.checkpoint:
            name = f"trajectories_{Path(args.checkpoint).stem}"
            written = save_figure(trajectory_figure(args.checkpoint), Path(args.out or "."), name, svg=not args.no_svg, dpi=args.dpi)
        else:
            out = Path(args.out) if args.out else Path(args.results_dir[0]) / "figures"
            written = write_all(args.results_dir, out, adaptation_dir=args.adaptation, svg=not args.no_svg,
                                examples_too=not args.no_examples, dpi=args.dpi)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
