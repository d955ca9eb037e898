import { test } from "node:test";
import assert from "node:assert/strict";
import { IDBFactory } from "fake-indexeddb";
import "fake-indexeddb/auto";
import {
  localStorageStore,
  memoryStore,
  openIndexedDbStore,
  type EventStore,
  type NewEvent,
} from "../../src/queue.js";

/** A Storage with an optional quota in characters, like a browser's localStorage. */
class FakeStorage implements Storage {
  private items = new Map<string, string>();
  constructor(private readonly quota = Infinity) {}
  get length() {
    return this.items.size;
  }
  clear() {
    this.items.clear();
  }
  getItem(key: string) {
    return this.items.get(key) ?? null;
  }
  key(index: number) {
    return [...this.items.keys()][index] ?? null;
  }
  removeItem(key: string) {
    this.items.delete(key);
  }
  setItem(key: string, value: string) {
    let used = value.length;
    for (const [k, v] of this.items) if (k !== key) used += v.length;
    if (used > this.quota) throw new DOMException("full", "QuotaExceededError");
    this.items.set(key, value);
  }
}

function events(prefix: string, n: number, size = 10): NewEvent[] {
  return Array.from({ length: n }, (_, i) => ({ id: `${prefix}-${i}`, bytes: new Uint8Array(size).fill(i % 256) }));
}

let dbCount = 0;
const stores: [string, () => Promise<EventStore>][] = [
  ["IndexedDB", () => openIndexedDbStore(`q-${++dbCount}`, new IDBFactory())],
  ["localStorage", async () => localStorageStore(new FakeStorage(), "q")],
  ["memory", async () => memoryStore()],
];

for (const [kind, open] of stores) {
  test(`${kind}: events come back per owner, oldest first, with their bytes`, async () => {
    const q = await open();
    const a = await q.append("tab-a", events("a", 3), { maxEvents: 100, maxBytes: 1e6 });
    await q.append("tab-b", events("b", 2), { maxEvents: 100, maxBytes: 1e6 });
    await q.append("tab-a", events("c", 1), { maxEvents: 100, maxBytes: 1e6 });
    assert.deepEqual(a.dropped, []);
    const seqs = a.stored.map((s) => s.seq);
    assert.ok(seqs[0] < seqs[1] && seqs[1] < seqs[2], "sequence numbers increase");
    const listed = await q.list("tab-a");
    assert.deepEqual(listed.map((e) => e.id), ["a-0", "a-1", "a-2", "c-0"]);
    assert.deepEqual([...listed[1].bytes], [...new Uint8Array(10).fill(1)]);
    assert.deepEqual((await q.owners()).sort(), ["tab-a", "tab-b"]);
    assert.deepEqual(await q.totals(), { events: 6, bytes: 60 });
  });

  test(`${kind}: the count cap drops the oldest events, of any tab, and says which`, async () => {
    const q = await open();
    await q.append("tab-b", events("b", 3), { maxEvents: 5, maxBytes: 1e6 });
    const r = await q.append("tab-a", events("a", 4), { maxEvents: 5, maxBytes: 1e6 });
    assert.deepEqual(r.dropped.map((e) => e.id), ["b-0", "b-1"]);
    assert.deepEqual(r.dropped.map((e) => e.owner), ["tab-b", "tab-b"]);
    assert.deepEqual((await q.list("tab-b")).map((e) => e.id), ["b-2"]);
    assert.equal((await q.list("tab-a")).length, 4);
    assert.deepEqual(await q.totals(), { events: 5, bytes: 50 });
  });

  test(`${kind}: the byte cap drops the oldest events`, async () => {
    const q = await open();
    await q.append("t", events("x", 5, 100), { maxEvents: 1000, maxBytes: 450 });
    assert.deepEqual((await q.list("t")).map((e) => e.id), ["x-1", "x-2", "x-3", "x-4"]);
    const r = await q.append("t", [{ id: "big", bytes: new Uint8Array(300) }], { maxEvents: 1000, maxBytes: 450 });
    assert.deepEqual(r.dropped.map((e) => e.id), ["x-1", "x-2", "x-3"]);
    assert.deepEqual(await q.totals(), { events: 2, bytes: 400 });
    // An event larger than the whole cap cannot be kept: it is dropped too, and said so.
    const huge = await q.append("t", [{ id: "huge", bytes: new Uint8Array(500) }], { maxEvents: 1000, maxBytes: 450 });
    assert.deepEqual(huge.dropped.map((e) => e.id), ["x-4", "big", "huge"]);
    assert.deepEqual(await q.totals(), { events: 0, bytes: 0 });
  });

  test(`${kind}: remove takes exactly the given events and ignores those already gone`, async () => {
    const q = await open();
    const r = await q.append("t", events("x", 4), { maxEvents: 100, maxBytes: 1e6 });
    await q.remove([r.stored[1].seq, r.stored[3].seq]);
    await q.remove([r.stored[1].seq]);
    await q.remove([]);
    assert.deepEqual((await q.list("t")).map((e) => e.id), ["x-0", "x-2"]);
    assert.deepEqual(await q.totals(), { events: 2, bytes: 20 });
  });

  test(`${kind}: adopt moves every event of a gone tab, once`, async () => {
    const q = await open();
    await q.append("gone", events("g", 3), { maxEvents: 100, maxBytes: 1e6 });
    await q.append("me", events("m", 1), { maxEvents: 100, maxBytes: 1e6 });
    const [first, second] = await Promise.all([q.adopt("gone", "me"), q.adopt("gone", "other")]);
    assert.equal(first + second, 3, "two tabs adopting at once move each event once");
    assert.deepEqual(await q.list("gone"), []);
    const mine = (await q.list("me")).map((e) => e.id);
    const others = (await q.list("other")).map((e) => e.id);
    assert.equal(mine.length + others.length, 4);
  });
}

