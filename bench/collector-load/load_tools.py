"""Helpers for run.sh (Python >= 3.11, standard library only).

    load_tools.py create STREAM --shards N     # a Kinesis stream on LocalStack; waits until ACTIVE
    load_tools.py delete STREAM
    load_tools.py metrics                       # the collector's /metrics counters as JSON
    load_tools.py sample --collector PID --out FILE [--interval S]
        # every interval, one JSON line: RSS and CPU time of the collector and of LocalStack's
        # processes, the machine's CPU time, and the collector's /metrics counters
    load_tools.py hold --connections N --seconds S --out FILE
        # N slow clients held open against the collector, re-opened when it closes them; one
        # JSON line a second (how many are open, closed, answered) until S seconds or SIGTERM
    load_tools.py mix --workers W --held H --seconds S --out FILE
        # the worst request mix: W connections cycling through the largest valid and invalid
        # bodies, JSON and protobuf, with and without ?wait=acked, plus H connections that send
        # a 1 MiB body but its last byte and hold it
    load_tools.py wrk-summary FILE              # wrk's --latency text summary as JSON
    load_tools.py report WORK                   # the results table from run.sh's files

The collector's address comes from COLLECTOR_URL (http://127.0.0.1:PORT), its write key from
COLLECTOR_KEY (sent as `Authorization: Bearer <key>` when set). AWS settings come from the
environment (AWS_ENDPOINT_URL, AWS_REGION); the stream calls speak Kinesis' JSON protocol to
LocalStack directly, with a placeholder signature (LocalStack does not check signatures), and
refuse an endpoint that is not on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

MAX_BODY = 1024 * 1024  # the collector's default body limit
MAX_EVENTS = 500  # its default events-per-request cap
MAX_EVENT_BYTES = 32 * 1024  # its default event size cap (protobuf bytes)


# --- Kinesis on LocalStack --------------------------------------------------------------------


def kinesis(action: str, payload: dict) -> dict:
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
    host = urllib.parse.urlsplit(endpoint).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"AWS_ENDPOINT_URL={endpoint} is not on loopback; these helpers only talk to LocalStack")
    region = os.environ.get("AWS_REGION", "us-east-1")
    key = os.environ.get("AWS_ACCESS_KEY_ID", "test")
    day = time.strftime("%Y%m%d", time.gmtime())
    request = urllib.request.Request(
        endpoint,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"Kinesis_20131202.{action}",
            "X-Amz-Date": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "Authorization": f"AWS4-HMAC-SHA256 Credential={key}/{day}/{region}/kinesis/aws4_request, "
            "SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        body = response.read()
    return json.loads(body) if body else {}


def create(args: argparse.Namespace) -> None:
    kinesis("CreateStream", {"StreamName": args.stream, "ShardCount": args.shards})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        summary = kinesis("DescribeStreamSummary", {"StreamName": args.stream})["StreamDescriptionSummary"]
        if summary["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.2)
    sys.exit(f"stream {args.stream} did not become ACTIVE within 60 s")


def delete(args: argparse.Namespace) -> None:
    try:
        kinesis("DeleteStream", {"StreamName": args.stream, "EnforceConsumerDeletion": True})
    except Exception as error:  # cleanup must not hide the results
        print(f"delete {args.stream}: {error}", file=sys.stderr)


# --- Sampling ---------------------------------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def localstack_processes() -> dict[str, list[int]]:
    """LocalStack's processes by role: its kinesis-local (Node), the rest of its tree."""
    cache = Path(os.environ.get("KTK_CACHE", Path.home() / ".cache/ktk"))
    port = urllib.parse.urlsplit(os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")).port or 4566
    pidfile = cache / ("localstack.pid" if port == 4566 else f"localstack-{port}.pid")
    try:
        root = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    tree = children()
    roles: dict[str, list[int]] = {"kinesis": [], "localstack_rest": []}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        roles["kinesis" if b"kinesis-local" in cmd else "localstack_rest"].append(pid)
    return roles


def clients_cpu_seconds() -> dict[str, float]:
    """CPU time of each load generator: wrk and this script's hold and mix commands, by pid."""
    out: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        is_wrk = cmd[0].endswith(b"wrk")
        is_tool = any(a.endswith(b"load_tools.py") for a in cmd) and (b"hold" in cmd or b"mix" in cmd)
        if is_wrk or is_tool:
            out[entry] = proc_cpu_seconds(int(entry)) or 0.0
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


METRIC_LINE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def scrape(url: str) -> dict[str, float]:
    """The collector's counters and gauges, summed over their labels (a few with labels kept)."""
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            text = response.read().decode()
    except Exception:
        return out
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if not match or line.startswith("#"):
            continue
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        if name.endswith("_bucket") or name.endswith("_sum") or name.endswith("_count"):
            continue
        if 'shard="' in labels:
            continue  # the producer counts per stream and again per shard: the stream's series only
        if name in ("collector_events_rejected", "collector_connections_timed_out", "ErrorsByCode"):
            tag = re.search(r'(?:reason|phase|code)="([^"]*)"', labels)
            name = f"{name}.{tag.group(1) if tag else ''}"
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def metrics_url() -> str:
    # /metrics is on the collector's admin listener (--admin-listen), not the public one.
    return os.environ.get("COLLECTOR_ADMIN_URL", "http://127.0.0.1:19090").rstrip("/") + "/metrics"


def metrics(args: argparse.Namespace) -> None:
    print(json.dumps(scrape(metrics_url())))


def sample(args: argparse.Namespace) -> None:
    url = metrics_url()
    with open(args.out, "a", buffering=1) as out:
        while True:
            roles = localstack_processes()
            busy, total = machine_cpu()
            row: dict[str, object] = {
                "t": time.time(),
                "pid": args.collector,
                "machine_busy_s": busy,
                "machine_total_s": total,
            }
            row["collector_cpu_s"] = proc_cpu_seconds(args.collector)
            row["collector"] = proc_status(args.collector)
            for role, pids in roles.items():
                row[f"{role}_cpu_s"] = sum(filter(None, (proc_cpu_seconds(p) for p in pids)))
                row[f"{role}_rss_kb"] = sum(proc_status(p).get("VmRSS", 0) for p in pids)
            row["clients"] = clients_cpu_seconds()
            row["loadavg"] = float(Path("/proc/loadavg").read_text().split()[0])
            row["metrics"] = scrape(url)
            out.write(json.dumps(row) + "\n")
            if row["collector_cpu_s"] is None:
                return
            time.sleep(args.interval)


# --- HTTP client pieces -----------------------------------------------------------------------


def target() -> tuple[str, int]:
    parts = urllib.parse.urlsplit(os.environ.get("COLLECTOR_URL", "http://127.0.0.1:18080"))
    return parts.hostname or "127.0.0.1", parts.port or 80


def head(path: str, content_type: str, length: int) -> bytes:
    host, port = target()
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        f"Content-Type: {content_type}",
        f"Content-Length: {length}",
    ]
    key = os.environ.get("COLLECTOR_KEY")
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, int, bool]:
    """(status, body bytes, server closes) of one HTTP/1.1 response."""
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, length, close


