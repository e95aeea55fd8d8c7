// Shared helpers of the dashboard pages: JSON fetches with the session, formatting, charts.
"use strict";

window.mnistq = (function () {
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  function pct(value) {
    return value === null || value === undefined ? "–" : (value * 100).toFixed(2) + "%";
  }

  function num(value, digits) {
    return value === null || value === undefined ? "–" : value.toFixed(digits === undefined ? 4 : digits);
  }

  function make(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function statusBadge(status) {
    return make("span", "status s-" + status, status);
  }

  function extent(values, fallback) {
    const finite = values.filter(Number.isFinite);
    if (!finite.length) return fallback;
    let lo = Math.min.apply(null, finite), hi = Math.max.apply(null, finite);
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    return [lo, hi];
  }

  function tick(value) {
    const abs = Math.abs(value);
    if (abs < 1e-9) return "0";
    if (abs >= 10000) return (value / 1000).toFixed(0) + "k";
    if (abs >= 100) return value.toFixed(0);
    if (abs >= 1) return value.toFixed(2);
    return value.toFixed(3);
  }

  // Where to put x-axis labels: every integer for a few epochs, else five even steps.
  function xTicks(xr, integer) {
    if (integer && xr[1] - xr[0] <= 12) {
      const out = [];
      for (let x = Math.ceil(xr[0]); x <= xr[1]; x++) out.push(x);
      return out;
    }
    return [0, 1, 2, 3, 4].map(function (i) { return xr[0] + (xr[1] - xr[0]) * i / 4; });
  }

  // series: [{label, color, points: [[x, y], ...], dots: bool}];
  // opts: {xLabel, xRange, yRange, integerX, empty}
  function drawChart(canvas, series, opts) {
    opts = opts || {};
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height, left = 52, right = 16, top = 30, bottom = 36;
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, w, h);
    const xs = [], ys = [];
    series.forEach(function (s) { s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); }); });
    ctx.font = "12px system-ui, sans-serif";
    if (!xs.length) {
      ctx.fillStyle = "#6b7280";
      ctx.fillText(opts.empty || "no data yet", left + 10, h / 2);
      canvas.dataset.points = "0";
      return;
    }
    const xr = opts.xRange || extent(xs, [0, 1]), yr = opts.yRange || extent(ys, [0, 1]);
    const px = function (x) { return left + (x - xr[0]) / (xr[1] - xr[0]) * (w - left - right); };
    const py = function (y) { return top + (1 - (y - yr[0]) / (yr[1] - yr[0])) * (h - top - bottom); };
    ctx.strokeStyle = "#e5e7eb";
    ctx.fillStyle = "#6b7280";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 4; i++) {
      const y = yr[0] + (yr[1] - yr[0]) * i / 4;
      ctx.beginPath(); ctx.moveTo(left, py(y)); ctx.lineTo(w - right, py(y)); ctx.stroke();
      ctx.fillText(tick(y), 4, py(y) + 4);
    }
    ctx.textAlign = "center";
    xTicks(xr, opts.integerX).forEach(function (x) {
      ctx.fillText(opts.integerX ? String(x) : tick(x), px(x), h - bottom + 16);
    });
    ctx.fillText(opts.xLabel || "", left + (w - left - right) / 2, h - 4);
    ctx.textAlign = "left";
    series.forEach(function (s) {
      ctx.strokeStyle = s.color; ctx.fillStyle = s.color; ctx.lineWidth = 2;
      if (s.points.length > 1 && !s.dotsOnly) {
        ctx.beginPath();
        s.points.forEach(function (p, i) { (i ? ctx.lineTo : ctx.moveTo).call(ctx, px(p[0]), py(p[1])); });
        ctx.stroke();
      }
      if (s.dots || s.points.length === 1) {
        s.points.forEach(function (p) { ctx.beginPath(); ctx.arc(px(p[0]), py(p[1]), 4, 0, 2 * Math.PI); ctx.fill(); });
      }
    });
    let lx = left + 8;
    series.forEach(function (s) {
      if (!s.label) return;
      ctx.fillStyle = s.color; ctx.fillRect(lx, 6, 10, 10);
      ctx.fillStyle = "#111827"; ctx.fillText(s.label, lx + 14, 15);
      lx += ctx.measureText(s.label).width + 30;
    });
    canvas.dataset.points = String(xs.length);
  }

  // Repeat fn every ms while keepGoing() says so; errors are shown, not thrown.
  function poll(fn, ms) {
    let timer = null;
    async function run() {
      let again = true;
      try { again = await fn(); } catch (err) { console.warn(err.message); }
      if (again !== false) timer = setTimeout(run, ms);
    }
    run();
    return function () { clearTimeout(timer); };
  }

  // Axes for test accuracy (percent) against epoch: whole epochs, a few points of headroom.
  function accuracyAxes(points, epochs) {
    const ys = points.map(function (p) { return p[1]; });
    const lo = ys.length ? Math.max(0, Math.floor(Math.min.apply(null, ys)) - 2) : 0;
    const hi = ys.length ? Math.min(100, Math.ceil(Math.max.apply(null, ys)) + 2) : 100;
    return { xLabel: "epoch", integerX: true, xRange: [0.5, Math.max(epochs, 1) + 0.5], yRange: [lo, hi] };
  }

  return { COLORS, getJSON, pct, num, make, statusBadge, drawChart, poll, accuracyAxes };
})();
