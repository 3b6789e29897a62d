"""Composition root: build the aiohttp application from a :class:`Config`.

Owns: which objects exist and how long they live. Resources live in ``cleanup_ctx`` so they are
closed in the reverse order of their creation, after aiohttp has stopped accepting connections
and finished in-flight requests (SIGTERM): first the broker connection (a clean
``Connection.Close``), then the key store's HTTP client. State is reachable through ``AppKey``.

Routes: ``<registration path>`` (GET challenge, POST events), ``/healthz``, ``/readyz``,
``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge import __version__, metrics
from bridge.checkpoint import Checkpoint, StateUnavailable
from bridge.config import Config, load_config
from bridge.declare import deprecations
from bridge.errors import ConfigError
from bridge.intake import Intake
from bridge.journal import JournalReader, first_url, run_reader
from bridge.journal_intake import JournalIntake
from bridge.keys import KeyStore
from bridge.outbox import Outbox, OutboxUnavailable
from bridge.publisher import AmqpPublisher, Publisher
from bridge.receiver import Receiver, answer_middleware, json_response
from bridge.tracing import Tracing
from bridge.verify import Verifier
from bridge.workers import SINGLE, WorkerSpec, stranded_outbox_dirs

log = structlog.get_logger("bridge.app")

CONFIG: Final = web.AppKey("config", Config)
PUBLISHER: Final = web.AppKey("publisher", Publisher)
KEYS: Final = web.AppKey("keys", KeyStore)
RECEIVER: Final = web.AppKey("receiver", Receiver)
RELOAD_LOCK: Final = web.AppKey("reload_lock", asyncio.Lock)


async def reload_config(app: web.Application, path: str) -> bool:
    """SIGHUP: re-read the config file; apply its routes when valid, else keep the old ones.

    The new topology is declared first, on a channel of its own, so new routes never point to
    an exchange that does not exist yet. Requests in flight finish with the rules they started
    with; the next ones use the new rules. Nothing is dropped on the way.
    """
    async with app[RELOAD_LOCK]:  # two SIGHUPs in a row: applied one after another, in order
        return await _reload(app, path)


async def _reload(app: web.Application, path: str) -> bool:
    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error(
            "config_reload_failed",
            config=path,
            problems=exc.problems,
            action="keeping the running configuration",
        )
        return False
    _warn_about_topology(config)  # before a broker that refuses it closes the connection
    publisher = app[PUBLISHER]
    if isinstance(publisher, AmqpPublisher):
        try:
            await publisher.apply_topology(config.topology)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the running config stays
            log.error(
                "config_reload_failed",
                config=path,
                problems=[f"topology: {exc}"],
                action="keeping the running configuration",
            )
            return False
    receiver = app[RECEIVER]
    notes = receiver.reload(config)
    if receiver.outbox is not None and receiver.outbox.exchanges is not None:
        receiver.outbox.exchanges = {e.name for e in config.topology.exchanges}
    log.info("config_reloaded", config=path, routes=len(config.routes), not_applied=notes)
    return True


def create_app(
    config: Config,
    publisher: Publisher | None = None,
    worker: WorkerSpec = SINGLE,
    tracing: Tracing | None = None,
) -> web.Application:
    """The daemon's application. Pass ``publisher`` to replace the broker (HTTP-only tests);
    ``worker`` is which of ``serve --workers N`` this process is; ``tracing``, the spans'
    tracer (``bridge.tracing``; None: off)."""
    # Bodies are read and capped by the receiver itself, so aiohttp's own cap is set above ours.
    app = web.Application(
        middlewares=[answer_middleware], client_max_size=config.server.max_body_bytes + 1
    )
    known = None if config.outbox.mode == "off" else worker.outbox_dir(Path(config.outbox.dir))
    keys = KeyStore(
        config.verification, known_file=None if known is None else known / "known-key-paths"
    )
    owned: AmqpPublisher | None = None  # the broker connection this application makes
    if publisher is None:
        publisher = owned = AmqpPublisher(config.broker, config.topology)
    app[CONFIG] = config
    app[KEYS] = keys
    app[RELOAD_LOCK] = asyncio.Lock()
    app[PUBLISHER] = publisher
    outbox, stranded = _outboxes(config, publisher, worker)
    app.cleanup_ctx.append(Lifetime(config, keys, owned, outbox, stranded, tracing))
    receiver = Receiver(config, Verifier(keys), publisher, outbox, tracing)
    receiver.add_routes(app)
    app[RECEIVER] = receiver
    if config.journal.enabled and worker.index == 0:  # one reader a daemon, beside worker 0's
        app.cleanup_ctx.append(_journal(config, receiver.intake))
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz(config, publisher, outbox, stranded))
    app.router.add_get("/metrics", _metrics)
    return app


@dataclass
class Lifetime:
    """The application's resources, as one ``cleanup_ctx`` entry: opened in :meth:`start`,
    before the first request; closed in :meth:`stop`, after aiohttp has answered the last one.

    ``owned`` is the broker connection the application made (none when a test gave its own
    publisher); ``stranded`` the outboxes a run with more workers left, to replay (those that
    cannot be opened are dropped from the list, which ``/readyz`` shares)."""

    config: Config
    keys: KeyStore
    owned: AmqpPublisher | None
    outbox: Outbox | None
    stranded: list[Outbox]
    tracing: Tracing | None = None

    async def __call__(self, _app: web.Application) -> AsyncIterator[None]:
        await self.start()
        yield
        await self.stop()

    async def start(self) -> None:
        _warn_about_trust(self.config)
        _warn_about_topology(self.config)
        metrics.configure(self.config.metrics.max_event_codes, self.config.metrics.max_job_statuses)
        # The outbox folder's lock before anything else: a second daemon stops here.
        if self.outbox is not None:
            await self.outbox.open()
        for leftover in list(self.stranded):
            try:
                await leftover.open()
            except OutboxUnavailable as exc:  # in use by someone: theirs to replay
                log.warning("outbox_not_adopted", folder=str(leftover.folder), reason=exc.detail)
                self.stranded.remove(leftover)
                continue
            log.info("outbox_adopted", folder=str(leftover.folder), events=leftover.depth)
        if self.owned is not None:
            await self.owned.start()
        log.info(
            "bridge_started",
            version=__version__,
            paths=[r.path for r in self.config.registrations],
        )

    async def stop(self) -> None:
        outbox = self.outbox
        if outbox is not None:
            # Shutdown order: the listener is closed and requests are answered (aiohttp), then
            # the outbox gets a bounded time to replay, then the broker connection closes.
            if outbox.depth and not await outbox.drain(self.config.outbox.drain_seconds):
                log.warning(
                    "outbox_left_for_next_start", events=outbox.depth, folder=str(outbox.folder)
                )
            await outbox.close()
        for leftover in self.stranded:
            await leftover.close()
            if not leftover.depth:
                shutil.rmtree(leftover.folder, ignore_errors=True)
        if self.owned is not None:
            await self.owned.close()
        await self.keys.close()
        if self.tracing is not None:  # the last spans exported, in the exporter's own time
            await asyncio.to_thread(self.tracing.shutdown)
        log.info("bridge_stopped")


def _journal(config: Config, intake: Intake) -> Callable[[web.Application], AsyncIterator[None]]:
    """The journal reader (``bridge.journal``), after the broker and outbox are up and stopped
    before them: a page in flight is finished (bounded by the answer deadline), then it stops.
    A state folder it cannot use leaves the webhooks serving, with an error in the log."""

    async def pull(_app: web.Application) -> AsyncIterator[None]:
        checkpoint = Checkpoint(Path(config.journal.state_dir), config.journal.url)
        try:
            checkpoint.open()
            since = checkpoint.load()
        except StateUnavailable as exc:
            metrics.JOURNAL_ERRORS.labels("state").inc()
            log.error("journal_not_started", reason=str(exc), action="the webhooks go on")
            checkpoint.close()
            yield
            return
        page_seconds = config.server.answer_deadline  # as long as a webhook's events may take
        take = JournalIntake(intake, config.journal_registration().name, page_seconds)
        url = first_url(config.journal, since, config.journal.start)
        reader = JournalReader(config.journal, url, take, checkpoint)
        start = None if since else config.journal.start
        log.info("journal_started", resume_after=since, start=start)
        task = asyncio.create_task(run_reader(reader), name="journal-reader")
        yield
        reader.stop()
        await asyncio.wait({task}, timeout=page_seconds + 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):  # run_reader logged it
            await task  # a position being saved in its thread is saved before the lock goes
        checkpoint.close()

    return pull


def _warn_about_topology(config: Config) -> None:
    """One warning for each thing of the topology that later RabbitMQ versions refuse."""
    for problem in deprecations(config.topology):
        log.warning("topology_deprecated", detail=problem)


def _warn_about_trust(config: Config) -> None:
    """One warning each for settings that are for local tests only."""
    if config.verification.key_base_url.startswith("http://"):
        log.warning(
            "key_host_without_tls",
            key_base_url=config.verification.key_base_url,
            detail="public keys are fetched over plain HTTP: for local tests only",
        )
    if not config.verification.enabled:
        log.warning(
            "signature_verification_disabled",
            detail="verification.enabled is false: forged events will be published",
        )


async def _healthz(_request: web.Request) -> web.Response:
    return json_response(200, {"status": "ok"})


async def _metrics(_request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(metrics.registry()), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def _readyz(
    config: Config, publisher: Publisher, outbox: Outbox | None, stranded: list[Outbox]
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """``/readyz``: ready when events can be made safe, through the broker or into the outbox;
    not while an outbox has a backlog that the connected broker does not take (stalled)."""
    always = outbox is not None and config.outbox.mode == "always"

    async def readyz(_request: web.Request) -> web.Response:
        outboxes = [o for o in (outbox, *stranded) if o is not None]
        stalled = any(o.stalled for o in outboxes)
        usable = outbox is not None and outbox.usable
        state = {
            "broker": "connected" if publisher.ready else "not connected",
            "outbox": "off"
            if outbox is None
            else "stalled"
            if stalled
            else ("usable" if usable else "unusable"),
            "outbox_depth": sum(o.depth for o in outboxes),
            **_broker_state(publisher),
        }
        if not stalled and ((publisher.ready and not always) or usable):
            return json_response(200, {"status": "ready", **state})
        return json_response(503, {"status": "not_ready", **state}, {"Retry-After": "5"})

    return readyz


def _broker_state(publisher: Publisher) -> dict[str, str]:
    """The node in use (a cluster's nodes are ``host:port``), or why the broker is not in use
    (a TLS problem, a refused login): an AMQP publisher's; a fake one has neither."""
    node = getattr(publisher, "node", None)
    if node is not None:
        return {"node": str(node.name)}
    problem = getattr(publisher, "problem", None)
    return {"broker_error": str(problem)} if problem else {}


def _outboxes(
    config: Config, publisher: Publisher, worker: WorkerSpec
) -> tuple[Outbox | None, list[Outbox]]:
    """This worker's outbox, and those that a run with more workers left behind (worker 0
    replays them; nothing is appended to them)."""
    if config.outbox.mode == "off":
        return None, []
    base = Path(config.outbox.dir)

    def make(folder: Path) -> Outbox:
        return Outbox(
            folder,
            config.outbox.max_bytes,
            publisher,
            exchanges={e.name for e in config.topology.exchanges} or None,
            unrouted_exchange=config.broker.unrouted_exchange,
            stall_seconds=config.outbox.stall_seconds,
        )

    stranded = stranded_outbox_dirs(base, worker.count) if worker.index == 0 else []
    return make(worker.outbox_dir(base)), [make(folder) for folder in stranded]
