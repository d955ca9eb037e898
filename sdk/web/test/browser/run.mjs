// The web SDK in a real browser (Debian's chromium, headless, driven by playwright-core) against
// the real `collector` binary, which puts into a Kinesis stream that a `consumer` process
// delivers to PostgreSQL. tests/tests/web_sdk.rs creates the stream, runs the consumer, runs this
// script and then checks the store and the stream against what this script writes to
// KTK_WEB_RESULTS: per scenario, the event ids that must be stored, those that must not be, and
// whether each must be in the stream exactly once.
//
// This script runs the rest: a static server for the test page (page.html, loading the built
// bundle dist/ktk-web.min.js), the collector (its keys file names the page's origin), and a small
// proxy in front of the collector through which the page sends everything, which can refuse
// connections ("down") or answer 503/429 with Retry-After on cue, and logs when each request came.
// Each scenario asserts what the page itself sees (its stats, its callbacks, the gaps between
// requests); a failed assertion fails the script (exit status 1).
//
// Env: KTK_WEB_COLLECTOR_BIN, KTK_WEB_STREAM, KTK_WEB_RESULTS (required), KTK_WEB_SCENARIOS
// (comma-separated subset), KTK_CHROMIUM (default /usr/bin/chromium); the AWS_* settings for the
// collector.
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync, mkdtempSync, rmSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { fromBinary, fromJsonString } from "@bufbuild/protobuf";
import { EventBatchSchema } from "../../dist/gen/events/v1/events_pb.js";

const here = dirname(fileURLToPath(import.meta.url));
const web = join(here, "..", "..");
const started = Date.now();
const log = (...args) => console.error(`[web-sdk ${((Date.now() - started) / 1000).toFixed(1)}s]`, ...args);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: this script is run by tests/tests/web_sdk.rs`);
  return value;
}

const collectorBin = required("KTK_WEB_COLLECTOR_BIN");
const stream = required("KTK_WEB_STREAM");
const resultsFile = required("KTK_WEB_RESULTS");
const chromiumPath = process.env.KTK_CHROMIUM || "/usr/bin/chromium";
const only = process.env.KTK_WEB_SCENARIOS ? new Set(process.env.KTK_WEB_SCENARIOS.split(",")) : undefined;
const bundle = readFileSync(join(web, "dist", "ktk-web.min.js"));
const pageHtml = readFileSync(join(here, "page.html"));

async function waitFor(what, check, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await check();
    if (last === true) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
    await sleep(100);
  }
}

function listen(server) {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => resolve(server.address().port));
  });
}

async function freePort() {
  const server = http.createServer();
  const port = await listen(server);
  await new Promise((r) => server.close(r));
  return port;
}

// --- the page's server ---------------------------------------------------------------------------
const pageServer = http.createServer((req, res) => {
  const path = new URL(req.url, "http://x").pathname;
  if (path === "/" || path === "/index.html") {
    res.writeHead(200, { "content-type": "text/html; charset=utf-8", "cache-control": "no-store" });
    res.end(pageHtml);
  } else if (path === "/ktk-web.min.js") {
    res.writeHead(200, { "content-type": "text/javascript", "cache-control": "no-store" });
    res.end(bundle);
  } else {
    res.writeHead(404);
    res.end();
  }
});
const pagePort = await listen(pageServer);
const origin = `http://127.0.0.1:${pagePort}`;

// --- the collector -------------------------------------------------------------------------------
const workDir = mkdtempSync(join(tmpdir(), "ktk-web-sdk-"));
const writeKey = `wk_websdk_${randomBytes(12).toString("hex")}`;
const keysFile = join(workDir, "keys.json");
writeFileSync(keysFile, JSON.stringify({ keys: [{ app_id: "tv-web", key: writeKey, origins: [origin] }] }));

class Collector {
  constructor(port, adminPort) {
    this.port = port;
    this.adminPort = adminPort;
    this.child = undefined;
  }

