"""Routing rules and broker topology as configured in YAML: their types and their parsing.

Owns: the ``routes:`` list (also inside a registration) and the ``topology:`` section, parsed into
frozen dataclasses with every problem named by YAML path and line. ``bridge.routing`` compiles
the rules and applies them; ``bridge.publisher`` declares the topology. Pure: no I/O.

A rule::

    - name: failed-jobs                # for logs, metrics and `events-bridge route`
      match:                           # every given matcher must hold; none given: always
        event_code: "*-job-status"     # glob, or a list of globs (any may match)
        status: failed                 # same for status, org, provider, registration
        fields:                        # JSON pointers into the event (RFC 6901)
          - {pointer: /event/body/jobId, exists: true}
          - {pointer: /event/header/msgType, equals: JOB_COMPLETION_STATUS}
          - {pointer: /data/state, one_of: [FAILED, COMPLETED]}
          - {pointer: /source, glob: "urn:*"}
      targets:                         # one or more
        - exchange: adobe.events
          routing_key: "{event_code}.{status}"   # {event_code} {status} {org_id} {job_id}
          headers: {team: imaging}               # {provider} {registration} {/json/pointer}
      continue: false                  # true: later rules may add targets too
    - name: noise
      match: {event_code: "aem.*"}
      action: drop                     # accepted (200), counted and logged, never published
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from bridge.yamldoc import Doc

MAX_HEADER_NAME_BYTES = 128
EXCHANGE_TYPES = ("topic", "direct", "fanout", "headers")
QUEUE_TYPES = ("quorum", "classic")
OVERFLOWS = ("drop-head", "reject-publish", "reject-publish-dlx")
FIELD_OPS = ("equals", "one_of", "exists", "glob")
PLACEHOLDERS = ("event_code", "status", "org_id", "job_id", "provider", "registration")
DEFAULT_ROUTING_KEY = "{event_code}.{status}"

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,127}$")  # AMQP: exchange names <= 127
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class FieldMatch:
    pointer: str
    op: str  # equals, one_of, exists, glob
    value: Any


@dataclass(frozen=True)
class Match:
    event_code: tuple[str, ...] = ()
    status: tuple[str, ...] = ()
    org: tuple[str, ...] = ()
    provider: tuple[str, ...] = ()
    registration: tuple[str, ...] = ()
    fields: tuple[FieldMatch, ...] = ()


@dataclass(frozen=True)
class TargetSpec:
    exchange: str
    routing_key: str = DEFAULT_ROUTING_KEY
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Route:
    name: str
    match: Match = Match()
    action: str = "publish"  # or "drop"
    targets: tuple[TargetSpec, ...] = ()
    continue_: bool = False


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
    """SPEC §5: the events topic exchange, whose alternate exchange parks what nobody binds."""
    return Topology(
        exchanges=(
            ExchangeSpec(unrouted_exchange, "fanout"),
            ExchangeSpec(exchange, "topic", alternate_exchange=unrouted_exchange),
        ),
        queues=(QueueSpec(unrouted_queue, "quorum"),),
        bindings=(BindingSpec(unrouted_exchange, unrouted_queue),),
    )


def default_routes(exchange: str) -> tuple[Route, ...]:
    return (Route("default", targets=(TargetSpec(exchange),)),)


def check_template(template: str) -> str | None:
    """None when every ``{placeholder}`` is known (or a JSON pointer), else the problem."""
    for name in _PLACEHOLDER.findall(template):
        if name not in PLACEHOLDERS and not name.startswith("/"):
            return f"unknown placeholder {{{name}}} (known: {', '.join(PLACEHOLDERS)}, /pointer)"
    if template.count("{") != template.count("}"):
        return "unbalanced { }"
    return None


def _globs(doc: Doc, value: Any, path: str, node: yaml.Node | None) -> tuple[str, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str | int) and str(v) for v in values):
        doc.fail(path, node, "expected a glob or a non-empty list of globs")
        return ()
    return tuple(str(v) for v in values)


def _field(doc: Doc, path: str, node: yaml.Node) -> FieldMatch | None:
    s = doc.mapping(node, path, {"pointer", *FIELD_OPS})
    pointer = s.string("pointer", "")
    if not pointer.startswith("/"):
        doc.fail(
            f"{path}.pointer",
            s.items.get("pointer", node),
            "required: a JSON pointer such as /event/body/jobId",
        )
        return None
    ops = [op for op in FIELD_OPS if s.has(op)]
    if len(ops) != 1:
        doc.fail(path, node, f"give exactly one of {', '.join(FIELD_OPS)}")
        return None
    op = ops[0]
    value = s.value(op)
    if op == "exists" and not isinstance(value, bool):
        doc.fail(f"{path}.exists", s.items[op], "expected true or false")
    if op == "one_of" and not isinstance(value, list):
        doc.fail(f"{path}.one_of", s.items[op], "expected a list of values")
    if op == "glob" and not isinstance(value, str):
        doc.fail(f"{path}.glob", s.items[op], "expected a glob pattern")
    return FieldMatch(pointer, op, tuple(value) if isinstance(value, list) else value)


def _match(doc: Doc, path: str, node: yaml.Node | None) -> Match:
    s = doc.mapping(
        node, path, {"event_code", "status", "org", "provider", "registration", "fields"}
    )

    def globs(key: str) -> tuple[str, ...]:
        return _globs(doc, s.value(key), f"{path}.{key}", s.items.get(key))

    fields = tuple(found for sub, item in s.sequence("fields") if (found := _field(doc, sub, item)))
    return Match(
        globs("event_code"),
        globs("status"),
        globs("org"),
        globs("provider"),
        globs("registration"),
        fields,
    )


def _target(doc: Doc, path: str, node: yaml.Node) -> TargetSpec:
    s = doc.mapping(node, path, {"exchange", "routing_key", "headers"})
    exchange = s.string("exchange", "", _NAME)
    if not s.has("exchange"):
        doc.fail(f"{path}.exchange", node, "required: the exchange to publish to")
    routing_key = s.get("routing_key", DEFAULT_ROUTING_KEY, str, "a routing key template")
    headers = {name: str(value) for name, value in s.scalars("headers").items()}
    for name in headers:
        if not 0 < len(name.encode()) <= MAX_HEADER_NAME_BYTES:
            doc.fail(
                f"{path}.headers.{name}",
                node,
                f"a header name must be 1 to {MAX_HEADER_NAME_BYTES} bytes (AMQP field names)",
            )
    for name, template in [("routing_key", routing_key)] + [
        (f"headers.{k}", v) for k, v in headers.items()
    ]:
        problem = check_template(template)
        if problem:
            doc.fail(f"{path}.{name}", s.items.get(name.split(".")[0], node), problem)
    return TargetSpec(exchange, routing_key, tuple(headers.items()))


def parse_routes(doc: Doc, node: yaml.Node | None, path: str) -> tuple[Route, ...] | None:
    """The rules under ``node`` (a YAML list), or None when absent."""
    if node is None:
        return None
    if not isinstance(node, yaml.SequenceNode):
        doc.fail(path, node, "expected a list of rules")
        return ()
    routes: list[Route] = []
    for i, item in enumerate(node.value):
        sub = f"{path}[{i}]"
        s = doc.mapping(item, sub, {"name", "match", "action", "targets", "continue"})
        action = s.choice("action", "publish", ("publish", "drop"))
        targets = tuple(_target(doc, t_path, t) for t_path, t in s.sequence("targets"))
        if action == "publish" and not targets:
            doc.fail(
                f"{sub}.targets",
                s.items.get("targets", item),
                "required: a publish rule needs at least one target",
            )
        if action == "drop" and targets:
            doc.fail(f"{sub}.targets", s.items["targets"], "a drop rule has no targets")
        routes.append(
            Route(
                name=s.string("name", f"rule-{i}", _NAME),
                match=_match(doc, f"{sub}.match", s.items.get("match")),
                action=action,
                targets=targets,
                continue_=s.boolean("continue", False),
            )
        )
    return tuple(routes)


_INT64 = (-(2**63), 2**63 - 1)


def _arguments(doc: Doc, values: dict[str, Any], path: str) -> tuple[tuple[str, Any], ...]:
    """AMQP table values the broker takes: strings, booleans, whole numbers within 64 bits."""
    for name, value in values.items():
        fits = isinstance(value, str | bool) or (
            isinstance(value, int) and _INT64[0] <= value <= _INT64[1]
        )
        if not fits:
            doc.fail(
                f"{path}.{name}",
                None,
                f"expected a string, true/false or a whole number, got {value!r}",
            )
    return tuple(sorted(values.items()))


def parse_topology(doc: Doc, node: yaml.Node | None, default: Topology) -> Topology:
    if node is None:
        return default
    s = doc.mapping(node, "topology", {"passive", "exchanges", "queues", "bindings"})
    exchanges: list[ExchangeSpec] = []
    for path, item in s.sequence("exchanges"):
        e = doc.mapping(
            item,
            path,
            {
                "name",
                "type",
                "durable",
                "auto_delete",
                "internal",
                "alternate_exchange",
                "arguments",
            },
        )
        exchanges.append(
            ExchangeSpec(
                name=e.string("name", "", _NAME),
                type=e.choice("type", "topic", EXCHANGE_TYPES),
                durable=e.boolean("durable", True),
                auto_delete=e.boolean("auto_delete", False),
                internal=e.boolean("internal", False),
                alternate_exchange=e.string("alternate_exchange", "", _NAME) or None,
                arguments=_arguments(doc, e.scalars("arguments"), f"{path}.arguments"),
            )
        )
        if not e.has("name"):
            doc.fail(f"{path}.name", item, "required")
    queues: list[QueueSpec] = []
    for path, item in s.sequence("queues"):
        q = doc.mapping(
            item,
            path,
            {
                "name",
                "type",
                "durable",
                "dead_letter_exchange",
                "dead_letter_routing_key",
                "message_ttl_ms",
                "max_length",
                "overflow",
                "delivery_limit",
                "arguments",
            },
        )
        queue_type = q.choice("type", "quorum", QUEUE_TYPES)
        durable = q.boolean("durable", True)
        if queue_type == "quorum" and not durable:
            doc.fail(f"{path}.durable", q.items.get("durable"), "quorum queues are always durable")
        dlx = q.get("dead_letter_exchange", None, str, 'an exchange name ("" is the default)')
        queues.append(
            QueueSpec(
                name=q.string("name", "", _NAME),
                type=queue_type,
                durable=durable,
                dead_letter_exchange=dlx,
                dead_letter_routing_key=q.get(
                    "dead_letter_routing_key", None, str, "a routing key"
                ),
                message_ttl_ms=_optional_int(q, "message_ttl_ms"),
                max_length=_optional_int(q, "max_length"),
                overflow=q.choice("overflow", "", OVERFLOWS) or None,
                delivery_limit=_optional_int(q, "delivery_limit"),
                arguments=_arguments(doc, q.scalars("arguments"), f"{path}.arguments"),
            )
        )
        if not q.has("name"):
            doc.fail(f"{path}.name", item, "required")
        spec = queues[-1]
        if spec.delivery_limit is not None and spec.type != "quorum":
            doc.fail(
                f"{path}.delivery_limit",
                q.items.get("delivery_limit"),
                "only quorum queues have a delivery limit",
            )
        if spec.message_ttl_ms is not None and spec.message_ttl_ms >= 2**32:
            doc.fail(
                f"{path}.message_ttl_ms", q.items.get("message_ttl_ms"), "at most 4294967295 ms"
            )
    bindings: list[BindingSpec] = []
    for path, item in s.sequence("bindings"):
        b = doc.mapping(item, path, {"exchange", "queue", "routing_key", "arguments"})
        bindings.append(
            BindingSpec(
                exchange=b.string("exchange", "", _NAME),
                queue=b.string("queue", "", _NAME),
                routing_key=b.get("routing_key", "", str, "a binding key"),
                arguments=_arguments(doc, b.scalars("arguments"), f"{path}.arguments"),
            )
        )
        for key in ("exchange", "queue"):
            if not b.has(key):
                doc.fail(f"{path}.{key}", item, "required")
    passive = s.boolean("passive", False)
    if not passive:
        for kind, names in (
            ("exchanges", [e.name for e in exchanges]),
            ("queues", [q.name for q in queues]),
        ):
            for i, name in enumerate(names):
                if name.startswith("amq."):
                    doc.fail(
                        f"topology.{kind}[{i}].name",
                        node,
                        f"{name!r}: amq.* names belong to the broker and cannot be "
                        "declared (use passive: true to rely on existing ones)",
                    )
    topology = Topology(tuple(exchanges), tuple(queues), tuple(bindings), passive)
    _check_names(doc, topology, node)
    return topology


def _optional_int(section: Any, key: str) -> int | None:
    value: int | None = section.get(key, None, lambda t: _positive(int(t)), "a whole number >= 0")
    return value


def _positive(value: int) -> int:
    if value < 0:
        raise ValueError
    return value


def _check_names(doc: Doc, topology: Topology, node: yaml.Node) -> None:
    """Bindings and alternate exchanges must name what the topology declares."""
    exchanges = {e.name for e in topology.exchanges}
    queues = {q.name for q in topology.queues}
    for i, binding in enumerate(topology.bindings):
        if binding.exchange and binding.exchange not in exchanges:
            doc.fail(
                f"topology.bindings[{i}].exchange",
                node,
                f"exchange {binding.exchange!r} is not in topology.exchanges",
            )
        if binding.queue and binding.queue not in queues:
            doc.fail(
                f"topology.bindings[{i}].queue",
                node,
                f"queue {binding.queue!r} is not in topology.queues",
            )
    for i, exchange in enumerate(topology.exchanges):
        if exchange.alternate_exchange and exchange.alternate_exchange not in exchanges:
            doc.fail(
                f"topology.exchanges[{i}].alternate_exchange",
                node,
                f"exchange {exchange.alternate_exchange!r} is not in topology.exchanges",
            )


def check_route_exchanges(
    doc: Doc, routes: tuple[Route, ...], path: str, topology: Topology, unrouted: str
) -> None:
    """A rule may only publish to an exchange the topology names: publishing to one the broker
    lacks makes it close the whole connection, failing every publish in flight with it."""
    known = {e.name for e in topology.exchanges}
    for i, route in enumerate(routes):
        for j, target in enumerate(route.targets):
            if target.exchange and target.exchange not in known:
                doc.fail(
                    f"{path}[{i}].targets[{j}].exchange",
                    None,
                    f"exchange {target.exchange!r} is not in topology.exchanges",
                )
