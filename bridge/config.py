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

T = TypeVar("T")

_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
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
    max_in_flight: int = 256  # webhook requests at once; more get 429
    # Adobe gives up after 10 s including connection set-up; we answer within this.
    answer_deadline: float = 7.5
    shutdown_timeout: float = 20.0


@dataclass(frozen=True)
class BrokerConfig:
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    heartbeat: int = 10
    connect_timeout: float = 5.0
    publish_timeout: float = 5.0
    reconnect_max_delay: float = 5.0
    exchange: str = "adobe.events"
    unrouted_exchange: str = "adobe.unrouted"
    unrouted_queue: str = "adobe.unrouted"


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


@dataclass(frozen=True)
class OutboxConfig:
    dir: str = ".local/outbox"
    mode: str = "off"


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
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    source: str = "<config>"


class _Doc:
    """Walks the composed YAML tree, collecting problems instead of stopping at the first."""

    def __init__(self, source: str, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.problems: list[str] = []

    def fail(self, path: str, node: yaml.Node | None, message: str) -> None:
        where = f" ({self.source}:{node.start_mark.line + 1})" if node is not None else ""
        self.problems.append(f"{path or '(top)'}: {message}{where}")

    def mapping(self, node: yaml.Node | None, path: str, allowed: set[str]) -> _Section:
        section = _Section(self, path, node)
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")):
            return section
        if not isinstance(node, yaml.MappingNode):
            self.fail(path, node, "expected a mapping of keys to values")
            return section
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            sub = f"{path}.{key}" if path else str(key)
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.fail(sub, key_node, f"unknown key (allowed here: {hint})")
            elif key in section.items:
                self.fail(sub, key_node, "duplicate key")
            else:
                section.items[key] = value_node
        return section

    def scalar(self, node: yaml.Node, path: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode):
            self.fail(path, node, "expected a single value, not a list or mapping")
            return None
        missing: list[str] = []

        def replace(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name, "")
            if value == "" and default is not None:
                return default
            if name not in self.environ:
                missing.append(name)
            return value

        text = _VAR.sub(replace, node.value)
        if missing:
            self.fail(path, node, f"environment variable {missing[0]} is not set")
            return None
        return text


class _Section:
    """One mapping of the YAML file, with typed getters that record problems."""

    def __init__(self, doc: _Doc, path: str, node: yaml.Node | None) -> None:
        self.doc, self.path, self.node = doc, path, node
        self.items: dict[str, yaml.Node] = {}

    def _sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, default: T, convert: Callable[[str], T], expected: str) -> T:
        node = self.items.get(key)
        if node is None:
            return default
        text = self.doc.scalar(node, self._sub(key))
        if text is None:
            return default
        try:
            return convert(text)
        except (ValueError, TypeError, KeyError):
            self.doc.fail(self._sub(key), node, f"expected {expected}, got {text!r}")
            return default

    def string(self, key: str, default: str, pattern: re.Pattern[str] | None = None) -> str:
        def convert(text: str) -> str:
            if not text.strip() or (pattern is not None and not pattern.match(text)):
                raise ValueError
            return text

        expected = (
            "a non-empty string" if pattern is None else f"a value matching {pattern.pattern}"
        )
        return self.get(key, default, convert, expected)

    def number(self, key: str, default: float, low: float, high: float) -> float:
        def convert(text: str) -> float:
            value = float(text)
            if not low <= value <= high:
                raise ValueError
            return value

        return self.get(key, default, convert, f"a number from {low:g} to {high:g}")

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        def convert(text: str) -> int:
            value = int(text.replace("_", ""))
            if not low <= value <= high:
                raise ValueError
            return value

        return self.get(key, default, convert, f"a whole number from {low} to {high}")

    def boolean(self, key: str, default: bool) -> bool:
        words = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        return self.get(key, default, lambda t: words[t.strip().lower()], "true or false")

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        def convert(text: str) -> str:
            if text not in choices:
                raise ValueError
            return text

        return self.get(key, default, convert, "one of " + ", ".join(choices))

    def strings(self, key: str) -> tuple[str, ...] | None:
        """A YAML list of strings, or one comma-separated string (handy from an env variable)."""
        node = self.items.get(key)
        if node is None:
            return None
        path = self._sub(key)
        if isinstance(node, yaml.SequenceNode):
            values: list[str | None] = [
                self.doc.scalar(item, f"{path}[{i}]") for i, item in enumerate(node.value)
            ]
        else:
            text = self.doc.scalar(node, path)
            if text is None:
                return None
            values = list(text.split(","))
        return tuple(v.strip() for v in values if v is not None and v.strip())


