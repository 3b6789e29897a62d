"""Typed configuration: one YAML file, validated once, into frozen dataclasses.

Owns: reading the YAML, replacing ``${VAR}`` and ``${VAR:-default}`` from the environment, and
checking every value. Every problem names its YAML path and line, for example
``broker.publish_timeout: expected a number, got 'soon' (bridge.yaml:14)``; unknown keys are
problems too. :func:`parse_config` collects all problems and raises one :class:`ConfigError`.

Does not: exit the process (the CLI chooses exit code 78), read the environment after start-up,
or open sockets. Secrets (the broker URL's password) come from the environment, never the file.

Variables are replaced inside scalar values only, so a value cannot smuggle in YAML structure.
``${VAR:-default}`` uses the default when VAR is unset or empty, as the shell does; ``$$`` is a
literal ``$``. A variable that is unset and has no default is a problem only if the value is read,
so ``events-bridge tail`` works without the receiver's settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from bridge.errors import ConfigError
from bridge.rules import (
    Route,
    Topology,
    check_route_exchanges,
    default_routes,
    default_topology,
    parse_routes,
    parse_topology,
)
from bridge.yamldoc import Doc

T = TypeVar("T")

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_PATH = re.compile(r"^/[A-Za-z0-9_./-]{0,200}$")
_RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_AMQP_URL = re.compile(
    r"^amqps?://(?:[^@/?#]*@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#@\[\]]+)(?::(?P<port>[0-9]{1,5}))?"
    r"(?:/[^?#]*)?(?:\?[^#]*)?$"
)

MAX_KEY_CACHE_SECONDS = 24 * 3600  # Adobe: cache a public key for not more than 24 h


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    max_batch_events: int = 1000  # Adobe sends at most 20; more is refused before any work
    max_in_flight: int = 256  # verified webhook requests at once; more get 429
    max_connections: int = 1024  # open connections; at the bound, idle ones are shed first
    # Adobe gives up after 10 s including connection set-up; we answer within this.
    answer_deadline: float = 7.5
    body_timeout: float = 5.0  # the body must arrive within this once the headers have
    header_timeout: float = 5.0  # a request's headers must arrive within this
    idle_timeout: float = 15.0  # a connection with no request in progress is closed after this
    shutdown_timeout: float = 20.0


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    heartbeat: int = 10
    connect_timeout: float = 5.0
    publish_timeout: float = 5.0
    reconnect_max_delay: float = 5.0
    # Bodies over this the broker refuses (its max_message_size); 0: learn it from the broker.
    max_message_bytes: int = 0
    exchange: str = "adobe.events"
    unrouted_exchange: str = "adobe.unrouted"
    unrouted_queue: str = "adobe.unrouted"


_DEFAULT_BROKER = BrokerConfig()
_DEFAULT_TOPOLOGY = default_topology(
    _DEFAULT_BROKER.exchange, _DEFAULT_BROKER.unrouted_exchange, _DEFAULT_BROKER.unrouted_queue
)
_DEFAULT_ROUTES = default_routes(_DEFAULT_BROKER.exchange)


@dataclass(frozen=True)
class VerificationConfig:
    enabled: bool = True
    key_base_url: str = "https://static.adobeioevents.com"
    key_cache_seconds: float = float(MAX_KEY_CACHE_SECONDS)
    key_fetch_timeout: float = 3.0
    key_max_bytes: int = 16 * 1024


@dataclass(frozen=True)
class Registration:
    name: str
    path: str
    client_ids: tuple[str, ...]
    ims_orgs: tuple[str, ...] = ()  # empty: any org
    routes: tuple[Route, ...] | None = None  # None: the shared top-level routes


@dataclass(frozen=True)
class OutboxConfig:
    dir: str = ".local/outbox"
    # off: a broker that cannot take an event gives a 503; fallback: the event is written here
    # and answered 200; always: every event is written here first (write-ahead).
    mode: str = "fallback"
    max_bytes: int = 256 * 1024 * 1024
    drain_seconds: float = 10.0  # on SIGTERM, time for the replayer to empty the outbox
    # A backlog the connected broker takes nothing of for this long: /readyz says not ready.
    stall_seconds: float = 30.0


@dataclass(frozen=True)
class DedupConfig:
    """An event id confirmed within the window is not published again."""

    enabled: bool = True
    seconds: float = 600.0
    size: int = 100_000


@dataclass(frozen=True)
class MetricsConfig:
    """Label values that signed input chooses are bounded: the first N keep their own series."""

    max_event_codes: int = 100
    max_job_statuses: int = 20


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"  # json, console, or auto (console on a terminal)
    level: str = "info"


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    registrations: tuple[Registration, ...] = ()
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    topology: Topology = field(default_factory=lambda: _DEFAULT_TOPOLOGY)
    routes: tuple[Route, ...] = field(default_factory=lambda: _DEFAULT_ROUTES)
    source: str = "<config>"

    def routes_for(self, registration: Registration) -> tuple[Route, ...]:
        return self.routes if registration.routes is None else registration.routes


def _server(doc: Doc, node: yaml.Node | None) -> ServerConfig:
    s = doc.mapping(
        node,
        "server",
        {
            "host",
            "port",
            "max_body_bytes",
            "max_batch_events",
            "max_in_flight",
            "max_connections",
            "answer_deadline",
            "body_timeout",
            "header_timeout",
            "idle_timeout",
            "shutdown_timeout",
        },
    )
    d = ServerConfig()
    cfg = ServerConfig(
        host=s.string("host", d.host),
        port=s.integer("port", d.port, 0, 65535),
        max_body_bytes=s.integer("max_body_bytes", d.max_body_bytes, 1024, 256 * 1024 * 1024),
        max_batch_events=s.integer("max_batch_events", d.max_batch_events, 20, 100_000),
        max_in_flight=s.integer("max_in_flight", d.max_in_flight, 1, 100_000),
        max_connections=s.integer("max_connections", d.max_connections, 16, 1_000_000),
        answer_deadline=s.number("answer_deadline", d.answer_deadline, 1.0, 8.0),
        body_timeout=s.number("body_timeout", d.body_timeout, 0.1, 8.0),
        header_timeout=s.number("header_timeout", d.header_timeout, 0.1, 60.0),
        idle_timeout=s.number("idle_timeout", d.idle_timeout, 0.1, 3600.0),
        shutdown_timeout=s.number("shutdown_timeout", d.shutdown_timeout, 0.0, 600.0),
    )
    if cfg.body_timeout >= cfg.answer_deadline:
        doc.fail(
            "server.body_timeout",
            s.items.get("body_timeout"),
            "must be below server.answer_deadline, so a late body still gets its 503 in time",
        )
    if cfg.shutdown_timeout < cfg.answer_deadline:
        doc.fail(
            "server.shutdown_timeout",
            s.items.get("shutdown_timeout"),
            "must be at least server.answer_deadline, so requests in flight are answered",
        )
    return cfg


def _broker(doc: Doc, node: yaml.Node | None) -> BrokerConfig:
    s = doc.mapping(
        node,
        "broker",
        {
            "url",
            "heartbeat",
            "connect_timeout",
            "publish_timeout",
            "reconnect_max_delay",
            "max_message_bytes",
            "exchange",
            "unrouted_exchange",
            "unrouted_queue",
        },
    )
    d = BrokerConfig()
    url = s.get("url", d.url, _amqp_url, "an amqp:// or amqps:// URL with a host")
    cfg = BrokerConfig(
        url=url,
        heartbeat=s.integer("heartbeat", d.heartbeat, 0, 600),
        connect_timeout=s.number("connect_timeout", d.connect_timeout, 0.1, 60.0),
        publish_timeout=s.number("publish_timeout", d.publish_timeout, 0.1, 9.0),
        reconnect_max_delay=s.number("reconnect_max_delay", d.reconnect_max_delay, 0.1, 300.0),
        max_message_bytes=s.integer("max_message_bytes", d.max_message_bytes, 0, 1 << 31),
        exchange=s.string("exchange", d.exchange, _NAME),
        unrouted_exchange=s.string("unrouted_exchange", d.unrouted_exchange, _NAME),
        unrouted_queue=s.string("unrouted_queue", d.unrouted_queue, _NAME),
    )
    if cfg.exchange == cfg.unrouted_exchange:
        doc.fail(
            "broker.unrouted_exchange",
            s.items.get("unrouted_exchange"),
            "must differ from broker.exchange",
        )
    return cfg


def _verification(doc: Doc, node: yaml.Node | None) -> VerificationConfig:
    s = doc.mapping(
        node,
        "verification",
        {"enabled", "key_base_url", "key_cache_seconds", "key_fetch_timeout", "key_max_bytes"},
    )
    d = VerificationConfig()
    return VerificationConfig(
        enabled=s.boolean("enabled", d.enabled),
        key_base_url=_strip_slash(
            s.string(
                "key_base_url", d.key_base_url, re.compile(r"^(https?://[^/?#@]+/?$|file:///)")
            )
        ),
        key_cache_seconds=s.number(
            "key_cache_seconds", d.key_cache_seconds, 0.0, float(MAX_KEY_CACHE_SECONDS)
        ),
        key_fetch_timeout=s.number("key_fetch_timeout", d.key_fetch_timeout, 0.1, 6.0),
        key_max_bytes=s.integer("key_max_bytes", d.key_max_bytes, 512, 1024 * 1024),
    )


def _strip_slash(url: str) -> str:
    stripped = url.rstrip("/")
    return "file:///" if stripped == "file:" else stripped


def _amqp_url(text: str) -> str:
    """Accept amqp(s)://[user:pass@]host[:port][/vhost][?query] whose port is a number."""
    match = _AMQP_URL.match(text)
    if not match or not match.group("host"):
        raise ValueError(text)
    if match.group("port") is not None and not 0 < int(match.group("port")) < 65536:
        raise ValueError(text)
    return text