  async start() {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("KTK_")));
    Object.assign(env, {
      KTK_STREAM: stream,
      KTK_LISTEN: `127.0.0.1:${this.port}`,
      KTK_ADMIN_LISTEN: `127.0.0.1:${this.adminPort}`,
      KTK_KEYS_FILE: keysFile,
      RUST_LOG: process.env.RUST_LOG || "warn",
    });
    const child = spawn(collectorBin, [], { env, stdio: ["ignore", "ignore", "inherit"] });
    this.child = child;
    let exited = null;
    child.once("exit", (code, signal) => (exited = { code, signal }));
    await waitFor(
      "the collector's /health",
      async () => {
        if (exited) throw new Error(`the collector exited at start: ${JSON.stringify(exited)}`);
        try {
          const r = await fetch(`http://127.0.0.1:${this.port}/health`);
          return r.status === 200 || r.status;
        } catch (e) {
          return String(e.cause?.code ?? e);
        }
      },
      60_000,
    );
  }

  async signal(name) {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once("exit", r));
    child.kill(name);
    await exited;
    this.child = undefined;
  }
}

const collector = new Collector(await freePort(), await freePort());

// --- the proxy in front of it --------------------------------------------------------------------
class FaultProxy {
  constructor() {
    /** "pass": forward; "down": close every connection at once (the collector is unreachable). */
    this.mode = "pass";
    /** Answers for the next POSTs, in order: {status, retryAfter}. */
    this.faults = [];
    /** Every POST /v1/events: {at, status, answeredAt, fault, ids, keepalive}. */
    this.posts = [];
    /** Requests refused in "down" mode, and those of them that were keepalive (text/plain). */
    this.refused = 0;
    this.refusedKeepalive = 0;
    /** Requests forwarded to the collector and not yet answered. */
    this.inFlight = 0;
    this.server = http.createServer((req, res) => this.handle(req, res));
  }

  handle(req, res) {
    if (this.mode === "down") {
      this.refused += 1;
      if ((req.headers["content-type"] ?? "").startsWith("text/plain")) this.refusedKeepalive += 1;
      req.socket.destroy();
      return;
    }
    const post = req.method === "POST";
    const entry = post ? { at: Date.now(), status: 0, answeredAt: 0, fault: false, ids: [], keepalive: false } : undefined;
    if (entry) {
      this.posts.push(entry);
      // Which events the request carries (the SDK's keepalive requests are JSON as text/plain).
      const chunks = [];
      req.on("data", (c) => chunks.push(c));
      req.on("end", () => {
        const body = Buffer.concat(chunks);
        const type = req.headers["content-type"] ?? "";
        try {
          const batch = type.startsWith("application/x-protobuf")
            ? fromBinary(EventBatchSchema, body)
            : fromJsonString(EventBatchSchema, body.toString("utf8"));
          entry.ids = batch.events.map((e) => e.eventId);
          entry.keepalive = type.startsWith("text/plain");
        } catch (e) {
          log("proxy: a request body that is not an EventBatch:", String(e));
        }
      });
    }
    if (post && this.faults.length > 0) {
      const fault = this.faults.shift();
      req.resume();
      req.on("end", () => {
        const headers = { "content-type": "application/json", "retry-after": String(fault.retryAfter), vary: "Origin" };
        if (req.headers.origin) {
          headers["access-control-allow-origin"] = req.headers.origin;
          headers["access-control-expose-headers"] = "retry-after";
        }
        res.writeHead(fault.status, headers);
        res.end(JSON.stringify({ error: fault.status === 429 ? "rate_limited" : "overloaded", reason: "a test fault" }));
        Object.assign(entry, { status: fault.status, answeredAt: Date.now(), fault: true });
      });
      return;
    }
    this.inFlight += 1;
    let done = false;
    const finished = () => {
      if (!done) this.inFlight -= 1;
      done = true;
    };
    const upstream = http.request(
      { host: "127.0.0.1", port: collector.port, method: req.method, path: req.url, headers: req.headers },
      (answer) => {
        res.writeHead(answer.statusCode, answer.headers);
        answer.pipe(res);
        answer.on("end", () => {
          if (entry) Object.assign(entry, { status: answer.statusCode, answeredAt: Date.now() });
          finished();
        });
      },
    );
    // The collector is not there (or died mid-request): the page sees a network error.
    upstream.on("error", () => {
      finished();
      req.socket.destroy();
    });
    req.pipe(upstream);
  }
}

