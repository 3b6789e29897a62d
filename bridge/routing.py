"""The route step, pure: an event and the configured rules → where it is published.

Rules (``bridge.rules``) are tried in order. A rule matches when every matcher it gives holds:
globs on the event code, job status (``none`` when the event has none), IMS org, provider
(``x-adobe-provider``) and registration name, and JSON-pointer tests on the event document
(``equals``, ``one_of``, ``exists``, ``glob``). A matching ``publish`` rule adds its targets and
ends the search, unless it says ``continue: true``. A matching ``drop`` rule ends the search and
adds nothing: if no earlier rule added a target, the event is dropped (accepted, counted, logged,
never published). An event that no rule takes goes to the unrouted exchange (the README, "What is
published": ``adobe.unrouted``), never nowhere.

Targets carry templates: ``{event_code}``, ``{status}``, ``{org_id}``, ``{job_id}``,
``{provider}``, ``{registration}`` and ``{/json/pointer}``; a missing value renders as ``none``.
The shipped config has one rule, ``{event_code}.{status}`` to ``adobe.events``.

Does not: publish, or know anything of AMQP beyond names. Compiled once per configuration.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Final

from bridge.adobe.envelope import Event
from bridge.rules import DEFAULT_ROUTING_KEY, FieldMatch, Route, TargetSpec

NO_VALUE: Final = "none"
MAX_ROUTING_KEY_BYTES: Final = 255
_MISSING: Final = object()
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Target:
    exchange: str
    routing_key: str
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Facts:
    """What rules can look at: the event, and what its request says about it."""

    event: Event
    provider: str | None
    registration: str

    def value(self, name: str) -> str | None:
        event = self.event
        if name == "event_code":
            return event.event_code
        if name == "status":
            return event.job_status or NO_VALUE
        if name == "org_id":
            return event.ims_org
        if name == "job_id":
            return event.job_id
        if name == "provider":
            return self.provider
        if name == "registration":
            return self.registration
        found = resolve_pointer(event.document, name)
        return _text(found)


@dataclass(frozen=True)
class Decision:
    targets: tuple[Target, ...]
    matched: tuple[str, ...]  # names of the rules that matched, in order
    dropped_by: str | None  # the drop rule that ended the search, if any
    unrouted: bool  # no rule took it: sent to the unrouted exchange
    reasons: tuple[str, ...] = ()  # with explain=True: one line per rule tried

    @property
    def dropped(self) -> bool:
        return not self.targets


def resolve_pointer(document: Any, pointer: str) -> Any:
    """RFC 6901: ``/a/0/b`` into dicts and lists; ``~1`` is ``/``, ``~0`` is ``~``."""
    if pointer == "":
        return document
    current = document
    for raw in pointer.split("/")[1:]:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(current, dict):
            if token not in current:
                return _MISSING
            current = current[token]
        elif isinstance(current, list) and token.isdigit() and int(token) < len(current):
            current = current[int(token)]
        else:
            return _MISSING
    return current


def _text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: valid JSON, but no key or header carries it
            return None
        return value
    if isinstance(value, int | float):
        return str(value)
    return None


class _Template:
    """A routing-key or header template, split once into literals and placeholders."""

    def __init__(self, template: str) -> None:
        self.parts: list[tuple[str, str | None]] = []
        last = 0
        for match in _PLACEHOLDER.finditer(template):
            self.parts.append((template[last : match.start()], match.group(1)))
            last = match.end()
        self.parts.append((template[last:], None))

    def render(self, facts: Facts) -> str:
        out: list[str] = []
        for literal, name in self.parts:
            out.append(literal)
            if name is not None:
                out.append(facts.value(name) or NO_VALUE)
        return "".join(out)


def _cap(key: str) -> str:
    """Routing keys are AMQP short strings: at most 255 bytes, cut on a character boundary."""
    data = key.encode("utf-8")
    if len(data) <= MAX_ROUTING_KEY_BYTES:
        return key
    return data[:MAX_ROUTING_KEY_BYTES].decode("utf-8", "ignore")


class _CompiledTarget:
    def __init__(self, spec: TargetSpec) -> None:
        self.exchange = spec.exchange
        self.routing_key = _Template(spec.routing_key)
        self.headers = [(name, _Template(value)) for name, value in spec.headers]

    def render(self, facts: Facts) -> Target:
        headers = tuple((name, template.render(facts)) for name, template in self.headers)
        return Target(self.exchange, _cap(self.routing_key.render(facts)), headers)


Check = Callable[[Facts], str | None]  # None when it holds, else why not


def _glob_check(label: str, patterns: tuple[str, ...], name: str) -> Check:
    def check(facts: Facts) -> str | None:
        value = facts.value(name)
        if value is not None and any(fnmatchcase(value, p) for p in patterns):
            return None
        return f"{label} {value!r} matches none of {list(patterns)}"

    return check


def _field_check(field: FieldMatch) -> Check:
    def check(facts: Facts) -> str | None:
        found = resolve_pointer(facts.event.document, field.pointer)
        if field.op == "exists":
            holds = (found is not _MISSING) == bool(field.value)
            what = "exists" if found is not _MISSING else "is missing"
            return None if holds else f"{field.pointer} {what}"
        if found is _MISSING:
            return f"{field.pointer} is missing"
        if field.op == "equals":
            holds = _same(found, field.value)
        elif field.op == "one_of":
            holds = any(_same(found, v) for v in field.value)
        else:  # glob
            holds = isinstance(found, str) and fnmatchcase(found, str(field.value))
        return None if holds else f"{field.pointer} = {found!r} fails {field.op} {field.value!r}"

    return check


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, but true is not 1; a YAML list equals a JSON array."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


class _CompiledRoute:
    def __init__(self, route: Route) -> None:
        self.name = route.name
        self.drop = route.action == "drop"
        self.continue_ = route.continue_
        self.targets = [_CompiledTarget(t) for t in route.targets]
        m = route.match
        self.checks: list[Check] = []
        # matcher name, its globs, and the Facts value it reads (the template placeholder)
        for label, patterns, name in (
            ("event_code", m.event_code, "event_code"),
            ("status", m.status, "status"),
            ("org", m.org, "org_id"),
            ("provider", m.provider, "provider"),
            ("registration", m.registration, "registration"),
        ):
            if patterns:
                self.checks.append(_glob_check(label, patterns, name))
        self.checks.extend(_field_check(field) for field in m.fields)

    def why_not(self, facts: Facts) -> str | None:
        for check in self.checks:
            reason = check(facts)
            if reason is not None:
                return reason
        return None


class Router:
    """Applies an ordered list of rules; see the module docstring."""

    def __init__(self, routes: Sequence[Route], unrouted_exchange: str) -> None:
        self.routes = tuple(routes)
        self._compiled = [_CompiledRoute(r) for r in routes]
        self._unrouted = _CompiledTarget(TargetSpec(unrouted_exchange, DEFAULT_ROUTING_KEY))

    def route(
        self,
        event: Event,
        provider: str | None = None,
        registration: str = "",
        explain: bool = False,
    ) -> Decision:
        facts = Facts(event, provider, registration)
        targets: list[Target] = []
        matched: list[str] = []
        reasons: list[str] = []
        for rule in self._compiled:
            why_not = rule.why_not(facts)
            if why_not is not None:
                if explain:
                    reasons.append(f"rule {rule.name}: no match: {why_not}")
                continue
            matched.append(rule.name)
            if rule.drop:
                if explain:
                    reasons.append(f"rule {rule.name}: matched: drop, search ends")
                return Decision(tuple(targets), tuple(matched), rule.name, False, tuple(reasons))
            targets.extend(t.render(facts) for t in rule.targets)
            if explain:
                then = "search goes on" if rule.continue_ else "search ends"
                reasons.append(f"rule {rule.name}: matched: {len(rule.targets)} target(s), {then}")
            if not rule.continue_:
                break
        if not targets:
            if explain:
                reasons.append("no rule took it: the unrouted exchange")
            return Decision(
                (self._unrouted.render(facts),), tuple(matched), None, True, tuple(reasons)
            )
        return Decision(tuple(dict.fromkeys(targets)), tuple(matched), None, False, tuple(reasons))
