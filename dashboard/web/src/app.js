// The dashboard page: polls /api/{audience,segments,pipeline} every refresh and draws uPlot
// charts, tables and numbers. Every card ends in one of three states, set on its element as
// data-state: "ready" (drawn with data), "empty" (the range holds nothing for it, and the card
// says so) or "error" (the answer failed, and the card says why). After each full refresh the
// body's data-updated counts up and data-ready is set: the browser tests wait on them.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import "./style.css";

const PALETTE = [
  "#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
  "#ea580c", "#4f46e5", "#0d9488", "#9333ea", "#ca8a04", "#e11d48", "#475569", "#059669",
];

const LABELS = {
  EVENT_TYPE_PLAY: "play", EVENT_TYPE_PAUSE: "pause", EVENT_TYPE_RESUME: "resume", EVENT_TYPE_SEEK: "seek",
  EVENT_TYPE_STOP: "stop", EVENT_TYPE_COMPLETE: "complete", EVENT_TYPE_BUFFER_START: "buffer start",
  EVENT_TYPE_BUFFER_END: "buffer end", EVENT_TYPE_HEARTBEAT: "heartbeat", EVENT_TYPE_AD_START: "ad start",
  EVENT_TYPE_AD_COMPLETE: "ad complete", EVENT_TYPE_AD_SKIP: "ad skip", EVENT_TYPE_AD_IMPRESSION: "ad impression",
  EVENT_TYPE_AD_CLICK: "ad click", EVENT_TYPE_PAGE_VIEW: "page view", EVENT_TYPE_CLICK: "click",
  EVENT_TYPE_SEARCH: "search", EVENT_TYPE_APP_OPEN: "app open", EVENT_TYPE_APP_CLOSE: "app close",
  EVENT_TYPE_ERROR: "error", PLATFORM_IOS: "iOS", PLATFORM_ANDROID: "Android", PLATFORM_FIRE_TV: "Fire TV",
  PLATFORM_APPLE_TV: "Apple TV", PLATFORM_ANDROID_TV: "Android TV", PLATFORM_ROKU: "Roku", PLATFORM_WEB: "web",
  PLATFORM_SMART_TV: "smart TV", PLATFORM_OTHER: "other",
  resent: "resent by clients or producers", reread: "re-read after a takeover",
};

// Tick steps of charts that count things: whole numbers only.
const COUNT_STEPS = [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1e3, 2e3, 2.5e3, 5e3, 1e4, 2e4, 2.5e4, 5e4, 1e5, 2e5, 2.5e5, 5e5, 1e6, 2e6, 5e6, 1e7];
const charts = new Map();
let range = Number(new URLSearchParams(location.hash.slice(1)).get("range")) || 3600;
let refreshMs = 5000;
let updates = 0;
let timer = null;

const $ = (selector, root = document) => root.querySelector(selector);
const card = (id) => $(`[data-card="${id}"]`);
const fmt = (n) => (n == null ? "–" : Math.round(n).toLocaleString("en-US"));
const label = (name) => LABELS[name] ?? name;
// Axis ticks: whole numbers with separators, fractions with one decimal.
const tick = (v) => (Number.isInteger(v) ? fmt(v) : v.toFixed(Math.abs(v) < 1 ? 2 : 1));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const child of children) node.append(child instanceof Node ? child : String(child));
  return node;
}

function setState(id, state, message = "") {
  const c = card(id);
  c.dataset.state = state;
  $(".empty", c).textContent = state === "ready" ? "" : message;
}

// A time chart: `times` in seconds, `series` [{name, values, total}]. Lines whose total is 0 are
// still drawn when `keepZero`; a chart whose every value is 0 (or that has no line) is empty.
function drawChart(id, times, series, { empty, keepZero = false, unit = "", totals: showTotals = true, counts: whole = true } = {}) {
  const c = card(id);
  const box = $(".chart", c);
  // A line of zeros is data when the source has the series (a gauge at 0, a counter that did
  // not move): `keepZero`. Otherwise lines without a value are left out.
  const counts = (v) => v != null && (keepZero || v !== 0);
  const lines = series.filter((s) => s.values.some(counts));
  const hasData = times.length > 0 && lines.length > 0;
  c.querySelector(".totals")?.remove();
  if (!hasData) {
    charts.get(id)?.destroy();
    charts.delete(id);
    box.replaceChildren();
    setState(id, "empty", empty);
    return;
  }
  const key = lines.map((s) => s.name).join("\u0000");
  const data = [times, ...lines.map((s) => s.values)];
  const width = Math.max(box.clientWidth || c.clientWidth - 24, 240);
  let chart = charts.get(id);
  if (chart && chart.ktkKey === key) {
    chart.setData(data);
  } else {
    chart?.destroy();
    chart = new uPlot(
      {
        width,
        height: 220,
        scales: { x: { time: true } },
        axes: [{}, { size: 60, values: (u, vals) => vals.map((v) => tick(v) + unit), ...(whole ? { incrs: COUNT_STEPS } : {}) }],
        series: [
          {},
          ...lines.map((s, i) => ({
            label: label(s.name),
            stroke: PALETTE[i % PALETTE.length],
            width: 1.5,
            // Sparse lines (a few buckets with values) would be invisible without their points.
            points: { show: s.values.filter((v) => v != null && v !== 0).length < 4 },
            value: (u, v) => (v == null ? "–" : `${fmt(v)}${unit}`),
          })),
        ],
        legend: { live: true },
      },
      data,
      box,
    );
    chart.ktkKey = key;
    charts.set(id, chart);
  }
  const totals = el("div", { class: "totals" });
  for (const s of lines) {
    if (s.total == null) continue;
    totals.append(el("div", { class: "total", "data-series": s.name, "data-total": Math.round(s.total) }, el("span", {}, label(s.name)), el("span", { class: "n" }, fmt(s.total))));
  }
  if (showTotals && totals.childElementCount > 0) c.append(totals);
  setState(id, "ready");
}

