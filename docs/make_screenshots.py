"""Screenshots for the README: TensorBoard's HParams and Scalars pages and the executed notebook.

Needs what the project does not install: Playwright's Python package (``pip install playwright``)
and a Chromium (Debian: ``apt-get install chromium``; ``--chromium`` names another binary).
Run from the repository root after a quick grid::

    python -m tune_node.grid --quick
    python docs/make_screenshots.py runs/quick --out docs/figures

Writes ``tensorboard_hparams.png``, ``tensorboard_scalars.png`` and ``notebook.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Chromium on a machine without outside network: no background connections it would wait on.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def tensorboard_pages(page, logdir: Path, out: Path) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port),
                               "--host", "127.0.0.1", "--reload_interval", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/data/runs")
        page.goto(f"{base}/?darkMode=false#hparams", wait_until="networkidle")
        page.get_by_text("TABLE VIEW").first.wait_for(timeout=60_000)
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "tensorboard_hparams.png"))
        # The runs' accuracy curves; the tag filter keeps the page to one group.
        page.goto(f"{base}/?darkMode=false&tagFilter=accuracy#timeseries", wait_until="networkidle")
        page.wait_for_timeout(3000)
        settings = page.get_by_role("button", name="Settings")
        if settings.count():  # the settings pane opens by default and hides half the cards
            settings.first.click()
        page.wait_for_timeout(3000)
        page.screenshot(path=str(out / "tensorboard_scalars.png"))
    finally:
        server.terminate()
        server.wait(timeout=30)


def notebook_page(page, results: Path, out: Path) -> None:
    notebook = Path(__file__).resolve().parents[1] / "analysis" / "critical_step.ipynb"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TUNE_NODE_RESULTS": str(results.resolve()), "TUNE_NODE_FIGURES": tmp}
        # Without the code cells: the picture is of what the notebook shows.
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--no-input", "--execute", str(notebook),
                        "--output-dir", tmp, "--output", "notebook"], check=True, env=env)
        page.goto(Path(tmp, "notebook.html").as_uri(), wait_until="load")
        page.wait_for_timeout(1000)
        page.screenshot(path=str(out / "notebook.png"), full_page=True, clip={"x": 0, "y": 0, "width": page.viewport_size["width"],
                                                                              "height": 2 * page.viewport_size["height"]})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a grid experiment's folder (runs/quick)")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--width", type=int, default=1700)
    parser.add_argument("--height", type=int, default=900)
    args = parser.parse_args(argv)
    if not (args.results / "results.csv").is_file():
        parser.error(f"{args.results} holds no results.csv: run python -m tune_node.grid --quick first")
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": args.width, "height": args.height})
        tensorboard_pages(page, args.results, args.out)
        notebook_page(page, args.results, args.out)
        browser.close()
    for name in ("tensorboard_hparams.png", "tensorboard_scalars.png", "notebook.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
