/**
 * The ktk web SDK: analytics events from web pages to the ktk collector, through a persistent,
 * bounded queue, with batching and retries. `init()` once, then `track()`:
 *
 * ```ts
 * import { init, track } from "@ktk/web-sdk";
 * init({ collectorUrl: "https://events.example.com", writeKey: "wk_...", appVersion: "3.2.0" });
 * track("PAGE_VIEW", { page: "/home" });
 * ```
 *
 * The types come from the central `events.v1` schema, generated at build time.
 */
import { Tracker, type EventFields, type EventTypeName, type Stats } from "./tracker.js";
import type { InitOptions } from "./options.js";
import type { EventType } from "./gen/events/v1/events_pb.js";

export { Tracker, SCHEMA_VERSION } from "./tracker.js";
export type { EventFields, EventTypeName, Stats } from "./tracker.js";
export type { BatchOptions, Format, InitOptions, QueueOptions, RetryOptions, StorageKind } from "./options.js";
export { EventType, Platform } from "./gen/events/v1/events_pb.js";
export type { Event, Geo } from "./gen/events/v1/events_pb.js";

let current: Tracker | undefined;

function tracker(): Tracker {
  if (!current) throw new Error("ktk: call init() before track(), flush() or stats()");
  return current;
}

/** Starts the SDK's tracker for this page (a second call replaces the first tracker). */
export function init(options: InitOptions): Tracker {
  const previous = current;
  current = new Tracker(options);
  void previous?.close();
  return current;
}

/** Tracks an event; returns its `event_id`. See [`Tracker.track`]. */
export function track(type: EventType | EventTypeName | number, fields?: EventFields): string {
  return tracker().track(type, fields);
}

/** Sends the queued events now; see [`Tracker.flush`]. */
export function flush(): Promise<void> {
  return tracker().flush();
}

/** The tracker's counters. */
export function stats(): Stats {
  return tracker().stats();
}
