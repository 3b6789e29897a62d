"""``make bench``'s TLS scenarios: what TLS costs a single delivery, each beside the same scenario
without TLS, run right before it (the machine is noisy: compare within a pair).

(h) (c) with the sender posting over HTTPS (``server.tls``; keep-alive connections, as Adobe's
    sender keeps them: one handshake per connection), beside (c) over plain HTTP, both publishing
    to the bench's broker;
(g) (c) publishing to a broker node of the bench's own (``tests/tlsbroker.py``, started and
    stopped here) over ``amqps://`` with a client certificate the broker verifies, beside the
    same node over plain AMQP.

Certificates are made for the run (``tests/certs.py``). ``--tls-rounds N`` repeats both pairs;
the figures are the means. ``--tls-rate R`` sends R requests/s instead of flat out: a load both
sides of a pair sustain, so that neither's CPU per event is inflated by less batching at a lower
throughput (flat out on a shared machine, the slower side batches less and pays more per event).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.bench.run import (
    _rates,
    broker_pid,
    declare,
    free_port,
    measured,
    purge,
    queued,
    start_bridge,
)
from tests.tlsbroker import Certificates, running_tls_broker

PAIRS = (("h_http", "h_https"), ("g_amqp", "g_amqps"))
LABELS = {
    "h_http": "(h) single, HTTP",
    "h_https": "(h) single, HTTPS",
    "g_amqp": "(g) single, amqp",
    "g_amqps": "(g) single, amqps",
}


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def _flow(**paths: Path) -> str:
    """A YAML flow mapping of file settings."""
    return "{" + ", ".join(f'{key}: "{path}"' for key, path in paths.items()) + "}"


def wait_connected(url: str, cafile: str = "", seconds: float = 60) -> None:
    """Until ``/readyz`` says the broker is connected, ten answers in a row (every worker: the
    kernel spreads new connections): with the outbox on, "ready" alone could mean the outbox."""
    context = ssl.create_default_context(cafile=cafile) if cafile else None
    deadline, in_a_row = time.monotonic() + seconds, 0
    while in_a_row < 10:
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {url} never had its broker connected")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
                connected = json.loads(response.read())["broker"] == "connected"
        except OSError:
            connected = False
        in_a_row = in_a_row + 1 if connected else 0
        time.sleep(0.05 if connected else 0.2)


async def scenario(
    admin_url: str,
    daemon_url: str,
    prefix: str,
    workers: int,
    requests: Path,
    seconds: float,
    *,
    broker: int | None,
    broker_tls: str = "",
    server_tls: str = "",
    cafile: str = "",
    rate: float = 0,
) -> dict[str, Any]:
    """One single-delivery run (at ``rate`` requests/s, or flat out); every answered event
    checked to be in the queue (counted over ``admin_url``, the node's plain port)."""
    await purge(admin_url, prefix)
    before = await queued(admin_url, prefix)
    port = free_port()
    base = f"{'https' if server_tls else 'http'}://127.0.0.1:{port}"
    daemon = start_bridge(
        prefix, port, daemon_url, workers, broker_tls=broker_tls, server_tls=server_tls
    )
    try:
        await asyncio.to_thread(wait_connected, base + "/readyz", cafile)
        out = await measured(daemon, base + "/webhook", requests, seconds, broker, cafile, rate)
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
    after = await queued(admin_url, prefix)
    if after - before < out["events"]:
        raise SystemExit(f"bench: {out['events']} events answered, only {after - before} queued")
    return {**_rates(out), "in_queue": after - before}


async def tls_scenarios(
    amqp_url: str,
    prefix: str,
    workers: int,
    requests: Path,
    seconds: float,
    rounds: int,
    rate: float = 0,
) -> dict[str, Any]:
    """(h) and (g), ``rounds`` times each pair; ``prefix``'s topology is declared on
    ``amqp_url`` already (the bench's), and here on the bench's TLS node."""
    folder = Path(tempfile.mkdtemp(prefix="bench-tls-"))
    runs: dict[str, list[dict[str, Any]]] = {key: [] for pair in PAIRS for key in pair}
    try:
        certs = Certificates.make(folder / "pki")
        https = _flow(cert_file=certs.server.cert, key_file=certs.server.key)
        for n in range(rounds):
            for key, server_tls in (("h_http", ""), ("h_https", https)):
                _say(f"{LABELS[key]} ({n + 1}/{rounds}), {workers} worker(s)")
                runs[key].append(
                    await scenario(
                        amqp_url, amqp_url, prefix, workers, requests, seconds,
                        broker=broker_pid(), server_tls=server_tls,
                        cafile=str(certs.ca) if server_tls else "", rate=rate,
                    )
                )  # fmt: skip
        _say("starting the bench's TLS broker node (tests/tlsbroker.py)")
        with running_tls_broker(folder / "broker", certs) as node:
            await declare(node.plain_url, prefix)
            client = _flow(ca_file=certs.ca, cert_file=certs.client.cert, key_file=certs.client.key)
            for n in range(rounds):
                for key, url, tls in (
                    ("g_amqp", node.plain_url, ""),
                    ("g_amqps", node.url(), client),
                ):
                    _say(f"{LABELS[key]} ({n + 1}/{rounds}), {workers} worker(s)")
                    runs[key].append(
                        await scenario(
                            node.plain_url, url, prefix, workers, requests, seconds,
                            broker=node.beam_pid(), broker_tls=tls, rate=rate,
                        )
                    )  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results: dict[str, Any] = {key: _mean(found) for key, found in runs.items()}
    results["tls_ratios"] = {tls: _ratios(results[plain], results[tls]) for plain, tls in PAIRS}
    results["tls_rate"] = rate
    return results


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    parties = ("server", "broker", "load_generator")
    cpu = {
        party: sum(run["cpu_us_per_event"][party] or 0 for run in runs) / len(runs)
        for party in parties
    }
    return {
        **runs[-1],
        "events_per_s": sum(run["events_per_s"] for run in runs) / len(runs),
        "p50_ms": sum(run["p50_ms"] for run in runs) / len(runs),
        "p99_ms": sum(run["p99_ms"] for run in runs) / len(runs),
        "cpu_us_per_event": cpu,
        "runs_events_per_s": [run["events_per_s"] for run in runs],
        "runs_server_cpu_us_per_event": [run["cpu_us_per_event"]["server"] for run in runs],
    }


def _ratios(plain: dict[str, Any], tls: dict[str, Any]) -> dict[str, float]:
    ours, theirs = plain["cpu_us_per_event"], tls["cpu_us_per_event"]
    return {
        "events_per_s": tls["events_per_s"] / plain["events_per_s"],
        "server_cpu": theirs["server"] / ours["server"],
        "server_cpu_extra_us": theirs["server"] - ours["server"],
        "broker_cpu": theirs["broker"] / ours["broker"] if ours["broker"] else 0.0,
        "load_generator_cpu": theirs["load_generator"] / ours["load_generator"],
    }


def report(results: dict[str, Any]) -> list[str]:
    """Lines for the summary: what TLS costs, per pair."""
    rate = results.get("tls_rate") or 0
    load = f"at {rate:.0f} requests/s" if rate else "flat out"
    lines = []
    for (plain, tls), what in zip(PAIRS, (f"HTTPS (h), {load}", f"amqps (g), {load}"), strict=True):
        if tls not in results:
            continue
        r = results["tls_ratios"][tls]
        server = results[tls]["runs_server_cpu_us_per_event"]
        lines.append(
            f"TLS: {what}: the bridge's CPU per event x{r['server_cpu']:.2f} "
            f"({r['server_cpu_extra_us']:+.0f} µs; runs {', '.join(f'{v:.0f}' for v in server)} "
            f"vs {', '.join(f'{v:.0f}' for v in results[plain]['runs_server_cpu_us_per_event'])}), "
            f"events/s x{r['events_per_s']:.2f}, broker CPU x{r['broker_cpu']:.2f}, "
            f"load generator CPU x{r['load_generator_cpu']:.2f}"
        )
    return lines
