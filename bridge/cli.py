"""The ``events-bridge`` command: sub-commands, and errors turned into exit codes.

Exit codes: 0 success; 1 a command that could not do its work (a file it cannot read, a broker
it cannot reach, a refused delivery); 2 bad options (argparse); 78 (EX_CONFIG) an invalid
configuration. A user's mistake
ends with one clear line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from bridge import __version__
from bridge.config import Config, Registration, load_config
from bridge.errors import BadRequest, ConfigError, PayloadTooLarge, Unavailable, UsageError
from bridge.workers import PARENT_PID, SINGLE, WorkerSpec

EX_CONFIG = 78
DEFAULT_CONFIG = "config/bridge.yaml"

EPILOG = """\
quick start:
  make run                                   # broker, dev keys, and serve on 127.0.0.1:8080
  events-bridge tail                         # in a second terminal: print what is published
  events-bridge simulate --url http://127.0.0.1:8080/webhook \\
      --key .local/keys/private/pub-key-dev.key.pem --key-path /prod/keys/pub-key-dev.pem \\
      --client-id events-bridge-dev \
      ../shared/adobe-samples/events/imaging_lightroom-job-status_succeeded.json

Every command reads its settings from the YAML config (default config/bridge.yaml), which reads
BRIDGE_* environment variables; see README.md.
"""


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        metavar="FILE",
        help=f"YAML configuration (default: {DEFAULT_CONFIG})",
    )


def _worker_count(text: str) -> int:
    from bridge.workers import MAX_WORKERS

    if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 to {MAX_WORKERS}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="events-bridge",
        description="Receive Adobe I/O Events webhooks, verify their signatures, and republish "
        "each event to RabbitMQ with publisher confirms.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"events-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "serve",
        help="run the daemon",
        description="Serve the webhook endpoints until SIGTERM or Ctrl-C. "
        "Answers 503 until the broker is reachable; never exits for it. "
        "SIGHUP reloads routes and topology from the config file.",
    )
    _config_arg(p)
    p.add_argument(
        "--workers",
        type=_worker_count,
        default=1,
        metavar="N",
        help="worker processes sharing the port (SO_REUSEPORT), each with its own broker "
        "connection and outbox folder; about one per spare core (default: 1)",
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)  # K/N: set by the parent of N workers

    p = sub.add_parser(
        "check-config",
        help="validate the configuration and exit",
        description="Print every problem with its YAML path and line. "
        "Exit 0 when valid, 78 when not.",
    )
    _config_arg(p)

    p = sub.add_parser(
        "declare",
        help="declare the exchanges and queues, then exit",
        description="Declare adobe.events (topic, alternate exchange "
        "adobe.unrouted), adobe.unrouted (fanout) and its queue.",
    )
    _config_arg(p)

    p = sub.add_parser(
        "route",
        help="dry run: where would this event go?",
        description="Parse an event file as the receiver would and print its "
        "envelope, id, code, job status and publish targets. "
        "Nothing is published.",
    )
    _config_arg(p)
    p.add_argument("event", type=Path, metavar="EVENT.json")
    p.add_argument("--event-id", help="the x-adobe-event-id header, for bodies without an id")
    p.add_argument("--event-code", help="the x-adobe-event-code header, for bodies without a code")
    p.add_argument("--provider", help="the x-adobe-provider header, for rules that match on it")
    p.add_argument("--registration", help="use this registration's own routes, if it has any")

    p = sub.add_parser(
        "simulate",
        help="act as Adobe I/O Events: challenge, then signed deliveries",
        description="Send the challenge GET, then POST each event signed with RSA-SHA256 as "
        "Adobe signs it, with Adobe's headers. Exit 0 when every delivery got a 2xx.",
    )
    p.add_argument(
        "files",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="event JSON files (a file holding an array gives one event per element)",
    )
    p.add_argument(
        "--url", required=True, help="the webhook URL, e.g. http://127.0.0.1:8080/webhook"
    )
    p.add_argument(
        "--key",
        action="append",
        required=True,
        type=Path,
        metavar="PRIVATE.pem",
        help="private key to sign with (give twice for two different keys)",
    )
    p.add_argument(
        "--key-path",
        action="append",
        required=True,
        metavar="/prod/keys/pub-key-NAME.pem",
        help="public key path sent in x-adobe-public-keyN-path (give twice for two)",
    )
    p.add_argument(
        "--client-id", help="set recipientclientid/recipient_client_id in each event, as Adobe does"
    )
    p.add_argument(
        "--batch",
        type=int,
        default=0,
        metavar="N",
        help="send events as batch deliveries (JSON arrays) of up to N",
    )
    p.add_argument(
        "--retry",
        action="store_true",
        help="retry 429/5xx and timeouts on Adobe's schedule (1, 2, 4, 8, 15… min)",
    )
    p.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        metavar="F",
        help="multiply retry delays by F (e.g. 0.001 for tests)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=0,
        metavar="N",
        help="stop retrying after N attempts (default: Adobe's 24 h)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="deliveries in flight at once (default 1)",
    )
    p.add_argument(
        "--provider", default="events-bridge-simulator", help="x-adobe-provider header value"
    )
    p.add_argument("--no-challenge", action="store_true", help="skip the challenge GET")
    p.add_argument("--quiet", "-q", action="store_true", help="print only the summary")

    keys = sub.add_parser("keys", help="development key pairs")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    p = keys_sub.add_parser(
        "generate",
        help="write a development RSA-2048 key pair",
        description="Write DIR/prod/keys/pub-key-NAME.pem (serve DIR with "
        "BRIDGE_KEY_BASE_URL=file://DIR) and DIR/private/pub-key-NAME.key.pem "
        "(for simulate --key). Development only: Adobe holds the real private keys.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    p.add_argument("--name", help="key name (default: 10 random characters, as Adobe's)")
    p.add_argument("--force", action="store_true", help="replace an existing pair")

    p = sub.add_parser(
        "tail",
        help="print each message published to the events exchange",
        description="Bind a temporary queue to the events exchange and print "
        "each message (properties, headers, body).",
    )
    _config_arg(p)
    p.add_argument(
        "binding_key",
        nargs="?",
        default="#",
        metavar="BINDING_KEY",
        help="topic binding key, e.g. '*.failed' (default: '#', everything)",
    )
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N messages")
    p.add_argument(
        "--timeout", type=float, default=0.0, metavar="SECONDS", help="stop after SECONDS"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per message")

    p = sub.add_parser(
        "quarantine",
        help="list the events the broker refused for what they are",
        description="Print each event kept in the outbox folders' quarantine.log (what no "
        "broker would take as it is, for example a body over the broker's max_message_size): "
        "when, message id, exchange, routing key, size and why. Nothing is changed; "
        "--bodies writes each body to a folder, to publish by other means.",
    )
    _config_arg(p)
    p.add_argument("--bodies", type=Path, metavar="DIR", help="write each body to DIR/<n>.json")
    p.add_argument("--json", action="store_true", help="one JSON object per event")
    return parser


def run(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run``, except that tasks a library leaves behind cannot hold the exit: they get
    a bounded time to end after cancellation (aio-pika's close ignores cancellation)."""
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop  # faster event loop where installed (Linux and macOS)

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main)
    finally:
        leftovers = asyncio.all_tasks(loop)
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.wait(leftovers, timeout=2.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    import structlog

    from bridge import logs
    from bridge.workers import supervise

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
    return run(_serve(config, args.config, worker))


async def _serve(config: Config, path: str, worker: WorkerSpec) -> int:
    import structlog
    from aiohttp import web

    from bridge.app import create_app
    from bridge.connections import ConnectionGuard, DescriptorAlarm

    log = structlog.get_logger("bridge.cli")
    server = config.server
    loop = asyncio.get_running_loop()
    alarm = DescriptorAlarm()
    loop.set_exception_handler(alarm)
    bound = _connection_bound(server.max_connections)
    # The port first, then the outbox: a second daemon on the same port stops here, before it
    # reads (or replays) anything of the first one's. It listens only once all is ready.
    sockets = _bind(server.host, server.port, reuse_port=worker.count > 1)
    app = create_app(config, worker=worker)
    _tune_gc()  # before the broker connection, which a reconnect replaces, exists
    handler_args: dict[str, Any] = {
        "access_log": None,
        "keepalive_timeout": server.idle_timeout,
        "auto_decompress": False,  # bodies are verified as they came: see the receiver
        "lingering_time": 1.0,
    }
    runner = web.AppRunner(
        app, handle_signals=False, shutdown_timeout=server.shutdown_timeout, **handler_args
    )
    try:
        await runner.setup()
    except Unavailable as exc:  # the outbox folder is locked or cannot be opened
        for sock in sockets:
            sock.close()
        raise UsageError(exc.detail) from None
    guard = ConnectionGuard(bound, server.header_timeout, server.idle_timeout)
    assert runner.server is not None
    listeners = [
        await loop.create_server(
            guard.factory(runner.server, **handler_args), sock=sock, backlog=1024
        )
        for sock in sockets
    ]
    log.info(
        "bridge_listening",
        host=server.host,
        port=sockets[0].getsockname()[1],
        config=config.source,
        max_connections=bound,
    )
    watch = asyncio.create_task(alarm.watch(), name="descriptor-watch")
    signalled, problem = await _until_stopped(app, path, worker)
    watch.cancel()
    log.info("bridge_stopping", signal=signalled, problem=problem)
    for listener in listeners:  # stop accepting; then answer what is in flight
        listener.close()
    # Lets in-flight requests finish (shutdown_timeout), then cleanup_ctx.
    await runner.cleanup()
    if problem is not None:
        raise UsageError(problem)
    return 0


async def _until_stopped(app: Any, path: str, worker: WorkerSpec) -> tuple[str | None, str | None]:
    """Serve until SIGTERM or SIGINT (SIGHUP reloads the config), a fatal start-up problem, or
    (a worker) the parent's death; the signal and the problem, if any."""
    from bridge.app import PUBLISHER, reload_config
    from bridge.publisher import AmqpPublisher

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []
    reloads: set[asyncio.Task[bool]] = set()

    def on_signal(signum: signal.Signals) -> None:
        received.append(signum.name)
        stop.set()

    def on_hangup() -> None:
        task = loop.create_task(reload_config(app, path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    publisher = app[PUBLISHER]
    fatal = publisher.fatal if isinstance(publisher, AmqpPublisher) else None
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if fatal is not None:
        waiters.append(fatal)  # passive topology missing at start-up: stop with one line
    if worker.count > 1:  # a worker whose parent died (SIGKILL) stops by itself
        parent = int(os.environ.get(PARENT_PID, "0")) or os.getppid()
        waiters.append(asyncio.ensure_future(_parent_gone(parent, received)))
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    problem = (
        fatal.result() if fatal is not None and fatal.done() and not fatal.cancelled() else None
    )
    return (received[0] if received else None), problem


def _connection_bound(configured: int) -> int:
    """``server.max_connections``, lowered to what the descriptor limit (raised to its hard
    limit first) can hold."""
    import structlog

    from bridge.connections import connection_bound, raise_descriptor_limit

    descriptors = raise_descriptor_limit()
    bound = connection_bound(configured, descriptors)
    if bound < configured:
        structlog.get_logger("bridge.cli").warning(
            "connection_bound_lowered",
            max_connections=bound,
            descriptor_limit=descriptors,
            detail="the process may not open more descriptors: raise its limit (ulimit -n)",
        )
    return bound


def _bind(host: str, port: int, reuse_port: bool) -> list[socket.socket]:
    """Bound (not yet listening) sockets for every address of ``host``, or a one-line error."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    addresses = list(dict.fromkeys((family, address) for family, _, _, _, address in found))
    if port == 0:
        addresses = addresses[:1]  # one chosen port: the others would each get their own
    sockets: list[socket.socket] = []
    try:
        for family, address in addresses:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


# A request allocates hundreds of objects (a batch, thousands) and frees nearly all of them by
# reference counting. At Python's default of 700, the cyclic collector ran 160 times a second per
# worker under batch load, its older generations walked every object the daemon holds, and it
# took a quarter of the CPU (measured with gc.callbacks). 20,000 lets request garbage go the
# cheap way; cycles (an exception's traceback) are still collected, a few times a minute.
GC_THRESHOLD = 20_000


def _tune_gc() -> None:
    """What start-up made (modules, the app, the dedup ring) is kept for good: move it out of
    the collector's sight, and collect less often. A flood of 1.8 MB requests refused with 401
    or 400 still left a worker's RSS flat (measured: 300 of each, 75 MB before, 95 MB at peak
    with 8 in flight, no growth after)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 10, 10)


async def _parent_gone(parent: int, received: list[str]) -> None:
    while os.getppid() == parent:  # noqa: ASYNC110 - no event tells of a parent's death
        await asyncio.sleep(1.0)
    received.append("parent_gone")


def cmd_check_config(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    from bridge.publisher import redacted

    regs = ", ".join(f"{r.name} at {r.path}" for r in config.registrations)
    print(
        f"{args.config}: valid ({len(config.registrations)} registration(s): {regs}; "
        f"broker {redacted(config.broker.url)}; key base {config.verification.key_base_url})"
    )
    return 0


def cmd_declare(args: argparse.Namespace) -> int:
    config = load_config(args.config, sections=("broker", "topology"))
    topology = config.topology

    async def declare() -> list[str]:
        import aio_pika

        from bridge.declare import check_topology, declare_topology
        from bridge.publisher import broker_url, redacted

        try:
            connection = await aio_pika.connect(
                broker_url(config.broker), timeout=config.broker.connect_timeout
            )
        except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
            raise UsageError(
                f"cannot connect to {redacted(config.broker.url)}: {exc or type(exc).__name__}"
            ) from None
        async with connection:
            if topology.passive:
                return await check_topology(connection, topology)
            try:
                await declare_topology(await connection.channel(), topology)
            except (aio_pika.exceptions.AMQPError, ValueError, TypeError) as exc:
                raise UsageError(f"declare failed: {exc}") from None
        return []

    missing = asyncio.run(declare())
    if missing:
        raise UsageError(", ".join(missing) + " missing on the broker (topology.passive is true)")
    if topology.passive:
        for e in topology.exchanges:
            print(f"exists: exchange {e.name}")
        for q in topology.queues:
            print(f"exists: queue {q.name}")
        print("(passive: only existence is checked, not types, arguments or bindings)")
        return 0
    verb = "declared"
    for e in topology.exchanges:
        ae = f", alternate exchange {e.alternate_exchange}" if e.alternate_exchange else ""
        print(f"{verb} exchange {e.name} ({e.type}{ae})")
    for q in topology.queues:
        dlx = (
            f", dead letters to {q.dead_letter_exchange!r}"
            if q.dead_letter_exchange is not None
            else ""
        )
        print(f"{verb} queue {q.name} ({q.type}{dlx})")
    for b in topology.bindings:
        print(f"{verb} binding {b.exchange} -> {b.queue} with {b.routing_key!r}")
    return 0


def _route_registration(args: argparse.Namespace) -> Registration | None:
    """The registration `route` speaks for: --registration, or the only one there is."""
    try:
        registrations = load_config(args.config, sections=("broker", "registrations")).registrations
    except ConfigError:
        if args.registration:
            raise
        return None  # e.g. BRIDGE_CLIENT_IDS unset: the shared routes, no recipient check
    if args.registration:
        found = [r for r in registrations if r.name == args.registration]
        if not found:
            raise UsageError(f"no registration named {args.registration!r} in {args.config}")
        return found[0]
    return registrations[0] if len(registrations) == 1 else None


def cmd_route(args: argparse.Namespace) -> int:
    from bridge.adobe.envelope import parse_delivery
    from bridge.authorize import refusal
    from bridge.routing import Router

    config = load_config(args.config, sections=("broker", "topology", "routes"))
    registration = _route_registration(args)
    routes = config.routes if registration is None else config.routes_for(registration)
    try:
        raw = args.event.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.event}: {exc.strerror}") from None
    try:
        delivery = parse_delivery(raw, args.event_id, args.event_code)
    except (BadRequest, PayloadTooLarge) as exc:
        print(f"{args.event}: would be refused with {exc.status}: {exc.detail}")
        return 1
    if delivery.validation_url is not None:
        print(f"{args.event}: a validationUrl handshake: logged, answered 200, never published")
        return 0
    router = Router(routes, config.broker.unrouted_exchange)
    kind = "batch of" if delivery.batch else "single delivery,"
    where = f"registration {registration.name}" if registration else "the shared routes"
    print(f"{args.event}: {kind} {len(delivery.events)} event(s), {len(routes)} rule(s) of {where}")
    for event in delivery.events:
        name = registration.name if registration else ""
        decision = router.route(event, args.provider, name, explain=True)
        print(f"  event {event.event_id}")
        print(f"    envelope:   {event.envelope}")
        print(f"    event code: {event.event_code}")
        print(f"    job status: {event.job_status or '(none)'}  job id: {event.job_id or '(none)'}")
        print(f"    IMS org:    {event.ims_org or '(none)'}")
        print(
            f"    recipient:  {event.recipient or '(none: ' + str(event.recipient_problem) + ')'}"
        )
        if registration is not None:
            refused = refusal(event, registration)
            if refused is not None:
                print(f"    -> refused with 403 ({refused.reason}): {refused.detail}")
                continue
        for reason in decision.reasons:
            print(f"    {reason}")
        for target in decision.targets:
            extra = "".join(f", header {k}={v}" for k, v in target.headers)
            print(f"    -> exchange {target.exchange}, routing key {target.routing_key}{extra}")
        if decision.dropped:
            print(f"    -> dropped by rule {decision.dropped_by}: accepted, never published")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from bridge.simulate import Simulator, build_deliveries, load_events, load_private_key

    if len(args.key) > 2 or len(args.key_path) > 2:
        raise UsageError("give --key and --key-path at most twice each")
    if args.batch < 0 or args.concurrency < 1 or args.time_scale < 0:
        raise UsageError("--batch, --concurrency and --time-scale must not be negative")
    simulator = Simulator(
        url=args.url,
        keys=[load_private_key(p) for p in args.key],
        key_paths=args.key_path,
        provider=args.provider,
        retry=args.retry,
        time_scale=args.time_scale,
        max_attempts=args.max_attempts,
        concurrency=args.concurrency,
        quiet=args.quiet,
    )
    deliveries = build_deliveries(load_events(args.files), args.batch, args.client_id)
    asyncio.run(simulator.run(deliveries, challenge=not args.no_challenge))
    accepted = sum(d.accepted for d in deliveries)
    events = sum(d.events for d in deliveries if d.accepted)
    print(f"simulate: {accepted}/{len(deliveries)} deliveries accepted ({events} events)")
    return 0 if accepted == len(deliveries) else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from bridge.simulate import generate_keys

    keys = generate_keys(args.dir, args.name, args.force)
    print(f"private key: {keys.private_key}")
    print(f"public key:  {keys.public_key}")
    print(f"key path:    {keys.key_path}")
    print(f"serve with:  BRIDGE_KEY_BASE_URL={keys.base_url}")
    return 0


def cmd_tail(args: argparse.Namespace) -> int:
    from bridge.publisher import broker_url
    from bridge.tail import tail

    config = load_config(args.config, sections=("broker",))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            tail(
                broker_url(config.broker),
                config.broker.exchange,
                args.binding_key,
                count=args.count,
                seconds=args.timeout,
                as_json=args.json,
            )
        )
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    import json

    from bridge.segments import read_quarantine

    config = load_config(args.config, sections=("outbox",))
    base = Path(config.outbox.dir)
    folders = [base, *sorted(p for p in base.glob("worker-*") if p.is_dir())]
    found = [(folder, *entry) for folder in folders for entry in read_quarantine(folder)]
    if args.bodies is not None:
        try:
            args.bodies.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot write to {args.bodies}: {exc.strerror}") from None
    for n, (folder, message, meta) in enumerate(found, 1):
        when, why = meta.get("quarantined_at", "?"), meta.get("quarantine_reason", "?")
        if args.bodies is not None:
            (args.bodies / f"{n}.json").write_bytes(message.body)
        if args.json:
            print(
                json.dumps(
                    {
                        "folder": str(folder),
                        "quarantined_at": when,
                        "message_id": message.message_id,
                        "exchange": message.exchange,
                        "routing_key": message.routing_key,
                        "headers": message.headers,
                        "body_bytes": len(message.body),
                        "reason": why,
                    }
                )
            )
        else:
            print(
                f"{n}. {when} {message.message_id} -> {message.exchange} "
                f"{message.routing_key} ({len(message.body)} bytes): {why}"
            )
    if not args.json:
        print(f"{len(found)} event(s) in quarantine under {base}")
    return 0


COMMANDS: dict[str, Any] = {
    "serve": cmd_serve,
    "check-config": cmd_check_config,
    "declare": cmd_declare,
    "route": cmd_route,
    "simulate": cmd_simulate,
    "keys": cmd_keys,
    "tail": cmd_tail,
    "quarantine": cmd_quarantine,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Commands say what went wrong in one line of their own; libraries' logs (aiormq prints a
    # traceback-like line on a refused connection) stay quiet. `serve` configures real logging.
    logging.basicConfig(level=logging.CRITICAL)
    try:
        return int(COMMANDS[args.command](args))
    except ConfigError as exc:
        if args.command == "check-config":
            for problem in exc.problems:
                print(f"{args.config}: {problem}", file=sys.stderr)
        else:
            more = (
                f" (and {len(exc.problems) - 1} more: run check-config)"
                if len(exc.problems) > 1
                else ""
            )
            print(
                f"events-bridge: invalid config {args.config}: {exc.problems[0]}{more}",
                file=sys.stderr,
            )
        return EX_CONFIG
    except UsageError as exc:
        print(f"events-bridge: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
