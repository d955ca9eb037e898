/**
 * The tracker: `track()` turns the app's fields into an `events.v1.Event` and stores it in the
 * persistent queue; a sender takes batches from the queue, posts them to the collector and lets
 * events leave the queue only as the collector's answer settles them.
 *
 * # Flow
 * `track()` encodes the event at once (binary protobuf, with the generated code) and keeps it in
 * memory; the events tracked in one turn of the event loop are appended to the queue in one
 * transaction. The sender runs at most one request at a time in this tab: it takes this tab's
 * oldest stored events, up to `batch.maxEvents` and `batch.maxBytes`, when that many are waiting,
 * when the oldest has waited `batch.maxDelayMs`, or on `flush()`. It posts them to
 * `<collectorUrl>/v1/events?wait=acked`, so the collector answers only once Kinesis has taken
 * them, and then:
 * - an accepted event leaves the queue;
 * - a rejected event that is not retryable (invalid) leaves the queue and goes to `onRejected`;
 * - a retryable rejection, a network error, a timeout, 408, 429 and 5xx keep the events and retry
 *   after the jittered exponential backoff, or after `Retry-After` when the collector sends one
 *   (`backoff.ts`);
 * - 413 and 400 halve the batch until the one event the collector cannot take is found; that
 *   event goes to `onRejected`;
 * - 401, 403 and other answers that say the key, the origin or the URL is wrong keep the events
 *   and retry with the backoff (fixing the key or the collector's origins lets them through).
 * While the browser says it is offline nothing is sent; `online` sends at once.
 *
 * # Tabs
 * Each tab owns the events it tracks and only it sends them; the events of a tab that has gone
 * are adopted by another tab, or by the next load of the page (`tabs.ts`). So no two tabs ever
 * send the same event, and one tab's failures do not hold up another's events.
 *
 * # Leaving the page
 * On `pagehide`, and when the page becomes hidden, the events of this tab that are in no request
 * go out at once with `fetch(..., {keepalive: true})`, as much as fits in the 64 KiB browsers
 * allow such requests: JSON as `text/plain` with the key in the query string, a request that needs
 * no CORS preflight. They stay in the queue until an answer to that request settles them: if the
 * page dies first, the next load sends them again, and the pipeline drops the copy by `event_id`.
 */
import { create, toBinary, type MessageInitShape } from "@bufbuild/protobuf";
import { EventSchema, EventType } from "./gen/events/v1/events_pb.js";
import { nextWait, parseRetryAfter } from "./backoff.js";
import { Identity, randomUuid } from "./identity.js";
import { KEEPALIVE_MAX_BYTES, MAX_EVENTS_PER_REQUEST, settings, type InitOptions, type Settings } from "./options.js";
import {
  localStorageStore,
  memoryStore,
  openIndexedDbStore,
  type EventStore,
  type QueuedEvent,
} from "./queue.js";
import { safeLocalStorage, tabPresence, type TabPresence } from "./tabs.js";
import { decodeEvent, jsonBody, jsonLength, protobufBody, readBatchAnswer, readErrorAnswer } from "./wire.js";

/** The schema version this SDK was built against, sent in `schema_version`. */
export const SCHEMA_VERSION = "1.0";

/** How often a tab looks for the events of tabs that have gone. */
const ORPHAN_CHECK_MS = 5_000;

/** The fields of an event the app gives to `track()`; the SDK fills the rest. */
export type EventFields = Omit<
  MessageInitShape<typeof EventSchema>,
  "$typeName" | "eventId" | "type" | "receivedAtMs" | "appId" | "schemaVersion"
>;

/** An event type by its name in the schema without the prefix (`"PAGE_VIEW"`). */
export type EventTypeName = Exclude<keyof typeof EventType, number>;

