"""Typed configuration: one YAML file, validated once, into frozen dataclasses.

Owns: reading the YAML, replacing ``${VAR}`` and ``${VAR:-default}`` from the environment, and
checking every value, alone and against the others (a route's exchange against the topology, a
timeout against the answer deadline). Every problem names its YAML path and line, for example
``broker.publish_timeout: expected a number, got 'soon' (bridge.yaml:14)``; unknown keys are
problems too. :func:`parse_config` collects all problems and raises one :class:`ConfigError`.
The dataclasses are ``bridge.config_types``' (re-exported here), the ``topology:`` section is
``bridge.topology``'s and ``routes:`` are ``bridge.rules``'.

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
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from bridge.config_journal import check_journal_registration, journal_section
from bridge.config_links import broker_tls, broker_urls, server_tls
from bridge.config_types import (
    MAX_KEY_CACHE_SECONDS,
    BrokerConfig,
    Config,
    DedupConfig,
    LoggingConfig,
    MetricsConfig,
    OutboxConfig,
    Registration,
    ServerConfig,
    VerificationConfig,
)
from bridge.errors import ConfigError
from bridge.rules import check_route_exchanges, default_routes, parse_routes
from bridge.topology import Topology, default_topology, parse_topology
from bridge.yamldoc import Doc, Section, locate

__all__ = [
    "ALL_SECTIONS",
    "MAX_KEY_CACHE_SECONDS",
    "BrokerConfig",
    "Config",
    "DedupConfig",
    "LoggingConfig",
    "MetricsConfig",
    "OutboxConfig",
    "Registration",
    "ServerConfig",
    "VerificationConfig",
    "load_config",
    "parse_config",
]

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_PATH = re.compile(r"^/[A-Za-z0-9_./-]{0,200}$")
_RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _keys(section: type[Any]) -> set[str]:
    """The keys a section of the file takes: its dataclass's fields."""
    return {f.name for f in fields(section)}


def _server(doc: Doc, node: yaml.Node | None) -> ServerConfig:
    s = doc.mapping(node, "server", _keys(ServerConfig))
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
        tls=server_tls(s),
    )
    if cfg.body_timeout >= cfg.answer_deadline:
        doc.fail(
            "server.body_timeout",
            _first(s, "body_timeout", "answer_deadline"),
            "must be below server.answer_deadline, so a late body still gets its 503 in time",
        )
    if cfg.shutdown_timeout < cfg.answer_deadline:
        doc.fail(
            "server.shutdown_timeout",
            _first(s, "shutdown_timeout", "answer_deadline"),
            "must be at least server.answer_deadline, so requests in flight are answered",
        )
    return cfg


def _broker(doc: Doc, node: yaml.Node | None) -> BrokerConfig:
    s = doc.mapping(node, "broker", (_keys(BrokerConfig) - {"urls"}) | {"url"})
    d = BrokerConfig()
    urls = broker_urls(s, d.urls)
    cfg = BrokerConfig(
        urls=urls,
        tls=broker_tls(s, urls),
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
            _first(s, "unrouted_exchange", "exchange"),
            "must differ from broker.exchange",
        )
    return cfg


def _first(section: Section, *keys: str) -> yaml.Node | None:
    """The node of the first of ``keys`` the file gives, else the section's: for a problem that
    compares values, the line of the one named first, or of the other when it is a default."""
    found = (section.items[key] for key in keys if key in section.items)
    return next(found, section.node)


def _verification(doc: Doc, node: yaml.Node | None) -> VerificationConfig:
    s = doc.mapping(node, "verification", _keys(VerificationConfig))
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
    _check_unique(doc, node, result)
    return tuple(result)


def _check_unique(doc: Doc, node: yaml.Node, registrations: list[Registration]) -> None:
    """Each registration has its own name and path (a default path counts as given)."""
    for field_name in ("name", "path"):
        seen: set[str] = set()
        for i, reg in enumerate(registrations):
            value = getattr(reg, field_name)
            if value in seen:
                doc.fail(
                    f"registrations[{i}].{field_name}",
                    locate(node, i, field_name) or node.value[i],
                    f"duplicate {value!r}",
                )
            seen.add(value)


def _outbox(doc: Doc, node: yaml.Node | None) -> OutboxConfig:
    s = doc.mapping(node, "outbox", _keys(OutboxConfig))
    d = OutboxConfig()
    return OutboxConfig(
        dir=s.string("dir", d.dir),
        mode=s.choice("mode", d.mode, ("off", "fallback", "always")),
        max_bytes=s.integer("max_bytes", d.max_bytes, 64 * 1024, 1 << 40),
        drain_seconds=s.number("drain_seconds", d.drain_seconds, 0.0, 600.0),
        stall_seconds=s.number("stall_seconds", d.stall_seconds, 1.0, 3600.0),
    )


