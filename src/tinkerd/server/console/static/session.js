// A session's live metrics (GET /api/v1/sessions/{id}/metrics), polled every 3 s.
"use strict";
(function () {
  const root = document.getElementById("session-metrics");
  if (!root) return;
  const sum = values => values.reduce((a, b) => a + b, 0);
  async function poll() {
    try {
      const response = await fetch(`/api/v1/sessions/${encodeURIComponent(root.dataset.session)}/metrics`,
                                   { credentials: "same-origin" });
      if (!response.ok) return;
      const m = await response.json();
      document.getElementById("in-flight").textContent = m.in_flight_samples;
      document.getElementById("train-rate").textContent = axisNumber(sum(m.train_tokens_per_s) / m.train_tokens_per_s.length);
      document.getElementById("sample-rate").textContent = axisNumber(sum(m.sample_tokens_per_s) / m.sample_tokens_per_s.length);
      const seconds = i => -60 + (i + 1) * m.bucket_seconds;
      lineChart(document.getElementById("chart-train-rate"), m.train_tokens_per_s.map((v, i) => [seconds(i), v]), { xLabel: "s" });
      lineChart(document.getElementById("chart-sample-rate"), m.sample_tokens_per_s.map((v, i) => [seconds(i), v]), { xLabel: "s" });
    } finally {
      setTimeout(poll, 3000);
    }
  }
  poll();
})();
