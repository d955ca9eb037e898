/**
 * The persistent, bounded event queue that every tab of a site shares.
 *
 * Each event is stored as its binary protobuf encoding, under a sequence number (the order it
 * was stored in, across tabs) and the id of the tab that owns it. A tab sends only the events it
 * owns; the events of a tab that has gone away (closed, reloaded, crashed) are adopted by
 * another tab, or by the next page load (see `tabs.ts`). An event leaves the queue only when the
 * collector's answer settles it, or when the queue is full and it is the oldest.
 *
 * The cap (events and bytes, over every tab's events) is kept at every append: the oldest events
 * are dropped until both limits hold, and the append reports what it dropped, so that no event
 * disappears without being counted.
 *
 * Three stores keep the same contract: IndexedDB (the default; each operation is one transaction,
 * so two tabs never see half of another's change), `localStorage` where IndexedDB is missing (a
 * whole-queue snapshot rewritten by each operation; a full `localStorage` drops the oldest events
 * until the snapshot fits), and memory where neither is usable (nothing survives the page).
 */

/** An event in the queue. */
export interface QueuedEvent {
  /** Position in the queue, across tabs; increases with each stored event. */
  seq: number;
  /** The event's `event_id`. */
  id: string;
  /** The tab that sends it. */
  owner: string;
  /** The `events.v1.Event`, binary protobuf. */
  bytes: Uint8Array;
}

/** An event to store. */
export interface NewEvent {
  id: string;
  bytes: Uint8Array;
}

/** The queue's cap: both hold after every append. */
export interface QueueLimits {
  maxEvents: number;
  maxBytes: number;
}

export interface AppendResult {
  /** The events appended, with their sequence numbers (those dropped at once included). */
  stored: QueuedEvent[];
  /** The events dropped to keep the cap, oldest first; they may belong to any tab. */
  dropped: QueuedEvent[];
}

export interface EventStore {
  /** Appends `events` for `owner`, then drops the oldest events while over `limits`. */
  append(owner: string, events: NewEvent[], limits: QueueLimits): Promise<AppendResult>;
  /** Every event `owner` has, oldest first. */
  list(owner: string): Promise<QueuedEvent[]>;
  /** Removes the events with these sequence numbers (those already gone are ignored). */
  remove(seqs: number[]): Promise<void>;
  /** The owners that have events. */
  owners(): Promise<string[]>;
  /** Gives every event of `from` to `to`; resolves with how many moved. */
  adopt(from: string, to: string): Promise<number>;
  /** Events and bytes in the queue, over every owner. */
  totals(): Promise<{ events: number; bytes: number }>;
}

// --- IndexedDB ---------------------------------------------------------------------------------

const EVENTS = "events";
const META = "meta";
const TOTALS = "totals";
const OWNER_INDEX = "owner";

interface Totals {
  events: number;
  bytes: number;
}

