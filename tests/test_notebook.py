import importlib.util
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from _results_fixture import shared_results

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "analysis" / "critical_step.ipynb"


def outputs_of(nb, kind):
    return [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []) if kind(o)]


def test_notebook_is_the_one_build_notebook_writes():
    from analysis.build_notebook import build

    assert [c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells] == [c.source for c in build().cells]


def test_notebook_runs_headless_on_grid_results(tmp_path_factory, tmp_path, monkeypatch):
    results = shared_results(tmp_path_factory)
    monkeypatch.setenv("TUNE_NODE_RESULTS", str(results))
    monkeypatch.setenv("TUNE_NODE_FIGURES", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Raises CellExecutionError, with the traceback, if any cell fails.
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()

    assert not outputs_of(nb, lambda o: o.output_type == "error")
    text = "\n".join(o.get("text", "") for o in outputs_of(nb, lambda o: o.output_type == "stream"))
    html = "\n".join(o.data["text/html"] for o in outputs_of(nb, lambda o: "text/html" in o.get("data", {})))
    assert "14 trials, " in text  # 7 training settings x 2 seeds
    assert "test_accuracy" in html  # the per-group trial table
    if importlib.util.find_spec("analysis.critical_step") is not None:
        assert "critical_steps" in html
    else:
        assert "analysis.critical_step (critical_steps) is not available here" in text
    markdown = "\n".join(o.data["text/markdown"] for o in outputs_of(nb, lambda o: "text/markdown" in o.get("data", {})))
    has_table1 = importlib.util.find_spec("analysis.table1") is not None
    if has_table1 and importlib.util.find_spec("analysis.critical_step") is not None:
        assert "Table 1 could not be built" not in text and "|" in markdown
    elif has_table1:  # Table 1 needs the critical-step analysis: the notebook says so
        assert "Table 1 could not be built" in text
    else:
        assert "analysis.table1 is not available here: no Table 1" in text
    images = outputs_of(nb, lambda o: "image/png" in o.get("data", {}))
    # accuracy vs steps and vs tolerance, adaptation, 3 trajectory figures, crossing, XOR, Appendix A.
    assert len(images) == 9
    saved = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(saved) == 9 and all((tmp_path / name).stat().st_size > 5000 for name in saved)
