import { test } from "node:test";
import assert from "node:assert/strict";
import { fromBinary } from "@bufbuild/protobuf";
import { EventBatchSchema, Platform, type Event } from "../../src/gen/events/v1/events_pb.js";
import { Tracker } from "../../src/tracker.js";
import type { InitOptions } from "../../src/options.js";

interface Seen {
  url: string;
  headers: Record<string, string>;
  events: Event[];
  at: number;
}

type Answer = { status: number; body?: unknown; headers?: Record<string, string> } | "network-error";

/** A collector in a function: records each request and answers with `answer`. */
function fakeCollector(answer: (events: Event[], n: number) => Answer) {
  const seen: Seen[] = [];
  const fetch = async (input: RequestInfo | URL, init?: RequestInit): Promise<Response> => {
    const body = init?.body as Uint8Array;
    const events = fromBinary(EventBatchSchema, body).events;
    seen.push({ url: String(input), headers: init?.headers as Record<string, string>, events, at: Date.now() });
    const a = answer(events, seen.length);
    if (a === "network-error") throw new TypeError("Failed to fetch");
    return new Response(a.body === undefined ? "" : JSON.stringify(a.body), { status: a.status, headers: a.headers });
  };
  return { seen, fetch: fetch as typeof globalThis.fetch };
}

const acceptAll = (events: Event[]): Answer => ({ status: 200, body: { accepted: events.length, rejected: [] } });

function options(fetch: typeof globalThis.fetch, more: Partial<InitOptions> = {}): InitOptions & { fetch: typeof fetch } {
  return {
    collectorUrl: "http://collector.test/",
    writeKey: "wk_unit_test_key_0001",
    appVersion: "9.9.9",
    storage: "memory",
    batch: { maxEvents: 50, maxBytes: 1e6, maxDelayMs: 20 },
    retry: { minDelayMs: 20, maxDelayMs: 100 },
    fetch,
    ...more,
  };
}

test("track fills the event's ids, times and app fields, and the request carries the key", async () => {
  const c = fakeCollector(acceptAll);
  const t = new Tracker(options(c.fetch));
  const before = Date.now();
  const id = t.track("PAGE_VIEW", { page: "/home", userId: "u-1" });
  t.track("CLICK", { target: "buy" });
  await t.flush();
  await t.close();
  assert.equal(c.seen.length, 1, "one batch");
  const [first, second] = c.seen[0].events;
  assert.equal(first.eventId, id);
  assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.notEqual(second.eventId, id);
  assert.equal(first.type, 40);
  assert.equal(first.page, "/home");
  assert.equal(first.userId, "u-1");
  assert.ok(Number(first.occurredAtMs) >= before && Number(first.occurredAtMs) <= Date.now());
  assert.equal(first.platform, Platform.WEB);
  assert.equal(first.appVersion, "9.9.9");
  assert.equal(first.schemaVersion, "1.0");
  assert.ok(first.deviceId.length > 0 && first.deviceId === second.deviceId);
  assert.ok(first.sessionId.length > 0 && first.sessionId === second.sessionId);
  assert.equal(c.seen[0].url, "http://collector.test/v1/events?wait=acked");
  assert.equal(c.seen[0].headers.authorization, "Bearer wk_unit_test_key_0001");
  assert.equal(c.seen[0].headers["content-type"], "application/x-protobuf");
  assert.deepEqual(t.stats(), { queued: 0, sent: 2, accepted: 2, rejected: 0, dropped: 0, retries: 0 });
});

test("batches are cut at maxEvents", async () => {
  const c = fakeCollector(acceptAll);
  const t = new Tracker(options(c.fetch, { batch: { maxEvents: 10, maxBytes: 1e6, maxDelayMs: 10_000 } }));
  for (let i = 0; i < 25; i++) t.track("HEARTBEAT");
  await t.flush();
  await t.close();
  assert.deepEqual(c.seen.map((s) => s.events.length), [10, 10, 5]);
});

test("an invalid event goes to onRejected once and is not sent again; the others are accepted", async () => {
  const c = fakeCollector((events) => {
    const bad = events.findIndex((e) => (e.type as number) === 999);
    const rejected = bad < 0 ? [] : [{ index: bad, event_id: events[bad].eventId, code: "unknown_type", reason: "type 999", retryable: false }];
    return { status: 200, body: { accepted: events.length - rejected.length, rejected } };
  });
  const refused: [string, string, string][] = [];
  const t = new Tracker(options(c.fetch, { onRejected: (e, code, reason) => refused.push([e.eventId, code, reason]) }));
  t.track("PLAY");
  const bad = t.track(999);
  t.track("PAUSE");
  await t.flush();
  await new Promise((r) => setTimeout(r, 100));
  await t.close();
  assert.deepEqual(refused, [[bad, "unknown_type", "type 999"]]);
  assert.equal(c.seen.length, 1, "nothing was sent again");
  assert.deepEqual(t.stats(), { queued: 0, sent: 3, accepted: 2, rejected: 1, dropped: 0, retries: 0 });
});

