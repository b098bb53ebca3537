"""The Workbench tab's main path in headless Chromium, on the tiny model: load, Macro Influence scan,
click a bar, preview, apply (prune), fuse, quantize, compare, export; every figure shown is checked
against the engine's own numbers for the same variant."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from test_browser import CHROMIUM, app_page, serve_tiny_app

from workbench.engine import evaluate as ev

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"{CHROMIUM} is absent (apt-get install chromium)"),
]


@pytest.fixture
def served(tiny_lm):
    with serve_tiny_app(tiny_lm) as served:
        yield served


def _session(store):
    """The page's session: the only one with a model attached (the page opened one)."""
    sids = [sid for sid, s in store._sessions.items() if s.spec is not None]
    assert len(sids) == 1, sids
    return sids[0]


def quick(store, sid, variant) -> dict:
    """The engine's own quick figures, computed here while holding the model as the app does (the app's
    background jobs run it too: two computations at once would mix their hooks' records)."""
    with store.using(sid) as lm:
        return ev.quick_eval(lm, variant)


def _cell(page, row: str, col: int) -> str:
    return page.locator("#wb-main-figures tr", has_text=row).locator("td").nth(col).inner_text().strip()


def test_main_path_on_the_workbench_tab(served, tmp_path):
    from workbench.panels.workbench import num

    url, store = served
    shots = Path(os.environ.get("WORKBENCH_SCREENSHOTS", tmp_path))
    T = 120_000
    with app_page(url, 1200) as (page, errors):
        try:
            page.get_by_role("tab", name="Workbench").click()
            sid = _session(store)
            chart = page.locator("#wb-main-chart")
            # the background scan ends with the chart on Macro Influence
            chart.locator(".gtitle", has_text="Macro Influence").wait_for(timeout=T)
            assert not page.locator("#wb-main-cancel").is_visible()  # nothing runs: no Cancel
            bars = chart.locator(".bars .point path")
            assert bars.count() == 4

            bars.nth(2).click(force=True)
            page.locator("#wb-main-selection").filter(has_text="selected: 2").wait_for(timeout=T)
            page.locator("#wb-main-figures").filter(has_text="preview: original without 2").wait_for(timeout=T)
            q = quick(store, sid, store.variants(sid)[0].with_dropped([2]))
            assert _cell(page, "KL to the original", 2) == f"{q['kl']:.4f}"
            assert _cell(page, "top-1", 2) == f"{q['top1']:.1%}"
            page.screenshot(path=str(shots / "workbench-preview.png"), full_page=True)

            # drill into the selected block: the Attention tab opens on it, then back to the screen
            page.locator("#wb-main-open-attention").click()
            page.locator("#wb-attention-info").filter(has_text="tokens").wait_for(timeout=T)
            assert page.get_by_role("tab", name="Attention", selected=True).count() == 1
            page.get_by_text("PageRank, block 2").first.wait_for(timeout=T)
            page.get_by_role("tab", name="Workbench").click()
            page.locator("#wb-main-selection").filter(has_text="selected: 2").wait_for(timeout=T)

            page.locator("#wb-main-apply").click()
            status = page.locator("#wb-main-status")
            status.filter(has_text="Pruned block 2 → v1").wait_for(timeout=T)
            v1 = store.current(sid)
            assert v1.dropped() == [2]
            assert f"KL {num(quick(store, sid, v1)['kl'])}," in status.inner_text()
            page.locator("#wb-main-figures").filter(has_text="current: v1").wait_for(timeout=T)
            assert _cell(page, "KL to the original", 2) == f"{quick(store, sid, v1)['kl']:.4f}"

            page.locator("#wb-main-mode").get_by_text("fuse", exact=True).click()
            bars.nth(0).click(force=True)
            page.locator("#wb-main-selection").filter(has_text="selected: 0").wait_for(timeout=T)
            page.locator("#wb-main-apply").click()
            status.filter(has_text="Fused block 0 into their neighbours → v2").wait_for(timeout=T)
            assert "Plain removal of the same blocks → v3" in status.inner_text()
            v2 = store.current(sid)
            assert v2.name == "v2" and v2.dropped() == [0, 2]

            page.locator("#wb-main-mode").get_by_text("quantize", exact=True).click()
            page.locator("#wb-main-group input").click()  # the tiny model's width 32 takes groups of 32
            page.get_by_role("option", name="32", exact=True).click()
            page.locator("#wb-main-apply").click()
            status.filter(has_text="→ v4").wait_for(timeout=T)
            v4 = store.current(sid)
            assert status.inner_text().startswith("Quantized 2 blocks to 4-bit GPTQ (groups of 32)")
            assert f"KL {num(quick(store, sid, v4)['kl'])}," in status.inner_text()
            variants = page.locator("#wb-main-variants")
            variants.filter(has_text="v4").wait_for(timeout=T)
            names = [line.split(":")[0].strip() for line in variants.inner_text().splitlines() if line.strip()]
            assert names == ["original", "v1", "v2", "v3", "v4"]
            # the size-vs-KL plot: one point per variant, the Pareto front drawn
            page.locator("#wb-main-plot .scatterlayer .trace").nth(1).locator(".point").nth(4).wait_for(timeout=T)
            assert page.locator("#wb-main-plot .scatterlayer .trace").nth(1).locator(".point").count() == 5
            page.screenshot(path=str(shots / "workbench-quantized.png"), full_page=True)

            page.get_by_role("tab", name="Compare").click()
            figures = page.locator("#wb-figures")
            figures.filter(has_text="original vs v4").wait_for(timeout=T)
            kl = figures.locator("tr", has_text="KL(orig").locator("td").nth(2).inner_text()
            assert float(kl.split()[0]) == pytest.approx(quick(store, sid, v4)["kl"], abs=1e-4)

            page.get_by_role("tab", name="Export").click()
            out = tmp_path / "exported"
            page.locator("#wb-export-folder textarea, #wb-export-folder input").first.fill(str(out))
            page.locator("#wb-export").click()
            page.locator("#wb-export-status").filter(has_text="Exported").wait_for(timeout=T)
        except Exception:
            page.screenshot(path=str(shots / "workbench-failure.png"), full_page=True)
            raise
    steps = json.loads((out / "recipe.json").read_text())["steps"]
    assert [s["op"] for s in steps] == ["prune_blocks", "fuse_blocks", "quantize"] and steps == v4.steps
    assert not errors, errors