function drawTable(id, head, rows, empty) {
  const c = card(id);
  const table = $("table", c);
  if (rows.length === 0) {
    table.replaceChildren();
    setState(id, "empty", empty);
    return;
  }
  table.replaceChildren(el("tr", {}, ...head.map((h) => el("th", {}, h))), ...rows);
  setState(id, "ready");
}

// "per minute" in the headings of per-bucket charts becomes the bucket's width.
function perBucket(ids, step) {
  const width = step === 60 ? "minute" : step < 60 ? `${step} s` : step % 3600 === 0 ? `${step / 3600} h` : `${step / 60} min`;
  for (const id of ids) {
    const heading = $("h3", card(id)).firstChild;
    heading.parentElement.dataset.heading ??= heading.textContent;
    heading.textContent = heading.parentElement.dataset.heading.replace("per minute", `per ${width}`);
  }
}

function drawAudience(a) {
  document.body.dataset.windowFrom = String(a.window.from);
  document.body.dataset.windowTo = String(a.window.to);
  perBucket(["by-type", "by-platform", "viewers"], a.window.step);
  drawChart("by-type", a.by_type.times, a.by_type.series, { empty: "No events in this range." });
  drawChart("by-platform", a.by_platform.times, a.by_platform.series, { empty: "No events in this range." });
  drawChart("viewers", a.viewers.times, a.viewers.series, { empty: "Nobody played or watched in this range." });
  const titleRow = (t) =>
    el("tr", { "data-title": t.title, "data-plays": t.plays, "data-viewers": t.viewers }, el("td", {}, t.title), el("td", { class: "n" }, fmt(t.viewers)), el("td", { class: "n" }, fmt(t.plays)));
  drawTable("watching-now", ["title", "viewers", "events"], a.watching_now.map(titleRow), "Nobody is watching right now.");
  const topRow = (t) =>
    el("tr", { "data-title": t.title, "data-plays": t.plays, "data-viewers": t.viewers }, el("td", {}, t.title), el("td", { class: "n" }, fmt(t.plays)), el("td", { class: "n" }, fmt(t.viewers)));
  drawTable("top-titles", ["title", "plays", "viewers"], a.top_titles_today.map(topRow), "No plays today yet.");
  const u = a.users;
  const numbers = $(".numbers", card("users"));
  if (u.active === 0) {
    numbers.replaceChildren();
    setState("users", "empty", "No identified users in this range.");
  } else {
    const stat = (name, value, text) => el("div", { class: "stat" }, el("span", { class: "big", "data-stat": name, "data-value": value }, fmt(value)), el("span", {}, text));
    numbers.replaceChildren(
      stat("users-active", u.active, "active"),
      stat("users-new", u.new, "new (first event in range)"),
      stat("users-returning", u.returning, "returning (seen before)"),
    );
    setState("users", "ready");
  }
}

function drawSegments(s) {
  drawChart("segments", s.chart.times, s.chart.series, { empty: "No user is in any segment in this range.", totals: false });
  const box = $(".segments", card("segments-table"));
  box.replaceChildren(
    ...s.segments.map((seg) =>
      el(
        "div",
        { class: "segment", "data-segment": seg.name, "data-users": seg.users },
        el("p", {}, el("strong", {}, seg.name.replace("_", " ")), `: ${seg.description}. `, el("span", { class: "big-inline" }, fmt(seg.users)), " users"),
        el("details", {}, el("summary", {}, "SQL"), el("pre", {}, seg.sql)),
      ),
    ),
  );
  setState("segments-table", "ready");
}

