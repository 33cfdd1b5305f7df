// Shared by the cttriage pages: sign-in with an API key, API calls, safe DOM building,
// formatting, and the live worklist stream. No framework, no build step.
//
// Every value that came from a DICOM header (accession, description, age, reasons) is put
// into the page with textContent (CT.el), never as HTML; the pages' Content-Security-Policy
// forbids inline scripts besides.
"use strict";

const CT = (() => {
  const KEY = "cttriage.key";
  const ORDER = "cttriage.order";
  const NOTICE = "cttriage.notice";

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail || `HTTP ${status}`);
      this.status = status;
      this.detail = detail;
    }
  }

  const key = () => sessionStorage.getItem(KEY);

  async function api(path, { method = "GET", raw = false } = {}) {
    const k = key();
    if (!k) throw new ApiError(401, "not signed in");
    const response = await fetch(path, {
      method, cache: "no-store", headers: { Authorization: `Bearer ${k}`, Accept: "application/json" },
    });
    if (!response.ok) {
      let detail = "";
      try { detail = (await response.json()).detail || ""; } catch (e) { /* not JSON */ }
      throw new ApiError(response.status, detail);
    }
    return raw ? response : response.json();
  }

  /** el("td", {class: "num", text: value, title: "…", dataset: {uid}, on: {click}}, ...children) */
  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "text") node.textContent = String(value);
      else if (name === "class") node.className = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // --- formatting ---------------------------------------------------------------------------
  const DASH = "—";
  const pad = (n) => String(n).padStart(2, "0");
  const isNone = (v) => v === null || v === undefined;
  const pct = (v, digits = 1) => (isNone(v) ? DASH : `${Number(v).toFixed(digits)} %`);
  const prob = (v) => (isNone(v) ? DASH : `${(Number(v) * 100).toFixed(0)} %`);
  function dateTime(iso, { seconds = false } = {}) {
    if (!iso) return DASH;
    const d = new Date(iso);
    const time = `${pad(d.getHours())}:${pad(d.getMinutes())}${seconds ? ":" + pad(d.getSeconds()) : ""}`;
    const today = new Date();
    if (d.toDateString() === today.toDateString()) return time;
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${time}`;
  }
  function duration(seconds) {
    if (isNone(seconds) || !isFinite(seconds)) return DASH;
    const s = Math.max(0, seconds);
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${pad(Math.floor((s % 3600) / 60))} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }
  const since = (iso) => (iso ? (Date.now() - new Date(iso).getTime()) / 1000 : null);
  const between = (a, b) => (a && b ? (new Date(b).getTime() - new Date(a).getTime()) / 1000 : null);
  /** DICOM AS "054Y" → "54 y"; anything else shown as it came. */
  function age(value) {
    const m = /^(\d{3})([DWMY])$/.exec(value || "");
    if (!m) return value || DASH;
    return `${Number(m[1])} ${{ D: "d", W: "wk", M: "mo", Y: "y" }[m[2]]}`;
  }
  /** DICOM DA "20240501" → "2024-05-01". */
  const dicomDate = (v) => (/^\d{8}$/.test(v || "") ? `${v.slice(0, 4)}-${v.slice(4, 6)}-${v.slice(6)}` : v || DASH);
  /** DICOM PN "DOE^JOHN^^^" → "DOE, JOHN" (family name, then the other components). */
  function personName(value) {
    const parts = (value || "").split("=")[0].split("^").map((x) => x.trim()).filter(Boolean);
    if (!parts.length) return DASH;
    return parts.length === 1 ? parts[0] : `${parts[0]}, ${parts.slice(1).join(" ")}`;
  }
  /** How to name a study in a list: its accession, else (anonymised) its patient ID or date. */
  const studyLabel = (s) => s.accession_number || (s.patient_id ? `patient ${s.patient_id}` : null)
    || (s.study_date ? `study of ${dicomDate(s.study_date)}` : "(no accession)");
  /** The "open in viewer" link (the API gives it only where a viewer is configured). */
  const viewerLink = (s) => (/^https?:\/\//i.test(s.viewer_url || "") ? el("a", { class: "viewer", href: s.viewer_url, target: "_blank",
    rel: "noopener noreferrer", text: "Open in viewer" }) : null);
  function bytes(n) {
    if (isNone(n)) return DASH;
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }
  /** The band pill; `atLeast`: the band was floored because the severity is a lower bound. */
  const band = (b, atLeast = false) => (isNone(b) ? el("span", { class: "muted", text: DASH })
    : el("span", { class: `band b${b}${atLeast ? " floored" : ""}`, text: atLeast ? `≥ CT-${b}` : `CT-${b}`,
                   title: atLeast ? `at least CT-${b}: the severity is a lower bound (see the flags)`
                     : BAND_TITLES[b] }));
  const BAND_TITLES = ["CT-0: no lesions", "CT-1: under 25 % of the worse lung", "CT-2: 25–50 %",
    "CT-3: 50–75 %", "CT-4: 75 % or more"];
  /** A severity that may under-read the disease reads "≥ x %". */
  const severity = (v, lowerBound = false) => (lowerBound && !isNone(v) ? `≥ ${pct(v)}` : pct(v));

  /** Change since the prior in points, signed ("+20.1 pt"). */
  const points = (v) => (isNone(v) ? DASH : `${v > 0 ? "+" : v < 0 ? "−" : "±"}${Math.abs(Number(v)).toFixed(1)} pt`);
  const TREND_ARROWS = { worse: "↑", better: "↓", unchanged: "=" };
  /** The trend against the prior (the server decides it: CTTRIAGE_TREND_POINTS); empty without one. */
  function trend(s) {
    if (!s.trend) return el("span", { class: "trend none", title: s.prior_reason || "no prior study" });
    return el("span", {
      class: `trend ${s.trend}`, dataset: { trend: s.trend },
      title: `${s.trend} than the prior of ${dicomDate(s.prior_study_date)} (${s.prior_days} days before)`,
      text: `${TREND_ARROWS[s.trend]} ${points(s.severity_change)}`,
    });
  }
  /** "LungMaskImplausible" → "Lung mask implausible": any code, known or not. */
  const flagName = (code) => String(code).replace(/([a-z0-9])([A-Z])/g, "$1 $2").replace(/ ([A-Z])(?=[a-z])/g,
    (m, c) => ` ${c.toLowerCase()}`);
  /** One badge per flag, its message as the title; lower-bound flags stand out. */
  const flagBadge = (f) => el("span", { class: `flag${f.lower_bound ? " lower-bound" : ""}`, dataset: { code: f.code },
    title: f.message, text: `⚠ ${flagName(f.code)}${f.lower_bound ? " · lower bound" : ""}` });
  const state = (s) => el("span", { class: `state ${s}`, text: s });

  // --- sign-in ------------------------------------------------------------------------------
  function authMessage(error, need) {
    if (error.status === 401) return "Unknown or revoked API key. Check it and sign in again.";
    if (error.status === 403) return `This key may not use this page: it needs the ${need} role.`;
    return `Cannot reach the server (${error.message}).`;
  }

  function signInForm(form, need) {
    const message = el("div", { id: "signin-message", class: "message", role: "alert", hidden: true });
    const input = el("input", { id: "signin-key", type: "password", autocomplete: "off", spellcheck: "false",
                                required: true });
    form.replaceChildren(
      el("h2", { text: need === "admin" ? "Sign in as an admin" : "Sign in" }),
      el("p", { class: "muted", text: `Enter your cttriage API key (${need === "admin" ? "admin role"
        : "radiologist or admin"}). It is kept in this browser tab only and sent with each request.` }),
      message, el("label", { for: "signin-key", text: "API key" }), input,
      el("button", { type: "submit", text: "Sign in" }));
    return { message, input };
  }

  /**
   * Resolves with {name, role} once a key with the needed role is stored. Shows the sign-in
   * form in #signin (and hides #app) until then.
   */
  function signIn(need = "radiologist") {
    const form = document.getElementById("signin");
    const app = document.getElementById("app");
    const { message, input } = signInForm(form, need);
    return new Promise((resolve) => {
      async function attempt() {
        try {
          const me = await api("/api/me");
          if (need === "admin" && me.role !== "admin") throw new ApiError(403, "");
          form.hidden = true;
          app.hidden = false;
          showWho(me);
          resolve(me);
        } catch (error) {
          if (error.status === 401) sessionStorage.removeItem(KEY);
          const notice = sessionStorage.getItem(NOTICE);
          sessionStorage.removeItem(NOTICE);
          app.hidden = true;
          form.hidden = false;
          message.textContent = notice || authMessage(error, need);
          message.hidden = !notice && error.detail === "not signed in";
          input.value = "";
          input.focus();
        }
      }
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const value = input.value.trim();
        if (!value) return;
        sessionStorage.setItem(KEY, value);
        attempt();
      });
      attempt();
    });
  }

  function showWho(me) {
    const who = document.getElementById("who");
    if (who) who.textContent = `${me.name} (${me.role})`;
    const adminLink = document.getElementById("admin-link");
    if (adminLink) adminLink.hidden = me.role !== "admin";
    const out = document.getElementById("signout");
    if (out) {
      out.hidden = false;
      out.onclick = () => { sessionStorage.removeItem(KEY); location.reload(); };
    }
  }

  /** After an API call failed: a refused key (401) sends the user back to the sign-in form. */
  function handleAuthError(error) {
    if (error.status !== 401) return false;
    sessionStorage.removeItem(KEY);
    sessionStorage.setItem(NOTICE, authMessage(error));
    location.reload();
    return true;
  }

  // --- live updates -------------------------------------------------------------------------
  /**
   * Calls onChange() whenever the worklist changes: an SSE stream read with fetch (so the key
   * goes in the Authorization header, not the URL), reconnected when it ends; polling every
   * `pollSeconds` while the stream cannot be held. The #live badge says which ("live", "polling").
   */
  function live(onChange, pollSeconds = 5) {
    const badge = document.getElementById("live");
    const onStatus = (mode) => {
      if (!badge) return;
      badge.hidden = false;
      badge.className = `live ${mode}`;
      badge.textContent = { on: "live", polling: "polling", off: "offline" }[mode];
    };
    let pollTimer = null;
    let backoff = 1;
    const startPolling = () => {
      if (!pollTimer) pollTimer = setInterval(onChange, pollSeconds * 1000);
      onStatus("polling");
    };
    const stopPolling = () => { clearInterval(pollTimer); pollTimer = null; };

    async function stream() {
      const response = await fetch("/api/worklist/events", {
        cache: "no-store", headers: { Authorization: `Bearer ${key()}`, Accept: "text/event-stream" },
      });
      if (!response.ok || !response.body) throw new ApiError(response.status, "");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          if (/^event: worklist$/m.test(block)) {
            stopPolling();
            backoff = 1;
            onStatus("on");
            onChange();
          }
        }
      }
    }

    async function run() {
      for (;;) {
        try {
          await stream();  // ended by the server after a few minutes: reconnect at once
        } catch (error) {
          if (handleAuthError(error)) return;
          startPolling();
          await new Promise((r) => setTimeout(r, backoff * 1000));
          backoff = Math.min(backoff * 2, 60);
        }
      }
    }
    if (typeof TextDecoderStream === "undefined") startPolling();
    else run();
  }

  /** Runs `task` now, or once more after the run in flight: bursts of events cost one reload. */
  function serial(task) {
    let running = null;
    let again = false;
    return async function trigger() {
      if (running) { again = true; return running; }
      running = (async () => {
        do { again = false; await task(); } while (again);
      })().finally(() => { running = null; });
      return running;
    };
  }

  /** True when the key press happened in a form field (shortcuts stay out of the way). */
  const typing = (event) => /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(event.target.tagName) || event.target.isContentEditable;

  const saveOrder = (uids) => sessionStorage.setItem(ORDER, JSON.stringify(uids));
  const loadOrder = () => { try { return JSON.parse(sessionStorage.getItem(ORDER) || "[]"); } catch (e) { return []; } };
  const studyUrl = (uid) => `/studies/${encodeURIComponent(uid)}`;

  return {
    ApiError, api, el, pct, prob, dateTime, duration, since, between, age, dicomDate, personName, studyLabel,
    viewerLink, bytes, band, state,
    severity, flagName, flagBadge, points, trend,
    signIn, handleAuthError, live, serial, typing, saveOrder, loadOrder, studyUrl, DASH,
  };
})();
