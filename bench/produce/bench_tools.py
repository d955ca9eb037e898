"""Helpers for run.sh: the dataset, streams on LocalStack, and reading a stream back.

    bench_tools.py dataset --records N --keys K --size BYTES --seed S > data.jsonl
    bench_tools.py create  STREAM --shards N      # waits until ACTIVE
    bench_tools.py verify  STREAM data.jsonl      # every record exactly once? prints JSON
    bench_tools.py delete  STREAM
    bench_tools.py table   results.jsonl          # the comparison table

AWS settings come from the environment (AWS_ENDPOINT_URL, AWS_REGION, credentials). Reading back
uses botocore (installed with aiobotocore) and deaggregates with Amazon's `aws_kinesis_agg`, so the
check does not rely on either producer's own codec.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import string
import sys
import time

import botocore.session


def client():
    session = botocore.session.get_session()
    return session.create_client(
        "kinesis",
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566"),
    )


def dataset(args: argparse.Namespace) -> None:
    # Seeded: the same file for every tool and every run with the same arguments.
    rng = random.Random(args.seed)
    alphabet = (string.ascii_letters + string.digits).encode()
    out = sys.stdout
    for i in range(args.records):
        key = f"pk-{rng.randrange(args.keys):04d}"
        head = f"{i:08d}|".encode()
        data = head + bytes(rng.choices(alphabet, k=args.size - len(head)))
        out.write(json.dumps({"partition_key": key, "data": base64.b64encode(data).decode()}, separators=(",", ":")))
        out.write("\n")


def create(args: argparse.Namespace) -> None:
    kinesis = client()
    kinesis.create_stream(StreamName=args.stream, ShardCount=args.shards)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = kinesis.describe_stream_summary(StreamName=args.stream)["StreamDescriptionSummary"]["StreamStatus"]
        if status == "ACTIVE":
            return
        time.sleep(0.1)
    sys.exit(f"stream {args.stream} did not become ACTIVE within 60 s")


def delete(args: argparse.Namespace) -> None:
    try:
        client().delete_stream(StreamName=args.stream, EnforceConsumerDeletion=True)
    except Exception as error:  # cleanup must not hide the result
        print(f"delete {args.stream}: {error}", file=sys.stderr)


def verify(args: argparse.Namespace) -> None:
    from aws_kinesis_agg.deaggregator import iter_deaggregate_records

    expected: dict[bytes, str] = {}
    with open(args.dataset, "rb") as f:
        for line in f:
            record = json.loads(line)
            expected[base64.b64decode(record["data"])] = record["partition_key"]

    kinesis = client()
    shards = kinesis.list_shards(StreamName=args.stream)["Shards"]
    seen: dict[bytes, int] = {}
    kinesis_records = 0
    wrong_key = 0
    unexpected = 0
    for shard in shards:
        iterator = kinesis.get_shard_iterator(
            StreamName=args.stream, ShardId=shard["ShardId"], ShardIteratorType="TRIM_HORIZON"
        )["ShardIterator"]
        quiet = 0
        while iterator and quiet < 2:
            page = kinesis.get_records(ShardIterator=iterator, Limit=10_000)
            records = page["Records"]
            if not records and page.get("MillisBehindLatest", 0) == 0:
                quiet += 1
            kinesis_records += len(records)
            for user in iter_deaggregate_records(records, data_format="Boto3"):
                k = user["kinesis"]
                data = base64.b64decode(k["data"]) if k.get("aggregated") else k["data"]
                want = expected.get(data)
                if want is None:
                    unexpected += 1
                    continue
                if want != k["partitionKey"]:
                    wrong_key += 1
                seen[data] = seen.get(data, 0) + 1
            iterator = page.get("NextShardIterator")
    result = {
        "stream": args.stream,
        "expected": len(expected),
        "found": len(seen),
        "missing": len(expected) - len(seen),
        "duplicated": sum(1 for n in seen.values() if n > 1),
        "unexpected": unexpected,
        "wrong_partition_key": wrong_key,
        "kinesis_records_in_stream": kinesis_records,
    }
    result["ok"] = result["missing"] == result["duplicated"] == result["unexpected"] == result["wrong_partition_key"] == 0
    print(json.dumps(result))


def table(args: argparse.Namespace) -> None:
    rows = [json.loads(line) for line in open(args.results) if line.strip()]
    by_tool = {r["tool"]: r for r in rows}
    header = (
        f"{'tool':<8} {'user rec/s':>11} {'rec/s (wall)':>13} {'calls/10k rec':>14} {'user rec/Kinesis rec':>21} "
        f"{'peak RSS MB':>12} {'CPU s':>7} {'verified':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        s = r["summary"]
        calls = s["put_records_calls"] * 10_000 / max(s["user_records"], 1)
        print(
            f"{r['tool']:<8} {s['user_records_per_second']:>11,.0f} {r['records_per_wall_second']:>13,.0f} "
            f"{calls:>14.2f} {s['user_records_per_kinesis_record']:>21.1f} {r['peak_rss_mb']:>12.1f} "
            f"{r['cpu_seconds']:>7.2f} {'yes' if r['verify']['ok'] else 'NO':>9}"
        )
    if "ktk" in by_tool and "aiokpl" in by_tool:
        k, a = by_tool["ktk"], by_tool["aiokpl"]
        ks, as_ = k["summary"], a["summary"]
        ratio = lambda x, y: x / y if y else float("nan")  # noqa: E731
        k_calls = ks["put_records_calls"] / max(ks["user_records"], 1)
        a_calls = as_["put_records_calls"] / max(as_["user_records"], 1)
        print(
            f"{'ktk/aiokpl':<8} {ratio(ks['user_records_per_second'], as_['user_records_per_second']):>10.2f}x "
            f"{ratio(k['records_per_wall_second'], a['records_per_wall_second']):>12.2f}x "
            f"{ratio(k_calls, a_calls):>13.2f}x "
            f"{ratio(ks['user_records_per_kinesis_record'], as_['user_records_per_kinesis_record']):>20.2f}x "
            f"{ratio(k['peak_rss_mb'], a['peak_rss_mb']):>11.2f}x {ratio(k['cpu_seconds'], a['cpu_seconds']):>6.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("dataset")
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=1_000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--seed", type=int, default=20_240_601)
    p.set_defaults(run=dataset)
    p = commands.add_parser("create")
    p.add_argument("stream")
    p.add_argument("--shards", type=int, default=4)
    p.set_defaults(run=create)
    p = commands.add_parser("delete")
    p.add_argument("stream")
    p.set_defaults(run=delete)
    p = commands.add_parser("verify")
    p.add_argument("stream")
    p.add_argument("dataset")
    p.set_defaults(run=verify)
    p = commands.add_parser("table")
    p.add_argument("results")
    p.set_defaults(run=table)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
