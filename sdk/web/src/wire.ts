/**
 * What goes over the wire: request bodies built with the generated `events.v1` code, and the
 * collector's answers read defensively (an answer that is not what the collector documents is
 * treated as no answer).
 */
import { create, fromBinary, toBinary, toJsonString } from "@bufbuild/protobuf";
import { EventBatchSchema, EventSchema, type Event } from "./gen/events/v1/events_pb.js";

export function decodeEvent(bytes: Uint8Array): Event {
  return fromBinary(EventSchema, bytes);
}

function batch(events: Uint8Array[], sentAtMs: number) {
  return create(EventBatchSchema, { events: events.map(decodeEvent), sentAtMs: BigInt(sentAtMs) });
}

/** An `events.v1.EventBatch` as binary protobuf. */
export function protobufBody(events: Uint8Array[], sentAtMs: number): Uint8Array {
  return toBinary(EventBatchSchema, batch(events, sentAtMs));
}

/** An `events.v1.EventBatch` as canonical proto3 JSON. */
export function jsonBody(events: Uint8Array[], sentAtMs: number): string {
  return toJsonString(EventBatchSchema, batch(events, sentAtMs));
}

/** The UTF-8 length of one event as JSON (to fill a request of limited size). */
export function jsonLength(bytes: Uint8Array): number {
  return new TextEncoder().encode(toJsonString(EventSchema, decodeEvent(bytes))).byteLength;
}

/** One refused event of a batch answer. */
export interface Rejection {
  index: number;
  code: string;
  reason: string;
  retryable: boolean;
}

/** The collector's per-event answer (status 200, and 503 when part of a batch was taken). */
export interface BatchAnswer {
  accepted: number;
  rejected: Rejection[];
}

/** The answer to a request the collector did not read events from (`{"error", "reason"}`). */
export interface ErrorAnswer {
  error: string;
  reason: string;
}

export function readBatchAnswer(body: unknown, events: number): BatchAnswer | undefined {
  if (!body || typeof body !== "object") return undefined;
  const { accepted, rejected } = body as { accepted?: unknown; rejected?: unknown };
  if (typeof accepted !== "number" || !Array.isArray(rejected)) return undefined;
  const out: Rejection[] = [];
  for (const r of rejected as unknown[]) {
    if (!r || typeof r !== "object") return undefined;
    const { index, code, reason, retryable } = r as Record<string, unknown>;
    if (typeof index !== "number" || !Number.isInteger(index) || index < 0 || index >= events) return undefined;
    out.push({
      index,
      code: typeof code === "string" ? code : "unknown",
      reason: typeof reason === "string" ? reason : "",
      retryable: retryable === true,
    });
  }
  if (accepted + out.length !== events) return undefined;
  return { accepted, rejected: out };
}

export function readErrorAnswer(body: unknown): ErrorAnswer | undefined {
  if (!body || typeof body !== "object") return undefined;
  const { error, reason } = body as { error?: unknown; reason?: unknown };
  if (typeof error !== "string") return undefined;
  return { error, reason: typeof reason === "string" ? reason : "" };
}
