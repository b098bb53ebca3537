"""The click bridge shared by every clickable chart: `assets/chart.js` with the plotly.js that ships
inside the installed `plotly` package, served locally (no CDN)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr


def click_bridge_js() -> str:
    """The chart script with plotly.js's local URL filled in (the file is added to the static paths)."""
    import plotly

    js_url = str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js")
    gr.set_static_paths([js_url])  # adds to the app's static paths (served locally)
    js = (Path(__file__).resolve().parent.parent / "assets" / "chart.js").read_text()
    return js.replace("__PLOTLY_URL__", f"/gradio_api/file={js_url}")
