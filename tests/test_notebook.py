from pathlib import Path

import nbformat
from _results_fixture import shared_results
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "critical_step.ipynb"


def outputs_of(nb, kind):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if kind(o)]


def test_notebook_is_the_one_build_notebook_writes():
    from analysis.build_notebook import build

    assert [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells] == [c.source for c in build().cells]


def execute_notebook(results_dir, figures_dir, monkeypatch):
    """Run the notebook headless on ``results_dir``; return (notebook, stream text, html, markdown)."""
    monkeypatch.setenv("TUNE_NODE_RESULTS", str(results_dir))
    monkeypatch.setenv("TUNE_NODE_FIGURES", str(figures_dir))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the traceback, if any cell fails.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    assert not outputs_of(nb, lambda o: o.output_type == "error")
    text = "\n".join(o.get("text", "") for o in outputs_of(nb, lambda o: o.output_type == "stream"))
    html = "\n".join(o.data["text/html"] for o in outputs_of(nb, lambda o: "text/html" in o.get("data", {})))
    markdown = "\n".join(o.data["text/markdown"] for o in outputs_of(nb, lambda o: "text/markdown" in o.get("data", {})))
    return nb, text, html, markdown


def test_notebook_runs_headless_on_grid_results(tmp_path_factory, tmp_path, monkeypatch):
    results = shared_results(tmp_path_factory)
    nb, text, html, markdown = execute_notebook(results, tmp_path, monkeypatch)
    assert "14 trials, " in text  # 7 training settings x 2 seeds
    assert "test_accuracy" in html  # the per-group trial table
    assert "critical_steps" in html  # the critical-step table
    # The fixture has adaptation results too: Table 1 is built and shown.
    assert "Table 1 could not be built" not in text and "| Concentric spheres 2d" in markdown
    images = outputs_of(nb, lambda o: "image/png" in o.get("data", {}))
    # accuracy vs steps and vs tolerance, adaptation, 3 trajectory figures, crossing, XOR, Appendix A.
    assert len(images) == 9
    saved = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(saved) == 9 and all((tmp_path / name).stat().st_size > 5000 for name in saved)
