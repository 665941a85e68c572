// A job's page: its curves (points the page carries, one per recorded step), and while the job is queued or
// running, a poll of GET /api/v1/jobs/{id} every 5 s that reloads the page when the job moves on.
"use strict";
(function () {
  const root = document.getElementById("job-charts");
  if (!root) return;
  for (const chart of root.querySelectorAll(".chart")) {
    lineChart(chart, JSON.parse(chart.dataset.points || "[]"), { empty: "not measured yet" });
  }
  if (root.dataset.live !== "yes") return;
  const poll = async () => {
    try {
      const job = await api("GET", `/api/v1/jobs/${encodeURIComponent(root.dataset.job)}`);
      if (job.status !== root.dataset.status || String(job.progress.step || 0) !== root.dataset.step) {
        window.location.reload();
        return;
      }
    } catch (error) { /* the server restarting: try again at the next tick */ }
    setTimeout(poll, 5000);
  };
  setTimeout(poll, 5000);
})();
