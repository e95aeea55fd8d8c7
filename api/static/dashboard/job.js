// The job page: follow the job's event stream (its log, progress and results), draw the
// curves, reload once it finishes; poll where the stream is not available.
"use strict";

(function () {
  const m = window.mnistq;
  const root = document.getElementById("job");
  if (!root) return;
  const FINISHED = ["succeeded", "failed", "cancelled", "pruned"];
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

  const log = document.getElementById("log");
  let lastSeq = 0;

  function addLine(seq, message) {
    if (seq <= lastSeq) return;
    lastSeq = seq;
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.append(message + "\n");
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  // Charts and figures are read again at most every 2 s while points stream in.
  let pending = null;
  function refreshSoon() {
    if (pending === null) pending = setTimeout(function () { pending = null; refresh(); }, 2000);
  }

  function follow() {
    const stream = new EventSource(root.dataset.events);
    let opened = false;
    stream.onopen = function () { opened = true; log.dataset.mode = "stream"; };
    stream.addEventListener("log", function (e) {
      const line = JSON.parse(e.data);
      addLine(line.seq, line.message);
    });
    stream.addEventListener("progress", function (e) {
      const p = JSON.parse(e.data);
      document.getElementById("progress").value = p.fraction;
      document.getElementById("progress-text").textContent =
        "epoch " + p.epoch + "/" + p.n_epochs + ", " + p.samples_seen + "/" + p.total_samples + " samples";
    });
    stream.addEventListener("metric", refreshSoon);
    stream.addEventListener("status", function () { refresh(); });
    stream.addEventListener("end", function () { stream.close(); refresh(); });
    stream.onerror = function () {
      // EventSource reconnects by itself (with Last-Event-ID); a stream that never opened
      // is not there (a proxy, an old server): poll instead.
      if (!opened) { stream.close(); pollInstead(); }
    };
  }

  async function pollLog() {
    const page = await m.getJSON(root.dataset.logs + "?after=" + lastSeq);
    page.lines.forEach(function (line) { addLine(line.seq, line.message); });
    return !page.complete;
  }

  function pollInstead() {
    log.dataset.mode = "poll";
    m.poll(pollLog, 1000);
    m.poll(refresh, 1000);
  }

  refresh();
  if (window.EventSource) follow(); else pollInstead();
})();
