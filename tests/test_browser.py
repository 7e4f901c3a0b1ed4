"""A real browser: JupyterLab + Debian's chromium through Playwright run %%generate cells.

Checks that the text grows while the cell is still running (live, not dumped at the end), that
the Stop button aborts a long generation while its cell runs and the next cell then runs, and
saves screenshots (``NBENGINE_SCREENSHOT_DIR`` also gets the README picture).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from jupyter_helpers import JupyterLab, write_notebook

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="chromium is not installed (apt-get install -y chromium; "
                                                             ".ci/run installs it)"),
]

CELLS = [
    "%load_ext nbengine",
    "%%generate --max-new-tokens 96 --temperature 0\nWrite a short poem about a lighthouse keeper.",
    "%%generate --raw --max-new-tokens 1500 --temperature 0 -o long\n1, 2, 3, 4, 5,",
    "m = long['meta_info']\nprint('next cell ran:', m['finish_reason']['type'], m['completion_tokens'])",
]

_CELL_STATE = """([i]) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[i];
  if (!cell) return null;
  const prompt = cell.querySelector('.jp-InputArea-prompt');
  const outs = [...cell.querySelectorAll('.jp-OutputArea-output')].map(o => o.innerText);
  return {prompt: prompt ? prompt.innerText : '', outputs: outs};
}"""


def _state(page, i: int) -> dict:
    return page.evaluate(_CELL_STATE, [i]) or {"prompt": "", "outputs": []}


def _pane(state: dict) -> str:
    """The streamed text: the output right after the controls bar (Stop + stats line)."""
    outs = state["outputs"]
    bars = [i for i, o in enumerate(outs) if " tokens · " in o]
    return outs[bars[0] + 1] if bars and bars[0] + 1 < len(outs) else ""


def _running(state: dict) -> bool:
    return "*" in state["prompt"]


def _wait(page, i: int, pred, timeout: float, what: str) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = _state(page, i)
        if pred(st):
            return st
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; cell {i}: {_state(page, i)}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab-root")
    server = JupyterLab(root, tmp_path_factory.mktemp("lab-home"))
    yield server, root
    server.stop()


def test_generate_streams_live_and_stop_button_aborts_while_the_cell_runs(lab, tmp_path, default_model_dir):
    from playwright.sync_api import sync_playwright

    server, root = lab
    write_notebook(root / "live.ipynb", CELLS)
    shots = Path(os.environ.get("NBENGINE_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 760}, device_scale_factor=1)
        try:
            open_and_run_all(page, server, "live.ipynb")

            # 1. live: the pane's text grows over >= 3 observations while the cell still runs
            seen: list[str] = []
            shot_taken = False
            deadline = time.time() + 240
            while time.time() < deadline:
                st = _state(page, 1)
                text = _pane(st)
                if _running(st) and text and (not seen or len(text) > len(seen[-1])):
                    seen.append(text)
                    if len(text) > 100 and not shot_taken:  # the README picture: mid-stream, a few lines in
                        _screenshot(page, 1, shots / "generate-streaming.png")
                        shot_taken = True
                if seen and not _running(st):
                    break
                time.sleep(0.1)
            assert len(seen) >= 3, f"the output did not grow live while the cell ran: {seen}"
            flat = [" ".join(t.split()) for t in seen]
            assert all(b.startswith(a[: len(a) // 2]) for a, b in zip(flat, flat[1:])), seen  # grows, same text
            # then the finished Markdown replaces the plain text
            _wait(page, 1, lambda s: not _running(s) and flat[0][:20] in " ".join(_pane(s).split()),
                  60, "the first cell's final output")

            # 2. Stop: click it once the long generation has shown some tokens, while its cell runs
            st = _wait(page, 2, lambda s: _running(s) and _pane(s).count(",") >= 12, 120, "the long generation to stream")
            shown = _pane(st).count(",")
            cell = page.locator(".jp-Notebook .jp-Cell").nth(2)
            cell.locator(".nbengine-controls button").click()
            done = _wait(page, 3, lambda s: any("next cell ran" in o for o in s["outputs"]), 120,
                         "the next cell to run after Stop")
            _screenshot(page, 2, shots / "generate-stopped.png")
            line = next(o for o in done["outputs"] if "next cell ran" in o)
            kind, tokens = line.split(":")[1].split()
            assert kind == "abort", line
            # the click landed while the cell ran: far fewer than the 1500 tokens asked for, a few
            # more than were on screen at the click (the display lags the engine by <= 50 ms)
            assert int(tokens) < 1500 and int(tokens) <= 3 * shown + 200, (line, shown)
            stopped = _state(page, 2)
            assert any("stopped after" in o for o in stopped["outputs"]), stopped
        finally:
            browser.close()
    screenshot_dir = os.environ.get("NBENGINE_SCREENSHOT_DIR")
    if screenshot_dir and (shots / "generate-streaming.png").exists():
        Path(screenshot_dir).mkdir(parents=True, exist_ok=True)
        shutil.copy(shots / "generate-streaming.png", Path(screenshot_dir) / "generate-streaming.png")


def open_and_run_all(page, server, name: str) -> None:
    """Open notebook ``name`` in JupyterLab, wait for its kernel, run all cells (returns at once)."""
    page.goto(f"{server.url}/lab/tree/{name}", timeout=120_000)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=120_000)
    page.wait_for_selector("#jp-main-statusbar >> text=Idle", timeout=120_000)
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")


def _screenshot(page, i: int, path: Path) -> None:
    """The notebook area around cell ``i`` (its input and live output)."""
    page.locator(".jp-Notebook .jp-Cell").nth(i).screenshot(path=str(path))
