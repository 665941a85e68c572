// An online model's charts: the retention probe and update times the page carries (one point per update).
"use strict";
for (const chart of document.querySelectorAll("#online-charts .chart")) {
  lineChart(chart, JSON.parse(chart.dataset.points || "[]"), { xLabel: "update", empty: "no updates yet" });
}
