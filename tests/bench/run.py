"""``make bench``: events/s, latency and memory, measured in one run on this machine.

(a) aio-pika alone, persistent messages with confirms, 64 in flight;
(b) the plain aiohttp handler that publishes with aio-pika and awaits the confirm (baseline);
(c) events-bridge, single deliveries, every safety on (signatures, recipient, confirms,
    persistent messages, outbox in fallback, dedup);
(d) events-bridge, batch deliveries of 20 events;
(e) the daemon's RSS under steady load (``BENCH_MEMORY_SECONDS``, default 300; 0 skips it).

HTTP scenarios use 64 connections and pre-signed requests (signed once, cached in
``.local/bench/``); the load generator runs in a process of its own. Absolute figures on a shared
2-core machine mislead: compare the ratios, which come from the same run. Every answered event
is checked to be in the queue. Results go to ``.local/bench.json``.

    BRIDGE_AMQP_URL=amqp://… python tests/bench/run.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = ROOT / ".local" / "bench"
CLIENT_ID = "bench-client"
KEY_PATH = "/prod/keys/pub-key-bench.pem"
LIGHTROOM = orjson.loads(
    (
        ROOT / "tests/data/adobe-samples/events/imaging_lightroom-job-status_succeeded.json"
    ).read_bytes()
)


def _key() -> rsa.RSAPrivateKey:
    CACHE.mkdir(parents=True, exist_ok=True)
    private = CACHE / "bench.key.pem"
    if not private.exists():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        private.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    loaded = serialization.load_pem_private_key(private.read_bytes(), password=None)
    assert isinstance(loaded, rsa.RSAPrivateKey)
    key = loaded
    public = CACHE / "keys" / KEY_PATH.lstrip("/")
    public.parent.mkdir(parents=True, exist_ok=True)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key


def _sign_chunk(args: tuple[int, int, int, str]) -> list[str]:
    start, count, batch, tag = args
    key = _key()
    lines = []
    for n in range(start, start + count):
        events = []
        docs = []
        for j in range(batch):
            event_id = f"{tag}-{n}-{j}"
            status = ("succeeded", "failed")[(n + j) % 2]
            docs.append(
                {
                    **LIGHTROOM,
                    "event_id": event_id,
                    "recipientclientid": CLIENT_ID,
                    "event": {
                        **LIGHTROOM["event"],
                        "body": {
                            **LIGHTROOM["event"]["body"],
                            "jobId": event_id,
                            "outputs": [{"status": status}],
                        },
                    },
                }
            )
            events.append(event_id)
        body = orjson.dumps(docs[0] if batch == 1 else docs)
        signature = base64.b64encode(key.sign(body, padding.PKCS1v15(), hashes.SHA256())).decode()
        headers = {
            "content-type": "application/json",
            "x-adobe-digital-signature-1": signature,
            "x-adobe-digital-signature-2": signature,
            "x-adobe-public-key1-path": KEY_PATH,
            "x-adobe-public-key2-path": KEY_PATH,
        }
        lines.append(json.dumps({"body": body.decode(), "headers": headers, "events": events}))
    return lines


def requests_file(name: str, count: int, batch: int) -> Path:
    """Pre-signed requests, made once (signing is slow) and kept in .local/bench/."""
    path = CACHE / f"{name}-{count}x{batch}.jsonl"
    if path.exists():
        return path
    _key()
    print(
        f"bench: signing {count} {name} requests once (cached in {path.parent})",
        file=sys.stderr,
        flush=True,
    )
    tag = uuid.uuid4().hex[:6]
    chunk = max(1, count // 8)
    jobs = [(s, min(chunk, count - s), batch, tag) for s in range(0, count, chunk)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        lines = [line for part in pool.map(_sign_chunk, jobs) for line in part]
    path.write_text("\n".join(lines) + "\n")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load(url: str, requests: Path, seconds: float) -> dict[str, Any]:
    done = subprocess.run(
        [
            sys.executable,
            str(HERE / "loadgen.py"),
            url,
            str(requests),
            "--connections",
            "64",
            "--seconds",
            str(seconds),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    )
    result: dict[str, Any] = json.loads(done.stdout)
    return result


async def declare(amqp_url: str, prefix: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        unrouted = await channel.declare_exchange(f"{prefix}.unrouted", "fanout", durable=True)
        queue = await channel.declare_queue(
            f"{prefix}.unrouted", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(unrouted)
        events = await channel.declare_exchange(
            f"{prefix}.events",
            "topic",
            durable=True,
            arguments={"alternate-exchange": f"{prefix}.unrouted"},
        )
        sink = await channel.declare_queue(
            f"{prefix}.sink", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await sink.bind(events, routing_key="#")


async def queued(amqp_url: str, prefix: str) -> int:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for _ in range(50):  # quorum queues report their length with a little delay
            queue = await channel.declare_queue(f"{prefix}.sink", passive=True)
            count = queue.declaration_result.message_count or 0
            await asyncio.sleep(0.2)
            again = await channel.declare_queue(f"{prefix}.sink", passive=True)
            if again.declaration_result.message_count == count:
                return count
        return count


async def cleanup(amqp_url: str, prefix: str) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        for name in ("sink", "unrouted"):
            await channel.queue_delete(f"{prefix}.{name}")
        for name in ("events", "unrouted"):
            await channel.exchange_delete(f"{prefix}.{name}")


async def bench_aio_pika(amqp_url: str, prefix: str, seconds: float) -> dict[str, Any]:
    body = orjson.dumps(LIGHTROOM)
    connection = await aio_pika.connect(amqp_url)
    sent = 0
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(f"{prefix}.events")
        deadline = time.monotonic() + seconds
        started = time.monotonic()

        async def worker() -> None:
            nonlocal sent
            while time.monotonic() < deadline:
                await exchange.publish(
                    aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                    routing_key="bench.none",
                )
                sent += 1

        await asyncio.gather(*(worker() for _ in range(64)))
        elapsed = time.monotonic() - started
    return {"events_per_s": sent / elapsed, "events": sent}


def bridge_config(prefix: str, port: int, amqp_url: str, outbox: str) -> Path:
    text = f"""
