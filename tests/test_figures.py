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


def trajectory_names(table):
    return [f"trajectories_sphere2_{t.train_method}_{int(t.train_steps)}steps_seed{t.seed}" for t in figures.trajectory_trials(table)]


def test_figures_cli_writes_every_figure(results, tmp_path, capsys):
    assert figures.main([str(results), "--out", str(tmp_path)]) == 0
    # Euler trained at 1, 2, 4 steps: the paper's h = 1/2 and the finest; RK4 at 1, 2: just 2.
    names = trajectory_names(figures.load_results(results))
    assert [n.split("_seed")[0] for n in names] == [
        "trajectories_sphere2_euler_2steps", "trajectories_sphere2_euler_4steps", "trajectories_sphere2_rk4_2steps"]
    assert_images(tmp_path, ["accuracy_vs_steps", "accuracy_vs_tolerance", "adaptation", "crossing_vs_steps", "xor", "appendix_a", *names])
    crossing = pd.read_csv(tmp_path / "crossing.csv")
    assert len(crossing) == 10 and crossing.crossing.between(0, 1).all()  # every fixed-step trial: 5 settings x 2 seeds
    assert "wrote" in capsys.readouterr().out


def test_trajectory_figures_show_a_trained_seed(results):
    table = figures.load_results(results)
    trials = table.drop_duplicates("trial_id")
    for chosen in figures.trajectory_trials(table):
        same = trials[(trials.train_method == chosen.train_method) & (trials.train_steps == chosen.train_steps)]
        trained = same[same.train_accuracy >= 0.5 + 0.1]  # Sphere2: chance 0.5, the critical-step rule's margin 0.1
        if len(trained):
            assert chosen.trial_id in set(trained.trial_id), f"{chosen.trial_id} is at chance; trained: {list(trained.trial_id)}"
        else:  # every seed at chance: the most accurate one
            own = table[table.trial_id.isin(same.trial_id) & table.is_train_solver].groupby("trial_id").accuracy.mean()
            assert chosen.trial_id == own.idxmax()


def synthetic_trials(accuracies, statuses=None):
    """Results rows of one Sphere2 setting (Euler, 2 steps), one trial per seed, train-solver row only."""
    rows = []
    for seed, acc in enumerate(accuracies):
        rows.append({"trial_id": f"t{seed}", "dataset": "sphere2", "train_method": "euler", "train_steps": 2.0, "train_tol": np.nan,
                     "gradient": "backprop", "seed": seed, "checkpoint": f"t{seed}.pt", "test_method": "euler", "test_steps": 2.0,
                     "test_tol": np.nan, "factor": 1.0, "accuracy": acc, "is_train_solver": True, "train_accuracy": acc,
                     "test_accuracy": acc, "nfe_forward_per_iteration": 2.0,
                     "status": (statuses or {}).get(seed, "trained")})
    return pd.DataFrame(rows)


def test_representative_seed_is_the_median_trained_one():
    # Seed 0 stayed at chance (0.5 < 0.5 + 0.1); of the trained 0.9, 0.99, 0.95 the median is seed 3.
    table = synthetic_trials([0.5, 0.9, 0.99, 0.95])
    assert [t.seed for t in figures.trajectory_trials(table)] == [3]
    # Every seed at chance: the most accurate; a diverged trial is not picked while another is left.
    assert [t.seed for t in figures.trajectory_trials(synthetic_trials([0.5, 0.52, 0.51]))] == [1]
    assert [t.seed for t in figures.trajectory_trials(synthetic_trials([0.5, 0.99, 0.9, 0.95], {2: "diverged"}))] == [1]
    # Without a rule (no chance known: every seed counts as trained): the median of all.
    table = synthetic_trials([0.5, 0.7, 0.99, 0.9, 0.95])
    assert figures.representative_seed(table.drop_duplicates("trial_id"), table, trained=None).seed == 3


def test_find_run_picks_the_newest_run_of_the_nearest_runs_folder(tmp_path):
    import os

    (tmp_path / "empty" / "runs").mkdir(parents=True)
    assert figures.find_run(start=tmp_path / "empty") is None  # the nearest runs folder holds no run yet
    runs = tmp_path / "project" / "runs"
    for age, name in ((300, "old"), (100, "quick"), (200, "other")):
        (runs / name).mkdir(parents=True)
        (runs / name / "results.csv").write_text("x\n")
        os.utime(runs / name / "results.csv", (1e9 - age, 1e9 - age))
    (runs / "adapt").mkdir()
    (runs / "adapt" / "adaptation.csv").write_text("x\n")
    (tmp_path / "project" / "analysis").mkdir()
    for start in (tmp_path / "project", tmp_path / "project" / "analysis"):  # the root, or where Jupyter starts a kernel
        assert figures.find_run("results.csv", start=start) == runs / "quick"
        assert figures.find_run("adaptation.csv", start=start) == runs / "adapt"
    assert figures.find_run("table1.md", start=tmp_path / "project") is None


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
    [name] = trajectory_names(figures.load_results(tmp_path))
    assert {p.name for p in written} == {"accuracy_vs_steps.png", f"{name}.png", "crossing_vs_steps.png"}


def test_dpi_sets_the_resolution_of_results_figures(results, tmp_path):
    import matplotlib.image

    table = pd.read_csv(results / "results.csv")
    table[table.train_tol.notna()].to_csv(tmp_path / "results.csv", index=False)  # adaptive trials only: one figure, fast
    widths = {}
    for dpi in (50, 100):
        out = tmp_path / f"dpi{dpi}"
        assert figures.main([str(tmp_path), "--out", str(out), "--no-svg", "--no-examples", "--dpi", str(dpi)]) == 0
        widths[dpi] = matplotlib.image.imread(out / "accuracy_vs_tolerance.png").shape[1]
    assert widths[100] == pytest.approx(2 * widths[50], rel=0.05)


