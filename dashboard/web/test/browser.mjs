// The dashboard in a real browser (Debian's chromium, headless, driven by playwright-core), for
// tests/tests/dashboard_browser.rs, which owns the stream, the collector, the consumer, the store
// and the dashboard server, and checks what this script reads off the page against SQL.
//
// Protocol (one JSON object per line on stdout; commands on stdin):
//   1. loads the page, waits until every card has a state, and prints
//      {"phase": "loaded", ...what the page shows...}
//   2. reads a line {"total": N} and waits (up to 60 s) until the page's events-by-type totals
//      add up to N without a reload, then prints {"phase": "updated", ...}
//   3. switches the range to 15 minutes, waits for the charts, takes a full-page screenshot to
//      KTK_SCREENSHOT and prints {"phase": "done", ...}
// Console errors, page errors and failed requests are collected and reported in every phase.
// Env: KTK_DASHBOARD_URL, KTK_SCREENSHOT (required), KTK_CHROMIUM (default /usr/bin/chromium).
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

const url = process.env.KTK_DASHBOARD_URL;
const screenshot = process.env.KTK_SCREENSHOT;
if (!url || !screenshot) {
  console.error("KTK_DASHBOARD_URL and KTK_SCREENSHOT are required");
  process.exit(2);
}
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (object) => process.stdout.write(`${JSON.stringify(object)}\n`);
const problems = [];

const browser = await chromium.launch({
  executablePath: process.env.KTK_CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
});
const watchdog = setTimeout(() => {
  console.error("the dashboard browser script ran past 240 s");
  process.exit(3);
}, 240_000);
try {
  const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") problems.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("requestfailed", (r) => problems.push(`request failed: ${r.url()} ${r.failure()?.errorText}`));
  page.on("response", (r) => {
    if (r.status() >= 400) problems.push(`HTTP ${r.status()}: ${r.url()}`);
  });

  // Everything the page shows that the test compares with SQL.
  const read = () =>
    page.evaluate(() => {
      const cards = {};
      for (const c of document.querySelectorAll("[data-card]")) {
        const totals = {};
        for (const tr of c.querySelectorAll("[data-series][data-total]")) totals[tr.dataset.series] = Number(tr.dataset.total);
        cards[c.dataset.card] = {
          state: c.dataset.state ?? null,
          message: c.querySelector(".empty")?.textContent ?? "",
          canvases: c.querySelectorAll("canvas").length,
          lines: [...c.querySelectorAll(".u-legend .u-series")].length - (c.querySelector(".u-legend") ? 1 : 0),
          legend: [...c.querySelectorAll(".u-legend .u-series .u-label")].map((l) => l.textContent),
          totals,
        };
      }
      const rows = (id) =>
        [...document.querySelectorAll(`[data-card="${id}"] tr[data-title]`)].map((tr) => ({
          title: tr.dataset.title,
          plays: Number(tr.dataset.plays),
          viewers: Number(tr.dataset.viewers),
        }));
      const stat = (name) => {
        const e = document.querySelector(`[data-stat="${name}"]`);
        return e ? Number(e.dataset.value) : null;
      };
      return {
        updated: Number(document.body.dataset.updated ?? 0),
        range: Number(document.body.dataset.range ?? 0),
        window: { from: Number(document.body.dataset.windowFrom), to: Number(document.body.dataset.windowTo) },
        cards,
        watching_now: rows("watching-now"),
        top_titles: rows("top-titles"),
        users: { active: stat("users-active"), new: stat("users-new"), returning: stat("users-returning") },
        delay: { p50: stat("delay-p50"), p99: stat("delay-p99"), events: stat("delay-events") },
        segments: Object.fromEntries(
          [...document.querySelectorAll("[data-segment]")].map((s) => [s.dataset.segment, { users: Number(s.dataset.users), sql: s.querySelector("pre").textContent }]),
        ),
        targets: [...document.querySelectorAll("tr[data-target]")].map((tr) => ({ url: tr.dataset.target, up: tr.dataset.up === "true" })),
        status: document.querySelector("#status").textContent,
      };
    });
  const allStated = () => page.waitForFunction(() => [...document.querySelectorAll("[data-card]")].every((c) => c.dataset.state), null, { timeout: 60_000 });
  const typeTotal = (view) => Object.values(view.cards["by-type"].totals).reduce((a, b) => a + b, 0);

  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => document.body.dataset.ready === "1", null, { timeout: 60_000 });
  await allStated();
  // Metrics charts need two scrapes; the test waited for them, but give the page one more refresh.
  const first = await read();
  await page.waitForFunction((n) => Number(document.body.dataset.updated) > n, first.updated, { timeout: 30_000 });
  const loaded = await read();
  say({ phase: "loaded", ...loaded, problems });

  const command = await lines.next();
  const { total } = JSON.parse(command.value);
  const started = Date.now();
  let updated = await read();
  while (typeTotal(updated) !== total) {
    if (Date.now() - started > 60_000) throw new Error(`the page still shows ${typeTotal(updated)} events, not ${total}`);
    await page.waitForTimeout(250);
    updated = await read();
  }
  say({ phase: "updated", ...updated, waited_ms: Date.now() - started, problems });

  await page.click('#ranges button[data-range="900"]');
  await page.waitForFunction(() => document.body.dataset.range === "900", null, { timeout: 10_000 });
  const before = Number(await page.evaluate(() => document.body.dataset.updated));
  await page.waitForFunction((n) => Number(document.body.dataset.updated) > n + 1, before, { timeout: 30_000 });
  await allStated();
  await page.screenshot({ path: screenshot, fullPage: true });
  const done = await read();
  say({ phase: "done", ...done, screenshot, problems });
} catch (e) {
  say({ phase: "failed", error: String(e?.stack ?? e), problems });
  process.exitCode = 1;
} finally {
  clearTimeout(watchdog);
  await browser.close();
  process.stdin.destroy();
}
