import { test } from "node:test";
import assert from "node:assert/strict";
import { nextWait, parseRetryAfter, retryDelay } from "../../src/backoff.js";

test("the first retry waits exactly the minimum", () => {
  for (const r of [0, 0.5, 0.999]) assert.equal(retryDelay(1, 100, 10_000, () => r), 100);
  assert.equal(retryDelay(0, 100, 10_000, () => 0.7), 100, "attempt 0 is treated as 1");
});

test("later retries spread over the upper half of a doubling ceiling, capped at the maximum", () => {
  // attempt 4: ceiling 100 * 2^3 = 800, floor 400
  assert.equal(retryDelay(4, 100, 10_000, () => 0), 400);
  assert.equal(retryDelay(4, 100, 10_000, () => 1), 800);
  for (let i = 0; i < 200; i++) {
    const d = retryDelay(4, 100, 10_000);
    assert.ok(d >= 400 && d <= 800, `${d}`);
  }
  // far attempts stay within [max/2, max]
  for (const attempt of [20, 40, 1000]) {
    assert.equal(retryDelay(attempt, 100, 10_000, () => 1), 10_000);
    assert.equal(retryDelay(attempt, 100, 10_000, () => 0), 5_000);
  }
});

test("the delays grow with the attempts until the cap", () => {
  const ceilings = [1, 2, 3, 4, 5, 6, 7, 8].map((n) => retryDelay(n, 50, 2_000, () => 1));
  assert.deepEqual(ceilings, [50, 100, 200, 400, 800, 1600, 2000, 2000]);
});

test("nonsense bounds are made sane", () => {
  assert.equal(retryDelay(1, 0, 0, () => 0.5), 1, "a minimum of at least 1 ms");
  assert.equal(retryDelay(3, 500, 100, () => 1), 500, "a maximum of at least the minimum");
});

test("Retry-After in seconds or as an HTTP date", () => {
  assert.equal(parseRetryAfter("2"), 2000);
  assert.equal(parseRetryAfter(" 1.5 "), 1500);
  assert.equal(parseRetryAfter("0"), 0);
  const now = Date.parse("2026-01-01T00:00:00Z");
  assert.equal(parseRetryAfter("Thu, 01 Jan 2026 00:00:03 GMT", now), 3000);
  assert.equal(parseRetryAfter("Wed, 31 Dec 2025 23:59:00 GMT", now), 0, "a date in the past is now");
  assert.equal(parseRetryAfter(null), undefined);
  assert.equal(parseRetryAfter(""), undefined);
  assert.equal(parseRetryAfter("soon"), undefined);
  assert.equal(parseRetryAfter("-3"), undefined);
});

test("a Retry-After replaces the backoff, with at most a tenth added", () => {
  assert.equal(nextWait(7, 2000, 100, 60_000, () => 0), 2000);
  assert.equal(nextWait(7, 2000, 100, 60_000, () => 1), 2200);
  assert.equal(nextWait(1, undefined, 100, 60_000, () => 0.3), 100);
});