export interface Stats {
  /** Events of this tab waiting in the queue (stored, or about to be). */
  queued: number;
  /** Events put in requests by this tab (a resend counts again). */
  sent: number;
  /** Events the collector accepted (acknowledged by Kinesis). */
  accepted: number;
  /** Events the collector refused for good (reported to `onRejected`). */
  rejected: number;
  /** Events dropped because the queue was full. */
  dropped: number;
  /** Requests that failed and were (or will be) tried again. */
  retries: number;
}

/** An event of this tab, from `track()` (or adopted) until the collector settles it. */
interface Own {
  id: string;
  bytes: Uint8Array;
  /** Its place in the stored queue, once stored. */
  seq?: number;
  /** In the request in flight. */
  busy: boolean;
  /** In the keepalive request sent when the page was hidden. */
  keepalive: boolean;
}

interface Reply {
  /** 0 for a network error or a timeout. */
  status: number;
  retryAfterMs?: number;
  body?: unknown;
}

type Listener = [EventTarget, string, () => void];

export class Tracker {
  private readonly s: Settings;
  private readonly fetch: typeof fetch;
  private readonly identity: Identity;
  private readonly presence: TabPresence;
  private readonly ready: Promise<EventStore>;

  /** This tab's unsettled events, in the order they were tracked or adopted. */
  private readonly own = new Map<string, Own>();
  private ownBytes = 0;
  /** Tracked, not yet handed to the store. */
  private unsaved: Own[] = [];
  /** Settled (by a keepalive answer) before they were stored: removed once stored. */
  private readonly settledUnsaved = new Set<string>();
  private saving: Promise<void> = Promise.resolve();
  private saveScheduled = false;

  private inFlight = false;
  private keepaliveInFlight = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private timerAt = Infinity;
  private readonly orphanTimer: ReturnType<typeof setInterval> | undefined;
  private attempt = 0;
  private backoffUntil = 0;
  /** Events per request while the collector refuses bigger ones (0: no such limit). */
  private splitTo = 0;
  private waiters: { ids: Set<string>; resolve: () => void }[] = [];
  private readonly counts = { sent: 0, accepted: 0, rejected: 0, dropped: 0, retries: 0 };
  private readonly listeners: Listener[] = [];
  private closed = false;

  constructor(options: InitOptions & { fetch?: typeof fetch }) {
    this.s = settings(options);
    const f = options.fetch ?? globalThis.fetch;
    this.fetch = (input, init) => f(input, init);
    const storage = safeLocalStorage();
    this.identity = new Identity(storage, this.s.name, this.s.sessionTimeoutMs);
    const kind = this.storeKind(storage);
    this.presence = tabPresence(this.s.name, randomUuid(), kind !== "memory");
    this.ready = this.open(kind, storage);
    this.ready.catch(() => undefined);
    // Events left by a page that has gone (a reload, a closed tab) are sent at once.
    this.ready.then(() => this.checkOrphans()).catch(() => undefined);
    this.orphanTimer = setInterval(() => void this.checkOrphans(), ORPHAN_CHECK_MS);
    this.listen();
  }

  /** Tracks an event of `type`; resolves nothing, returns its `event_id`. */
  track(type: EventType | EventTypeName | number, fields: EventFields = {}): string {
    if (this.closed) throw new Error("ktk: track() after close()");
    const value = typeof type === "string" ? (EventType as unknown as Record<string, unknown>)[type] : type;
    if (typeof value !== "number" || !Number.isInteger(value)) {
      throw new TypeError(`ktk: unknown event type ${String(type)}`);
    }
    const now = Date.now();
    const id = randomUuid();
    const event = create(EventSchema, {
      occurredAtMs: BigInt(now),
      deviceId: this.identity.deviceId(),
      sessionId: this.identity.sessionId(now),
      platform: this.s.platform,
      appVersion: this.s.appVersion,
      ...fields,
      eventId: id,
      type: value,
      schemaVersion: SCHEMA_VERSION,
    });
    const entry: Own = { id, bytes: toBinary(EventSchema, event), busy: false, keepalive: false };
    this.addOwn(entry);
    this.unsaved.push(entry);
    this.scheduleSave();
    this.afterChange();
    return id;
  }

