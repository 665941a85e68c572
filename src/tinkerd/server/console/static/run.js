// A run's charts: the curves the server recorded (GET /api/v1/training_runs/{id}/curves), polled every 3 s
// while the run is live; each poll asks only for the rows after the last cursor.
"use strict";
(function () {
  const root = document.getElementById("charts");
  if (!root) return;
  const runId = root.dataset.run;
  const series = {};  // kind -> {metric -> [values]}
  let cursor = 0;

  function append(update) {
    for (const [kind, columns] of Object.entries(update.series)) {
      const have = series[kind] || (series[kind] = {});
      const n = have.time ? have.time.length : 0;
      const added = columns.time.length;
      for (const name of new Set([...Object.keys(have), ...Object.keys(columns)])) {
        const old = have[name] || new Array(n).fill(null);
        have[name] = old.concat(columns[name] || new Array(added).fill(null));
      }
    }
  }

  function draw() {
    for (const chart of root.querySelectorAll(".chart")) {
      const columns = series[chart.dataset.kind] || {};
      const values = columns[chart.dataset.metric] || [];
      const points = [];
      values.forEach((v, i) => { if (v !== null && v !== undefined) points.push([i + 1, v]); });
      lineChart(chart, points, { empty: chart.dataset.kind === "sample" ? "no samples from this run yet"
                                                                        : "no steps recorded yet" });
    }
  }

  async function poll() {
    try {
      const response = await fetch(`/api/v1/training_runs/${encodeURIComponent(runId)}/curves?after=${cursor}`,
                                   { credentials: "same-origin" });
      if (response.ok) {
        const update = await response.json();
        const changed = update.cursor !== cursor || cursor === 0;
        cursor = update.cursor;
        append(update);
        if (changed) draw();
        root.dataset.cursor = cursor;
      }
    } finally {
      if (root.dataset.live === "yes") {
        document.getElementById("live").textContent = "· live, updating every 3 s";
        setTimeout(poll, 3000);
      }
    }
  }
  poll();
})();
