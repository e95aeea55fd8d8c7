// The job page: poll the job and its metrics, draw the curves, reload once it finishes.
"use strict";

(function () {
  const m = window.mnistq;
  const root = document.getElementById("job");
  if (!root) return;
  const FINISHED = ["succeeded", "failed", "cancelled"];
  const CHART_POINTS = 2000; // a chart cannot show more; the series is thinned to this
  const lossChart = document.getElementById("loss-chart");
  const accuracyChart = document.getElementById("accuracy-chart");

  function drawMetrics(metrics, epochs) {
    const train = metrics.train.map(function (p) { return [p.samples_seen, p.loss]; });
    const test = metrics.test.map(function (p) { return [p.samples_seen, p.loss]; });
    m.drawChart(lossChart, [
      { label: "train loss", color: m.COLORS[0], points: train },
      { label: "test loss", color: m.COLORS[1], points: test, dots: true },
    ], { xLabel: "samples seen" });
    const accuracy = metrics.test
      .filter(function (p) { return p.accuracy !== null; })
      .map(function (p) { return [p.epoch, p.accuracy * 100]; });
    const axes = m.accuracyAxes(accuracy, epochs);
    axes.empty = "after the first epoch";
    m.drawChart(accuracyChart, [
      { label: "test accuracy %", color: m.COLORS[2], points: accuracy, dots: true },
    ], axes);
  }

  function showJob(job) {
    const status = document.getElementById("status");
    status.replaceChildren(m.statusBadge(job.status));
    document.getElementById("progress").value = job.progress.fraction;
    const p = job.progress;
    document.getElementById("progress-text").textContent =
      "epoch " + p.epoch + "/" + p.n_epochs + ", " + p.samples_seen + "/" + p.total_samples + " samples" +
      (p.eta_seconds !== null ? ", about " + Math.ceil(p.eta_seconds) + " s left" : "");
    document.getElementById("accuracy").textContent = m.pct(job.test_accuracy);
    document.getElementById("loss").textContent = m.num(job.test_loss);
    const note = document.getElementById("queue-note");
    if (note) note.hidden = job.status !== "queued";
  }

  async function refresh() {
    const job = await m.getJSON(root.dataset.job);
    drawMetrics(await m.getJSON(root.dataset.metrics + "?max_points=" + CHART_POINTS), job.progress.n_epochs);
    showJob(job);
    if (FINISHED.indexOf(job.status) >= 0) {
      // The server renders the plots and artifacts of a finished job: show them once.
      if (FINISHED.indexOf(root.dataset.status) < 0) window.location.reload();
      return false;
    }
    return true;
  }

  m.poll(refresh, 1000);
})();