def _server(doc: _Doc, node: yaml.Node | None) -> ServerConfig:
    s = doc.mapping(
        node,
        "server",
        {"host", "port", "max_body_bytes", "max_in_flight", "answer_deadline", "shutdown_timeout"},
    )
    d = ServerConfig()
    cfg = ServerConfig(
        host=s.string("host", d.host),
        port=s.integer("port", d.port, 0, 65535),
        max_body_bytes=s.integer("max_body_bytes", d.max_body_bytes, 1024, 256 * 1024 * 1024),
        max_in_flight=s.integer("max_in_flight", d.max_in_flight, 1, 100_000),
        answer_deadline=s.number("answer_deadline", d.answer_deadline, 1.0, 8.0),
        shutdown_timeout=s.number("shutdown_timeout", d.shutdown_timeout, 0.0, 600.0),
    )
    if cfg.shutdown_timeout < cfg.answer_deadline:
        doc.fail(
            "server.shutdown_timeout",
            s.items.get("shutdown_timeout"),
            "must be at least server.answer_deadline, so requests in flight are answered",
        )
    return cfg


def _broker(doc: _Doc, node: yaml.Node | None) -> BrokerConfig:
    s = doc.mapping(
        node,
        "broker",
        {
            "url",
            "heartbeat",
            "connect_timeout",
            "publish_timeout",
            "reconnect_max_delay",
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


def _verification(doc: _Doc, node: yaml.Node | None) -> VerificationConfig:
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


def _registrations(doc: _Doc, node: yaml.Node | None) -> tuple[Registration, ...]:
    if node is None:
        doc.fail("registrations", None, "at least one registration is required")
        return ()
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        doc.fail("registrations", node, "expected a non-empty list of registrations")
        return ()
    result: list[Registration] = []
    for i, item in enumerate(node.value):
        path = f"registrations[{i}]"
        s = doc.mapping(item, path, {"name", "path", "client_ids", "ims_orgs"})
        name = s.string("name", f"registration-{i}", _NAME)
        url_path = s.string("path", "/webhook", _PATH)
        if url_path in _RESERVED_PATHS:
            doc.fail(f"{path}.path", s.items.get("path"), f"{url_path} is reserved")
        client_ids = s.strings("client_ids")
        if not client_ids and "client_ids" not in s.items:
            doc.fail(f"{path}.client_ids", item, "required: the client ids accepted as recipient")
        elif client_ids is not None and not client_ids:
            doc.fail(f"{path}.client_ids", s.items["client_ids"], "must name at least one id")
        result.append(Registration(name, url_path, client_ids or (), s.strings("ims_orgs") or ()))
    for field_name in ("name", "path"):
        seen: set[str] = set()
        for i, reg in enumerate(result):
            value = getattr(reg, field_name)
            if value in seen:
                doc.fail(f"registrations[{i}].{field_name}", node.value[i], f"duplicate {value!r}")
            seen.add(value)
    return tuple(result)


def _outbox(doc: _Doc, node: yaml.Node | None) -> OutboxConfig:
    s = doc.mapping(node, "outbox", {"dir", "mode"})
    d = OutboxConfig()
    # Only "off" exists so far: a broker that cannot take an event gets a 503 and Adobe retries.
    return OutboxConfig(dir=s.string("dir", d.dir), mode=s.choice("mode", d.mode, ("off",)))


def _logging(doc: _Doc, node: yaml.Node | None) -> LoggingConfig:
    s = doc.mapping(node, "logging", {"format", "level"})
    d = LoggingConfig()
    return LoggingConfig(
        format=s.choice("format", d.format, ("auto", "json", "console")),
        level=s.choice("level", d.level, ("debug", "info", "warning", "error")),
    )


_SECTIONS: dict[str, Callable[[_Doc, yaml.Node | None], Any]] = {
    "server": _server,
    "broker": _broker,
    "verification": _verification,
    "registrations": _registrations,
    "outbox": _outbox,
    "logging": _logging,
}


def parse_config(
    text: str,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    sections: tuple[str, ...] = tuple(_SECTIONS),
) -> Config:
    """Parse YAML text into a :class:`Config`, reading only ``sections`` (the rest keep defaults).

    Raises :class:`ConfigError` listing every problem found.
    """
    doc = _Doc(source, os.environ if environ is None else environ)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" ({source}:{mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"(top): not valid YAML: {problem}{where}"]) from None
    top = doc.mapping(root, "", set(_SECTIONS))
    values: dict[str, Any] = {}
    for name in sections:
        parse = _SECTIONS[name]
        values[name] = parse(doc, top.items.get(name))
    if doc.problems:
        raise ConfigError(doc.problems)
    return Config(source=source, **values)


def load_config(
    path: str | Path,
    environ: Mapping[str, str] | None = None,
    sections: tuple[str, ...] = tuple(_SECTIONS),
) -> Config:
    """Read and parse a config file; a missing or unreadable file is a :class:`ConfigError`."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError([f"{file}: cannot read the config file: {reason}"]) from None
    return parse_config(text, file.name, environ, sections)
