"""End to end in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright's Python API):
load a model, click a block's bar in the chart, see the comparison change, export."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from conftest import TINY_SPEC as SPEC
from test_app import free_port

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


@contextlib.contextmanager
def serve_tiny_app(tiny_lm):
    """The app served on a free loopback port with a 4-block tiny Llama registered -> (url, store)."""
    from workbench.app import build_app, css
    from workbench.store import Store

    store = Store(default_model=SPEC, device="cpu")
    store.register_model(tiny_lm("llama", layers=4), SPEC)
    demo = build_app(store=store)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, css=css(), quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", store
    finally:
        demo.close()


@pytest.fixture
def app_url(tiny_lm):
    with serve_tiny_app(tiny_lm) as (url, _store):
        yield url


@contextlib.contextmanager
def app_page(url: str, height: int = 1000):
    """A headless Chromium page on the app with the tiny model loaded -> (page, page errors seen)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": height})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.get_by_role("tab", name="Model").click()  # the app opens on the Workbench tab
            page.get_by_role("button", name="Load", exact=True).click()
            page.wait_for_selector("#wb-model-info:has-text('4 blocks')", timeout=120_000)
            yield page, errors
        finally:
            browser.close()


def test_click_a_bar_compare_and_export(app_url, tmp_path):
    shots = Path(os.environ.get("WORKBENCH_SCREENSHOTS", tmp_path))
    with app_page(app_url, 1000) as (page, errors):
        try:
            page.get_by_role("tab", name="Compare").click()
            figures = page.locator("#wb-figures")
            figures.filter(has_text="original vs original").wait_for(timeout=120_000)
            before = figures.inner_text()

            # click block 2's bar in the chart (drawn by plotly.js inside a gr.HTML component)
            page.get_by_role("tab", name="Blocks").click()
            bars = page.locator("#wb-chart .bars .point path")
            bars.first.wait_for(timeout=120_000)
            assert bars.count() == 4
            page.locator("#wb-apply").click()  # nothing selected: a message, not a dead page
            page.get_by_text("select blocks to prune").first.wait_for(timeout=120_000)
            bars.nth(2).click(force=True)
            page.locator("#wb-selection").filter(has_text="selected: 2").wait_for(timeout=120_000)
            page.locator("#wb-preview").filter(has_text="Preview").wait_for(timeout=120_000)
            page.screenshot(path=str(shots / "blocks.png"), full_page=True)
            page.locator("#wb-apply").click()
            page.locator("#wb-status").filter(has_text="Pruned block 2 → v1").wait_for(timeout=120_000)

            # the comparison changed: variant v1 with 3 of 4 blocks and a positive KL
            page.get_by_role("tab", name="Compare").click()
            figures.filter(has_text="original vs v1").wait_for(timeout=120_000)
            assert figures.inner_text() != before
            kept = figures.locator("tr", has_text="blocks kept").locator("td")
            assert [kept.nth(i).inner_text().strip() for i in (1, 2)] == ["4", "3"]
            kl = figures.locator("tr", has_text="KL(orig").locator("td").nth(2).inner_text()
            assert float(kl.split()[0]) > 0
            page.screenshot(path=str(shots / "compare.png"), full_page=True)

            # export
            page.get_by_role("tab", name="Export").click()
            out = tmp_path / "exported"
            page.locator("#wb-export-folder textarea, #wb-export-folder input").first.fill(str(out))
            page.locator("#wb-export").click()
            page.locator("#wb-export-status").filter(has_text="Exported").wait_for(timeout=120_000)
        except Exception:
            page.screenshot(path=str(shots / "failure.png"), full_page=True)  # for diagnosis
            raise
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    assert json.loads((out / "recipe.json").read_text())["steps"] == [{"op": "prune_blocks", "blocks": [2]}]
    assert not errors, errors
