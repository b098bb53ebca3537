"""The views in headless Chromium: attention figures appear, a no-op heatmap click opens that head's map,
a map click selects a block for pruning, attributions render (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_browser import CHROMIUM, app_page, app_url  # noqa: F401  (same app fixture and browser)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


def test_views_in_the_browser(app_url):  # noqa: F811
    with app_page(app_url, 1000) as (page, errors):
        page.get_by_role("tab", name="Attention").click()
        page.locator("#wb-attention-go").click()
        page.locator("#wb-attention-info").filter(has_text="4 blocks x 4 heads").wait_for(timeout=120_000)
        page.locator("#wb-attention-grid .main-svg").first.wait_for(timeout=60_000)

        page.get_by_role("tab", name="Outliers").click()
        page.locator("#wb-outliers-go").click()
        page.locator("#wb-outliers-summary").filter(has_text="Blocks with activation outliers").wait_for(timeout=120_000)
        drag = page.locator("#wb-noop .nsewdrag").first
        drag.wait_for(timeout=60_000)
        box = drag.bounding_box()
        # 4 blocks (rows, top to bottom 0..3) x 4 heads: click the cell of block 3, head 0 (bottom left).
        page.mouse.click(box["x"] + box["width"] * 0.12, box["y"] + box["height"] * 0.88)
        page.locator("#wb-noop-head .gtitle").filter(has_text="block 3, head 0").wait_for(timeout=120_000)

        page.get_by_role("tab", name="Map").click()
        page.locator("#wb-map-go").click()
        points = page.locator("#wb-map-blocks .scatterlayer .point")
        points.first.wait_for(timeout=120_000)
        assert points.count() == 4
        points.nth(2).click(force=True)
        page.locator("#wb-map-note").filter(has_text="Selected for pruning: 2").wait_for(timeout=60_000)

        page.get_by_role("tab", name="Attribution").click()
        page.locator("#wb-attribution-go").click()
        page.locator("#wb-attribution-summary").filter(has_text="captum delta").wait_for(timeout=120_000)
    assert not errors, errors
