/**
 * The ids `track()` fills in: a random UUID per event, a device id kept in `localStorage` for as
 * long as the browser keeps the site's storage, and a session id that changes after
 * `sessionTimeoutMs` without an event (shared by the site's tabs through `localStorage`).
 */

/** A random (version 4) UUID from the browser's cryptographic generator. */
export function randomUuid(): string {
  const c = globalThis.crypto;
  // randomUUID exists only in secure contexts (https, localhost).
  if (typeof c.randomUUID === "function") return c.randomUUID();
  const b = c.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const hex = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

interface SessionRecord {
  id: string;
  /** The last event of the session, epoch milliseconds. */
  last: number;
}

export class Identity {
  private memoryDevice: string | undefined;
  private memorySession: SessionRecord | undefined;

  constructor(
    private readonly storage: Storage | undefined,
    private readonly name: string,
    private readonly sessionTimeoutMs: number,
  ) {}

  /** The device id, created on first use. */
  deviceId(): string {
    const key = `${this.name}:device_id`;
    const stored = this.read(key);
    if (stored) return stored;
    const id = this.memoryDevice ?? randomUuid();
    this.memoryDevice = id;
    this.write(key, id);
    return id;
  }

  /** The session of an event at `now`: the current one, or a new one after the timeout. */
  sessionId(now: number): string {
    const key = `${this.name}:session`;
    let session = this.memorySession;
    const stored = this.read(key);
    if (stored) {
      try {
        session = JSON.parse(stored) as SessionRecord;
      } catch {
        session = undefined;
      }
    }
    if (!session || typeof session.id !== "string" || !(now - session.last < this.sessionTimeoutMs)) {
      session = { id: randomUuid(), last: now };
    }
    session.last = Math.max(session.last, now);
    this.memorySession = session;
    this.write(key, JSON.stringify(session));
    return session.id;
  }

  private read(key: string): string | null {
    try {
      return this.storage?.getItem(key) ?? null;
    } catch {
      return null;
    }
  }

  private write(key: string, value: string): void {
    try {
      this.storage?.setItem(key, value);
    } catch {
      // Full or refused: the value lives in memory for this page.
    }
  }
}
