// The worklist page: most urgent first, live, filterable, keyboard driven.
"use strict";

(() => {
  const { el } = CT;
  // Rows per request (?rows= overrides, up to the API's 500); "Show more" adds a page.
  const ROWS_PARAM = new URLSearchParams(location.search).get("rows");
  const PAGE = Math.min(500, Math.max(1, Number(ROWS_PARAM) || 200));
  let pages = 1;
  const rows = document.getElementById("rows");
  const more = document.getElementById("more");
  const status = document.getElementById("status");
  const filters = {
    state: document.getElementById("f-state"),
    band: document.getElementById("f-band"),
    from: document.getElementById("f-from"),
    to: document.getElementById("f-to"),
    patient: document.getElementById("f-patient"),
  };
  let items = [];
  let previous = null; // uid -> state|priority of the last render (to flash what changed)
  let selected = null; // uid of the selected row

  // --- filters, kept in the URL so a reload or a bookmark keeps them -------------------------
  function readFiltersFromUrl() {
    const q = new URLSearchParams(location.search);
    for (const [name, input] of Object.entries(filters)) input.value = q.get(name) || "";
  }
  function writeFiltersToUrl() {
    const q = new URLSearchParams();
    if (ROWS_PARAM) q.set("rows", ROWS_PARAM);
    for (const [name, input] of Object.entries(filters)) if (input.value) q.set(name, input.value);
    history.replaceState(null, "", q.toString() ? `?${q}` : location.pathname);
  }
  function worklistQuery(page) {
    const q = new URLSearchParams({ limit: PAGE, offset: page * PAGE });
    for (const s of filters.state.value.split(",").filter(Boolean)) q.append("state", s);
    for (const b of filters.band.value.split(",").filter(Boolean)) q.append("band", b);
    if (filters.from.value) q.set("received_from", filters.from.value);
    if (filters.to.value) q.set("received_to", filters.to.value);
    if (filters.patient.value.trim()) q.set("patient_id", filters.patient.value.trim());
    // The days picked are the reader's days, as the times shown are the reader's times.
    if (filters.from.value || filters.to.value) q.set("tz", Intl.DateTimeFormat().resolvedOptions().timeZone);
    return q;
  }

  // --- rendering ------------------------------------------------------------------------------
  function severityCell(item) {
    const td = el("td", { class: "num sev", title: item.severity_lower_bound ? "a lower bound: see the flags" : null },
      CT.severity(item.severity, item.severity_lower_bound));
    if (item.severity !== null) {
      const fill = el("span", { class: `b${item.severity_band}` });
      fill.style.width = `${Math.min(100, Math.max(0, item.severity))}%`;
      td.append(el("span", { class: "sevbar" }, fill));
    }
    return td;
  }

  function flagsCell(item) {
    const flags = item.flags || [];
    return el("td", { class: "flags" }, flags.length ? flags.map(CT.flagBadge) : null);
  }

  function stateCell(item) {
    const td = el("td", {}, CT.state(item.state));
    if (item.reason) td.append(el("span", { class: "reason", text: item.reason }));
    return td;
  }

  function renderRow(item, index) {
    const bandClass = item.severity_band === null ? "" : `band-row-${item.severity_band}`;
    const tr = el("tr", {
      tabindex: "-1", class: bandClass, dataset: { uid: item.study_uid },
      "aria-label": `Study ${item.accession_number || item.patient_id || item.study_uid}`,
      on: { click: () => open(item.study_uid), focus: () => { selected = item.study_uid; } },
    },
    el("td", { class: "num muted", text: index + 1 }),
    el("td", {}, CT.band(item.severity_band, item.severity_lower_bound)),
    severityCell(item),
    el("td", { class: "num trend-cell" }, CT.trend(item)),
    el("td", { class: "num prior-days", text: item.prior_days === null ? "" : `${item.prior_days} d` }),
    el("td", { class: "num", text: CT.pct(item.severity_left) }),
    el("td", { class: "num", text: CT.pct(item.severity_right) }),
    el("td", { class: "num", text: CT.prob(item.identification),
               title: item.identification === null ? "not computed by this method" : null }),
    flagsCell(item),
    el("td", { class: "accession" }, el("a", { href: CT.studyUrl(item.study_uid), tabindex: "-1",
                                               text: CT.studyLabel(item) })),
    el("td", { class: "patient wrap" }, el("span", { class: "patient-name", text: CT.personName(item.patient_name) }),
      el("span", { class: "patient-id muted", text: item.patient_id || "" })),
    el("td", { text: CT.age(item.patient_age) }),
    el("td", { class: "study-date", text: CT.dicomDate(item.study_date) }),
    el("td", { class: "modality", text: item.modality || CT.DASH }),
    el("td", { class: "wrap", text: item.study_description || CT.DASH }),
    el("td", { text: CT.dateTime(item.first_received_at), title: item.first_received_at }),
    el("td", { class: "num waiting", dataset: { since: item.first_received_at },
               text: CT.duration(CT.since(item.first_received_at)) }),
    stateCell(item),
    el("td", { class: "viewer-cell" }, CT.viewerLink(item)));
    if (item.flags && item.flags.length) tr.classList.add("flagged");
    const fingerprint = `${item.state}|${item.priority}`;
    if (previous && previous.get(item.study_uid) !== fingerprint) tr.classList.add("fresh");
    return tr;
  }

  function render(data) {
    const hadFocus = rows.contains(document.activeElement);
    items = data.items;
    const rendered = items.map(renderRow);
    rows.replaceChildren(...(rendered.length ? rendered
      : [el("tr", {}, el("td", { colspan: 17, class: "empty", text: "No studies match the filters." }))]));
    previous = new Map(items.map((i) => [i.study_uid, `${i.state}|${i.priority}`]));
    CT.saveOrder(items.map((i) => i.study_uid));
    const shown = items.length < data.total ? `${items.length} of ${data.total}` : `${data.total}`;
    status.textContent = `${shown} studies · updated ${CT.dateTime(new Date().toISOString(), { seconds: true })}`;
    more.hidden = items.length >= data.total;
    more.textContent = `Show ${Math.min(PAGE, data.total - items.length)} more`;
    if (selected && !items.some((i) => i.study_uid === selected)) selected = null;
    rove(selectedIndex());
    if (hadFocus || document.activeElement === document.body) focusRow(selectedIndex(), { scroll: false });
  }

  const refresh = CT.serial(async () => {
    try {
      // The pages shown so far, again: a live update may move any study up or down.
      const first = await CT.api(`/api/worklist?${worklistQuery(0)}`);
      const seen = new Set(first.items.map((i) => i.study_uid));
      const all = [...first.items];
      for (let page = 1; page < pages && all.length < first.total; page++) {
        const next = await CT.api(`/api/worklist?${worklistQuery(page)}`);
        for (const item of next.items) if (!seen.has(item.study_uid)) { seen.add(item.study_uid); all.push(item); }
        if (!next.items.length) break;
      }
      render({ items: all, total: first.total });
    } catch (error) {
      if (!CT.handleAuthError(error)) status.textContent = `Cannot load the worklist: ${error.message}`;
    }
  });

  // Waiting times tick without asking the server.
  setInterval(() => {
    for (const cell of rows.querySelectorAll("td.waiting")) cell.textContent = CT.duration(CT.since(cell.dataset.since));
  }, 15000);

  // --- keyboard ------------------------------------------------------------------------------
  const rowElements = () => [...rows.querySelectorAll("tr[data-uid]")];
  const selectedIndex = () => Math.max(0, items.findIndex((i) => i.study_uid === selected));
  /** Roving tabindex: Tab reaches the table at the selected row, j/k move within it. */
  function rove(index) {
    rowElements().forEach((row, i) => { row.tabIndex = i === index ? 0 : -1; });
  }
  function focusRow(index, { scroll = true } = {}) {
    const list = rowElements();
    if (!list.length) return;
    const at = Math.min(Math.max(index, 0), list.length - 1);
    const row = list[at];
    selected = row.dataset.uid;
    rove(at);
    row.focus({ preventScroll: !scroll });
    if (scroll) row.scrollIntoView({ block: "nearest" });
  }
  const open = (uid) => { location.href = CT.studyUrl(uid); };

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (CT.typing(event)) {
      if (event.key === "Escape") { event.target.blur(); focusRow(selectedIndex()); }
      return;
    }
    const current = rows.contains(document.activeElement) ? selectedIndex() : -1;
    const actions = {
      j: () => focusRow(current + 1), ArrowDown: () => focusRow(current + 1),
      k: () => focusRow(current - 1), ArrowUp: () => focusRow(current - 1),
      Home: () => focusRow(0), g: () => focusRow(0),
      End: () => focusRow(Infinity), G: () => focusRow(Infinity),
      Enter: () => selected && open(selected), o: () => selected && open(selected),
      "/": () => filters.state.focus(),
      r: () => refresh(),
    };
    if (actions[event.key]) {
      event.preventDefault();
      actions[event.key]();
    }
  });

  // --- start -----------------------------------------------------------------------------------
  readFiltersFromUrl();
  for (const input of Object.values(filters)) {
    input.addEventListener("change", () => { writeFiltersToUrl(); previous = null; pages = 1; refresh(); });
  }
  // Enter in the patient ID box applies the filters (the form is never sent: the page asks the API).
  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    writeFiltersToUrl();
    previous = null;
    pages = 1;
    refresh();
  });
  document.getElementById("f-clear").addEventListener("click", () => {
    for (const input of Object.values(filters)) input.value = "";
    writeFiltersToUrl();
    previous = null;
    pages = 1;
    refresh();
  });
  more.addEventListener("click", () => { pages += 1; refresh(); });

  CT.signIn("radiologist").then(async () => {
    await refresh();
    focusRow(0, { scroll: false });
    CT.live(refresh);
  });
})();
