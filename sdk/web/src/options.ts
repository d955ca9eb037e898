/** The options of `init()` and their defaults. */
import type { Event } from "./gen/events/v1/events_pb.js";
import { Platform } from "./gen/events/v1/events_pb.js";

export interface BatchOptions {
  /** Events per request, at most 500 (the collector's default limit). Default 100. */
  maxEvents: number;
  /** Encoded bytes of the events per request. Default 256 KiB. */
  maxBytes: number;
  /** How long an event waits for a batch to fill before it is sent anyway. Default 1000 ms. */
  maxDelayMs: number;
}

export interface QueueOptions {
  /** Events kept in the queue over every tab of the site. Default 1000. */
  maxEvents: number;
  /** Encoded bytes kept in the queue. Default 1 MiB. */
  maxBytes: number;
}

export interface RetryOptions {
  /** The first retry's delay. Default 1000 ms. */
  minDelayMs: number;
  /** The longest delay between retries. Default 60 s. */
  maxDelayMs: number;
}

export type Format = "protobuf" | "json";
export type StorageKind = "auto" | "indexeddb" | "localstorage" | "memory";

export interface InitOptions {
  /** The collector's base URL, e.g. `https://events.example.com` (the SDK posts to `/v1/events`). */
  collectorUrl: string;
  /** This app's write key (it names the app; the collector lists the origins it may be used from). */
  writeKey: string;
  /** The app's version, put in every event. */
  appVersion: string;
  /** Default `Platform.WEB`. */
  platform?: Platform;
  batch?: Partial<BatchOptions>;
  queue?: Partial<QueueOptions>;
  retry?: Partial<RetryOptions>;
  /** A new session starts after this long without an event. Default 30 minutes. */
  sessionTimeoutMs?: number;
  /** The request body: binary protobuf (default) or JSON. */
  format?: Format;
  /** A request without an answer after this long is abandoned and retried. Default 30 s. */
  requestTimeoutMs?: number;
  /**
   * Names the queue, the device id and the session in the browser's storage; trackers with the
   * same name on one site share them. Default `"ktk"`.
   */
  name?: string;
  /** Where the queue lives. `auto`: IndexedDB, else `localStorage`, else memory. */
  storage?: StorageKind;
  /** An event the collector refused for good (invalid): it has left the queue. */
  onRejected?: (event: Event, code: string, reason: string) => void;
  /** `count` events were dropped because the queue was full (the oldest go first). */
  onDropped?: (count: number) => void;
}

/** The collector's default `--max-events-per-request`. */
export const MAX_EVENTS_PER_REQUEST = 500;
/** Browsers cap the bodies of `keepalive` requests in flight from a page at 64 KiB together. */
export const KEEPALIVE_MAX_BYTES = 64 * 1024;

export interface Settings {
  url: string;
  writeKey: string;
  appVersion: string;
  platform: Platform;
  batch: BatchOptions;
  queue: QueueOptions;
  retry: RetryOptions;
  sessionTimeoutMs: number;
  format: Format;
  requestTimeoutMs: number;
  name: string;
  storage: StorageKind;
  onRejected: (event: Event, code: string, reason: string) => void;
  onDropped: (count: number) => void;
}

function positive(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !Number.isFinite(value) || value <= 0) {
    throw new TypeError(`ktk: ${name} must be a positive number, got ${String(value)}`);
  }
  return value;
}

/** The options with their defaults filled in; a `TypeError` naming the option when one is wrong. */
export function settings(options: InitOptions): Settings {
  if (!options || typeof options !== "object") throw new TypeError("ktk: init() needs an options object");
  let url: URL;
  try {
    url = new URL(options.collectorUrl);
  } catch {
    throw new TypeError(`ktk: collectorUrl must be an absolute URL, got ${String(options.collectorUrl)}`);
  }
  if (typeof options.writeKey !== "string" || options.writeKey === "") {
    throw new TypeError("ktk: writeKey is required");
  }
  if (typeof options.appVersion !== "string") throw new TypeError("ktk: appVersion is required");
  const format = options.format ?? "protobuf";
  if (format !== "protobuf" && format !== "json") {
    throw new TypeError(`ktk: format must be "protobuf" or "json", got ${String(format)}`);
  }
  const storage = options.storage ?? "auto";
  if (!["auto", "indexeddb", "localstorage", "memory"].includes(storage)) {
    throw new TypeError(`ktk: storage must be auto, indexeddb, localstorage or memory, got ${String(storage)}`);
  }
  const retryMin = positive("retry.minDelayMs", options.retry?.minDelayMs, 1000);
  return {
    url: url.href.replace(/\/+$/, ""),
    writeKey: options.writeKey,
    appVersion: options.appVersion,
    platform: options.platform ?? Platform.WEB,
    batch: {
      maxEvents: Math.min(MAX_EVENTS_PER_REQUEST, Math.floor(positive("batch.maxEvents", options.batch?.maxEvents, 100))),
      maxBytes: positive("batch.maxBytes", options.batch?.maxBytes, 256 * 1024),
      maxDelayMs: positive("batch.maxDelayMs", options.batch?.maxDelayMs, 1000),
    },
    queue: {
      maxEvents: Math.floor(positive("queue.maxEvents", options.queue?.maxEvents, 1000)),
      maxBytes: positive("queue.maxBytes", options.queue?.maxBytes, 1024 * 1024),
    },
    retry: {
      minDelayMs: retryMin,
      maxDelayMs: Math.max(retryMin, positive("retry.maxDelayMs", options.retry?.maxDelayMs, 60_000)),
    },
    sessionTimeoutMs: positive("sessionTimeoutMs", options.sessionTimeoutMs, 30 * 60 * 1000),
    format,
    requestTimeoutMs: positive("requestTimeoutMs", options.requestTimeoutMs, 30_000),
    name: options.name ?? "ktk",
    storage,
    onRejected: options.onRejected ?? (() => undefined),
    onDropped: options.onDropped ?? (() => undefined),
  };
}
