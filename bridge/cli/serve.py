"""``events-bridge serve``: its options, and which way it runs: alone, as worker K of N, or as
the parent of N workers (:mod:`bridge.workers`). The daemon's lifetime is :mod:`bridge.cli.daemon`.
"""

from __future__ import annotations

import argparse
import signal
import sys

from bridge.cli.options import QUICK_START, Subparsers, config_arg
from bridge.errors import UsageError


def add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Serve the webhook endpoints until SIGTERM or Ctrl-C. Answers 503 until the\n"
        "broker is reachable; never exits for it. SIGHUP reloads routes and topology.\n"
        "HTTPS with server.tls.cert_file and key_file, mTLS (a client certificate required)\n"
        "with server.tls.client_ca_file; SIGHUP reloads the HTTPS certificate and key too.",
        epilog=QUICK_START,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_arg(p)
    p.add_argument(
        "--workers",
        type=worker_count,
        default=1,
        metavar="N",
        help="worker processes sharing the port (SO_REUSEPORT), each with its own broker "
        "connection and outbox folder; about one per spare core (default: 1)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # K/N: set by the parent of N workers
    p.set_defaults(run=run_serve)


def worker_count(text: str) -> int:
    from bridge.workers import MAX_WORKERS

    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_WORKERS}")
    return int(text)


def run_serve(args: argparse.Namespace) -> int:
    from bridge.config import load_config
    from bridge.tls import check_tls

    config = load_config(args.config)
    check_tls(config)  # a certificate that does not load: exit 78 now, not in every worker
    import structlog

    from bridge import logs
    from bridge.workers import SINGLE, WorkerSpec, supervise

    logs.configure(config.logging.format, config.logging.level)
    if args.worker is not None:
        worker = WorkerSpec.parse(args.worker)
        structlog.contextvars.bind_contextvars(worker=worker.index)
        # Until the event loop takes them over: a reload asked for this early has nothing to
        # reload, and a stop before the port is open loses nothing.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    elif args.workers > 1:
        if config.server.port == 0:
            raise UsageError("--workers needs a fixed server.port (0 would give each its own)")
        return supervise(args.config, args.workers)
    else:
        worker = SINGLE
    # The daemon's modules (aiohttp, the app) only now: a worker ignores SIGHUP by this time.
    from bridge.cli.daemon import run, serve

    return run(serve(config, args.config, worker))