# --- Slow clients -----------------------------------------------------------------------------


class HoldStats:
    def __init__(self) -> None:
        self.open = 0
        self.opened = 0
        self.closed_by_server = 0
        self.connect_errors = 0
        self.statuses: dict[int, int] = {}


async def slow_client(mode: str, stats: HoldStats, stop: asyncio.Event) -> None:
    """One slow client: `body` sends a head then a body a byte per second; `head` sends a head a
    byte per second. Re-opens whenever the collector closes the connection."""
    host, port = target()
    request_head = head("/v1/events", "application/json", 1_000_000)
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats.connect_errors += 1
            await asyncio.sleep(0.5)
            continue
        stats.open += 1
        stats.opened += 1
        answer = asyncio.ensure_future(read_response(reader))
        try:
            if mode == "body":
                writer.write(request_head)
                trickle = b'{"events":['
            else:
                trickle = request_head
            sent = 0
            while not stop.is_set() and not answer.done():
                # The head's or the body's next byte (a body goes on with spaces), one a second.
                writer.write(trickle[sent : sent + 1] if sent < len(trickle) else b" ")
                sent += 1
                await writer.drain()
                await asyncio.wait([answer], timeout=1.0)
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                status = answer.result()[0]
                stats.statuses[status] = stats.statuses.get(status, 0) + 1
            if not stop.is_set():
                stats.closed_by_server += 1
        except (OSError, asyncio.IncompleteReadError):
            stats.closed_by_server += 1
        finally:
            answer.cancel()
            stats.open -= 1
            writer.close()