function drawPipeline(p) {
  const m = p.metrics;
  const store = p.store;
  if (store) {
    perBucket(["stored", "dead-letters"], store.window.step);
    drawChart("stored", store.stored.times, store.stored.series, { empty: "Nothing was stored in this range." });
    const d = store.delay;
    drawChart(
      "delay",
      d.times,
      [
        { name: "p50", values: d.p50, total: null },
        { name: "p99", values: d.p99, total: null },
      ],
      { empty: "No delivered event in this range.", unit: " ms", counts: false },
    );
    const delayCard = card("delay");
    delayCard.querySelector(".totals")?.remove();
    if (d.events > 0) {
      const item = (stat, value, text, shown) =>
        el("div", { class: "total", "data-stat": stat, "data-value": value }, el("span", {}, text), el("span", { class: "n" }, shown));
      delayCard.append(
        el("div", { class: "totals" },
          item("delay-p50", d.overall_p50, "p50 over the range", `${fmt(d.overall_p50)} ms`),
          item("delay-p99", d.overall_p99, "p99 over the range", `${fmt(d.overall_p99)} ms`),
          item("delay-events", d.events, "events", fmt(d.events))),
      );
    }
    drawChart("dead-letters", store.dead_letters.times, store.dead_letters.series, { empty: "No dead letters in this range." });
  } else {
    for (const id of ["stored", "delay", "dead-letters"]) setState(id, "error", `The store did not answer: ${p.store_error}`);
  }
  if (!m) {
    const none = "No metrics source: start the dashboard with --metrics <consumer or collector /metrics URL>.";
    for (const id of ["throughput", "lag", "duplicates", "sink-errors", "targets"]) setState(id, "empty", none);
    return;
  }
  const young = m.covered_secs < 1 ? "Collecting: the first two scrapes are a few seconds apart." : null;
  drawChart("throughput", m.throughput.times, m.throughput.series, { empty: young ?? "No events went through in this range.", keepZero: true, unit: "/s", totals: false, counts: false });
  drawChart("lag", m.lag.times, m.lag.series, { empty: young ?? "No consumer reported a shard yet.", keepZero: true, totals: false, counts: false });
  drawChart("duplicates", m.duplicates.times, m.duplicates.series, { empty: young ?? "No duplicate dropped since the consumers started.", keepZero: true, totals: false, counts: false });
  drawChart("sink-errors", m.sink_errors.times, m.sink_errors.series, { empty: young ?? "No sink error since the consumers started.", keepZero: true, totals: false, counts: false });
  const rows = m.targets.map((t) =>
    el("tr", { "data-target": t.url, "data-up": t.up }, el("td", {}, t.url), el("td", { class: t.up ? "up" : "down" }, t.up ? "up" : `down: ${t.last_error ?? "not scraped yet"}`)),
  );
  drawTable("targets", ["/metrics", "state"], rows, "No metrics source.");
}

async function fetchJson(path) {
  const response = await fetch(path, { cache: "no-store" });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok && !body.store_error) throw new Error(body.error ?? `HTTP ${response.status}`);
  return body;
}

function failCards(ids, error) {
  for (const id of ids) setState(id, "error", `Could not load: ${error.message}`);
}

async function refresh() {
  clearTimeout(timer);
  const started = Date.now();
  const q = `?range=${range}`;
  const results = await Promise.allSettled([
    fetchJson(`/api/audience${q}`).then(drawAudience),
    fetchJson(`/api/segments${q}`).then(drawSegments),
    fetchJson(`/api/pipeline${q}`).then(drawPipeline),
  ]);
  const groups = [
    ["by-type", "by-platform", "viewers", "users", "watching-now", "top-titles"],
    ["segments", "segments-table"],
    ["stored", "delay", "dead-letters", "throughput", "lag", "duplicates", "sink-errors", "targets"],
  ];
  results.forEach((r, i) => {
    if (r.status === "rejected") failCards(groups[i], r.reason);
  });
  const failed = results.filter((r) => r.status === "rejected").length;
  $("#status").textContent = failed
    ? `${failed} of 3 panels failed at ${new Date().toLocaleTimeString()}`
    : `updated ${new Date().toLocaleTimeString()} · every ${refreshMs / 1000} s`;
  updates += 1;
  document.body.dataset.updated = String(updates);
  document.body.dataset.ready = "1";
  timer = setTimeout(refresh, Math.max(refreshMs - (Date.now() - started), 500));
}

function selectRange(seconds) {
  range = seconds;
  history.replaceState(null, "", `#range=${seconds}`);
  for (const b of document.querySelectorAll("#ranges button")) b.setAttribute("aria-pressed", String(Number(b.dataset.range) === seconds));
  document.body.dataset.range = String(seconds);
  refresh();
}

async function start() {
  try {
    const info = await fetchJson("/api/info");
    refreshMs = info.refresh_ms;
    $("#title").textContent = info.title;
    document.title = `${info.title} · ktk dashboard`;
    if (!info.ranges.includes(range)) range = 3600;
  } catch (e) {
    $("#status").textContent = `The dashboard server did not answer: ${e.message}`;
  }
  for (const b of document.querySelectorAll("#ranges button")) b.addEventListener("click", () => selectRange(Number(b.dataset.range)));
  window.addEventListener("resize", () => {
    for (const [id, chart] of charts) chart.setSize({ width: Math.max($(".chart", card(id)).clientWidth, 240), height: 220 });
  });
  selectRange(range);
}

start();