broker: {{url: "{amqp_url}", exchange: {prefix}.events, unrouted_exchange: {prefix}.unrouted,
          unrouted_queue: {prefix}.unrouted}}
server: {{port: {port}, max_in_flight: 4096}}
verification: {{key_base_url: "file://{CACHE / "keys"}"}}
registrations: [{{name: bench, path: /webhook, client_ids: [{CLIENT_ID}]}}]
outbox: {{dir: "{outbox}", mode: fallback}}
logging: {{format: json, level: warning}}
topology:
  exchanges:
    - {{name: {prefix}.events, type: topic, alternate_exchange: {prefix}.unrouted}}
    - {{name: {prefix}.unrouted, type: fanout}}
"""
    path = Path(tempfile.mkstemp(suffix=".yaml")[1])
    path.write_text(text)
    return path


def wait_ready(url: str, seconds: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} never became ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(seconds: float, memory_seconds: float) -> dict[str, Any]:
    amqp_url = os.environ.get("BRIDGE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    results: dict[str, Any] = {"seconds": seconds}
    singles = requests_file("single", int(seconds * 4000), 1)
    batches = requests_file("batch20", int(seconds * 400), 20)

    prefix = f"bench.{uuid.uuid4().hex[:6]}"
    await declare(amqp_url, prefix)
    try:
        print("bench: (a) aio-pika alone", file=sys.stderr, flush=True)
        results["a_aio_pika"] = await bench_aio_pika(amqp_url, prefix, seconds)

        print("bench: (b) plain aiohttp + aio-pika handler", file=sys.stderr, flush=True)
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, str(HERE / "baseline.py"), amqp_url, f"{prefix}.events", str(port)]
        )
        try:
            await asyncio.sleep(1.5)
            out = await asyncio.to_thread(
                load, f"http://127.0.0.1:{port}/webhook", singles, seconds
            )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)
        results["b_baseline"] = {**_rates(out), "ids": None}

        for key, requests, label in (
            ("c_bridge_single", singles, "(c) single deliveries"),
            ("d_bridge_batch20", batches, "(d) batches of 20"),
        ):
            print(f"bench: {label}", file=sys.stderr, flush=True)
            before = await queued(amqp_url, prefix)
            port = free_port()
            config = bridge_config(prefix, port, amqp_url, tempfile.mkdtemp())
            daemon = subprocess.Popen(
                [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
                cwd=ROOT,
                stderr=subprocess.DEVNULL,
            )
            try:
                await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz")
                out = await asyncio.to_thread(
                    load, f"http://127.0.0.1:{port}/webhook", requests, seconds
                )
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=60)
            after = await queued(amqp_url, prefix)
            results[key] = {**_rates(out), "in_queue": after - before}
            if after - before < out["events"]:
                raise SystemExit(
                    f"bench: {key}: {out['events']} events answered, only "
                    f"{after - before} in the queue"
                )
        if memory_seconds > 0:
            results["e_memory"] = await memory(amqp_url, prefix, memory_seconds)
    finally:
        await cleanup(amqp_url, prefix)
    a = results["a_aio_pika"]["events_per_s"]
    b = results["b_baseline"]["events_per_s"]
    c = results["c_bridge_single"]["events_per_s"]
    d = results["d_bridge_batch20"]["events_per_s"]
    results["ratios"] = {"c/b": c / b, "c/a": c / a, "d/a": d / a}
    return results


async def memory(amqp_url: str, prefix: str, seconds: float) -> dict[str, Any]:
    print(f"bench: (e) memory under steady load for {seconds:.0f} s", file=sys.stderr, flush=True)
    requests = requests_file("memory", int(seconds * 150), 1)
    port = free_port()
    config = bridge_config(prefix, port, amqp_url, tempfile.mkdtemp())
    daemon = subprocess.Popen(
        [sys.executable, "-m", "bridge", "serve", "--config", str(config)],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    samples: list[tuple[float, float]] = []
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz")
        started = time.monotonic()
        # A gentle steady load: 4 connections over the whole window.
        loader = asyncio.create_task(
            asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    str(HERE / "loadgen.py"),
                    f"http://127.0.0.1:{port}/webhook",
                    str(requests),
                    "--connections",
                    "4",
                    "--seconds",
                    str(seconds),
                ],
                capture_output=True,
                check=True,
            )
        )
        while not loader.done():
            samples.append((time.monotonic() - started, rss_mb(daemon.pid)))
            await asyncio.sleep(5)
        await loader
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    first_minute = next((mb for t, mb in samples if t >= min(60, seconds / 5)), samples[0][1])
    last = samples[-1][1]
    return {
        "rss_mb_after_first_minute": first_minute,
        "rss_mb_at_end": last,
        "growth": last / first_minute - 1,
        "samples": samples,
    }


def _rates(out: dict[str, Any]) -> dict[str, Any]:
    return {
        "events_per_s": out["events"] / out["seconds"],
        "requests_per_s": out["requests"] / out["seconds"],
        "p50_ms": out["p50_ms"],
        "p99_ms": out["p99_ms"],
        "events": out["events"],
        "others": out["others"],
        "exhausted": out["exhausted"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="per scenario")
    args = parser.parse_args()
    memory_seconds = float(os.environ.get("BENCH_MEMORY_SECONDS", "300"))
    results = asyncio.run(run(args.seconds, memory_seconds))
    out = ROOT / ".local" / "bench.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{'scenario':<28}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for key in ("a_aio_pika", "b_baseline", "c_bridge_single", "d_bridge_batch20"):
        row = results[key]
        print(
            f"{key:<28}{row['events_per_s']:>10.0f}{row.get('p50_ms', 0):>9.1f}"
            f"{row.get('p99_ms', 0):>9.1f}"
        )
    ratios = results["ratios"]
    print(
        f"\nratios: (c)/(b) = {ratios['c/b']:.2f}   (c)/(a) = {ratios['c/a']:.2f}   "
        f"(d)/(a) = {ratios['d/a']:.2f}"
    )
    if "e_memory" in results:
        e = results["e_memory"]
        print(
            f"memory: {e['rss_mb_after_first_minute']:.1f} MB after the first minute, "
            f"{e['rss_mb_at_end']:.1f} MB at the end ({e['growth']:+.1%})"
        )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