async def hold_main(args: argparse.Namespace) -> None:
    """Holds the slow clients until --seconds pass or SIGTERM; one JSON line a second to --out."""
    stats = HoldStats()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    for i in range(args.connections):
        mode = "body" if i % 2 == 0 else "head"
        tasks.append(asyncio.ensure_future(slow_client(mode, stats, stop)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)
    started = time.monotonic()
    ready_file = Path(args.out + ".ready")
    with open(args.out, "a", buffering=1) as out:
        while not stop.is_set() and time.monotonic() - started < args.seconds:
            try:
                await asyncio.wait_for(stop.wait(), timeout=1)
            except asyncio.TimeoutError:
                pass
            row = {
                "t": time.time(),
                "connections": args.connections,
                "modes": {"body": (args.connections + 1) // 2, "head": args.connections // 2},
                "open": stats.open,
                "opened": stats.opened,
                "closed_by_server": stats.closed_by_server,
                "connect_errors": stats.connect_errors,
                "answers": {str(k): v for k, v in sorted(stats.statuses.items())},
            }
            out.write(json.dumps(row) + "\n")
            if stats.open >= args.connections and not ready_file.exists():
                ready_file.write_text(str(stats.open))
    stop.set()
    await asyncio.wait(tasks, timeout=5)


def hold(args: argparse.Namespace) -> None:
    asyncio.run(hold_main(args))


# --- The worst mix ----------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


ID_DIGITS = 10  # the request counter patched into every event id


def event_ids(prefix: str, count: int) -> list[str]:
    # Fixed width: "<prefix>-<10-digit request>-<3-digit index>", patched per request.
    return [f"{prefix}-{'0' * ID_DIGITS}-{i:03d}" for i in range(count)]


def proto_event(event_id: str, now_ms: int, user: int, pad: int) -> bytes:
    body = (
        field_bytes(1, event_id.encode())
        + field_varint(2, 9)  # EVENT_TYPE_HEARTBEAT
        + field_varint(3, now_ms)
        + field_bytes(5, f"user-{user:05d}".encode())
        + field_bytes(6, f"device-{user:05d}".encode())
        + field_varint(8, 7)  # PLATFORM_WEB
        + field_bytes(12, b"content-000042")
        + field_varint(14, 123_456)
    )
    if pad:
        body += field_bytes(23, field_bytes(1, b"pad") + field_bytes(2, b"x" * pad))
    return body


def json_event(event_id: str, now_ms: int, user: int, pad: int) -> bytes:
    event = {
        "eventId": event_id,
        "type": "EVENT_TYPE_HEARTBEAT",
        "occurredAtMs": str(now_ms),
        "userId": f"user-{user:05d}",
        "deviceId": f"device-{user:05d}",
        "platform": "PLATFORM_WEB",
        "contentId": "content-000042",
        "positionMs": "123456",
    }
    if pad:
        event["attributes"] = {"pad": "x" * pad}
    return json.dumps(event, separators=(",", ":")).encode()


def proto_batch(events: list[bytes]) -> bytes:
    return b"".join(field_bytes(1, e) for e in events)


def json_batch(events: list[bytes]) -> bytes:
    return b'{"events":[' + b",".join(events) + b"]}"


def largest_pad(build, limit: int) -> int:
    """The largest pad for which build(pad) fits in limit bytes (build grows about linearly
    with pad once pad is not 0)."""
    if len(build(0)) > limit:
        raise ValueError(f"even without padding the body is over {limit} bytes")
    low, high = len(build(1000)), len(build(2000))
    guess = 1000 + int((limit - low) * 1000 / max(1, high - low))
    # Binary search around the linear guess (varint lengths make it only nearly linear).
    lo, hi = max(0, guess - 1000), max(0, guess + 1000)
    if len(build(lo)) > limit:
        lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def largest(build, limit: int) -> bytes:
    return build(largest_pad(build, limit))


class Kind:
    """One kind of request of the mix: a body template and where to patch the request counter."""

    def __init__(self, name: str, content_type: str, body: bytes, query: str = "", prefix: str | None = None):
        self.name = name
        self.content_type = content_type
        self.body = body
        self.path = "/v1/events" + query
        self.offsets = []
        if prefix:
            pattern = re.escape(prefix.encode()) + rb"-0{10}-"
            self.offsets = [m.start() + len(prefix) + 1 for m in re.finditer(pattern, body)]

    def request(self, counter: int) -> bytes:
        if not self.offsets:
            return head(self.path, self.content_type, len(self.body)) + self.body
        body = bytearray(self.body)
        digits = f"{counter:0{ID_DIGITS}d}".encode()
        for offset in self.offsets:
            body[offset : offset + ID_DIGITS] = digits
        return head(self.path, self.content_type, len(body)) + bytes(body)


def mix_kinds(now_ms: int) -> list[Kind]:
    pb, js = "application/x-protobuf", "application/json"
    kinds = []

    def valid(prefix: str, count: int, encode, batch, limit: int = MAX_BODY) -> bytes:
        ids = event_ids(prefix, count)
        return largest(lambda pad: batch([encode(ids[i], now_ms, i, pad) for i in range(count)]), limit)

    # Valid, as large as the limits allow: 500 events in 1 MiB (about 2 KiB each).
    kinds.append(Kind("json 500 x 2 KiB valid", js, valid("jm", MAX_EVENTS, json_event, json_batch), prefix="jm"))
    kinds.append(Kind("proto 500 x 2 KiB valid", pb, valid("pm", MAX_EVENTS, proto_event, proto_batch), prefix="pm"))
    kinds.append(
        Kind("json 500 x 2 KiB ?wait=acked", js, valid("ja", MAX_EVENTS, json_event, json_batch), "?wait=acked", "ja")
    )
    acked = valid("pa", MAX_EVENTS, proto_event, proto_batch)
    kinds.append(Kind("proto 500 x 2 KiB ?wait=acked", pb, acked, "?wait=acked", "pa"))
    # Valid, the largest events: as many events of just under 32 KiB as fit in 1 MiB.
    ids = event_ids("pl", 40)
    pad = largest_pad(lambda pad: proto_event(ids[0], now_ms, 0, pad), MAX_EVENT_BYTES)
    count = MAX_BODY // len(field_bytes(1, proto_event(ids[0], now_ms, 0, pad)))
    body = proto_batch([proto_event(ids[i], now_ms, i, pad) for i in range(count)])
    kinds.append(Kind(f"proto {count} x 32 KiB valid", pb, body, prefix="pl"))
    # Rejected event by event (200, 500 entries in `rejected`): the most answer per request byte.
    kinds.append(Kind("json 500 empty events", js, json_batch([b"{}"] * MAX_EVENTS)))
    kinds.append(Kind("proto 500 empty events", pb, proto_batch([b""] * MAX_EVENTS)))
    long_ids = [json_event(f"{i:03d}-" + "i" * 1800, now_ms, i, 0) for i in range(MAX_EVENTS)]
    kinds.append(Kind("json 500 ids of 1.8 KB", js, json_batch(long_ids)))
    # Refused whole (413 / 400).
    empty_proto = proto_batch([b""] * ((MAX_BODY) // 2))
    kinds.append(Kind(f"proto {MAX_BODY // 2} empty events (1 MiB)", pb, empty_proto))
    n = (MAX_BODY - len(b'{"events":[]}') + 1) // 3
    kinds.append(Kind(f"json {n} empty events (1 MiB)", js, json_batch([b"{}"] * n)))
    few = event_ids("jx", MAX_EVENTS + 1)
    over = json_batch([json_event(few[i], now_ms, i, 0) for i in range(MAX_EVENTS + 1)])
    kinds.append(Kind("json 501 events", js, over, prefix="jx"))
    one = largest(lambda pad: json_batch([json_event("big-json", now_ms, 0, pad)]), MAX_BODY)
    kinds.append(Kind("json 1 event of 1 MiB", js, one))
    one = largest(lambda pad: proto_batch([proto_event("big-proto", now_ms, 0, pad)]), MAX_BODY)
    kinds.append(Kind("proto 1 event of 1 MiB", pb, one))
    kinds.append(Kind("json 1 MiB not JSON", js, b"{" * MAX_BODY))
    kinds.append(Kind("body over the limit (1 MiB + 1)", js, b" " * (MAX_BODY + 1)))
    for kind in kinds:
        assert len(kind.body) <= MAX_BODY or "over the limit" in kind.name, (kind.name, len(kind.body))
    return kinds


class MixStats:
    def __init__(self) -> None:
        self.by_kind: dict[str, dict[str, int]] = {}
        self.sent: dict[str, int] = {}
        self.held_open = 0
        self.held_samples: list[int] = []
        self.held_opened = 0
        self.held_answers: dict[int, int] = {}
        self.errors = 0

    def count(self, kind: str, status: int | str, response_bytes: int = 0) -> None:
        entry = self.by_kind.setdefault(kind, {"max_response_bytes": 0})
        key = str(status)
        entry[key] = entry.get(key, 0) + 1
        entry["max_response_bytes"] = max(entry["max_response_bytes"], response_bytes)


async def mix_worker(index: int, kinds: list[Kind], stats: MixStats, stop: asyncio.Event, counter: list[int]) -> None:
    host, port = target()
    position = index
    reader = writer = None
    while not stop.is_set():
        kind = kinds[position % len(kinds)]
        position += 1
        stats.sent[kind.name] = stats.sent.get(kind.name, 0) + 1
        # A kept-alive connection may have been closed by the collector after an early answer
        # (413 before the body was read): then the request is sent again on a new connection.
        for attempt in (1, 2):
            fresh = writer is None
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                counter[0] += 1
                writer.write(kind.request(counter[0]))
                await writer.drain()
                status, length, close = await asyncio.wait_for(read_response(reader), timeout=60)
                stats.count(kind.name, status, length)
                if close or status == 413:
                    writer.close()
                    writer = None
                break
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                if writer is not None:
                    writer.close()
                writer = None
                if fresh or attempt == 2:
                    stats.count(kind.name, "closed")
                    await asyncio.sleep(0.05)
                    break
    if writer is not None:
        writer.close()


async def held_body(body: bytes, stats: MixStats, stop: asyncio.Event) -> None:
    """Sends a 1 MiB body but its last byte and holds it until the collector gives up (408)."""
    host, port = target()
    request_head = head("/v1/events", "application/json", len(body))
    most = memoryview(body)[:-1]
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            stats.errors += 1
            await asyncio.sleep(0.5)
            continue
        stats.held_open += 1
        stats.held_opened += 1
        try:
            writer.write(request_head)
            writer.write(most)
            await writer.drain()
            answer = asyncio.ensure_future(read_response(reader))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait([answer, stopping], return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if answer.done() and answer.exception() is None:
                status = answer.result()[0]
                stats.held_answers[status] = stats.held_answers.get(status, 0) + 1
            answer.cancel()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            stats.held_open -= 1
            writer.close()


async def mix_main(args: argparse.Namespace) -> None:
    now_ms = int(time.time() * 1000)
    kinds = mix_kinds(now_ms)
    stats = MixStats()
    stop = asyncio.Event()
    counter = [0]
    held_template = kinds[0].body  # a valid 1 MiB JSON batch
    tasks = [asyncio.ensure_future(held_body(held_template, stats, stop)) for _ in range(args.held)]
    tasks += [asyncio.ensure_future(mix_worker(i, kinds, stats, stop, counter)) for i in range(args.workers)]
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:
        await asyncio.sleep(1)
        stats.held_samples.append(stats.held_open)
    stop.set()
    # Requests still waiting (for Kinesis, with ?wait=acked) are left unanswered.
    _, pending = await asyncio.wait(tasks, timeout=2)
    for task in pending:
        task.cancel()
    Path(args.out).write_text(
        json.dumps(
            {
                "workers": args.workers,
                "held": args.held,
                "held_open_max": max(stats.held_samples or [0]),
                "held_opened": stats.held_opened,
                "held_answers": {str(k): v for k, v in sorted(stats.held_answers.items())},
                "kinds": {k.name: len(k.body) for k in kinds},
                "by_kind": stats.by_kind,
                "sent": stats.sent,
                "requests": counter[0],
            }
        )
    )


def mix(args: argparse.Namespace) -> None:
    asyncio.run(mix_main(args))


# --- wrk's summary, and the table ---------------------------------------------------------------

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def duration_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_wrk(text: str) -> dict:
    out: dict = {"latency_ms": {}}
    for pct in ("50", "75", "90", "99"):
        match = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.M)
        if match:
            out["latency_ms"][pct] = duration_ms(match.group(1))
    match = re.search(r"(\d+) requests in ([\d.]+\w+),", text)
    if match:
        out["requests"] = int(match.group(1))
        out["seconds"] = duration_ms(match.group(2)) / 1000
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    out["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    out["socket_errors"] = sum(int(x) for x in match.groups()) if match else 0
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["requests_per_s"] = float(match.group(1)) if match else 0.0
    return out


def wrk_summary(args: argparse.Namespace) -> None:
    print(json.dumps(parse_wrk(Path(args.file).read_text())))


def samples_between(samples: list[dict], phase: dict) -> list[dict]:
    """The samples of the phase's collector taken during the phase."""
    return [
        s
        for s in samples
        if phase["start"] <= s["t"] <= phase["end"]
        and s.get("pid") == phase.get("pid")
        and s.get("collector_cpu_s") is not None
    ]


def cpu_share(rows: list[dict], key: str) -> float:
    """Cores used by `key` between the first and last row (1.0 = one core busy)."""
    if len(rows) < 2 or rows[0].get(key) is None or rows[-1].get(key) is None:
        return float("nan")
    return (rows[-1][key] - rows[0][key]) / (rows[-1]["t"] - rows[0]["t"])


def clients_share(rows: list[dict]) -> float:
    """Cores used by the load generators between the first and last row. They come and go: each
    counts from its first sample (0 if it started after the first row) to its last."""
    if len(rows) < 2:
        return float("nan")
    first = rows[0].get("clients", {})
    last_seen: dict[str, float] = {}
    for row in rows:
        last_seen.update(row.get("clients", {}))
    used = sum(cpu - first.get(pid, 0.0) for pid, cpu in last_seen.items())
    return used / (rows[-1]["t"] - rows[0]["t"])


def counter_of(row: dict, name: str) -> float:
    return row.get("metrics", {}).get(name, 0.0)


def report(args: argparse.Namespace) -> None:
    work = Path(args.work)
    samples = [json.loads(line) for line in (work / "samples.jsonl").read_text().splitlines() if line.strip()]
    phases = [json.loads(line) for line in (work / "phases.jsonl").read_text().splitlines() if line.strip()]
    lines = []
    header = (
        f"{'run':<28} {'req/s':>7} {'200 req/s':>9} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'non-2xx':>7} {'put/s':>7} {'peak MB':>7} {'ev/CPU-s':>8} {'cores: coll':>11} {'kinesis':>7} "
        f"{'LS rest':>7} {'clients':>7} {'all':>5}"
    )
    lines += [header, "-" * len(header)]
    notes = []
    for phase in phases:
        rows = samples_between(samples, phase)
        name = phase["name"]
        if phase.get("wrk"):
            w = parse_wrk(Path(phase["wrk"]).read_text())
            before, after = phase["metrics_before"], phase["metrics_after"]
            accepted = after.get("collector_events_accepted", 0) - before.get("collector_events_accepted", 0)
            put = after.get("UserRecordsPut", 0) - before.get("UserRecordsPut", 0)
            seconds = w.get("seconds") or (phase["end"] - phase["start"])
            ok = w.get("requests", 0) - w["non_2xx"]
            lat = w["latency_ms"]
            busy = cpu_share(rows, "machine_busy_s")
            collector_cores = cpu_share(rows, "collector_cpu_s")
            lines.append(
                f"{name:<28} {w['requests_per_s']:>7,.0f} {ok / seconds:>9,.0f} {accepted / seconds:>9,.0f} "
                f"{lat.get('50', float('nan')):>7.1f} {lat.get('99', float('nan')):>7.1f} {w['non_2xx']:>7,} "
                f"{put / seconds:>7,.0f} {phase.get('vmhwm_kb', 0) / 1024:>7.0f} "
                f"{accepted / seconds / collector_cores if collector_cores else float('nan'):>8,.0f} "
                f"{collector_cores:>11.2f} {cpu_share(rows, 'kinesis_cpu_s'):>7.2f} "
                f"{cpu_share(rows, 'localstack_rest_cpu_s'):>7.2f} {clients_share(rows):>7.2f} {busy:>5.2f}"
            )
            # Accepted events per second over the run, from the 1 s samples: is the rate sustained?
            if len(rows) >= 4:
                third = len(rows) // 3
                rates = []
                for a, b in ((rows[0], rows[third]), (rows[third], rows[2 * third]), (rows[2 * third], rows[-1])):
                    dt = b["t"] - a["t"]
                    rates.append(
                        (counter_of(b, "collector_events_accepted") - counter_of(a, "collector_events_accepted")) / dt
                        if dt
                        else 0
                    )
                pending = max(counter_of(r, "UserRecordsPending") for r in rows)
                full = after.get("collector_events_rejected.producer_full", 0) - before.get(
                    "collector_events_rejected.producer_full", 0
                )
                delta = lambda key: after.get(key, 0) - before.get(key, 0)  # noqa: E731
                errors = {
                    k.split(".", 1)[1]: int(delta(k)) for k in after if k.startswith("ErrorsByCode.") and delta(k)
                }
                notes.append(
                    f"{name}: accepted events/s by thirds {' / '.join(f'{r:,.0f}' for r in rates)}; "
                    f"most records pending in the producer {pending:,.0f}; producer_full rejections {full:,.0f}; "
                    f"records expired "
                    f"(TTL) {delta('UserRecordExpired'):,.0f}; failed PutRecords attempts by code "
                    f"{errors or 'none'}; wrk socket errors {w['socket_errors']}"
                )
        if phase.get("hold"):
            held = [
                r
                for r in (json.loads(line) for line in Path(phase["hold"]).read_text().splitlines() if line.strip())
                if phase["start"] <= r["t"] <= phase["end"]
            ]
            if held:
                first, last = held[0], held[-1]
                opened = [r["open"] for r in held]
                answers = {k: v - first["answers"].get(k, 0) for k, v in last["answers"].items()}
                answers = {k: v for k, v in answers.items() if v}
                notes.append(
                    f"{name}: slow clients open min/mean/max {min(opened)}/{sum(opened) / len(opened):.0f}/"
                    f"{max(opened)} of {last['connections']} ({last['modes']['body']} sending a body, "
                    f"{last['modes']['head']} a head, 1 byte/s); closed by the collector and re-opened "
                    f"{last['closed_by_server'] - first['closed_by_server']} times (answers {answers or 'none'}); "
                    f"connect errors {last['connect_errors'] - first['connect_errors']}"
                )
        if phase.get("mix"):
            m = json.loads(Path(phase["mix"]).read_text())
            peak = phase.get("vmhwm_kb", 0) / 1024
            base = phase.get("rss_before_kb", 0) / 1024
            notes.append(
                f"{name}: collector peak RSS (VmHWM) {peak:,.0f} MB (RSS {base:,.0f} MB before); "
                f"{m['workers']} connections cycling through {len(m['kinds'])} kinds ({m['requests']:,} requests), "
                f"{m['held']} connections holding a 1 MiB body but its last byte (most held at once "
                f"{m['held_open_max']}, answers {m['held_answers']}); most records pending in the producer "
                f"{max((counter_of(r, 'UserRecordsPending') for r in rows), default=0):,.0f}; cores: collector "
                f"{cpu_share(rows, 'collector_cpu_s'):.2f}, kinesis {cpu_share(rows, 'kinesis_cpu_s'):.2f}, "
                f"clients {clients_share(rows):.2f}"
            )
            for kind, size in m["kinds"].items():
                statuses = m["by_kind"].get(kind, {"max_response_bytes": 0})
                answered = {k: v for k, v in sorted(statuses.items()) if k != "max_response_bytes"}
                waiting = m["sent"].get(kind, 0) - sum(answered.values())
                if waiting:
                    answered["unanswered at the end"] = waiting
                counts = ", ".join(f"{k}: {v}" for k, v in answered.items())
                notes.append(
                    f"    {kind:<34} body {size:>9,} B  answers {counts or 'none'}; largest answer "
                    f"{statuses['max_response_bytes']:,} B"
                )
    log = work / "collector.log"
    if log.exists():
        total = unput = 0
        with open(log, "rb") as f:
            for line in f:
                total += 1
                unput += b"could not be put into Kinesis" in line
        notes.append(
            f"collector log: {total:,} lines, {log.stat().st_size / 1e6:,.1f} MB; {unput:,} of them "
            f"'an accepted event could not be put into Kinesis' (at most one per 10 s; collector_events_failed counts them all)"
        )
    load = [s["loadavg"] for s in samples]
    machine = (
        f"{os.cpu_count()} CPUs, load average {min(load or [0]):.1f}-{max(load or [0]):.1f} during the runs; "
        f"'cores' columns are CPU seconds per second (1.00 = one core), 'all' the whole machine"
    )
    text = "\n".join(lines + [""] + notes + ["", machine]) + "\n"
    (work / "results.txt").write_text(text)
    print(text, end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("create")
    p.add_argument("stream")
    p.add_argument("--shards", type=int, default=4)
    p.set_defaults(run=create)
    p = commands.add_parser("delete")
    p.add_argument("stream")
    p.set_defaults(run=delete)
    p = commands.add_parser("metrics")
    p.set_defaults(run=metrics)
    p = commands.add_parser("sample")
    p.add_argument("--collector", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=1.0)
    p.set_defaults(run=sample)
    p = commands.add_parser("hold")
    p.add_argument("--connections", type=int, default=500)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--out", required=True)
    p.set_defaults(run=hold)
    p = commands.add_parser("mix")
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--held", type=int, default=256)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--out", required=True)
    p.set_defaults(run=mix)
    p = commands.add_parser("wrk-summary")
    p.add_argument("file")
    p.set_defaults(run=wrk_summary)
    p = commands.add_parser("report")
    p.add_argument("work")
    p.set_defaults(run=report)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