test("a 503 with Retry-After is retried no sooner than it says", async () => {
  const c = fakeCollector((events, n) =>
    n === 1 ? { status: 503, body: { error: "overloaded", reason: "busy" }, headers: { "retry-after": "0.3" } } : acceptAll(events),
  );
  const t = new Tracker(options(c.fetch));
  t.track("PLAY");
  await t.flush();
  await t.close();
  assert.equal(c.seen.length, 2);
  const gap = c.seen[1].at - c.seen[0].at;
  assert.ok(gap >= 300, `waited ${gap} ms for Retry-After 0.3`);
  assert.equal(t.stats().retries, 1);
  assert.equal(c.seen[0].events[0].eventId, c.seen[1].events[0].eventId, "the same event id is sent again");
});

test("429, 5xx and network errors are retried with the backoff until accepted", async () => {
  const answers: Answer[] = [{ status: 429 }, { status: 500 }, "network-error", { status: 502 }];
  const c = fakeCollector((events, n) => answers[n - 1] ?? acceptAll(events));
  const t = new Tracker(options(c.fetch));
  const id = t.track("PLAY");
  await t.flush();
  await t.close();
  assert.equal(c.seen.length, 5);
  assert.ok(c.seen.every((s) => s.events[0].eventId === id));
  assert.deepEqual(t.stats(), { queued: 0, sent: 5, accepted: 1, rejected: 0, dropped: 0, retries: 4 });
  // min 20 ms, then ceilings 40, 80, 100: the waits grow
  const gaps = c.seen.slice(1).map((s, i) => s.at - c.seen[i].at);
  assert.ok(gaps[0] >= 20 && gaps[1] >= 20 && gaps[2] >= 40 && gaps[3] >= 50, `gaps ${gaps}`);
});

test("only the events rejected as retryable are sent again (a 503 that took part of the batch)", async () => {
  const c = fakeCollector((events, n) => {
    if (n > 1) return acceptAll(events);
    const rejected = events.slice(2).map((e, i) => ({ index: i + 2, event_id: e.eventId, code: "producer_full", reason: "", retryable: true }));
    return { status: 503, body: { accepted: 2, rejected }, headers: { "retry-after": "0" } };
  });
  const t = new Tracker(options(c.fetch));
  const ids = [0, 1, 2, 3, 4].map(() => t.track("HEARTBEAT"));
  await t.flush();
  await t.close();
  assert.deepEqual(c.seen[1].events.map((e) => e.eventId), ids.slice(2));
  assert.equal(t.stats().accepted, 5);
});

test("a 413 halves the batch until the one event too large is alone, which goes to onRejected", async () => {
  const c = fakeCollector((events) => {
    if (events.some((e) => e.page === "huge")) {
      return { status: 413, body: { error: "event_too_large", reason: "over 32 KiB" } };
    }
    return acceptAll(events);
  });
  const refused: string[] = [];
  const t = new Tracker(options(c.fetch, { onRejected: (e, code) => refused.push(`${e.page}:${code}`) }));
  for (let i = 0; i < 8; i++) t.track("PAGE_VIEW", { page: i === 5 ? "huge" : `p${i}` });
  await t.flush();
  await t.close();
  assert.deepEqual(refused, ["huge:event_too_large"]);
  assert.equal(t.stats().accepted, 7);
  assert.equal(t.stats().queued, 0);
});

test("a full queue drops the oldest events, counted in onDropped and stats", async () => {
  const c = fakeCollector(() => "network-error");
  let dropped = 0;
  const t = new Tracker(
    options(c.fetch, {
      queue: { maxEvents: 10, maxBytes: 1e6 },
      batch: { maxEvents: 50, maxBytes: 1e6, maxDelayMs: 60_000 },
      onDropped: (n) => (dropped += n),
    }),
  );
  for (let i = 0; i < 15; i++) t.track("HEARTBEAT", { positionMs: BigInt(i) });
  await t.persisted();
  assert.equal(dropped, 5);
  assert.equal(t.stats().dropped, 5);
  assert.equal(t.stats().queued, 10);
  await t.close();
});

test("a new session starts after the inactivity timeout", async () => {
  const c = fakeCollector(acceptAll);
  const t = new Tracker(options(c.fetch, { sessionTimeoutMs: 50 }));
  t.track("PLAY");
  t.track("PAUSE");
  await new Promise((r) => setTimeout(r, 80));
  t.track("RESUME");
  await t.flush();
  await t.close();
  const sessions = c.seen.flatMap((s) => s.events).map((e) => e.sessionId);
  assert.equal(sessions[0], sessions[1]);
  assert.notEqual(sessions[1], sessions[2]);
});

test("bad options and unknown event types are clear errors", () => {
  const c = fakeCollector(acceptAll);
  assert.throws(() => new Tracker(options(c.fetch, { collectorUrl: "not a url" })), /collectorUrl/);
  assert.throws(() => new Tracker(options(c.fetch, { writeKey: "" })), /writeKey/);
  assert.throws(() => new Tracker(options(c.fetch, { batch: { maxEvents: 0 } })), /batch.maxEvents/);
  assert.throws(() => new Tracker(options(c.fetch, { format: "xml" as "json" })), /format/);
  const t = new Tracker(options(c.fetch));
  assert.throws(() => t.track("NOT_A_TYPE" as "PLAY"), /unknown event type NOT_A_TYPE/);
  void t.close();
});
