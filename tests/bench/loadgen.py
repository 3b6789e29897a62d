"""Load generator for ``make bench``: POST pre-signed requests over N connections for T seconds.

Runs in a process of its own (the server under test must not share its interpreter). Prints one
JSON line: requests answered 2xx, events in them, other answers, latency percentiles.

    python tests/bench/loadgen.py URL BODIES.jsonl --connections 64 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("requests", type=Path, help="JSON lines: {body, headers, events}")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    prepared = [json.loads(line) for line in args.requests.read_text().splitlines()]
    requests = [(r["body"].encode(), r["headers"], r["events"]) for r in prepared]
    latencies: list[float] = []
    ok_requests = ok_events = 0
    others: dict[str, int] = {}
    answered_ids: list[str] = []
    next_index = 0
    deadline = time.monotonic() + args.seconds
    connector = aiohttp.TCPConnector(limit=args.connections)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal next_index, ok_requests, ok_events
            while time.monotonic() < deadline and next_index < len(requests):
                body, headers, events = requests[next_index]
                next_index += 1
                started = time.perf_counter()
                try:
                    async with session.post(args.url, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError) as exc:
                    others[type(exc).__name__] = others.get(type(exc).__name__, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)
                if 200 <= status < 300:
                    ok_requests += 1
                    ok_events += len(events)
                    answered_ids.extend(events)
                else:
                    others[str(status)] = others.get(str(status), 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(args.connections)))
        elapsed = time.monotonic() - started
    latencies.sort()

    def pct(p: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else 0.0
        )

    print(
        json.dumps(
            {
                "seconds": elapsed,
                "requests": ok_requests,
                "events": ok_events,
                "others": others,
                "p50_ms": pct(0.50),
                "p99_ms": pct(0.99),
                "ids": answered_ids,
                "exhausted": next_index >= len(requests),
            }
        )
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
