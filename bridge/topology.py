"""Broker topology as configured in YAML (``topology:``): its types and its parsing.

Owns: the exchanges, queues and bindings the bridge declares (or, with ``passive: true``, only
expects), parsed into frozen dataclasses with every problem named by YAML path and line, and the
values the broker would refuse caught as config problems (see the README, "Topology"). Does
not: talk to the broker (``bridge.declare`` declares or checks what is parsed here). Pure: no I/O.

A topology::

    topology:
      passive: false                   # true: declare nothing, check that it all exists
      exchanges:
        - {name: adobe.events, type: topic, alternate_exchange: adobe.unrouted}
        - {name: adobe.unrouted, type: fanout}
      queues:
        - {name: adobe.unrouted}        # quorum unless type: classic or stream
        - {name: jobs, dead_letter_exchange: jobs.dlx, delivery_limit: 10}
        - {name: history, type: stream, max_age: 7D, max_length_bytes: 10000000000}
      bindings:
        - {exchange: adobe.unrouted, queue: adobe.unrouted}
        - {exchange: adobe.events, queue: jobs, routing_key: "*.failed"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from bridge.yamldoc import Doc, Section, locate

EXCHANGE_TYPES = ("topic", "direct", "fanout", "headers")
QUEUE_TYPES = ("quorum", "classic", "stream")
OVERFLOWS = ("drop-head", "reject-publish", "reject-publish-dlx")
AMQP_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,127}$")  # AMQP: exchange names <= 127
# RabbitMQ's x-max-age (and x-stream-offset interval): a whole number > 0 and one unit.
MAX_AGE = re.compile(r"[0-9]+[YMDhms]")  # fullmatch
MAX_AGE_EXPECTED = "a whole number > 0 and a unit: Y, M (30 days), D, h, m or s, as in 7D or 12h"
_MAX_AGE_SECONDS = {"Y": 365 * 86400, "M": 30 * 86400, "D": 86400, "h": 3600, "m": 60, "s": 1}
_MAX_SEGMENT_BYTES = 3_000_000_000  # RabbitMQ refuses a larger x-stream-max-segment-size-bytes

_TOPOLOGY_KEYS = {"passive", "exchanges", "queues", "bindings"}
_EXCHANGE_KEYS = {
    "name",
    "type",
    "durable",
    "auto_delete",
    "internal",
    "alternate_exchange",
    "arguments",
}
_QUEUE_KEYS = {
    "name",
    "type",
    "durable",
    "dead_letter_exchange",
    "dead_letter_routing_key",
    "message_ttl_ms",
    "max_length",
    "overflow",
    "delivery_limit",
    "max_length_bytes",
    "max_age",
    "stream_max_segment_size_bytes",
    "arguments",
}
# What a stream refuses (RabbitMQ 3.10 and 4.x answer PRECONDITION_FAILED): the key, and why.
_NOT_FOR_STREAMS = {
    "dead_letter_exchange": "streams do not dead-letter: a stream keeps every message",
    "dead_letter_routing_key": "streams do not dead-letter: a stream keeps every message",
    "message_ttl_ms": "streams do not expire single messages: use max_age",
    "max_length": "streams are not limited by message count: use max_length_bytes",
    "overflow": "streams do not overflow: retention (max_age, max_length_bytes) drops the "
    "oldest segments",
}
_ONLY_FOR_STREAMS = {
    "max_age": "only streams have max_age (a queue's messages expire with message_ttl_ms)",
    "stream_max_segment_size_bytes": "only streams have segments",
}
STREAM_REFUSED_ARGUMENTS = (
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-delivery-limit",
    "x-expires",
    "x-max-length",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-mode",
    "x-single-active-consumer",
)
_BINDING_KEYS = {"exchange", "queue", "routing_key", "arguments"}
_INT64 = (-(2**63), 2**63 - 1)
_MAX_TTL_MS = 2**32 - 1


@dataclass(frozen=True)
class ExchangeSpec:
    name: str
    type: str = "topic"
    durable: bool = True
    auto_delete: bool = False
    internal: bool = False
    alternate_exchange: str | None = None
    arguments: tuple[tuple[str, Any], ...] = ()

    def declare_arguments(self) -> dict[str, Any]:
        arguments = dict(self.arguments)
        if self.alternate_exchange:
            arguments["alternate-exchange"] = self.alternate_exchange
        return arguments


@dataclass(frozen=True)
class QueueSpec:
    name: str
    type: str = "quorum"
    durable: bool = True
    dead_letter_exchange: str | None = None
    dead_letter_routing_key: str | None = None
    message_ttl_ms: int | None = None
    max_length: int | None = None
    overflow: str | None = None
    delivery_limit: int | None = None
    max_length_bytes: int | None = None
    max_age: str | None = None  # streams: "7D", "12h"... (MAX_AGE)
    stream_max_segment_size_bytes: int | None = None
    arguments: tuple[tuple[str, Any], ...] = ()

    def declare_arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"x-queue-type": self.type}
        optional = {
            "x-dead-letter-exchange": self.dead_letter_exchange,
            "x-dead-letter-routing-key": self.dead_letter_routing_key,
            "x-message-ttl": self.message_ttl_ms,
            "x-max-length": self.max_length,
            "x-overflow": self.overflow,
            "x-delivery-limit": self.delivery_limit,
            "x-max-length-bytes": self.max_length_bytes,
            "x-max-age": self.max_age,
            "x-stream-max-segment-size-bytes": self.stream_max_segment_size_bytes,
        }
        arguments.update({k: v for k, v in optional.items() if v is not None})
        arguments.update(dict(self.arguments))
        return arguments


@dataclass(frozen=True)
class BindingSpec:
    exchange: str
    queue: str
    routing_key: str = ""
    arguments: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Topology:
    exchanges: tuple[ExchangeSpec, ...] = ()
    queues: tuple[QueueSpec, ...] = ()
    bindings: tuple[BindingSpec, ...] = ()
    passive: bool = False


def default_topology(exchange: str, unrouted_exchange: str, unrouted_queue: str) -> Topology:
    """The events topic exchange, whose alternate exchange parks what nobody binds (see the
    README, "Configuration": the shipped topology)."""
    return Topology(
        exchanges=(
            ExchangeSpec(unrouted_exchange, "fanout"),
            ExchangeSpec(exchange, "topic", alternate_exchange=unrouted_exchange),
        ),
        queues=(QueueSpec(unrouted_queue, "quorum"),),
        bindings=(BindingSpec(unrouted_exchange, unrouted_queue),),
    )


def parse_topology(doc: Doc, node: yaml.Node | None, default: Topology) -> Topology:
    """The ``topology:`` section under ``node``, or ``default`` when there is none."""
    if node is None:
        return default
    s = doc.mapping(node, "topology", _TOPOLOGY_KEYS)
    topology = Topology(
        exchanges=tuple(_exchange(doc, path, item) for path, item in s.sequence("exchanges")),
        queues=tuple(_queue(doc, path, item) for path, item in s.sequence("queues")),
        bindings=tuple(_binding(doc, path, item) for path, item in s.sequence("bindings")),
        passive=s.boolean("passive", False),
    )
    if not topology.passive:
        _check_reserved_names(doc, topology, node)
    _check_names(doc, topology, node)
    return topology


def _exchange(doc: Doc, path: str, node: yaml.Node) -> ExchangeSpec:
    e = doc.mapping(node, path, _EXCHANGE_KEYS)
    spec = ExchangeSpec(
        name=e.string("name", "", AMQP_NAME),
        type=e.choice("type", "topic", EXCHANGE_TYPES),
        durable=e.boolean("durable", True),
        auto_delete=e.boolean("auto_delete", False),
        internal=e.boolean("internal", False),
        alternate_exchange=e.string("alternate_exchange", "", AMQP_NAME) or None,
        arguments=_arguments(doc, e),
    )
    if not e.has("name"):
        doc.fail(f"{path}.name", node, "required")
    return spec


def _queue(doc: Doc, path: str, node: yaml.Node) -> QueueSpec:
    q = doc.mapping(node, path, _QUEUE_KEYS)
    queue_type = q.choice("type", "quorum", QUEUE_TYPES)
    durable = q.boolean("durable", True)
    if queue_type != "classic" and not durable:
        kind = "quorum queues" if queue_type == "quorum" else "streams"
        doc.fail(f"{path}.durable", q.items.get("durable"), f"{kind} are always durable")
    dlx = q.get("dead_letter_exchange", None, str, 'an exchange name ("" is the default)')
    spec = QueueSpec(
        name=q.string("name", "", AMQP_NAME),
        type=queue_type,
        durable=durable,
        dead_letter_exchange=dlx,
        dead_letter_routing_key=q.get("dead_letter_routing_key", None, str, "a routing key"),
        message_ttl_ms=_optional_int(q, "message_ttl_ms"),
        max_length=_optional_int(q, "max_length"),
        overflow=q.choice("overflow", "", OVERFLOWS) or None,
        delivery_limit=_optional_int(q, "delivery_limit"),
        max_length_bytes=_optional_range(q, "max_length_bytes", 1, _INT64[1]),
        max_age=q.get("max_age", None, _max_age, MAX_AGE_EXPECTED),
        stream_max_segment_size_bytes=_optional_range(
            q, "stream_max_segment_size_bytes", 1, _MAX_SEGMENT_BYTES
        ),
        arguments=_arguments(doc, q),
    )
    if not q.has("name"):
        doc.fail(f"{path}.name", node, "required")
    _check_queue_type(doc, q, spec)
    if spec.delivery_limit is not None and spec.type != "quorum":
        doc.fail(
            f"{path}.delivery_limit",
            q.items.get("delivery_limit"),
            "only quorum queues have a delivery limit",
        )
    if spec.message_ttl_ms is not None and spec.message_ttl_ms > _MAX_TTL_MS:
        doc.fail(f"{path}.message_ttl_ms", q.items.get("message_ttl_ms"), "at most 4294967295 ms")
    return spec


def _binding(doc: Doc, path: str, node: yaml.Node) -> BindingSpec:
    b = doc.mapping(node, path, _BINDING_KEYS)
    spec = BindingSpec(
        exchange=b.string("exchange", "", AMQP_NAME),
        queue=b.string("queue", "", AMQP_NAME),
        routing_key=b.get("routing_key", "", str, "a binding key"),
        arguments=_arguments(doc, b),
    )
    for key in ("exchange", "queue"):
        if not b.has(key):
            doc.fail(f"{path}.{key}", node, "required")
    return spec


def _arguments(doc: Doc, section: Section) -> tuple[tuple[str, Any], ...]:
    """AMQP table values the broker takes: strings, booleans, whole numbers within 64 bits."""
    path = f"{section.path}.arguments"
    values = section.scalars("arguments")
    for name, value in values.items():
        fits = isinstance(value, str | bool) or (
            isinstance(value, int) and _INT64[0] <= value <= _INT64[1]
        )
        if not fits:
            doc.fail(
                f"{path}.{name}",
                locate(section.items.get("arguments"), name),
                f"expected a string, true/false or a whole number, got {value!r}",
            )
    return tuple(sorted(values.items()))


def _check_queue_type(doc: Doc, q: Section, spec: QueueSpec) -> None:
    """Keys (and arguments) the broker would refuse for this queue's type."""
    stream = spec.type == "stream"
    for key, message in (_NOT_FOR_STREAMS if stream else _ONLY_FOR_STREAMS).items():
        if q.has(key):
            doc.fail(f"{q.path}.{key}", q.items[key], message)
    if not stream:
        return
    for name, value in spec.arguments:
        where = locate(q.items.get("arguments"), name)
        if name in STREAM_REFUSED_ARGUMENTS:
            doc.fail(f"{q.path}.arguments.{name}", where, "streams refuse this argument")
        elif name == "x-max-age" and not _is_max_age(value):
            doc.fail(f"{q.path}.arguments.{name}", where, f"expected {MAX_AGE_EXPECTED}")