test("IndexedDB: the queue survives closing and reopening the database (a reload)", async () => {
  const factory = new IDBFactory();
  const first = await openIndexedDbStore("persist", factory);
  await first.append("old-tab", events("p", 200), { maxEvents: 1000, maxBytes: 1e6 });
  const second = await openIndexedDbStore("persist", factory);
  assert.deepEqual(await second.owners(), ["old-tab"]);
  assert.equal((await second.list("old-tab")).length, 200);
  assert.deepEqual(await second.totals(), { events: 200, bytes: 2000 });
});

test("localStorage: the queue survives a new store over the same storage (a reload)", async () => {
  const storage = new FakeStorage();
  await localStorageStore(storage, "q").append("old-tab", events("p", 5), { maxEvents: 10, maxBytes: 1e6 });
  const again = localStorageStore(storage, "q");
  assert.deepEqual((await again.list("old-tab")).map((e) => e.id), ["p-0", "p-1", "p-2", "p-3", "p-4"]);
});

test("localStorage: a full storage drops the oldest events until the rest fits, and says so", async () => {
  const storage = new FakeStorage(2_000);
  const q = localStorageStore(storage, "q");
  let dropped = 0;
  for (let i = 0; i < 10; i++) {
    const r = await q.append("t", events(`r${i}`, 5, 20), { maxEvents: 1000, maxBytes: 1e6 });
    dropped += r.dropped.length;
  }
  const kept = (await q.list("t")).length;
  assert.ok(dropped > 0, "the quota was reached");
  assert.equal(kept + dropped, 50, "every event is either kept or reported dropped");
  const ids = (await q.list("t")).map((e) => e.id);
  assert.equal(ids[ids.length - 1], "r9-4", "the newest are kept");
});

test("localStorage: a damaged queue is started afresh", async () => {
  const storage = new FakeStorage();
  storage.setItem("q", "{not json");
  const q = localStorageStore(storage, "q");
  assert.deepEqual(await q.list("t"), []);
  await q.append("t", events("x", 1), { maxEvents: 10, maxBytes: 1e6 });
  assert.equal((await q.list("t")).length, 1);
});
