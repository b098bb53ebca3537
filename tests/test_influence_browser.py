"""Influence tab in headless Chromium: compute, click a heatmap cell, see the run selected in Blocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_browser import CHROMIUM, app_page, app_url  # noqa: F401  (the tiny-model app fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


def test_heatmap_cell_click_selects_a_run(app_url, tmp_path):  # noqa: F811
    shots = Path(os.environ.get("WORKBENCH_SCREENSHOTS", tmp_path))
    with app_page(app_url, 1100) as (page, errors):
        page.get_by_role("tab", name="Influence").click()
        page.get_by_role("button", name="Compute (heatmap + all metrics)").click()
        page.locator("#wb-influence-table").filter(has_text="ppl_without").wait_for(timeout=120_000)
        page.locator("#wb-influence-status").filter(has_text="All metrics").wait_for(timeout=240_000)
        page.locator("#wb-best-runs").filter(has_text="n=1").wait_for(timeout=120_000)
        cells = page.locator("#wb-heatmap .hm image")
        cells.first.wait_for(timeout=120_000)
        box = cells.first.bounding_box()
        # 4 starts (x) by 4 run lengths (y, upwards): the cell start=1, n=2
        page.mouse.click(box["x"] + box["width"] * 1.5 / 4, box["y"] + box["height"] * (1 - 1.5 / 4))
        page.locator("#wb-influence-status").filter(has_text="Selected the run of 2 block(s) [1, 2]").wait_for(
            timeout=120_000)
        page.screenshot(path=str(shots / "influence.png"), full_page=True)
        page.get_by_role("tab", name="Blocks").click()
        page.locator("#wb-selection").filter(has_text="selected: **1, 2**").or_(
            page.locator("#wb-selection").filter(has_text="selected: 1, 2")).first.wait_for(timeout=120_000)
    assert not errors, errors