  /**
   * Sends this tab's queued events now, without waiting for batches to fill. Resolves when every
   * event queued at the call has left the queue (accepted, rejected or dropped); while the
   * collector cannot be reached that is after the retries that reach it.
   */
  flush(): Promise<void> {
    const ids = new Set(this.own.keys());
    if (ids.size === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.waiters.push({ ids, resolve });
      this.kick(0);
    });
  }

  /** Resolves once every event tracked so far is in the persistent queue (or was dropped). */
  async persisted(): Promise<void> {
    while (this.saveScheduled || this.unsaved.length > 0) {
      await this.saving;
    }
    await this.saving;
  }

  stats(): Stats {
    return { queued: this.own.size, ...this.counts };
  }

  /**
   * Stops sending and lets other tabs adopt this tab's queued events. Resolves once what was
   * tracked is stored. The tracker cannot be used afterwards.
   */
  async close(): Promise<void> {
    await this.persisted().catch(() => undefined);
    this.closed = true;
    if (this.timer !== undefined) clearTimeout(this.timer);
    if (this.orphanTimer !== undefined) clearInterval(this.orphanTimer);
    for (const [target, type, fn] of this.listeners) target.removeEventListener(type, fn);
    this.presence.stop();
  }

  // --- the queue ---------------------------------------------------------------------------------

  private storeKind(storage: Storage | undefined): "indexeddb" | "localstorage" | "memory" {
    const wanted = this.s.storage;
    if (wanted === "memory") return "memory";
    if (wanted !== "localstorage" && typeof indexedDB !== "undefined") return "indexeddb";
    if (wanted !== "indexeddb" && storage) return "localstorage";
    return wanted === "auto" ? "memory" : (wanted as "indexeddb" | "localstorage");
  }

  private async open(kind: string, storage: Storage | undefined): Promise<EventStore> {
    let store: EventStore;
    if (kind === "indexeddb") {
      try {
        store = await openIndexedDbStore(`${this.s.name}-events`, indexedDB);
      } catch (error) {
        // IndexedDB refused (some private modes): localStorage if allowed, else memory.
        if (this.s.storage === "indexeddb") throw error;
        store = storage ? localStorageStore(storage, `${this.s.name}:queue`) : memoryStore();
      }
    } else if (kind === "localstorage" && storage) {
      store = localStorageStore(storage, `${this.s.name}:queue`);
    } else if (kind === "memory") {
      store = memoryStore();
    } else {
      throw new Error(`ktk: storage ${kind} is not available in this browser`);
    }
    await this.presence.start();
    return store;
  }

  private addOwn(entry: Own): void {
    this.own.set(entry.id, entry);
    this.ownBytes += entry.bytes.byteLength;
  }

  private deleteOwn(id: string): void {
    const entry = this.own.get(id);
    if (!entry) return;
    this.own.delete(id);
    this.ownBytes -= entry.bytes.byteLength;
  }

  private scheduleSave(): void {
    if (this.saveScheduled) return;
    this.saveScheduled = true;
    this.saving = this.saving.then(() => this.save()).catch(() => undefined);
  }

  private async save(): Promise<void> {
    let store: EventStore | undefined;
    try {
      store = await this.ready;
    } catch {
      store = undefined;
    }
    this.saveScheduled = false;
    const items = this.unsaved;
    this.unsaved = [];
    if (items.length === 0) return;
    const pending = items.filter((e) => !this.settledUnsaved.has(e.id));
    let result;
    try {
      if (!store) throw new Error("no queue");
      result = await store.append(
        this.presence.me,
        items.map((e) => ({ id: e.id, bytes: e.bytes })),
        this.s.queue,
      );
    } catch {
      // The queue cannot store them: they are lost to it, and said so.
      for (const e of pending) if (!e.keepalive) this.deleteOwn(e.id);
      this.dropped(pending.filter((e) => !e.keepalive).length);
      return;
    }
    const settled: number[] = [];
    for (const stored of result.stored) {
      if (this.settledUnsaved.delete(stored.id)) {
        settled.push(stored.seq);
        continue;
      }
      const entry = this.own.get(stored.id);
      if (entry) entry.seq = stored.seq;
    }
    let lost = 0;
    for (const d of result.dropped) {
      if (settled.includes(d.seq)) continue;
      lost += 1;
      if (d.owner === this.presence.me) this.deleteOwn(d.id);
    }
    if (settled.length > 0) await store.remove(settled);
    this.dropped(lost);
    this.checkWaiters();
  }

  private dropped(count: number): void {
    if (count <= 0) return;
    this.counts.dropped += count;
    safely(() => this.s.onDropped(count));
  }

  private async checkOrphans(): Promise<void> {
    if (this.closed || this.inFlight) return;
    try {
      const store = await this.ready;
      for (const owner of await store.owners()) {
        if (await this.presence.isGone(owner)) {
          this.kick(0);
          return;
        }
      }
    } catch {
      // The next check tries again.
    }
  }

  private async adoptOrphans(store: EventStore): Promise<void> {
    for (const owner of await store.owners()) {
      if (await this.presence.isGone(owner)) {
        await store.adopt(owner, this.presence.me);
        this.presence.forget(owner);
      }
    }
  }

  /** Brings the memory view of this tab's events in line with the store. */
  private resync(queued: QueuedEvent[]): void {
    const stored = new Set(queued.map((q) => q.id));
    for (const [id, entry] of this.own) {
      // Stored once, gone now: dropped by another tab's append.
      if (entry.seq !== undefined && !stored.has(id) && !entry.busy && !entry.keepalive) this.deleteOwn(id);
    }
    for (const q of queued) {
      const entry = this.own.get(q.id);
      if (entry) entry.seq = q.seq;
      else this.addOwn({ id: q.id, bytes: q.bytes, seq: q.seq, busy: false, keepalive: false });
    }
  }

  // --- sending -----------------------------------------------------------------------------------

  private online(): boolean {
    return typeof navigator === "undefined" || navigator.onLine !== false;
  }

  /** Runs the sender after `delayMs`, or earlier if it is already due earlier; never before the backoff ends. */
  private kick(delayMs: number): void {
    if (this.closed) return;
    const now = Date.now();
    const at = Math.max(now + delayMs, this.backoffUntil);
    if (this.timer !== undefined && this.timerAt <= at) return;
    if (this.timer !== undefined) clearTimeout(this.timer);
    this.timerAt = at;
    this.timer = setTimeout(() => {
      this.timer = undefined;
      this.timerAt = Infinity;
      void this.pump();
    }, at - now);
  }

  /** Schedules the next send for what is waiting. */
  private afterChange(): void {
    if (this.closed) return;
    let waiting = 0;
    let bytes = 0;
    for (const e of this.own.values()) {
      if (e.busy || e.keepalive) continue;
      waiting += 1;
      bytes += e.bytes.byteLength;
    }
    if (waiting === 0) return;
    const full = waiting >= this.s.batch.maxEvents || bytes >= this.s.batch.maxBytes;
    this.kick(full || this.waiters.length > 0 ? 0 : this.s.batch.maxDelayMs);
  }

  private checkWaiters(): void {
    if (this.waiters.length === 0) return;
    this.waiters = this.waiters.filter((w) => {
      for (const id of w.ids) if (!this.own.has(id)) w.ids.delete(id);
      if (w.ids.size > 0) return true;
      w.resolve();
      return false;
    });
  }

  /** One request: takes a batch of this tab's stored events, sends it, settles it. */
  private async pump(): Promise<void> {
    if (this.inFlight || this.closed || !this.online()) return;
    if (Date.now() < this.backoffUntil) {
      this.kick(0);
      return;
    }
    this.inFlight = true;
    try {
      const store = await this.ready;
      await this.saving;
      await this.adoptOrphans(store);
      const queued = await store.list(this.presence.me);
      this.resync(queued);
      const batch = this.pick(queued);
      if (batch.length > 0) {
        for (const e of batch) e.busy = true;
        try {
          const reply = await this.post(batch.map((e) => e.bytes), false);
          await this.settle(store, batch, reply, false);
        } finally {
          for (const e of batch) e.busy = false;
        }
      }
    } catch {
      // The store failed (quota, a closing database): try again after a pause.
      this.failed(undefined);
    } finally {
      this.inFlight = false;
      this.checkWaiters();
      this.afterChange();
    }
  }

  private pick(queued: QueuedEvent[]): Own[] {
    const maxEvents = this.splitTo > 0 ? Math.min(this.splitTo, this.s.batch.maxEvents) : this.s.batch.maxEvents;
    const batch: Own[] = [];
    let bytes = 0;
    for (const q of queued) {
      const entry = this.own.get(q.id);
      if (!entry || entry.busy || entry.keepalive) continue;
      if (batch.length >= maxEvents) break;
      if (batch.length > 0 && bytes + q.bytes.byteLength > this.s.batch.maxBytes) break;
      batch.push(entry);
      bytes += q.bytes.byteLength;
    }
    return batch;
  }

  /**
   * Posts `events`. Everything up to the `fetch()` call runs synchronously, so a keepalive request
   * leaves from inside a `pagehide` handler.
   */
  private async post(events: Uint8Array[], keepalive: boolean): Promise<Reply> {
    const sentAt = Date.now();
    let url = `${this.s.url}/v1/events?wait=acked`;
    const headers: Record<string, string> = {};
    let body: BodyInit;
    if (keepalive) {
      // A CORS-safelisted request: no preflight, which a keepalive request may not get to make.
      url += `&key=${encodeURIComponent(this.s.writeKey)}`;
      headers["content-type"] = "text/plain";
      body = jsonBody(events, sentAt);
    } else {
      headers.authorization = `Bearer ${this.s.writeKey}`;
      if (this.s.format === "json") {
        headers["content-type"] = "application/json";
        body = jsonBody(events, sentAt);
      } else {
        headers["content-type"] = "application/x-protobuf";
        body = protobufBody(events, sentAt) as Uint8Array<ArrayBuffer>;
      }
    }
    this.counts.sent += events.length;
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), this.s.requestTimeoutMs);
    try {
      const response = await this.fetch(url, {
        method: "POST",
        headers,
        body,
        keepalive,
        signal: controller.signal,
        credentials: "omit",
        mode: "cors",
      });
      const text = await response.text();
      let parsed: unknown;
      try {
        parsed = JSON.parse(text);
      } catch {
        parsed = undefined;
      }
      return { status: response.status, retryAfterMs: parseRetryAfter(response.headers.get("retry-after")), body: parsed };
    } catch {
      return { status: 0 };
    } finally {
      clearTimeout(timeout);
    }
  }

  /** Applies the collector's answer to the events of a request. */
  private async settle(store: EventStore, batch: Own[], reply: Reply, keepalive: boolean): Promise<void> {
    const answer = readBatchAnswer(reply.body, batch.length);
    if (answer) {
      const refused = new Map(answer.rejected.map((r) => [r.index, r]));
      const leaving: Own[] = [];
      const invalid: [Own, string, string][] = [];
      let retry = false;
      batch.forEach((entry, index) => {
        const r = refused.get(index);
        if (!r) {
          leaving.push(entry);
          this.counts.accepted += 1;
        } else if (r.retryable) {
          retry = true;
        } else {
          leaving.push(entry);
          invalid.push([entry, r.code, r.reason]);
          this.counts.rejected += 1;
        }
      });
      await this.leave(store, leaving);
      for (const [entry, code, reason] of invalid) this.rejected(entry, code, reason);
      if (retry || reply.status !== 200) this.failed(reply.retryAfterMs);
      else if (!keepalive) this.succeeded();
      return;
    }
    if ((reply.status === 413 || reply.status === 400) && !keepalive) {
      if (batch.length > 1) {
        // Too big, or one event cannot be read: halve until the culprit is alone.
        this.splitTo = Math.max(1, Math.floor(batch.length / 2));
        return;
      }
      const error = readErrorAnswer(reply.body);
      await this.leave(store, batch);
      this.counts.rejected += 1;
      this.rejected(batch[0], error?.error ?? `http_${reply.status}`, error?.reason ?? "");
      this.splitTo = 0;
      return;
    }
    if (!keepalive || reply.status !== 0) this.failed(reply.retryAfterMs);
  }

  private async leave(store: EventStore, entries: Own[]): Promise<void> {
    const seqs: number[] = [];
    for (const e of entries) {
      if (e.seq !== undefined) seqs.push(e.seq);
      else this.settledUnsaved.add(e.id);
    }
    await store.remove(seqs);
    for (const e of entries) this.deleteOwn(e.id);
  }

  private rejected(entry: Own, code: string, reason: string): void {
    safely(() => this.s.onRejected(decodeEvent(entry.bytes), code, reason));
  }

  private failed(retryAfterMs: number | undefined): void {
    this.attempt += 1;
    this.counts.retries += 1;
    const wait = nextWait(this.attempt, retryAfterMs, this.s.retry.minDelayMs, this.s.retry.maxDelayMs);
    this.backoffUntil = Date.now() + wait;
  }

  private succeeded(): void {
    this.attempt = 0;
    this.backoffUntil = 0;
  }

  // --- the page ----------------------------------------------------------------------------------

  private listen(): void {
    if (typeof window === "undefined" || typeof window.addEventListener !== "function") return;
    const on = (target: EventTarget, type: string, fn: () => void) => {
      target.addEventListener(type, fn);
      this.listeners.push([target, type, fn]);
    };
    on(window, "online", () => {
      this.backoffUntil = 0;
      this.kick(0);
    });
    on(window, "pagehide", () => this.sendOnHide());
    if (typeof document !== "undefined") {
      on(document, "visibilitychange", () => {
        if (document.visibilityState === "hidden") this.sendOnHide();
      });
    }
  }

  /** The rest of this tab's events in one keepalive request, as much as fits in 64 KiB. */
  private sendOnHide(): void {
    if (this.closed || this.keepaliveInFlight || !this.online()) return;
    // Room for the envelope: `{"events":[...],"sentAtMs":"..."}`.
    const limit = KEEPALIVE_MAX_BYTES - 256;
    const chosen: Own[] = [];
    let size = 0;
    for (const entry of this.own.values()) {
      if (entry.busy || entry.keepalive) continue;
      const length = jsonLength(entry.bytes) + 1;
      if (size + length > limit || chosen.length >= MAX_EVENTS_PER_REQUEST) break;
      chosen.push(entry);
      size += length;
    }
    if (chosen.length === 0) return;
    for (const e of chosen) e.keepalive = true;
    this.keepaliveInFlight = true;
    const reply = this.post(
      chosen.map((e) => e.bytes),
      true,
    );
    void reply
      .then(async (r) => this.settle(await this.ready, chosen, r, true))
      .catch(() => undefined)
      .finally(() => {
        for (const e of chosen) e.keepalive = false;
        this.keepaliveInFlight = false;
        this.checkWaiters();
        this.afterChange();
      });
  }
}

function safely(fn: () => void): void {
  try {
    fn();
  } catch (error) {
    // An app callback that throws must not stop the sender.
    setTimeout(() => {
      throw error;
    }, 0);
  }
}