def _registrations(doc: Doc, node: yaml.Node | None) -> tuple[Registration, ...]:
    if node is None:
        doc.fail("registrations", None, "at least one registration is required")
        return ()
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        doc.fail("registrations", node, "expected a non-empty list of registrations")
        return ()
    result: list[Registration] = []
    for i, item in enumerate(node.value):
        path = f"registrations[{i}]"
        s = doc.mapping(item, path, {"name", "path", "client_ids", "ims_orgs", "routes"})
        name = s.string("name", f"registration-{i}", _NAME)
        url_path = s.string("path", "/webhook", _PATH)
        if url_path in _RESERVED_PATHS:
            doc.fail(f"{path}.path", s.items.get("path"), f"{url_path} is reserved")
        client_ids = s.strings("client_ids")
        if not client_ids and "client_ids" not in s.items:
            doc.fail(f"{path}.client_ids", item, "required: the client ids accepted as recipient")
        elif client_ids is not None and not client_ids:
            doc.fail(f"{path}.client_ids", s.items["client_ids"], "must name at least one id")
        routes = parse_routes(doc, s.items.get("routes"), f"{path}.routes")
        result.append(
            Registration(name, url_path, client_ids or (), s.strings("ims_orgs") or (), routes)
        )
    for field_name in ("name", "path"):
        seen: set[str] = set()
        for i, reg in enumerate(result):
            value = getattr(reg, field_name)
            if value in seen:
                doc.fail(f"registrations[{i}].{field_name}", node.value[i], f"duplicate {value!r}")
            seen.add(value)
    return tuple(result)