const proxy = new FaultProxy();
const proxyPort = await listen(proxy.server);
const collectorUrl = `http://127.0.0.1:${proxyPort}`;

// --- the browser ---------------------------------------------------------------------------------
const browser = await chromium.launch({
  executablePath: chromiumPath,
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  timeout: 60_000,
});

async function openPage(context) {
  const page = await context.newPage();
  page.on("pageerror", (e) => log("page error:", e.message));
  await page.goto(`${origin}/`);
  await page.waitForFunction(() => window.sdkLoaded === true, null, { timeout: 30_000 });
  return page;
}

function start(page, name, extra = {}) {
  const options = {
    collectorUrl,
    writeKey,
    appVersion: "web-test-1.0",
    name,
    batch: { maxEvents: 100, maxBytes: 256 * 1024, maxDelayMs: 200 },
    retry: { minDelayMs: 200, maxDelayMs: 2000 },
    ...extra,
  };
  return page.evaluate((o) => window.start(o), options);
}

const stats = (page) => page.evaluate(() => window.tracker.stats());
const persisted = (page) => page.evaluate(() => window.tracker.persisted());

/** Tracks `n` HEARTBEAT events tagged with the scenario; returns their ids. */
function track(page, n, scenario) {
  return page.evaluate(
    ({ n, scenario }) =>
      Array.from({ length: n }, (_, i) =>
        window.tracker.track("HEARTBEAT", { contentId: scenario, positionMs: BigInt(i), attributes: { scenario } }),
      ),
    { n, scenario },
  );
}