def test_accuracy_figure_plots_seed_means_and_marks_the_critical_step(results):
    from matplotlib.colors import to_hex

    table = figures.load_results(results)
    fig = figures.accuracy_figure(table, critical={("sphere2", "euler"): 2})
    panels = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title().split("\n")[0] for ax in panels]
    tested = table[table.train_steps.notna()].groupby("train_method").test_method.unique()
    # One panel per train method and test method it was tested with, lower order first.
    order = ["euler", "midpoint", "rk4"]
    expected = [f"trained with {figures.METHOD_NAMES[m]}, tested with {figures.METHOD_NAMES[t]}"
                for m in ("euler", "rk4") for t in sorted(tested[m], key=order.index)]
    assert titles == expected and "tested with Midpoint" in titles[1]
    euler = panels[0]
    # The large train-solver points are the means over seeds of the train solver's accuracy.
    drawn = sorted((float(c.lines[0].get_xdata()[0]), float(c.lines[0].get_ydata()[0])) for c in euler.containers)
    train = table[(table.train_method == "euler") & table.is_train_solver].groupby("train_steps").accuracy.mean()
    # pytest.approx takes flat sequences only (pytest >= 9.2 refuses nested ones): compare per column.
    assert [s for s, _ in drawn] == [float(s) for s in train.index]
    assert [y for _, y in drawn] == pytest.approx([100 * a for a in train.values])
    # The critical step: a dashed line in every Euler panel, named in their titles, no text over the data.
    for ax in panels:
        dashed = [line for line in ax.lines if list(line.get_xdata()) == [2, 2]]
        is_euler = ax.get_title().startswith("trained with Euler")
        assert len(dashed) == (1 if is_euler else 0)
        assert ("critical: 2 steps" in ax.get_title()) == is_euler
        assert not ax.texts
    # Shared y axis; one colour-blind-safe colour and marker per train setting, the same in every panel.
    assert len({ax.get_ylim() for ax in panels}) == 1
    drawn_styles = set()
    for ax in panels:
        for line in ax.lines:
            if list(line.get_xdata()) != [2, 2]:
                assert to_hex(line.get_color()) in {c.lower() for c in figures.OKABE_ITO}
                drawn_styles.add((to_hex(line.get_color()), line.get_marker()))
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    settings = [h for h, label in zip(legend.legend_handles, labels) if label.startswith("trained with")]
    assert labels[:3] == ["trained with 1 step", "trained with 2 steps", "trained with 4 steps"]
    assert "critical train setting" in labels
    # Distinct colour-marker pairs, and each legend entry is drawn (no entry without points).
    pairs = [(to_hex(h.get_color()), h.get_marker()) for h in settings]
    assert len(set(pairs)) == len(pairs) == 3 and set(pairs) <= drawn_styles  # settings 1, 2, 4 steps (RK4's 1, 2 share theirs)
    assert figures.accuracy_figure(table[table.train_tol.isna()], adaptive=True) is None


def test_setting_styles_keep_settings_apart():
    styles = figures.setting_styles(range(12))
    assert len(set(styles.values())) == 12
    assert [c for c, _ in styles.values()][:7] == list(figures.OKABE_ITO)


def test_adaptation_legend_names_only_the_checks_that_happened(results):
    history = figures.load_adaptation_history(results)
    def labels(h):
        return [t.get_text() for t in figures.adaptation_figure(h).legends[0].get_texts()]

    all_accepted = history.assign(accepted=True)
    assert "check: setting changed" in labels(all_accepted) and "check: proposal rejected" not in labels(all_accepted)
    some_rejected = history.assign(accepted=[i % 3 != 0 for i in range(len(history))])
    assert {"check: setting changed", "check: proposal rejected"} <= set(labels(some_rejected))
    assert [x for x in labels(history.drop(columns="accepted")) if x.startswith("check")] == ["check"]


def test_critical_from_summary_reads_steps_and_tolerances():
    summary = pd.DataFrame([
        {"dataset": "sphere2", "train_method": "euler", "gradient": "backprop", "critical_steps": 8, "critical_tol": np.nan},
        {"dataset": "sphere2", "train_method": "dopri5", "gradient": "adjoint", "critical_steps": np.nan, "critical_tol": 1e-4},
        {"dataset": "sphere2", "train_method": "rk4", "gradient": "backprop", "critical_steps": np.nan, "critical_tol": np.nan},
    ])
    assert figures.critical_from_summary(summary) == {("sphere2", "euler", "backprop"): 8.0, ("sphere2", "dopri5", "adjoint"): 1e-4}


def test_results_in_parts_read_as_one_table(results, tmp_path):
    table = figures.load_results(results)
    first_trials = table.trial_id.drop_duplicates().iloc[:2]
    parts = []
    for name, rows in (("a", table[table.trial_id.isin(first_trials)]), ("b", table[~table.trial_id.isin(first_trials)])):
        (tmp_path / name).mkdir()
        rows.to_csv(tmp_path / name / "results.csv", index=False)
        parts.append(tmp_path / name)
    combined = figures.load_results(parts)
    pd.testing.assert_frame_equal(combined.sort_values(list(combined.columns)).reset_index(drop=True),
                                  table.sort_values(list(table.columns)).reset_index(drop=True))
    with pytest.raises(ValueError, match="the results overlap"):
        figures.load_results([parts[0], parts[0]])
    assert figures.main([str(p) for p in parts] + ["--out", str(tmp_path / "out"), "--no-svg", "--no-examples", "--dpi", "40"]) == 0
    assert (tmp_path / "out" / "accuracy_vs_steps.png").is_file()


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
