"""The click bridge shared by every clickable chart: `assets/chart.js` with the plotly.js that ships
inside the installed `plotly` package, served locally (no CDN)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr


def placeholder(text: str, height: int = 340) -> dict:
    """An empty chart that says what to do, as plotly JSON: no empty axes, no grid, one centred line."""
    return {"data": [], "layout": {"height": height, "xaxis": {"visible": False}, "yaxis": {"visible": False},
                                   "plot_bgcolor": "rgba(0,0,0,0)", "paper_bgcolor": "rgba(0,0,0,0)",
                                   "annotations": [{"text": text, "showarrow": False, "xref": "paper", "yref": "paper",
                                                    "x": 0.5, "y": 0.5, "font": {"size": 14, "color": "#666"}}]}}


def placeholder_figure(text: str, height: int = 300):
    """`placeholder` as a plotly Figure, for gr.Plot components."""
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(placeholder(text, height)["layout"])
    return fig


def click_bridge_js() -> str:
    """The chart script with plotly.js's local URL filled in (the file is added to the static paths)."""
    import plotly

    js_url = str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js")
    gr.set_static_paths([js_url])  # adds to the app's static paths (served locally)
    js = (Path(__file__).resolve().parent.parent / "assets" / "chart.js").read_text()
    return js.replace("__PLOTLY_URL__", f"/gradio_api/file={js_url}")
