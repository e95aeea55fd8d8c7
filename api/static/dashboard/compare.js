// The compare page: overlay each chosen job's train loss and test accuracy.
"use strict";

(function () {
  const m = window.mnistq;
  const root = document.getElementById("compare");
  if (!root) return;
  const heads = Array.from(document.querySelectorAll("th[data-id]"));

  heads.forEach(function (th, i) {
    th.querySelector(".swatch").style.backgroundColor = m.COLORS[i % m.COLORS.length];
  });

  async function draw() {
    const all = await Promise.all(heads.map(function (th) {
      return m.getJSON(root.dataset.metrics.replace("JOB", encodeURIComponent(th.dataset.id)) + "?max_points=2000");
    }));
    const label = function (i) { return heads[i].textContent.trim(); };
    const color = function (i) { return m.COLORS[i % m.COLORS.length]; };
    m.drawChart(document.getElementById("loss-chart"), all.map(function (metrics, i) {
      return { label: label(i), color: color(i), points: metrics.train.map(function (p) { return [p.samples_seen, p.loss]; }) };
    }), { xLabel: "samples seen" });
    const accuracy = all.map(function (metrics, i) {
      const points = metrics.test.filter(function (p) { return p.accuracy !== null; })
        .map(function (p) { return [p.epoch, p.accuracy * 100]; });
      return { label: label(i), color: color(i), points: points, dots: true };
    });
    const everyPoint = [].concat.apply([], accuracy.map(function (s) { return s.points; }));
    const epochs = Math.max.apply(null, heads.map(function (th) { return Number(th.dataset.epochs); }));
    m.drawChart(document.getElementById("accuracy-chart"), accuracy, m.accuracyAxes(everyPoint, epochs));
    return true;
  }

  m.poll(draw, 3000);
})();
