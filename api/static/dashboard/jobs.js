// The job list: re-read /api/v1/jobs every two seconds and redraw the rows.
"use strict";

(function () {
  const m = window.mnistq;
  const table = document.getElementById("jobs");
  if (!table) return;
  const body = table.tBodies[0];

  function cell(row, child, className) {
    const td = row.insertCell();
    if (className) td.className = className;
    if (child instanceof Node) td.appendChild(child); else td.textContent = child;
    return td;
  }

  function render(job, checked) {
    const row = document.createElement("tr");
    row.dataset.id = job.id;
    const box = m.make("input");
    box.type = "checkbox"; box.name = "job"; box.value = job.id; box.checked = checked;
    box.setAttribute("aria-label", "compare " + job.id);
    cell(row, box);
    const link = m.make("a", "", job.name || job.id);
    link.href = table.dataset.jobUrl.replace("JOB", encodeURIComponent(job.id));
    const name = cell(row, link);
    name.appendChild(m.make("div", "muted small", job.id));
    cell(row, m.statusBadge(job.status));
    const bar = m.make("progress");
    bar.max = 1; bar.value = job.progress.fraction;
    const progress = cell(row, bar);
    progress.appendChild(m.make("span", "small", " " + Math.round(job.progress.fraction * 100) + "%"));
    cell(row, m.pct(job.test_accuracy), "n");
    cell(row, m.num(job.test_loss), "n");
    cell(row, job.hyperparameters.model || "");
    cell(row, job.created_at.slice(0, 19).replace("T", " "), "small");
    return row;
  }

  async function refresh() {
    const page = await m.getJSON(table.dataset.source);
    if (!page.items.length) return true;
    const checked = new Set(Array.from(body.querySelectorAll("input:checked")).map(function (b) { return b.value; }));
    const rows = page.items.map(function (job) { return render(job, checked.has(job.id)); });
    body.replaceChildren.apply(body, rows);
    return true;
  }

  m.poll(refresh, 2000);
})();
