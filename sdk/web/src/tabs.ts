/**
 * Which tabs are still there, so that the events of a tab that has gone (closed, reloaded,
 * crashed) are adopted by another one and never sent by two.
 *
 * Each tab has a fresh id and owns the events it tracks (see `queue.ts`). With Web Locks, a tab
 * holds the lock `<name>:tab:<id>` for its whole life; the browser releases it when the page goes
 * away, however it goes, so "no one holds the lock" means "the tab is gone". The lock is held
 * before the tab stores its first event, so an owner found in the queue without its lock is gone.
 * Without Web Locks, a tab writes a heartbeat to `localStorage` every few seconds and is taken as
 * gone once its heartbeat is older than `HEARTBEAT_EXPIRY_MS` (a tab frozen for that long then
 * loses its events to another: a duplicate downstream, never a loss).
 */

export interface TabPresence {
  /** This tab's id. */
  readonly me: string;
  /** Resolves once this tab is marked as present (before it stores anything). */
  start(): Promise<void>;
  /** Whether the tab `owner` has gone. */
  isGone(owner: string): Promise<boolean>;
  /** Forgets the mark of a gone tab once its events are adopted. */
  forget(owner: string): void;
  /** Stops marking this tab as present (its events can then be adopted). */
  stop(): void;
}

export const HEARTBEAT_MS = 5_000;
export const HEARTBEAT_EXPIRY_MS = 30_000;

/**
 * Web Locks where the browser has them, else `localStorage` heartbeats, else nothing shared.
 * `shared` is false when the queue itself is not shared (kept in memory).
 */
export function tabPresence(name: string, me: string, shared: boolean): TabPresence {
  const locks = typeof navigator !== "undefined" ? navigator.locks : undefined;
  if (shared && locks && typeof locks.request === "function") return new LockPresence(locks, name, me);
  const storage = shared ? safeLocalStorage() : undefined;
  if (storage) return new HeartbeatPresence(storage, name, me);
  // Nothing is shared between tabs, so neither is the queue (it is in memory): only this tab's
  // own events exist.
  return {
    me,
    start: () => Promise.resolve(),
    isGone: async (owner) => owner !== me,
    forget: () => undefined,
    stop: () => undefined,
  };
}

class LockPresence implements TabPresence {
  private release: (() => void) | undefined;

  constructor(
    private readonly locks: LockManager,
    private readonly name: string,
    readonly me: string,
  ) {}

  private lockName(id: string): string {
    return `${this.name}:tab:${id}`;
  }

  start(): Promise<void> {
    return new Promise((granted, failed) => {
      this.locks
        .request(this.lockName(this.me), () => {
          granted();
          return new Promise<void>((release) => {
            this.release = release;
          });
        })
        .catch(failed);
    });
  }

  async isGone(owner: string): Promise<boolean> {
    if (owner === this.me) return false;
    const state = await this.locks.query();
    const wanted = this.lockName(owner);
    return ![...(state.held ?? []), ...(state.pending ?? [])].some((lock) => lock.name === wanted);
  }

  forget(): void {}

  stop(): void {
    this.release?.();
    this.release = undefined;
  }
}

class HeartbeatPresence implements TabPresence {
  private timer: ReturnType<typeof setInterval> | undefined;

  constructor(
    private readonly storage: Storage,
    private readonly name: string,
    readonly me: string,
  ) {}

  private key(id: string): string {
    return `${this.name}:tab:${id}`;
  }

  private beat(): void {
    try {
      this.storage.setItem(this.key(this.me), String(Date.now()));
    } catch {
      // A full localStorage: the next beat tries again.
    }
  }

  async start(): Promise<void> {
    this.beat();
    this.timer = setInterval(() => this.beat(), HEARTBEAT_MS);
  }

  async isGone(owner: string): Promise<boolean> {
    if (owner === this.me) return false;
    const last = Number(this.storage.getItem(this.key(owner)));
    return !(last > Date.now() - HEARTBEAT_EXPIRY_MS);
  }

  forget(owner: string): void {
    this.storage.removeItem(this.key(owner));
  }

  stop(): void {
    if (this.timer !== undefined) clearInterval(this.timer);
    this.timer = undefined;
    this.storage.removeItem(this.key(this.me));
  }
}

/** `localStorage`, or `undefined` where it is missing or refuses to be used (some private modes). */
export function safeLocalStorage(): Storage | undefined {
  try {
    const storage = globalThis.localStorage;
    if (!storage) return undefined;
    const probe = "__ktk_probe__";
    storage.setItem(probe, probe);
    storage.removeItem(probe);
    return storage;
  } catch {
    return undefined;
  }
}
