"""Routing rules as configured in YAML (``routes:``): their types and their parsing.

Owns: the ``routes:`` list (also inside a registration), parsed into frozen dataclasses with
every problem named by YAML path and line (see the README, "Routing rules"). ``bridge.routing``
compiles the rules and applies them; the ``topology:`` they publish into is
``bridge.topology``'s. Pure: no I/O.

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

from bridge.topology import AMQP_NAME, Topology
from bridge.yamldoc import Doc, locate

MAX_HEADER_NAME_BYTES = 128
FIELD_OPS = ("equals", "one_of", "exists", "glob")
PLACEHOLDERS = ("event_code", "status", "org_id", "job_id", "provider", "registration")
DEFAULT_ROUTING_KEY = "{event_code}.{status}"

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
    exchange = s.string("exchange", "", AMQP_NAME)
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
                name=s.string("name", f"rule-{i}", AMQP_NAME),
                match=_match(doc, f"{sub}.match", s.items.get("match")),
                action=action,
                targets=targets,
                continue_=s.boolean("continue", False),
            )
        )
    return tuple(routes)


def check_route_exchanges(
    doc: Doc, routes: tuple[Route, ...], node: yaml.Node | None, path: str, topology: Topology
) -> None:
    """A rule may only publish to an exchange the topology names: publishing to one the broker
    lacks makes it close the whole connection, failing every publish in flight with it.

    ``node`` is the YAML list ``routes`` were parsed from, for the lines of the problems; for
    rules not in the file (the default one) the node they derive from.
    """
    known = {e.name for e in topology.exchanges}
    for i, route in enumerate(routes):
        for j, target in enumerate(route.targets):
            if target.exchange and target.exchange not in known:
                doc.fail(
                    f"{path}[{i}].targets[{j}].exchange",
                    locate(node, i, "targets", j, "exchange") or node,
                    f"exchange {target.exchange!r} is not in topology.exchanges",
                )
