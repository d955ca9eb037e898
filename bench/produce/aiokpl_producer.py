"""Puts a JSON Lines file of user records into a stream with aiokpl 0.2.0, the way `ktk produce` does.

Input lines are `{"partition_key", "explicit_hash_key"?, "data": "<base64>"}` (what `ktk produce`
reads). Like `ktk produce`, it keeps at most --max-outstanding receipts in flight (and sets aiokpl's
own `max_outstanding_records` to the same), then flushes and waits for every outcome. Prints one
JSON summary with the field names of `ktk produce --summary-json`.

aiokpl has no call counter, so PutRecords calls and the Kinesis records they carry are counted
with a botocore `before-parameter-build` event hook on the producer's client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import sys
import time

from aiokpl import Config, Producer


async def produce(args: argparse.Namespace) -> dict:
    rate = args.rate_limit / 100.0
    config = Config(
        region=os.environ.get("AWS_REGION", "us-east-1"),
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
        aggregation_enabled=not args.no_aggregation,
        record_max_buffered_time_ms=float(args.max_buffered_ms),
        max_outstanding_records=args.max_outstanding,
        # aiokpl takes absolute per-shard limits; scale its defaults (the Kinesis quotas) the way
        # the KPL's RateLimit percentage does.
        rate_limit_records_per_sec_per_shard=1_000.0 * rate,
        rate_limit_bytes_per_sec_per_shard=1_048_576.0 * rate,
    )
    calls = 0
    kinesis_records = 0

    # `before-parameter-build` sees the API parameters (`before-call` only the serialised body).
    def count_call(params, **_kwargs):
        nonlocal calls, kinesis_records
        calls += 1
        kinesis_records += len(params.get("Records", ()))

    stats = collections.Counter()
    failures: list[str] = []

    def settle(number: int, result) -> None:
        if result.success:
            stats["put"] += 1
            stats["retries"] += len(result.attempts) - 1
        else:
            stats["failed"] += 1
            last = result.attempts[-1] if result.attempts else None
            if last is not None and last.error_code == "Expired":
                stats["expired"] += 1
            failures.append(f"line {number}: not put: {last.error_code if last else '?'}: {last.error_message if last else ''}")

    lines = malformed = 0
    window: collections.deque = collections.deque()
    async with Producer(config) as producer:
        # A private attribute: the only handle on aiokpl's botocore client.
        producer._kinesis_client.meta.events.register("before-parameter-build.kinesis.PutRecords", count_call)
        started = time.perf_counter()
        with open(args.input, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                lines += 1
                try:
                    record = json.loads(line)
                    data = base64.b64decode(record["data"], validate=True)
                    key = record["partition_key"]
                    ehk = record.get("explicit_hash_key")
                except (ValueError, KeyError) as error:
                    malformed += 1
                    print(f"line {number}: {error}", file=sys.stderr)
                    continue
                while len(window) >= args.max_outstanding:
                    n, outcome = window.popleft()
                    settle(n, await outcome.wait())
                outcome = await producer.put_record(
                    stream=args.stream, partition_key=key, data=data, explicit_hash_key=ehk
                )
                window.append((number, outcome))
        # flush() sends what is buffered but does not wait for the outcomes.
        await producer.flush()
        while window:
            n, outcome = window.popleft()
            settle(n, await outcome.wait())
        elapsed = time.perf_counter() - started
    for failure in failures[:20]:
        print(failure, file=sys.stderr)
    put = stats["put"]
    return {
        "lines": lines,
        "malformed_lines": malformed,
        "user_records": put,
        "kinesis_records": kinesis_records,
        "put_records_calls": calls,
        "retries": stats["retries"],
        "failures": stats["failed"],
        "expired": stats["expired"],
        "elapsed_seconds": elapsed,
        "user_records_per_second": put / elapsed if elapsed else 0.0,
        # Kinesis records sent, retries included (aiokpl does not report the accepted ones alone).
        "user_records_per_kinesis_record": put / kinesis_records if kinesis_records else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--input", required=True, help="JSON Lines file of user records")
    parser.add_argument("--no-aggregation", action="store_true")
    parser.add_argument("--max-buffered-ms", type=int, default=100)
    parser.add_argument("--rate-limit", type=int, default=100, help="percent of the shard quotas (aiokpl: 100)")
    parser.add_argument("--max-outstanding", type=int, default=10_000)
    args = parser.parse_args()
    summary = asyncio.run(produce(args))
    print(json.dumps(summary))
    sys.exit(0 if summary["failures"] == 0 and summary["malformed_lines"] == 0 else 1)


if __name__ == "__main__":
    main()