def max_age_seconds(text: str) -> int:
    """Seconds in a RabbitMQ max-age (``7D``, ``12h``), as the broker counts them (a month is
    30 days, a year 365); :class:`ValueError` for anything else (``7d``, ``0D``, ``1.5h``)."""
    if not MAX_AGE.fullmatch(text) or int(text[:-1]) == 0:
        raise ValueError(f"expected {MAX_AGE_EXPECTED}, got {text!r}")
    return int(text[:-1]) * _MAX_AGE_SECONDS[text[-1]]


def _max_age(text: str) -> str:
    max_age_seconds(text)
    return text


def _is_max_age(value: object) -> bool:
    try:
        return isinstance(value, str) and max_age_seconds(value) > 0
    except ValueError:
        return False


def _optional_range(section: Section, key: str, low: int, high: int) -> int | None:
    def convert(text: str) -> int:
        value = int(text.replace("_", ""))
        if not low <= value <= high:
            raise ValueError
        return value

    found: int | None = section.get(key, None, convert, f"a whole number from {low} to {high}")
    return found


def _optional_int(section: Section, key: str) -> int | None:
    value: int | None = section.get(key, None, lambda t: _positive(int(t)), "a whole number >= 0")
    return value


def _positive(value: int) -> int:
    if value < 0:
        raise ValueError
    return value