def _dedup(doc: Doc, node: yaml.Node | None) -> DedupConfig:
    s = doc.mapping(node, "dedup", _keys(DedupConfig))
    d = DedupConfig()
    return DedupConfig(
        enabled=s.boolean("enabled", d.enabled),
        seconds=s.number("seconds", d.seconds, 1.0, 7 * 24 * 3600.0),
        size=s.integer("size", d.size, 1, 1_000_000),  # about 190 bytes each, reserved at start
    )


def _logging(doc: Doc, node: yaml.Node | None) -> LoggingConfig:
    s = doc.mapping(node, "logging", _keys(LoggingConfig))
    d = LoggingConfig()
    return LoggingConfig(
        format=s.choice("format", d.format, ("auto", "json", "console")),
        level=s.choice("level", d.level, ("debug", "info", "warning", "error")),
    )


def _metrics(doc: Doc, node: yaml.Node | None) -> MetricsConfig:
    s = doc.mapping(node, "metrics", _keys(MetricsConfig))
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
    "journal": journal_section,
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
    top = doc.mapping(_compose(text, source), "", {*_SECTIONS, "topology", "routes"})
    values: dict[str, Any] = {
        name: _SECTIONS[name](doc, top.items.get(name)) for name in sections if name in _SECTIONS
    }
    broker: BrokerConfig = values.get("broker", BrokerConfig())
    if "server" in values and "broker" in values:
        _check_publish_timeout(doc, top, broker, values["server"])
    if "topology" in sections:
        values["topology"] = parse_topology(
            doc,
            top.items.get("topology"),
            default_topology(broker.exchange, broker.unrouted_exchange, broker.unrouted_queue),
        )
    if "routes" in sections:
        routes = parse_routes(doc, top.items.get("routes"), "routes")
        values["routes"] = default_routes(broker.exchange) if routes is None else routes
    _check_exchanges(doc, top, values, broker)
    if "journal" in values and "registrations" in values:
        node = top.items.get("journal")
        check_journal_registration(doc, node, values["journal"], values["registrations"])
    if doc.problems:
        raise ConfigError(doc.problems)
    return Config(source=source, **values)


def _compose(text: str, source: str) -> yaml.Node | None:
    """The YAML tree of ``text``; YAML that does not parse is a :class:`ConfigError` at once."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" ({source}:{mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"(top): not valid YAML: {problem}{where}"]) from None


def _check_publish_timeout(
    doc: Doc, top: Section, broker: BrokerConfig, server: ServerConfig
) -> None:
    """An unconfirmed publish must give up in time for the event to reach the outbox."""
    if broker.publish_timeout + 1.0 <= server.answer_deadline:
        return
    doc.fail(
        "broker.publish_timeout",
        locate(top.node, "broker", "publish_timeout")
        or locate(top.node, "server", "answer_deadline"),
        f"must be at least 1 s below server.answer_deadline ({server.answer_deadline:g}),"
        " so an event the broker does not confirm still has time to reach the outbox",
    )


def _check_exchanges(doc: Doc, top: Section, values: dict[str, Any], broker: BrokerConfig) -> None:
    """Every exchange the config publishes to must be in the topology: the unrouted exchange,
    and each rule's targets (the top-level routes and every registration's own)."""
    topology: Topology | None = values.get("topology")
    if topology is None:
        return
    exchanges = locate(top.node, "topology", "exchanges") or top.items.get("topology")
    if broker.unrouted_exchange not in {e.name for e in topology.exchanges}:
        doc.fail(
            "broker.unrouted_exchange",
            locate(top.node, "broker", "unrouted_exchange") or exchanges,
            f"exchange {broker.unrouted_exchange!r} (where events no rule takes go) is not "
            "in topology.exchanges",
        )
    routes = top.items.get("routes")
    if routes is None:  # the default rule, to broker.exchange
        routes = locate(top.node, "broker", "exchange") or exchanges
    check_route_exchanges(doc, values.get("routes", ()), routes, "routes", topology)
    for i, registration in enumerate(values.get("registrations", ())):
        if registration.routes is not None:
            check_route_exchanges(
                doc,
                registration.routes,
                locate(top.node, "registrations", i, "routes"),
                f"registrations[{i}].routes",
                topology,
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