def _outbox(doc: Doc, node: yaml.Node | None) -> OutboxConfig:
    s = doc.mapping(node, "outbox", {"dir", "mode", "max_bytes", "drain_seconds", "stall_seconds"})
    d = OutboxConfig()
    return OutboxConfig(
        dir=s.string("dir", d.dir),
        mode=s.choice("mode", d.mode, ("off", "fallback", "always")),
        max_bytes=s.integer("max_bytes", d.max_bytes, 64 * 1024, 1 << 40),
        drain_seconds=s.number("drain_seconds", d.drain_seconds, 0.0, 600.0),
        stall_seconds=s.number("stall_seconds", d.stall_seconds, 1.0, 3600.0),
    )


def _dedup(doc: Doc, node: yaml.Node | None) -> DedupConfig:
    s = doc.mapping(node, "dedup", {"enabled", "seconds", "size"})
    d = DedupConfig()
    return DedupConfig(
        enabled=s.boolean("enabled", d.enabled),
        seconds=s.number("seconds", d.seconds, 1.0, 7 * 24 * 3600.0),
        size=s.integer("size", d.size, 1, 1_000_000),  # about 190 bytes each, reserved at start
    )


def _logging(doc: Doc, node: yaml.Node | None) -> LoggingConfig:
    s = doc.mapping(node, "logging", {"format", "level"})
    d = LoggingConfig()
    return LoggingConfig(
        format=s.choice("format", d.format, ("auto", "json", "console")),
        level=s.choice("level", d.level, ("debug", "info", "warning", "error")),
    )


