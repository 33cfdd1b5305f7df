// One study: scores, chosen series and why others were passed over, timings, errors, score
// history with model versions, and the two pictures (fetched with the key, shown as blob URLs).
"use strict";

(() => {
  const { el } = CT;
  const uid = decodeURIComponent(location.pathname.replace(/^\/studies\//, ""));
  const FINAL = new Set(["scored", "failed", "rejected"]);
  const STAGES = ["select", "load", "resample", "lungs", "lesions", "severity"];
  let study = null;
  let pictureOf = null; // result id the pictures were loaded for
  let comparedWith = null; // "prior uid|result id" the comparison was loaded for
  const blobUrls = [];

  const figure = (label, value, cls = "value") => el("div", { class: "figure" },
    el("span", { class: "label", text: label }), el("span", { class: cls, text: value }));

  function renderSummary(s) {
    const summary = document.getElementById("summary");
    const lowerBound = s.severity_lower_bound;
    summary.replaceChildren(
      CT.band(s.severity_band, lowerBound),
      figure(lowerBound ? "Max-lung severity (lower bound)" : "Max-lung severity", CT.severity(s.severity, lowerBound)),
      figure("Left lung", CT.pct(s.severity_left)),
      figure("Right lung", CT.pct(s.severity_right)),
      figure("COVID-19 probability", CT.prob(s.identification)),
      el("div", { class: "figure" }, el("span", { class: "label", text: "Since prior" }),
        s.trend ? el("span", { class: "value small" }, CT.trend(s)) : el("span", { class: "value small muted",
          text: s.prior_reason || CT.DASH })),
      el("div", { class: "figure" }, el("span", { class: "label", text: "State" }), CT.state(s.state)),
      figure("Patient", CT.personName(s.patient_name), "value small patient-name"),
      figure("Patient ID", s.patient_id || CT.DASH, "value small patient-id"),
      figure("Study date", CT.dicomDate(s.study_date), "value small"),
      figure("Modality", s.modality || CT.DASH, "value small"),
      figure("Accession", s.accession_number || CT.DASH, "value small"),
    );
    const viewer = CT.viewerLink(s);
    if (viewer) summary.append(el("div", { class: "figure" }, el("span", { class: "label", text: "Images" }), viewer));
    if (s.reason) {
      summary.append(el("div", { class: "figure why" },
        el("span", { class: "label", text: s.state === "rejected" ? "Rejected because" : "Reason" }),
        el("code", { class: "reason-code", text: s.reason_code || "no code recorded" }),
        el("span", { class: "reason", text: s.reason })));
    }
    document.title = `cttriage · ${CT.studyLabel(s)} · ${s.severity_band === null ? s.state : "CT-" + s.severity_band}`;
  }

  function renderFlags(s) {
    const box = document.getElementById("flags");
    const flags = s.flags || [];
    if (s.severity === null) { box.replaceChildren(el("p", { class: "muted", text: "Not scored yet." })); return; }
    if (!flags.length) {
      box.replaceChildren(el("p", { class: "muted", text: "No flags: nothing found that makes the scores doubtful." }));
      return;
    }
    box.replaceChildren(
      ...(s.severity_lower_bound ? [el("p", { class: "lower-bound-note", text: "The severity is a lower bound: the "
        + "disease may be worse than measured, so the study is ranked at least CT-3." })] : []),
      el("ul", { class: "flag-list" }, flags.map((f) => el("li", { dataset: { code: f.code } },
        CT.flagBadge(f), el("code", { text: f.code }), el("span", { class: "flag-message", text: f.message })))));
  }

  const share = (v) => (v === null || v === undefined ? CT.DASH : `${(100 * v).toFixed(0)} %`);

  function renderDescriptors(s) {
    const d = s.descriptors;
    const tbody = document.getElementById("descriptor-rows");
    const bilateral = document.getElementById("bilateral");
    if (!d) {
      tbody.replaceChildren(el("tr", {}, el("td", { colspan: 6, class: "empty",
        text: s.severity === null ? "Not scored yet." : "No descriptors for this scoring." })));
      bilateral.textContent = "";
      return;
    }
    tbody.replaceChildren(...[["Right", d.right], ["Left", d.left]].map(([name, lung]) => el("tr", {},
      el("td", { text: name }),
      el("td", { class: "num", text: `${lung.lesion_volume_ml.toFixed(1)} ml` }),
      el("td", { class: "num", text: share(lung.peripheral_share) }),
      el("td", { class: "num", text: share(lung.ground_glass_share) }),
      el("td", { class: "num", text: share(lung.consolidation_share) }),
      el("td", { class: "num", text: lung.foci }))));
    bilateral.textContent = `Bilateral: ${d.bilateral ? "yes" : "no"} (lesions in both lungs). Shares are of `
      + "each lung's lesion volume.";
  }

  function renderMeta(s) {
    const rows = [
      ["Patient", CT.personName(s.patient_name)], ["Patient ID", s.patient_id || CT.DASH],
      ["Accession", s.accession_number || CT.DASH], ["Modality", s.modality || CT.DASH],
      ["Patient age", CT.age(s.patient_age)],
      ["Study date", CT.dicomDate(s.study_date)], ["Description", s.study_description || CT.DASH],
      ["First received", CT.dateTime(s.first_received_at, { seconds: true })],
      ["Last received", CT.dateTime(s.last_received_at, { seconds: true })],
      ["Scored", CT.dateTime(s.scored_at, { seconds: true })],
      ["Instances", s.instance_count], ["Version", s.version],
      ["Method", s.method || CT.DASH], ["Model version", s.model_version || CT.DASH],
      ["Study UID", s.study_uid],
    ];
    document.getElementById("meta").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })]));
  }

  function renderTimings(s) {
    const box = document.getElementById("timings");
    const result = s.results[s.results.length - 1];
    if (!result) { box.replaceChildren(el("p", { class: "muted", text: "Not scored yet." })); return; }
    const job = s.jobs.find((j) => j.id === result.job_id);
    const t = result.timings || {};
    const stages = [...STAGES.filter((k) => k in t), ...Object.keys(t).filter((k) => !STAGES.includes(k) && k !== "total")];
    const longest = Math.max(...stages.map((k) => t[k]), 0.001);
    const bar = (label, seconds, scale) => {
      const fill = el("span");
      fill.style.width = `${Math.min(100, (100 * (seconds || 0)) / scale)}%`;
      return el("div", { class: "stagebar" }, el("span", { text: label }), el("span", { class: "track" }, fill),
        el("span", { class: "num", text: CT.duration(seconds) }));
    };
    const lifecycle = [];
    if (job) {
      if (job.trigger !== "rescore") {
        lifecycle.push([job.trigger === "released" ? "settling (series complete)" : "settling (quiet)",
          CT.between(s.last_received_at, job.created_at)]);
      }
      lifecycle.push(["to broker", CT.between(job.created_at, job.enqueued_at)]);
      lifecycle.push(["worker wait", CT.between(job.enqueued_at, job.started_at)]);
      lifecycle.push(["processing", CT.between(job.started_at, job.finished_at)]);
    }
    const longestStep = Math.max(...lifecycle.map(([, v]) => v || 0), 0.001);
    box.replaceChildren(
      el("p", { class: "hint", text: "Scoring stages in the worker:" }),
      ...stages.map((k) => bar(k, t[k], longest)),
      el("div", { class: "stagebar" }, el("strong", { text: "total" }), el("span"),
        el("strong", { class: "num", text: CT.duration(t.total) })),
      el("p", { class: "hint", text: "From the last instance to the score:" }),
      ...(job ? [el("p", { id: "settle-rule", text: `Queued because ${job.trigger_description}.` })] : []),
      ...lifecycle.map(([k, v]) => bar(k, v, longestStep)),
    );
  }

  // Objects derived from images (segmentations, reports, screenshots): no slices to count or space.
  const DERIVED = new Set(["SEG", "SR", "SC", "OT", "PR", "KO", "REG", "RTSTRUCT"]);

  /** A series' decision, consistent with the study's state: "✓ scored" only with a result for it. */
  function decision(s, x) {
    const scored = s.results.some((r) => r.series_uid === x.series_uid);
    if (x.chosen && scored && s.state === "scored") return el("span", { class: "decision-scored", text: "✓ scored" });
    if (x.chosen) {
      const text = { failed: "chosen, but scoring failed (see the reason above)",
                     rejected: "chosen, but the study was rejected (see the reason above)" }[s.state]
        || (FINAL.has(s.state) ? "chosen, not scored" : "chosen, being scored");
      return el("span", { class: s.state === "failed" || s.state === "rejected" ? "reason" : "muted", text });
    }
    if (x.skip_reason) return el("span", { class: "reason", text: x.skip_reason });
    return el("span", { class: "muted", text: FINAL.has(s.state) ? "not examined" : "not examined yet" });
  }

  function sliceCells(x) {
    if (DERIVED.has(x.modality)) {
      const frames = x.slice_count && x.slice_count > x.instance_count ? `${x.slice_count} frames` : CT.DASH;
      return [el("td", { class: "num", text: frames, title: "a derived object, not a stack of slices" }),
              el("td", { class: "num", text: CT.DASH })];
    }
    const spacing = x.slice_spacing_mm ? `${x.slice_spacing_mm.toFixed(2)} mm` : CT.DASH;
    return [el("td", { class: "num", text: x.slice_count ?? CT.DASH }), el("td", { class: "num", text: spacing })];
  }

  function renderSeries(s) {
    const tbody = document.getElementById("series");
    const rows = s.series.map((x) => el("tr", { class: x.chosen && s.state === "scored" ? "chosen" : "",
                                                dataset: { series: x.series_uid } },
      el("td", { class: "wrap decision" }, decision(s, x)),
      el("td", { class: "num", text: x.series_number ?? CT.DASH }),
      el("td", { class: "wrap", text: x.description || CT.DASH }),
      el("td", { text: x.modality || CT.DASH }),
      el("td", { class: "num", text: x.instance_count }),
      ...sliceCells(x),
      el("td", { class: "wrap muted", text: x.series_uid })));
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 8, class: "empty", text: "No series." }))]));
  }

  function renderResults(s) {
    const trigger = new Map(s.jobs.map((j) => [j.id, j.trigger]));
    const ml = (a, b) => `${Math.round(a)} / ${Math.round(b)} ml`;
    const rows = [...s.results].reverse().map((r) => el("tr", {},
      el("td", { text: CT.dateTime(r.created_at, { seconds: true }), title: r.created_at }),
      el("td", { class: "num", text: r.study_version }),
      el("td", { text: trigger.get(r.job_id) || CT.DASH }),
      el("td", { text: r.method }),
      el("td", { text: r.model_version }),
      el("td", { class: "num", text: CT.prob(r.identification) }),
      el("td", { class: "num", text: CT.pct(r.severity) }),
      el("td", { class: "num", text: CT.pct(r.severity_left) }),
      el("td", { class: "num", text: CT.pct(r.severity_right) }),
      el("td", { class: "num", text: ml(r.lung_volume_left_ml, r.lung_volume_right_ml) }),
      el("td", { class: "num", text: ml(r.lesion_volume_left_ml, r.lesion_volume_right_ml) }),
      el("td", { class: "flags" }, (r.flags || []).length ? r.flags.map(CT.flagBadge) : CT.DASH)));
    document.getElementById("results").replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { colspan: 12, class: "empty", text: "No scoring yet." }))]));
  }

  function renderJobs(s) {
    const rows = [...s.jobs].reverse().map((j) => el("tr", {},
      el("td", { class: "num", text: j.id }),
      el("td", { class: "num", text: j.study_version }),
      el("td", { title: j.trigger_description, text: j.trigger }),
      el("td", {}, CT.state(j.state)),
      el("td", { text: CT.dateTime(j.created_at, { seconds: true }) }),
      el("td", { class: "num", text: CT.duration(CT.between(j.enqueued_at, j.started_at)) }),
      el("td", { class: "num", text: CT.duration(CT.between(j.started_at, j.finished_at)) }),
      el("td", { class: "num", text: j.attempts }),
      el("td", { class: "wrap muted", text: j.worker || CT.DASH }),
      el("td", { class: "wrap" }, j.error ? el("span", { class: "reason", text: j.error }) : CT.DASH)));
    document.getElementById("jobs").replaceChildren(...(rows.length ? rows
      : [el("tr", {}, el("td", { colspan: 10, class: "empty", text: "No job yet (the study is still arriving)." }))]));
  }

  const EXPORT_KINDS = { sr: "Structured Report (scores)", seg: "Segmentation (lungs, lesions)",
                         sc: "Secondary capture (projection)" };

  function renderExports(s) {
    const exports = Array.isArray(s.exports) ? s.exports : [];
    document.getElementById("exports-panel").hidden = !exports.length;
    document.getElementById("exports").replaceChildren(...[...exports].reverse().map((x) => el("tr", {},
      el("td", { text: EXPORT_KINDS[x.kind] || x.kind }),
      el("td", {}, CT.state(x.state)),
      el("td", { class: "num", text: x.attempts }),
      el("td", { text: CT.dateTime(x.sent_at, { seconds: true }) }),
      el("td", { class: "wrap" }, x.last_error ? el("span", { class: "reason", text: x.last_error }) : CT.DASH),
      el("td", { class: "wrap muted", text: x.sop_instance_uid }))));
  }

  async function loadPicture(kind, boxId = kind, studyUid = uid) {
    const box = document.getElementById(boxId);
    const caption = box.querySelector("figcaption");
    try {
      const path = `/api/studies/${encodeURIComponent(studyUid)}/images/${kind}.png`;
      const blob = await (await CT.api(path, { raw: true })).blob();
      const url = URL.createObjectURL(blob);
      blobUrls.push(url);
      box.replaceChildren(el("img", { src: url, alt: caption.textContent }), caption);
    } catch (error) {
      if (CT.handleAuthError(error)) return;
      const text = error.status === 404 ? "No picture (not scored yet, or removed after the retention period)."
        : `Cannot load the picture: ${error.message}`;
      box.replaceChildren(el("div", { class: "placeholder", text }), caption);
    }
  }

  function renderPictures(s) {
    const newest = s.results.length ? s.results[s.results.length - 1].id : null;
    // No scoring (rejected, failed, or not scored yet): no pictures to wait for.
    document.getElementById("pictures-panel").hidden = newest === null;
    if (newest === pictureOf) return;
    pictureOf = newest;
    while (blobUrls.length) URL.revokeObjectURL(blobUrls.pop());
    loadPicture("projection");
    loadPicture("axial");
  }

  /** Both studies' projections side by side, each captioned with its date and scores. */
  async function renderComparison(s) {
    const panel = document.getElementById("comparison-panel");
    const newest = s.results.length ? s.results[s.results.length - 1] : null;
    panel.hidden = newest === null || (!s.prior_study_uid && !s.prior_reason);
    if (panel.hidden) return;
    const text = document.getElementById("comparison-text");
    const pictures = document.getElementById("comparison-pictures");
    if (!s.prior_study_uid) {
      text.textContent = `No prior study compared: ${s.prior_reason}.`;
      pictures.hidden = true;
      return;
    }
    pictures.hidden = false;
    const key = `${s.prior_study_uid}|${newest.id}`;
    if (key === comparedWith) return;
    comparedWith = key;
    text.replaceChildren(CT.trend(s), ` since the prior of ${CT.dicomDate(s.prior_study_date)}, `,
      `${s.prior_days} days before: left ${CT.points(newest.severity_left_change)}, right `,
      `${CT.points(newest.severity_right_change)}, lesion volume `,
      `${newest.lesion_volume_change_ml > 0 ? "+" : ""}${Number(newest.lesion_volume_change_ml).toFixed(1)} mL.`);
    const caption = (id, label, x) => {
      document.querySelector(`#${id} figcaption`).textContent = `${label} · ${CT.dicomDate(x.study_date)} · `
        + `max-lung ${CT.severity(x.severity, x.severity_lower_bound)} (left ${CT.pct(x.severity_left)}, `
        + `right ${CT.pct(x.severity_right)}) · CT-${x.severity_band}`;
    };
    caption("current-projection", "This study", s);
    loadPicture("projection", "current-projection");
    try {
      const prior = await CT.api(`/api/studies/${encodeURIComponent(s.prior_study_uid)}`);
      caption("prior-projection", "Prior study", prior);
    } catch (error) {
      if (CT.handleAuthError(error)) return;
    }
    loadPicture("projection", "prior-projection", s.prior_study_uid);
  }

  const load = CT.serial(async () => {
    const errorBox = document.getElementById("error");
    try {
      study = await CT.api(`/api/studies/${encodeURIComponent(uid)}`);
      errorBox.hidden = true;
    } catch (error) {
      if (CT.handleAuthError(error)) return;
      errorBox.textContent = error.status === 404 ? "No such study." : `Cannot load the study: ${error.message}`;
      errorBox.hidden = false;
      return;
    }
    renderSummary(study);
    renderFlags(study);
    renderDescriptors(study);
    renderMeta(study);
    renderTimings(study);
    renderSeries(study);
    renderResults(study);
    renderJobs(study);
    renderExports(study);
    renderPictures(study);
    renderComparison(study);
  });

  function neighbour(step) {
    const order = CT.loadOrder();
    const at = order.indexOf(uid);
    const next = at < 0 ? null : order[at + step];
    if (next) location.href = CT.studyUrl(next);
  }

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || CT.typing(event)) return;
    const actions = {
      Escape: () => { location.href = "/"; }, Backspace: () => { location.href = "/"; },
      j: () => neighbour(1), n: () => neighbour(1), k: () => neighbour(-1), p: () => neighbour(-1),
      r: () => load(),
    };
    if (actions[event.key]) { event.preventDefault(); actions[event.key](); }
  });

  CT.signIn("radiologist").then(async () => {
    await load();
    // Follow the study while it is still being received or scored (each read is audited, so
    // a study that reached its final state is not read again on every worklist change).
    CT.live(() => { if (study && !FINAL.has(study.state)) load(); });
  });
})();