def _check_reserved_names(doc: Doc, topology: Topology, node: yaml.Node) -> None:
    """``amq.*`` exchanges and queues belong to the broker: only passive mode may list them."""
    for kind, names in (
        ("exchanges", [e.name for e in topology.exchanges]),
        ("queues", [q.name for q in topology.queues]),
    ):
        for i, name in enumerate(names):
            if name.startswith("amq."):
                doc.fail(
                    f"topology.{kind}[{i}].name",
                    _at(node, kind, i, "name"),
                    f"{name!r}: amq.* names belong to the broker and cannot be "
                    "declared (use passive: true to rely on existing ones)",
                )


def _check_names(doc: Doc, topology: Topology, node: yaml.Node) -> None:
    """Bindings and alternate exchanges must name what the topology declares."""
    exchanges = {e.name for e in topology.exchanges}
    queues = {q.name for q in topology.queues}
    for i, binding in enumerate(topology.bindings):
        if binding.exchange and binding.exchange not in exchanges:
            doc.fail(
                f"topology.bindings[{i}].exchange",
                _at(node, "bindings", i, "exchange"),
                f"exchange {binding.exchange!r} is not in topology.exchanges",
            )
        if binding.queue and binding.queue not in queues:
            doc.fail(
                f"topology.bindings[{i}].queue",
                _at(node, "bindings", i, "queue"),
                f"queue {binding.queue!r} is not in topology.queues",
            )
    for i, exchange in enumerate(topology.exchanges):
        if exchange.alternate_exchange and exchange.alternate_exchange not in exchanges:
            doc.fail(
                f"topology.exchanges[{i}].alternate_exchange",
                _at(node, "exchanges", i, "alternate_exchange"),
                f"exchange {exchange.alternate_exchange!r} is not in topology.exchanges",
            )


def _at(node: yaml.Node, *steps: str | int) -> yaml.Node:
    """The node a problem is about, or the topology itself should it not be found."""
    return locate(node, *steps) or node