function request<T>(r: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

/** Opens (creating it if needed) the IndexedDB database `name` as an [`EventStore`]. */
export async function openIndexedDbStore(name: string, factory: IDBFactory): Promise<EventStore> {
  const open = factory.open(name, 1);
  open.onupgradeneeded = () => {
    const db = open.result;
    const events = db.createObjectStore(EVENTS, { keyPath: "seq", autoIncrement: true });
    events.createIndex(OWNER_INDEX, "owner");
    db.createObjectStore(META);
  };
  const db = await request(open);
  // Another page wants a newer version of the database: let it have it.
  db.onversionchange = () => db.close();
  return new IndexedDbStore(db);
}

class IndexedDbStore implements EventStore {
  constructor(private readonly db: IDBDatabase) {}

  /** Runs `body` in one transaction over both object stores; resolves once it has committed. */
  private async transaction<T>(
    mode: IDBTransactionMode,
    body: (events: IDBObjectStore, meta: IDBObjectStore) => Promise<T>,
  ): Promise<T> {
    const tx = this.db.transaction([EVENTS, META], mode);
    const finished = new Promise<void>((resolve, reject) => {
      tx.oncomplete = () => resolve();
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
    });
    let result: T;
    try {
      result = await body(tx.objectStore(EVENTS), tx.objectStore(META));
    } catch (error) {
      try {
        tx.abort();
      } catch {
        // already finished
      }
      await finished.catch(() => undefined);
      throw error;
    }
    await finished;
    return result;
  }

  append(owner: string, events: NewEvent[], limits: QueueLimits): Promise<AppendResult> {
    return this.transaction("readwrite", async (store, meta) => {
      const totals: Totals = (await request(meta.get(TOTALS))) ?? { events: 0, bytes: 0 };
      const adds = events.map((e) => request(store.add({ id: e.id, owner, bytes: e.bytes })));
      const seqs = await Promise.all(adds);
      const stored = events.map((e, i) => ({ seq: Number(seqs[i]), id: e.id, owner, bytes: e.bytes }));
      for (const e of events) {
        totals.events += 1;
        totals.bytes += e.bytes.byteLength;
      }
      const dropped: QueuedEvent[] = [];
      const over = () => totals.events > limits.maxEvents || totals.bytes > limits.maxBytes;
      if (over()) {
        const cursor = store.openCursor();
        await new Promise<void>((resolve, reject) => {
          cursor.onerror = () => reject(cursor.error);
          cursor.onsuccess = () => {
            const c = cursor.result;
            if (!c || !over()) return resolve();
            const value = c.value as QueuedEvent;
            dropped.push(value);
            totals.events -= 1;
            totals.bytes -= value.bytes.byteLength;
            c.delete();
            c.continue();
          };
        });
      }
      meta.put(totals, TOTALS);
      return { stored, dropped };
    });
  }

  list(owner: string): Promise<QueuedEvent[]> {
    return this.transaction("readonly", async (store) => {
      const all = await request(store.index(OWNER_INDEX).getAll(IDBKeyRange.only(owner)));
      return (all as QueuedEvent[]).sort((a, b) => a.seq - b.seq);
    });
  }

  remove(seqs: number[]): Promise<void> {
    if (seqs.length === 0) return Promise.resolve();
    return this.transaction("readwrite", async (store, meta) => {
      const totals: Totals = (await request(meta.get(TOTALS))) ?? { events: 0, bytes: 0 };
      const found = await Promise.all(seqs.map((seq) => request(store.get(seq))));
      for (const value of found as (QueuedEvent | undefined)[]) {
        if (!value) continue;
        store.delete(value.seq);
        totals.events = Math.max(0, totals.events - 1);
        totals.bytes = Math.max(0, totals.bytes - value.bytes.byteLength);
      }
      meta.put(totals, TOTALS);
    });
  }

  owners(): Promise<string[]> {
    return this.transaction("readonly", async (store) => {
      const owners: string[] = [];
      const cursor = store.index(OWNER_INDEX).openKeyCursor(null, "nextunique");
      await new Promise<void>((resolve, reject) => {
        cursor.onerror = () => reject(cursor.error);
        cursor.onsuccess = () => {
          const c = cursor.result;
          if (!c) return resolve();
          owners.push(String(c.key));
          c.continue();
        };
      });
      return owners;
    });
  }

  adopt(from: string, to: string): Promise<number> {
    return this.transaction("readwrite", async (store) => {
      let moved = 0;
      const cursor = store.index(OWNER_INDEX).openCursor(IDBKeyRange.only(from));
      await new Promise<void>((resolve, reject) => {
        cursor.onerror = () => reject(cursor.error);
        cursor.onsuccess = () => {
          const c = cursor.result;
          if (!c) return resolve();
          c.update({ ...(c.value as QueuedEvent), owner: to });
          moved += 1;
          c.continue();
        };
      });
      return moved;
    });
  }

  totals(): Promise<Totals> {
    return this.transaction("readonly", async (_store, meta) => {
      const totals: Totals | undefined = await request(meta.get(TOTALS));
      return totals ?? { events: 0, bytes: 0 };
    });
  }
}

// --- localStorage and memory -------------------------------------------------------------------

interface Snapshot {
  next: number;
  events: QueuedEvent[];
}

/** Where a snapshot store keeps its queue. `save` throws when the snapshot does not fit. */
interface SnapshotMedium {
  load(): Snapshot;
  save(snapshot: Snapshot): void;
}

class SnapshotStore implements EventStore {
  constructor(private readonly medium: SnapshotMedium) {}

  async append(owner: string, events: NewEvent[], limits: QueueLimits): Promise<AppendResult> {
    const snapshot = this.medium.load();
    const stored = events.map((e) => ({ seq: snapshot.next++, id: e.id, owner, bytes: e.bytes }));
    snapshot.events.push(...stored);
    let bytes = snapshot.events.reduce((sum, e) => sum + e.bytes.byteLength, 0);
    const dropped: QueuedEvent[] = [];
    while (snapshot.events.length > limits.maxEvents || bytes > limits.maxBytes) {
      const oldest = snapshot.events.shift() as QueuedEvent;
      bytes -= oldest.bytes.byteLength;
      dropped.push(oldest);
    }
    // The medium is full (a localStorage quota): the oldest go until the rest fits.
    for (;;) {
      try {
        this.medium.save(snapshot);
        break;
      } catch (error) {
        const oldest = snapshot.events.shift();
        if (!oldest) throw error;
        dropped.push(oldest);
      }
    }
    return { stored, dropped };
  }

  async list(owner: string): Promise<QueuedEvent[]> {
    return this.medium.load().events.filter((e) => e.owner === owner);
  }

  async remove(seqs: number[]): Promise<void> {
    if (seqs.length === 0) return;
    const gone = new Set(seqs);
    const snapshot = this.medium.load();
    snapshot.events = snapshot.events.filter((e) => !gone.has(e.seq));
    this.medium.save(snapshot);
  }

  async owners(): Promise<string[]> {
    return [...new Set(this.medium.load().events.map((e) => e.owner))];
  }

  async adopt(from: string, to: string): Promise<number> {
    const snapshot = this.medium.load();
    let moved = 0;
    for (const e of snapshot.events) {
      if (e.owner === from) {
        e.owner = to;
        moved += 1;
      }
    }
    if (moved > 0) this.medium.save(snapshot);
    return moved;
  }

  async totals(): Promise<Totals> {
    const events = this.medium.load().events;
    return { events: events.length, bytes: events.reduce((sum, e) => sum + e.bytes.byteLength, 0) };
  }
}

function toBase64(bytes: Uint8Array): string {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

function fromBase64(text: string): Uint8Array {
  const raw = atob(text);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

/** A queue kept in `storage` under `key`, as JSON with base64 event bytes. */
export function localStorageStore(storage: Storage, key: string): EventStore {
  return new SnapshotStore({
    load() {
      const text = storage.getItem(key);
      if (!text) return { next: 1, events: [] };
      try {
        const raw = JSON.parse(text) as { next: number; events: [number, string, string, string][] };
        return {
          next: raw.next,
          events: raw.events.map(([seq, id, owner, b64]) => ({ seq, id, owner, bytes: fromBase64(b64) })),
        };
      } catch {
        // Not ours or damaged: start afresh rather than fail every track().
        return { next: 1, events: [] };
      }
    },
    save(snapshot) {
      const events = snapshot.events.map((e) => [e.seq, e.id, e.owner, toBase64(e.bytes)]);
      storage.setItem(key, JSON.stringify({ next: snapshot.next, events }));
    },
  });
}

/** A queue in this page's memory only. */
export function memoryStore(): EventStore {
  let current: Snapshot = { next: 1, events: [] };
  return new SnapshotStore({
    load: () => ({ next: current.next, events: current.events.map((e) => ({ ...e })) }),
    save: (snapshot) => {
      current = snapshot;
    },
  });
}