async function flush(page, timeoutMs) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`flush() did not finish within ${timeoutMs} ms`)), timeoutMs);
  });
  try {
    await Promise.race([page.evaluate(() => window.tracker.flush()), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

async function settled(page, accepted, timeoutMs) {
  await waitFor(
    `${accepted} events accepted and none queued`,
    async () => {
      const s = await stats(page);
      return (s.accepted === accepted && s.queued === 0) || s;
    },
    timeoutMs,
  );
}

/** How many requests (that reached the collector) carried each event id. */
function sendCounts(posts) {
  const counts = new Map();
  for (const p of posts) {
    if (p.status === 0) continue;
    for (const id of p.ids) counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  return counts;
}

// --- scenarios -----------------------------------------------------------------------------------
const results = [];
const measures = {};

const scenarios = {
  async thousand(context) {
    const page = await openPage(context);
    await start(page, "thousand");
    const ids = await track(page, 1000, "thousand");
    await flush(page, 120_000);
    const s = await stats(page);
    assert.deepEqual({ ...s, sent: undefined, retries: undefined }, {
      queued: 0, sent: undefined, accepted: 1000, rejected: 0, dropped: 0, retries: undefined,
    });
    measures.thousand = s;
    results.push({ name: "thousand", stored: ids, not_stored: [], once_in_stream: s.retries === 0 });
  },

  async outage(context) {
    const page = await openPage(context);
    await start(page, "outage", { batch: { maxEvents: 50, maxBytes: 256 * 1024, maxDelayMs: 200 } });
    const ids = [];
    let killedAt = 0;
    // 500 events over 5 s; the collector is killed (SIGKILL: whatever it was doing is lost)
    // once the first 100 are tracked, and comes back 10 s later.
    for (let round = 0; round < 10; round++) {
      ids.push(...(await track(page, 50, "outage")));
      if (round === 1) {
        await collector.signal("SIGKILL");
        killedAt = Date.now();
        log("outage: collector killed");
      }
      await sleep(500);
    }
    await sleep(Math.max(0, killedAt + 10_000 - Date.now()));
    const during = await stats(page);
    assert.ok(during.queued > 0, `events wait while the collector is down: ${JSON.stringify(during)}`);
    assert.ok(during.retries > 0, `requests are retried while the collector is down: ${JSON.stringify(during)}`);
    await collector.start();
    log(`outage: collector back after ${Date.now() - killedAt} ms, ${during.queued} events queued`);
    await settled(page, 500, 120_000);
    const s = await stats(page);
    assert.equal(s.rejected + s.dropped, 0);
    measures.outage = { during, after: s, kill_to_all_accepted_ms: Date.now() - killedAt };
    results.push({ name: "outage", stored: ids, not_stored: [], once_in_stream: false });
  },

  async reload(context) {
    proxy.mode = "down";
    const page = await openPage(context);
    await start(page, "reload");
    const ids = await track(page, 200, "reload");
    await persisted(page);
    const before = await stats(page);
    assert.equal(before.queued, 200);
    assert.equal(before.accepted, 0);
    await page.reload();
    await page.waitForFunction(() => window.sdkLoaded === true, null, { timeout: 30_000 });
    proxy.mode = "pass";
    // The new page's tracker adopts the queue of the page that went away, and sends it.
    await start(page, "reload");
    await settled(page, 200, 60_000);
    measures.reload = await stats(page);
    results.push({ name: "reload", stored: ids, not_stored: [], once_in_stream: true });
  },

  async retry_after(context) {
    const page = await openPage(context);
    await start(page, "retry_after");
    const mark = proxy.posts.length;
    proxy.faults.push({ status: 503, retryAfter: 2 }, { status: 429, retryAfter: 1 });
    const ids = await track(page, 10, "retry_after");
    await flush(page, 60_000);
    const posts = proxy.posts.slice(mark).filter((p) => p.answeredAt > 0);
    assert.deepEqual(posts.map((p) => p.status), [503, 429, 200]);
    const after503 = posts[1].at - posts[0].answeredAt;
    const after429 = posts[2].at - posts[1].answeredAt;
    log(`retry_after: next request ${after503} ms after 503 Retry-After: 2, ${after429} ms after 429 Retry-After: 1`);
    assert.ok(after503 >= 2000, `Retry-After: 2 honoured (${after503} ms)`);
    assert.ok(after429 >= 1000, `Retry-After: 1 honoured (${after429} ms)`);
    const s = await stats(page);
    assert.equal(s.retries, 2);
    assert.equal(s.accepted, 10);
    measures.retry_after = { after503_ms: after503, after429_ms: after429 };
    results.push({ name: "retry_after", stored: ids, not_stored: [], once_in_stream: true });
  },

  async invalid(context) {
    const page = await openPage(context);
    await start(page, "invalid");
    const mark = proxy.posts.length;
    const good = await track(page, 5, "invalid");
    // An event from a clock three days ahead: the collector refuses it as occurred_in_future.
    const bad = await page.evaluate(() =>
      window.tracker.track("PLAY", { contentId: "invalid", occurredAtMs: BigInt(Date.now() + 3 * 86_400_000) }),
    );
    await flush(page, 60_000);
    await sleep(3000); // time for a wrong retry to show
    const rejected = await page.evaluate(() => window.rejectedEvents);
    assert.equal(rejected.length, 1, JSON.stringify(rejected));
    assert.equal(rejected[0].id, bad);
    assert.equal(rejected[0].code, "occurred_in_future");
    const s = await stats(page);
    assert.deepEqual([s.sent, s.accepted, s.rejected, s.queued, s.retries], [6, 5, 1, 0, 0]);
    const sends = sendCounts(proxy.posts.slice(mark));
    assert.equal(sends.get(bad), 1, "the invalid event was sent once, not retried");
    assert.ok(good.every((id) => sends.get(id) === 1), "each valid event was sent once");
    results.push({ name: "invalid", stored: good, not_stored: [bad], once_in_stream: true });
  },

  async offline(context) {
    const page = await openPage(context);
    await start(page, "offline");
    await context.setOffline(true);
    const mark = proxy.posts.length;
    const ids = await track(page, 20, "offline");
    await persisted(page);
    await sleep(1500); // several batch delays: nothing may be tried while offline
    const during = await stats(page);
    assert.deepEqual([during.queued, during.sent, during.retries], [20, 0, 0], "nothing is sent while offline");
    assert.equal(proxy.posts.length, mark);
    await context.setOffline(false); // the "online" event sends at once
    await settled(page, 20, 30_000);
    results.push({ name: "offline", stored: ids, not_stored: [], once_in_stream: true });
  },

  async page_exit(context) {
    const page = await openPage(context);
    // Batches wait a minute: the events are still queued when the page closes.
    await start(page, "page_exit", { batch: { maxEvents: 100, maxBytes: 256 * 1024, maxDelayMs: 60_000 } });
    const mark = proxy.posts.length;
    const ids = await track(page, 30, "page_exit");
    await persisted(page);
    assert.equal((await stats(page)).sent, 0);
    await page.close();
    // The keepalive request (JSON as text/plain, the key in the query) outlives the page.
    await waitFor(
      "the keepalive request's answer",
      () => proxy.posts.slice(mark).some((p) => p.answeredAt > 0) || { posts: proxy.posts.length - mark },
      30_000,
    );
    const posts = proxy.posts.slice(mark);
    assert.equal(posts.length, 1);
    assert.equal(posts[0].status, 200);
    assert.equal(posts[0].keepalive, true);
    assert.deepEqual(posts[0].ids, ids);
    results.push({ name: "page_exit", stored: ids, not_stored: [], once_in_stream: true });
  },

  async queue_cap(context) {
    proxy.mode = "down";
    const page = await openPage(context);
    await start(page, "queue_cap", { queue: { maxEvents: 50, maxBytes: 1024 * 1024 } });
    const ids = await track(page, 80, "queue_cap");
    await persisted(page);
    const dropped = await page.evaluate(() => window.droppedCounts.reduce((a, b) => a + b, 0));
    const before = await stats(page);
    assert.equal(dropped, 30, "onDropped reported the 30 oldest");
    assert.equal(before.dropped, 30);
    assert.equal(before.queued, 50);
    proxy.mode = "pass";
    await settled(page, 50, 60_000);
    results.push({ name: "queue_cap", stored: ids.slice(30), not_stored: ids.slice(0, 30), once_in_stream: true });
  },

  async two_tabs(context) {
    const [a, b] = [await openPage(context), await openPage(context)];
    await start(a, "two_tabs");
    await start(b, "two_tabs");
    const mark = proxy.posts.length;
    const ids = [];
    const aIds = [];
    // Both tabs track at once, 300 events each in 10 rounds, into the same shared queue.
    for (let round = 0; round < 10; round++) {
      const [x, y] = await Promise.all([track(a, 30, "two_tabs"), track(b, 30, "two_tabs")]);
      ids.push(...x, ...y);
      aIds.push(...x);
      await sleep(100);
    }
    // Tab a goes away with 100 events queued, while the collector is unreachable: tab b adopts
    // them and sends them. (An answer tab a does not live to apply, or its keepalive request on
    // the way out, would leave events in the queue that the collector has: tab b would send them
    // again, a resend the pipeline drops, but not what this scenario is about. So tab a closes
    // once it has applied every answer, and its keepalive request is refused.)
    proxy.mode = "down";
    // Tab a may send its keepalive request when it becomes hidden (tab b in front) as well as on
    // its way out: either is refused while the collector is down.
    const refused = proxy.refusedKeepalive;
    const late = await track(a, 100, "two_tabs");
    ids.push(...late);
    aIds.push(...late);
    await persisted(a);
    await waitFor("no request in flight", () => proxy.inFlight === 0 || { inFlight: proxy.inFlight }, 60_000);
    await waitFor(
      "tab a to apply every answer",
      async () => {
        const acked = new Set(proxy.posts.slice(mark).filter((p) => p.status === 200).flatMap((p) => p.ids));
        const waiting = aIds.filter((id) => !acked.has(id)).length;
        const { queued } = await stats(a);
        return queued === waiting || { queued, waiting };
      },
      30_000,
    );
    const refusedBeforeClose = proxy.refusedKeepalive;
    await a.close();
    await waitFor("tab a's keepalive request, refused", () => proxy.refusedKeepalive > refused, 30_000);
    if (proxy.refusedKeepalive === refusedBeforeClose) {
      // Refused before the close only: a request of the closing page may still come; it must
      // find the collector down too. Up to 2 s for it, then on.
      await waitFor("a keepalive request of the closed tab", () => proxy.refusedKeepalive > refusedBeforeClose, 2_000).catch(() => {});
    }
    proxy.mode = "pass";
    await waitFor(
      "every event of both tabs accepted",
      async () => {
        const acked = new Set(proxy.posts.slice(mark).filter((p) => p.status === 200).flatMap((p) => p.ids));
        const missing = ids.filter((id) => !acked.has(id)).length;
        return missing === 0 || { missing };
      },
      60_000,
    );
    const sends = sendCounts(proxy.posts.slice(mark));
    const twice = ids.filter((id) => (sends.get(id) ?? 0) > 1);
    if (twice.length > 0) {
      const where = proxy.posts.slice(mark).filter((p) => p.ids.includes(twice[0]));
      log("proxy posts", JSON.stringify(proxy.posts.slice(mark).map((p) => [p.at, p.status, p.ids.length, p.keepalive])));
      const show = where.map((p) => ({ at: p.at, status: p.status, keepalive: p.keepalive, events: p.ids.length }));
      assert.fail(`${twice.length} events were sent twice by the two tabs; the first in ${JSON.stringify(show)}`);
    }
    assert.equal([...sends.keys()].length, ids.length);
    measures.two_tabs = { b: await stats(b), requests: proxy.posts.length - mark };
    results.push({ name: "two_tabs", stored: ids, not_stored: [], once_in_stream: true });
  },
};

let failure;
try {
  await collector.start();
  log(`collector on ${collector.port}, proxy on ${proxyPort}, page at ${origin}, ${chromiumPath} (${browser.version()})`);
  for (const [name, run] of Object.entries(scenarios)) {
    if (only && !only.has(name)) continue;
    const t0 = Date.now();
    proxy.mode = "pass";
    const context = await browser.newContext();
    try {
      await run(context);
    } catch (error) {
      throw new Error(`scenario ${name}: ${error.stack ?? error}`);
    } finally {
      await context.close().catch(() => undefined);
    }
    log(`scenario ${name}: passed in ${Date.now() - t0} ms`);
  }
} catch (error) {
  failure = error;
} finally {
  await browser.close().catch(() => undefined);
  await collector.signal("SIGTERM").catch(() => undefined);
  pageServer.close();
  proxy.server.close();
  rmSync(workDir, { recursive: true, force: true });
}
writeFileSync(resultsFile, JSON.stringify({ scenarios: results, measures, failure: failure ? String(failure) : null }, null, 1));
if (failure) {
  log(String(failure.stack ?? failure));
  process.exit(1);
}
log(`all scenarios passed (${results.map((r) => r.name).join(", ")})`);
process.exit(0);
