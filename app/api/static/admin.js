// The admin page: overview tiles, throughput and latency, workers, failures with retry,
// audit export downloads and the audit log. Refreshed live and every 15 s.
"use strict";

(() => {
  const { el } = CT;
  const STATES = ["receiving", "queued", "processing", "scored", "failed", "rejected"];

  const tile = (label, value, sub, alert = false) => el("div", { class: alert ? "tile alert" : "tile" },
    el("div", { class: "label", text: label }), el("div", { class: "value", text: value }),
    sub ? el("div", { class: "sub", text: sub }) : null);
  const empty = (columns, text) => el("tr", {}, el("td", { colspan: columns, class: "empty", text }));

  function renderOverview(o) {
    const s = o.studies_by_state;
    const storage = o.storage;
    document.getElementById("tiles").replaceChildren(
      ...STATES.map((state) => tile(`Studies ${state}`, s[state],
        null, (state === "failed" || state === "rejected") && s[state] > 0)),
      tile("Queue depth", o.queue.depth, `${o.queue.pending} pending · ${o.queue.enqueued} with the broker`),
      tile("Running jobs", o.queue.running, `${o.workers.length} worker(s) active in the last hour`),
      tile("Scored, last hour", o.throughput.hour.scored, `${o.throughput.day.scored} in the last day`),
      tile("Latency p50, hour", CT.duration(o.throughput.hour.latency_seconds.p50),
        `p95 ${CT.duration(o.throughput.hour.latency_seconds.p95)} · last instance → scored`),
      tile("Storage used", CT.bytes(storage.total_bytes),
        `${CT.bytes(storage.disk_free_bytes)} free on the disk`),
    );

    const rows = [
      ["Scored", (t) => t.scored], ["Rejected", (t) => t.rejected], ["Failed", (t) => t.failed],
      ["Scored per hour", (t) => t.scored_per_hour.toFixed(1)],
      ["Latency p50 (last instance → scored)", (t) => CT.duration(t.latency_seconds.p50)],
      ["Latency p95", (t) => CT.duration(t.latency_seconds.p95)],
      ["Waiting for a worker p50 / p95", (t) => `${CT.duration(t.queue_wait_seconds.p50)} / ${CT.duration(t.queue_wait_seconds.p95)}`],
      ["Processing p50 / p95", (t) => `${CT.duration(t.processing_seconds.p50)} / ${CT.duration(t.processing_seconds.p95)}`],
    ];
    document.getElementById("throughput").replaceChildren(...rows.map(([label, f]) => el("tr", {},
      el("td", { text: label }), el("td", { class: "num", text: f(o.throughput.hour) }),
      el("td", { class: "num", text: f(o.throughput.day) }))),
    el("tr", {}, el("td", { text: "Storage: instances / derived / quarantine" }),
      el("td", { class: "num", colspan: 2,
                 text: `${CT.bytes(storage.instances_bytes)} / ${CT.bytes(storage.derived_bytes)} / ${CT.bytes(storage.quarantine_bytes)}` })));

    document.getElementById("workers").replaceChildren(...(o.workers.length ? o.workers.map((w) => el("tr", {},
      el("td", { class: "wrap", text: w.name }), el("td", { class: "num", text: w.jobs_finished }),
      el("td", { class: "num", text: w.running }), el("td", { text: CT.dateTime(w.last_finished_at, { seconds: true }) })))
      : [empty(4, "No worker finished a job in the last hour.")]));
    document.getElementById("celery").textContent = o.celery.checked
      ? `Answering a broker ping now: ${o.celery.responding.length ? o.celery.responding.join(", ") : "none"}`
      : `Broker ping: ${o.celery.note || "not checked"}`;
  }

  const retried = new Map(); // study uid -> job id of the retry asked for from this page

  async function retry(button, uid) {
    button.disabled = true;
    try {
      const answer = await CT.api(`/api/admin/studies/${encodeURIComponent(uid)}/retry`, { method: "POST" });
      retried.set(uid, answer.job_id);
      button.textContent = `Queued (job ${answer.job_id})`;
    } catch (error) {
      if (CT.handleAuthError(error)) return;
      button.textContent = `Failed: ${error.message}`;
      button.disabled = false;
    }
  }

  function renderFailures(data) {
    const rows = data.items.map((f) => {
      const button = el("button", { type: "button", text: "Retry" });
      button.addEventListener("click", () => retry(button, f.study_uid));
      const retryJob = retried.get(f.study_uid);
      const retryNote = retryJob && f.last_job && f.last_job.id >= retryJob
        ? el("span", { class: "reason", text: `retry (job ${retryJob}) ${f.state} again` }) : null;
      if (retryJob && !retryNote) { button.disabled = true; button.textContent = `Queued (job ${retryJob})`; }
      return el("tr", {},
        el("td", {}, el("a", { href: CT.studyUrl(f.study_uid), text: f.accession_number || "(no accession)" })),
        el("td", {}, CT.state(f.state)),
        el("td", { class: "wrap" }, el("span", { class: "reason", text: f.reason || CT.DASH }),
          el("span", { class: "muted", text: f.reason_code || "" })),
        el("td", { class: "wrap muted", text: f.last_job ? f.last_job.error || CT.DASH : CT.DASH }),
        el("td", { text: CT.dateTime(f.last_received_at) }),
        el("td", { class: "num", text: f.last_job ? f.last_job.attempts : CT.DASH }),
        el("td", {}, button, retryNote));
    });
    document.getElementById("failures").replaceChildren(...(rows.length ? rows : [empty(7, "No failed or rejected study.")]));
    document.getElementById("failures-more").textContent =
      data.total > data.items.length ? `${data.items.length} of ${data.total} shown (GET /api/admin/failures pages through all).` : "";
  }

  function renderAudit(data) {
    document.getElementById("audit").replaceChildren(...(data.items.length ? data.items.map((a) => el("tr", {},
      el("td", { text: CT.dateTime(a.at, { seconds: true }) }), el("td", { text: a.actor }), el("td", { text: a.role }),
      el("td", { text: a.action }),
      el("td", { class: "wrap" }, a.study_uid ? el("a", { href: CT.studyUrl(a.study_uid), text: a.study_uid }) : CT.DASH),
      el("td", { class: "wrap muted", text: a.detail || "" }))) : [empty(6, "No audit event yet.")]));
  }

  function renderPriorLookups(data) {
    document.getElementById("prior-lookups-panel").hidden = !data.enabled && !data.items.length;
    document.getElementById("prior-lookups").replaceChildren(...(data.items.length ? data.items.map((p) => el("tr", {
      dataset: { state: p.state } },
      el("td", {}, el("a", { href: CT.studyUrl(p.study_uid), text: p.accession_number || p.study_uid })),
      el("td", {}, el("span", { class: `state ${p.state === "failed" ? "failed" : ""}`, text: p.state })),
      el("td", { class: "wrap" }, el("span", { class: p.state === "failed" ? "reason" : "muted", text: p.reason || CT.DASH })),
      el("td", { class: "wrap muted", text: p.prior_study_uid || CT.DASH }),
      el("td", { text: CT.dateTime(p.created_at, { seconds: true }) }),
      el("td", { text: CT.dateTime(p.finished_at, { seconds: true }) }))) : [empty(6, "No prior looked up yet.")]));
  }

  async function download(format, button) {
    button.disabled = true;
    try {
      const blob = await (await CT.api(`/api/admin/export.${format}`, { raw: true })).blob();
      const url = URL.createObjectURL(blob);
      const link = el("a", { href: url, download: `cttriage-scores.${format}` });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (error) {
      if (!CT.handleAuthError(error)) alertError(`Export failed: ${error.message}`);
    } finally {
      button.disabled = false;
    }
  }

  function alertError(text) {
    const box = document.getElementById("error");
    box.textContent = text;
    box.hidden = !text;
  }

  const refresh = CT.serial(async () => {
    try {
      const [overview, failures, audit, lookups] = await Promise.all([
        CT.api("/api/admin/overview"), CT.api("/api/admin/failures?limit=50"), CT.api("/api/admin/audit?limit=50"),
        CT.api("/api/admin/prior-lookups?limit=50"),
      ]);
      renderOverview(overview);
      renderFailures(failures);
      renderAudit(audit);
      renderPriorLookups(lookups);
      alertError("");
      document.getElementById("status").textContent =
        `updated ${CT.dateTime(overview.generated_at, { seconds: true })}`;
    } catch (error) {
      if (!CT.handleAuthError(error)) alertError(`Cannot load the overview: ${error.message}`);
    }
  });

  for (const format of ["csv", "json"]) {
    const button = document.getElementById(`export-${format}`);
    button.addEventListener("click", () => download(format, button));
  }

  CT.signIn("admin").then(async () => {
    await refresh();
    CT.live(refresh);
    setInterval(refresh, 15000); // the hour and day windows move even when nothing happens
  });
})();