def _metrics(doc: Doc, node: yaml.Node | None) -> MetricsConfig:
    s = doc.mapping(node, "metrics", {"max_event_codes", "max_job_statuses"})
    d = MetricsConfig()
    return MetricsConfig(
        max_event_codes=s.integer("max_event_codes", d.max_event_codes, 1, 10_000),
        max_job_statuses=s.integer("max_job_statuses", d.max_job_statuses, 1, 1_000),
    )


_SECTIONS: dict[str, Callable[[Doc, yaml.Node | None], Any]] = {
    "server": _server,
    "broker": _broker,
    "verification": _verification,
    "registrations": _registrations,
    "outbox": _outbox,
    "dedup": _dedup,
    "logging": _logging,
    "metrics": _metrics,
}


ALL_SECTIONS = (*_SECTIONS, "topology", "routes")


def parse_config(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    sections: tuple[str, ...] = ALL_SECTIONS,
) -> Config:
    """Parse YAML text into a :class:`Config`, reading only ``sections`` (the rest keep defaults).

    Raises :class:`ConfigError` listing every problem found.
    """
    doc = Doc(source, os.environ if environ is None else environ)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" ({source}:{mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"(top): not valid YAML: {problem}{where}"]) from None
    top = doc.mapping(root, "", {*_SECTIONS, "topology", "routes"})
    values: dict[str, Any] = {}
    for name in sections:
        if name in _SECTIONS:
            values[name] = _SECTIONS[name](doc, top.items.get(name))
    broker: BrokerConfig = values.get("broker", BrokerConfig())
    server: ServerConfig | None = values.get("server")
    if (
        server is not None
        and "broker" in values
        and broker.publish_timeout + 1.0 > server.answer_deadline
    ):
        doc.fail(
            "broker.publish_timeout",
            None,
            f"must be at least 1 s below server.answer_deadline ({server.answer_deadline:g}),"
            " so an event the broker does not confirm still has time to reach the outbox",
        )
    if "topology" in sections:
        values["topology"] = parse_topology(
            doc,
            top.items.get("topology"),
            default_topology(broker.exchange, broker.unrouted_exchange, broker.unrouted_queue),
        )
    if "routes" in sections:
        routes = parse_routes(doc, top.items.get("routes"), "routes")
        values["routes"] = default_routes(broker.exchange) if routes is None else routes
    _check_exchanges(doc, values, broker)
    if doc.problems:
        raise ConfigError(doc.problems)
    return Config(source=source, **values)


def _check_exchanges(doc: Doc, values: dict[str, Any], broker: BrokerConfig) -> None:
    topology: Topology | None = values.get("topology")
    if topology is None:
        return
    if broker.unrouted_exchange not in {e.name for e in topology.exchanges}:
        doc.fail(
            "broker.unrouted_exchange",
            None,
            f"exchange {broker.unrouted_exchange!r} (where events no rule takes go) is not "
            "in topology.exchanges",
        )
    check_route_exchanges(
        doc, values.get("routes", ()), "routes", topology, broker.unrouted_exchange
    )
    for i, registration in enumerate(values.get("registrations", ())):
        if registration.routes is not None:
            check_route_exchanges(
                doc,
                registration.routes,
                f"registrations[{i}].routes",
                topology,
                broker.unrouted_exchange,
            )


def load_config(
    path: str | Path,
    environ: Mapping[str, str] | None = None,
    sections: tuple[str, ...] = ALL_SECTIONS,
) -> Config:
    """Read and parse a config file; a missing or unreadable file is a :class:`ConfigError`."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{file}: cannot read the config file: {reason}"]) from None
    return parse_config(text, file.name, environ, sections)
