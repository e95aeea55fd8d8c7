// The drawing pad: white strokes on black like MNIST, posted as PNG to the chosen job's model.
"use strict";

(function () {
  const root = document.getElementById("draw");
  if (!root) return;
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const select = document.getElementById("model-job");
  const error = document.getElementById("predict-error");
  let drawing = false, last = null;

  function clear() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
    document.getElementById("digit").textContent = "–";
    showProbabilities(null);
  }

  function at(event) {
    const box = pad.getBoundingClientRect();
    return [(event.clientX - box.left) * pad.width / box.width, (event.clientY - box.top) * pad.height / box.height];
  }

  function stroke(to) {
    ctx.strokeStyle = "#fff"; ctx.fillStyle = "#fff";
    ctx.lineWidth = 20; ctx.lineCap = "round"; ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(last[0], last[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
    last = to;
  }

  // Pointer events cover mouse, pen and touch alike; touch-action: none stops scrolling.
  pad.addEventListener("pointerdown", function (event) {
    drawing = true; last = at(event);
    pad.setPointerCapture(event.pointerId);
    stroke(last);
  });
  pad.addEventListener("pointermove", function (event) { if (drawing) stroke(at(event)); });
  ["pointerup", "pointercancel"].forEach(function (name) {
    pad.addEventListener(name, function () { drawing = false; });
  });

  function showProbabilities(probabilities) {
    document.querySelectorAll("#probabilities .prob").forEach(function (row, digit) {
      const p = probabilities ? probabilities[digit] : 0;
      row.querySelector(".fill").style.width = (p * 100).toFixed(1) + "%";
      row.querySelector(".p").textContent = probabilities ? (p * 100).toFixed(1) + "%" : "–";
      row.classList.toggle("best", !!probabilities && p === Math.max.apply(null, probabilities));
    });
  }

  function png() {
    return new Promise(function (resolve) { pad.toBlob(resolve, "image/png"); });
  }

  async function predict() {
    error.hidden = true;
    const url = select.options[select.selectedIndex].dataset.predict;
    const response = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "image/png", "X-CSRF-Token": root.dataset.csrf, Accept: "application/json" },
      body: await png(),
    });
    const body = await response.json();
    if (!response.ok) {
      error.textContent = body.message || ("HTTP " + response.status);
      error.hidden = false;
      return;
    }
    document.getElementById("digit").textContent = String(body.digit);
    showProbabilities(body.probabilities);
  }

  document.getElementById("clear").addEventListener("click", clear);
  document.getElementById("predict").addEventListener("click", function () {
    predict().catch(function (err) { error.textContent = err.message; error.hidden = false; });
  });
  select.addEventListener("change", function () { document.getElementById("pick").submit(); });
  clear();
})();
