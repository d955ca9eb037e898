/**
 * Retry delays: exponential, capped, jittered, with the rule the rest of ktk uses (the Rust crate
 * `ktk-backoff`): retry number `n` (1 for the first) waits a random time in
 * `[max(min, c/2), c]` where `c = min(max, min * 2^(n-1))`. The first retry waits exactly `min`;
 * later ones grow to `max`, each spread over the upper half of its ceiling so that the tabs and
 * devices that failed together do not all come back together.
 *
 * A `Retry-After` from the collector (seconds, or an HTTP date) replaces the computed delay: the
 * server knows when it can take the request again. A little jitter (up to a tenth) is added on
 * top so that every client told "1" does not return in the same millisecond.
 */

/** The delay before retry number `attempt` (1 or more; less is treated as 1). */
export function retryDelay(attempt: number, minMs: number, maxMs: number, random: () => number = Math.random): number {
  const min = Math.max(1, minMs);
  const max = Math.max(min, maxMs);
  const exponent = Math.min(Math.max(0, Math.floor(attempt) - 1), 30);
  const ceiling = Math.min(max, min * 2 ** exponent);
  const floor = Math.max(min, ceiling / 2);
  return floor + (ceiling - floor) * random();
}

/**
 * `Retry-After` in milliseconds from now, or `undefined` when the header is absent or unreadable.
 * Negative values and dates in the past are 0.
 */
export function parseRetryAfter(value: string | null | undefined, nowMs: number = Date.now()): number | undefined {
  if (value == null) return undefined;
  const text = value.trim();
  if (text === "") return undefined;
  if (/^\d+(\.\d+)?$/.test(text)) return Math.round(Number(text) * 1000);
  // An HTTP date names its day and month ("Wed, 21 Oct 2015 07:28:00 GMT"); anything else
  // (such as "-3", which Date.parse would read as a year) is unreadable.
  if (!/[a-z]/i.test(text)) return undefined;
  const date = Date.parse(text);
  if (Number.isNaN(date)) return undefined;
  return Math.max(0, date - nowMs);
}

/** The wait before the next attempt: `Retry-After` (plus up to 10%) when given, else the backoff. */
export function nextWait(
  attempt: number,
  retryAfterMs: number | undefined,
  minMs: number,
  maxMs: number,
  random: () => number = Math.random,
): number {
  if (retryAfterMs !== undefined) return retryAfterMs + retryAfterMs * 0.1 * random();
  return retryDelay(attempt, minMs, maxMs, random);
}
