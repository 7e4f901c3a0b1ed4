"""A real browser (JupyterLab + Debian's chromium through Playwright): the probability view, branching, the dashboard.

Runs ``%%generate --show probs`` in widget mode, waits for the coloured tokens, clicks a token,
clicks one of its alternatives and checks that a second branch appears; checks that the dashboard
counts the finished request. Saves screenshots (``NBENGINE_SCREENSHOT_DIR`` also gets the README's).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path


from jupyter_helpers import write_notebook
# the JupyterLab fixture, and the marks: slow, skipped without chromium
from test_browser import CHROMIUM, FLAGS, lab, open_and_run_all, pytestmark  # noqa: F401

CELLS = [
    "%load_ext nbengine",
    "%nbengine dashboard",
    "%%generate --show probs --max-new-tokens 32 --temperature 0\nName the three primary colours.",
]
PICTURES = ("token-probs.png", "branches.png", "dashboard.png")


def _wait_for(page, js: str, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = page.evaluate(js)
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_clicking_a_token_and_an_alternative_adds_a_branch_and_the_dashboard_counts_it(lab, tmp_path,
                                                                                      default_model_dir):
    from playwright.sync_api import sync_playwright

    server, root = lab
    write_notebook(root / "views.ipynb", CELLS)
    shots = Path(os.environ.get("NBENGINE_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1100, "height": 800}, device_scale_factor=1)
        try:
            open_and_run_all(page, server, "views.ipynb")
            cells = page.locator(".jp-Notebook .jp-Cell")
            gen, dash = cells.nth(2), cells.nth(1)

            # the finished view is the clickable branch widget, one coloured span per token
            gen.locator(".nbe-tree .nbe-branch").first.wait_for(timeout=300_000)
            spans = gen.locator(".nbe-output .nbe-tok")
            assert spans.count() == 32
            assert all(spans.nth(i).get_attribute("data-p") for i in range(spans.count()))
            spans.nth(4).hover()
            gen.screenshot(path=str(shots / "token-probs.png"))

            # click a token: its alternatives appear; click one: a second branch appears
            spans.nth(4).click()
            alts = gen.locator(".nbe-alts .nbe-alt")
            alts.first.wait_for(timeout=30_000)
            chosen = alts.first.get_attribute("data-id")
            alts.first.click()
            gen.locator('.nbe-tree [data-branch="1"]').wait_for(timeout=120_000)
            assert gen.locator(".nbe-tree .nbe-branch").count() == 2
            forced = gen.locator('.nbe-output .nbe-tok[data-forced="1"]')
            assert forced.count() == 1 and forced.get_attribute("data-id") == chosen
            assert forced.get_attribute("data-i") == "4"
            gen.screenshot(path=str(shots / "branches.png"))

            # back to the root by clicking it in the tree
            gen.locator('.nbe-tree [data-branch="0"]').click()
            _wait_for(page, "() => !!document.querySelector('.nbe-branch.nbe-current[data-branch=\"0\"]')", 30,
                      "the root to be selected again")

            # the dashboard, refreshed while the cells ran, lists the finished requests (the fork's too)
            _wait_for(page, "() => document.querySelectorAll('.nbe-dashboard .nbe-recent tr').length >= 3", 30,
                      "the dashboard to list two finished requests")
            dash.screenshot(path=str(shots / "dashboard.png"))
        finally:
            browser.close()
    screenshot_dir = os.environ.get("NBENGINE_SCREENSHOT_DIR")
    if screenshot_dir:
        Path(screenshot_dir).mkdir(parents=True, exist_ok=True)
        for name in PICTURES:
            shutil.copy(shots / name, Path(screenshot_dir) / name)
