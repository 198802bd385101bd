from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _results_fixture import shared_results

from analysis import examples, figures
from tune_node.solvers import SolverSetting
from tune_node.training import TrainConfig, save_checkpoint, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return shared_results(tmp_path_factory)


def assert_images(folder: Path, names, svg=True):
    for name in names:
        png = folder / f"{name}.png"
        assert png.is_file(), f"{png} missing; have {sorted(p.name for p in folder.iterdir())}"
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
        if svg:
            assert (folder / f"{name}.svg").read_text()[:200].lstrip().startswith("<?xml")


def test_figures_cli_writes_every_figure(results, tmp_path, capsys):
    assert figures.main([str(results), "--out", str(tmp_path)]) == 0
    assert_images(tmp_path, [
        "accuracy_vs_steps", "accuracy_vs_tolerance", "adaptation", "crossing_vs_steps", "xor", "appendix_a",
        # Euler trained at 1, 2, 4 steps: the paper's h = 1/2 and the finest; RK4 at 1, 2: just 2.
        "trajectories_sphere2_euler_2steps_seed0", "trajectories_sphere2_euler_4steps_seed0", "trajectories_sphere2_rk4_2steps_seed0",
    ])
    crossing = pd.read_csv(tmp_path / "crossing.csv")
    assert len(crossing) == 10 and crossing.crossing.between(0, 1).all()  # every fixed-step trial: 5 settings x 2 seeds
    assert "wrote" in capsys.readouterr().out


def test_checkpoint_command_writes_the_trajectory_figure(results, tmp_path):
    checkpoint = results / "trials" / "euler_2_s0" / "checkpoint.pt"
    assert figures.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path), "--dpi", "60"]) == 0
    assert_images(tmp_path, ["trajectories_checkpoint"])
    with pytest.raises(SystemExit):
        figures.main([str(results), "--checkpoint", str(checkpoint)])  # one or the other


def test_results_are_read_from_parquet_too(results, tmp_path):
    pd.read_csv(results / "results.csv").to_parquet(tmp_path / "results.parquet")
    assert figures.load_results(tmp_path).equals(figures.load_results(results))


def test_missing_parts_are_skipped_with_a_note(results, tmp_path):
    table = pd.read_csv(results / "results.csv")
    table[table.train_steps.notna() & (table.train_method == "rk4")].to_csv(tmp_path / "results.csv", index=False)
    notes = []
    written = figures.write_all(tmp_path, tmp_path / "figures", svg=False, examples_too=False, log=notes.append)
    text = "\n".join(notes)
    assert "skipped accuracy_vs_tolerance: the results hold no adaptive trials" in text
    assert "skipped adaptation: no adaptation_history.csv" in text
    assert {p.name for p in written} == {"accuracy_vs_steps.png", "trajectories_sphere2_rk4_2steps_seed0.png", "crossing_vs_steps.png"}


def test_accuracy_figure_plots_seed_means_and_marks_the_critical_step(results):
    table = figures.load_results(results)
    fig = figures.accuracy_figure(table, critical={("sphere2", "euler"): 2})
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(" (")[0] for ax in panels] == ["sphere2: trained with Euler", "sphere2: trained with RK4"]
    euler = panels[0]
    # The dark train-solver points are the means over seeds of the train solver's accuracy.
    drawn = sorted((float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0])) for c in euler.containers)
    train = table[(table.train_method == "euler") & table.is_train_solver].groupby("train_steps").accuracy.mean()
    # pytest.approx takes flat sequences only (pytest >= 9.2 refuses nested ones): compare per column.
    assert [s for s, _ in drawn] == [float(s) for s in train.index]
    assert [y for _, y in drawn] == pytest.approx([100 * a for a in train.values])
    vertical = [line for line in euler.lines if list(line.get_xdata()) == [2, 2]]
    assert len(vertical) == 1
    assert not any(list(line.get_xdata()) == [2, 2] for line in panels[1].lines)
    assert figures.accuracy_figure(table[table.train_tol.isna()], adaptive=True) is None


def test_critical_from_summary_reads_steps_and_tolerances():
    summary = pd.DataFrame([
        {"dataset": "sphere2", "train_method": "euler", "gradient": "backprop", "critical_steps": 8, "critical_tol": np.nan},
        {"dataset": "sphere2", "train_method": "dopri5", "gradient": "adjoint", "critical_steps": np.nan, "critical_tol": 1e-4},
        {"dataset": "sphere2", "train_method": "rk4", "gradient": "backprop", "critical_steps": np.nan, "critical_tol": np.nan},
    ])
    assert figures.critical_from_summary(summary) == {("sphere2", "euler", "backprop"): 8.0, ("sphere2", "dopri5", "adjoint"): 1e-4}


def test_bad_inputs_give_clear_errors(results, tmp_path):
    with pytest.raises(FileNotFoundError, match="results.csv"):
        figures.load_results(tmp_path)
    pd.read_csv(results / "results.csv").drop(columns=["checkpoint", "accuracy"]).to_csv(tmp_path / "results.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks columns \['checkpoint', 'accuracy'\]"):
        figures.load_results(tmp_path)
    with pytest.raises(SystemExit):
        figures.main([str(tmp_path / "nowhere")])
    state = {}
    train(TrainConfig(dataset="sphere3", solver=SolverSetting.fixed("euler", 1), iterations=2, report_every=2),
          on_report=lambda p, s: state.update(s=s()))
    checkpoint = save_checkpoint(tmp_path / "sphere3.pt", state["s"])
    with pytest.raises(ValueError, match="2-D data"):
        figures.trajectory_figure(checkpoint)


@pytest.mark.parametrize("example, name", [("xor", "xor"), ("appendix-a", "appendix_a")])
def test_example_commands_write_their_figure(example, name, tmp_path, capsys):
    assert examples.main([example, "--out", str(tmp_path)]) == 0
    assert_images(tmp_path, [name])
    out = capsys.readouterr().out
    if example == "xor":
        assert "h = 10^-2.5: linearly separable = True" in out and "h = 10^-3.5: linearly separable = False" in out
    else:
        assert "x(0)=0, Euler h = 1: 0/36 pairs cross" in out and "x(0)=0, Euler h = 0.03125: 0/36 pairs cross" in out
