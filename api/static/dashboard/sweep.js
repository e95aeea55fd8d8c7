// The sweep page: the metric against each searched parameter, the best trial's curves;
// polled while the sweep runs, the page reloaded (table, buttons) when it ends.
"use strict";

(function () {
  const m = window.mnistq;
  const root = document.getElementById("sweep");
  if (!root) return;
  const METRIC = root.dataset.metric;
  const COLOR = { succeeded: m.COLORS[2], pruned: m.COLORS[3], running: m.COLORS[0] };

  // A trial's point on a parameter chart: its final metric, else its newest epoch's.
  function metricOf(trial) {
    if (trial.value !== null) return trial.value;
    const tests = trial.job.test_metrics;
    if (!tests.length) return null;
    const last = tests[tests.length - 1];
    return METRIC === "test_accuracy" ? last.accuracy : last.loss;
  }

  // Numbers as they are (log10 for log-uniform ones), categories by their first appearance.
  function axis(trials, name, log) {
    const seen = [];
    return function (trial) {
      const value = trial.params[name];
      if (typeof value === "number") return log ? Math.log10(value) : value;
      if (seen.indexOf(String(value)) < 0) seen.push(String(value));
      return seen.indexOf(String(value));
    };
  }

  function drawParams(trials) {
    document.querySelectorAll("canvas.param-chart").forEach(function (canvas) {
      const name = canvas.dataset.param, log = canvas.dataset.log === "true";
      const x = axis(trials, name, log);
      const series = ["succeeded", "pruned", "running"].map(function (state) {
        const points = trials
          .filter(function (t) { return t.job.status === state && metricOf(t) !== null; })
          .map(function (t) { return [x(t), metricOf(t)]; });
        return { label: state, color: COLOR[state], points: points, dots: true, dotsOnly: true };
      });
      m.drawChart(canvas, series, { xLabel: log ? "log10 " + name : name, empty: "no trial has a metric yet" });
    });
  }

  async function drawBest(sweep) {
    if (!sweep.best) return;
    const metrics = await m.getJSON(root.dataset.metrics.replace("JOB", encodeURIComponent(sweep.best.job_id)));
    const train = metrics.train.map(function (p) { return [p.samples_seen, p.loss]; });
    const test = metrics.test.map(function (p) { return [p.samples_seen, p.loss]; });
    m.drawChart(document.getElementById("best-loss-chart"), [
      { label: "train loss", color: m.COLORS[0], points: train },
      { label: "test loss", color: m.COLORS[1], points: test, dots: true },
    ], { xLabel: "samples seen" });
    const accuracy = metrics.test
      .filter(function (p) { return p.accuracy !== null; })
      .map(function (p) { return [p.epoch, p.accuracy * 100]; });
    m.drawChart(document.getElementById("best-accuracy-chart"), [
      { label: "test accuracy %", color: m.COLORS[2], points: accuracy, dots: true },
    ], m.accuracyAxes(accuracy, sweep.best.hyperparameters.n_epochs || 1));
  }

  async function refresh() {
    const sweep = await m.getJSON(root.dataset.sweep);
    const trials = (await m.getJSON(root.dataset.trials)).items;
    drawParams(trials);
    await drawBest(sweep);
    document.getElementById("status").replaceChildren(m.statusBadge(sweep.status));
    document.getElementById("trial-count").textContent = sweep.trials + "/" + sweep.budget.max_trials;
    document.getElementById("best").textContent = sweep.best ? sweep.best.value.toFixed(4) : "–";
    if (sweep.status !== "running") {
      // The server renders the trials table and the best trial's buttons: show them once.
      if (root.dataset.status === "running") window.location.reload();
      return false;
    }
    return true;
  }

  m.poll(refresh, 2000);
})();
