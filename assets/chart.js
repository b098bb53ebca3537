// Click bridge for the block chart (a gr.HTML component's js_on_load).
// `props.value` holds a plotly figure as JSON; we draw it with the plotly.js that ships inside the
// `plotly` python package (served locally, no CDN) and turn a bar click into the component's
// `click` event with the block's original index: Python reads it as `evt.block`.
const PLOTLY_URL = "__PLOTLY_URL__";

function withPlotly(cb) {
  if (window.Plotly) return cb();
  let s = document.querySelector("script[data-wb-plotly]");
  if (!s) {
    s = document.createElement("script");
    s.src = PLOTLY_URL;
    s.dataset.wbPlotly = "1";
    document.head.appendChild(s);
  }
  s.addEventListener("load", cb, { once: true });
}

function draw() {
  const div = element.querySelector(".wb-chart");
  if (!div || !props.value) return;
  const fig = typeof props.value === "string" ? JSON.parse(props.value) : props.value;
  withPlotly(() => {
    window.Plotly.react(div, fig.data, fig.layout, { displayModeBar: false, responsive: true });
    if (!div.dataset.wbBound && window.ResizeObserver) {
      // drawn while its tab was hidden (zero width): redraw at the real size once it is shown
      new ResizeObserver(() => { if (div.offsetWidth > 0) window.Plotly.Plots.resize(div); }).observe(div);
    }
    if (!div.dataset.wbBound) {
      div.on("plotly_click", (d) => {
        const p = d.points && d.points[0];
        if (p && p.customdata !== undefined) trigger("click", { block: Number(p.customdata) });
      });
      div.dataset.wbBound = "1";
    }
  });
}

draw();
watch("value", draw);
