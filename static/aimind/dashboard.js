// The dashboard's charts: one uPlot line chart per <figure class="chart" data-series="…">, from the series the
// server put in #dashboard-data ({"x": [epoch seconds], "<name>": [{"label", "values"}]}). A chart with no series
// says so instead of drawing empty axes.
(function () {
  "use strict";
  const source = document.getElementById("dashboard-data");
  if (!source || typeof uPlot === "undefined") return;
  const data = JSON.parse(source.textContent);
  const palette = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
  const empty = document.getElementById("chart-empty").dataset.emptyText;
  document.querySelectorAll("figure.chart").forEach(function (figure) {
    const series = data[figure.dataset.series] || [];
    if (!series.length) {
      const note = document.createElement("p");
      note.className = "muted small";
      note.textContent = empty;
      figure.appendChild(note);
      return;
    }
    const unit = figure.dataset.unit;
    const options = {
      width: Math.max(320, Math.min(figure.parentElement.clientWidth / 2 - 24, 640)),
      height: 220,
      series: [{}].concat(series.map(function (s, i) {
        return {label: s.label, stroke: palette[i % palette.length], width: 1.5, spanGaps: false,
                value: function (u, v) { return v == null ? "—" : v + unit; }};
      })),
      axes: [{}, {values: function (u, ticks) { return ticks.map(function (t) { return t + unit; }); }}],
    };
    new uPlot(options, [data.x].concat(series.map(function (s) { return s.values; })), figure);
  });
})();
