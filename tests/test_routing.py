"""Routing rules, table-driven: every matcher, every action, templates, and their YAML."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bridge.adobe.envelope import Event, parse_delivery
from bridge.config import parse_config
from bridge.errors import ConfigError
from bridge.routing import Router, Target, resolve_pointer
from tests.helpers import EVENTS

LIGHTROOM = (EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes()
CLOUDEVENT = (EVENTS / "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json").read_bytes()


def lightroom(status: str = "succeeded", org: str = "ORG1@AdobeOrg") -> Event:
    doc = orjson.loads(LIGHTROOM)
    doc["event"]["body"]["outputs"][0]["status"] = status
    doc["event"]["header"]["imsOrgId"] = org
    (event,) = parse_delivery(orjson.dumps(doc)).events
    return event


def rules(yaml_routes: str, topology: str = "") -> Router:
    text = (
        "registrations:\n  - {name: main, client_ids: [c]}\n"
        + (
            topology
            or "topology:\n  exchanges:\n"
            "    - {name: adobe.events, type: topic}\n    - {name: audit, type: fanout}\n"
            "    - {name: adobe.unrouted, type: fanout}\n"
        )
        + "routes:\n"
        + yaml_routes
    )
    config = parse_config(text, "t.yaml", {})
    return Router(config.routes, config.broker.unrouted_exchange)


def keys(
    router: Router, event: Event, provider: str | None = "p1", registration: str = "main"
) -> list[tuple[str, str]]:
    decision = router.route(event, provider, registration)
    return [(t.exchange, t.routing_key) for t in decision.targets]


UNROUTED = [("adobe.unrouted", "lightroom-job-status.succeeded")]
HIT = [("adobe.events", "hit")]


def one_rule(match: str) -> str:
    target = "{exchange: adobe.events, routing_key: hit}"
    return f"  - name: r\n    match: {match}\n    targets: [{target}]\n"


@pytest.mark.parametrize(
    ("match", "event", "expected"),
    [
        # event_code: glob, list of globs
        ("{event_code: lightroom-job-status}", lightroom(), HIT),
        ("{event_code: '*-job-status'}", lightroom(), HIT),
        ("{event_code: 'photoshop-*'}", lightroom(), UNROUTED),
        ("{event_code: [photoshop-job-status, lightroom-*]}", lightroom(), HIT),
        # status, including `none` for events without one
        ("{status: failed}", lightroom("failed"), HIT),
        ("{status: failed}", lightroom("succeeded"), []),
        ("{status: [failed, running]}", lightroom("running"), HIT),
        # org
        ("{org: ORG1@AdobeOrg}", lightroom(), HIT),
        ("{org: 'ORG2*'}", lightroom(), []),
        # provider (x-adobe-provider) and registration
        ("{provider: p1}", lightroom(), HIT),
        ("{provider: p2}", lightroom(), []),
        ("{registration: main}", lightroom(), HIT),
        ("{registration: other}", lightroom(), []),
        # JSON pointer matchers
        ("{fields: [{pointer: /event/body/jobId, exists: true}]}", lightroom(), HIT),
        ("{fields: [{pointer: /event/body/nope, exists: true}]}", lightroom(), []),
        ("{fields: [{pointer: /event/body/nope, exists: false}]}", lightroom(), HIT),
        (
            "{fields: [{pointer: /event/header/msgType, equals: JOB_COMPLETION_STATUS}]}",
            lightroom(),
            HIT,
        ),
        ("{fields: [{pointer: /event/header/msgType, equals: OTHER}]}", lightroom(), []),
        (
            "{fields: [{pointer: /event/body/outputs/0/status, one_of: [failed, succeeded]}]}",
            lightroom(),
            HIT,
        ),
        ("{fields: [{pointer: /event/body/outputs/0/status, one_of: [failed]}]}", lightroom(), []),
        (
            "{fields: [{pointer: /event/body/_links/self/href, glob: 'https://image.adobe.io/*'}]}",
            lightroom(),
            HIT,
        ),
        ("{fields: [{pointer: /event/body/outputs/5/status, glob: '*'}]}", lightroom(), []),
        # every matcher must hold
        ("{event_code: lightroom-job-status, status: failed}", lightroom("succeeded"), []),
        ("{}", lightroom(), HIT),
    ],
)
def test_each_matcher(match: str, event: Event, expected: list[tuple[str, str]]) -> None:
    router = rules(one_rule(match))
    found = keys(router, event)
    if expected == []:
        expected = [("adobe.unrouted", f"lightroom-job-status.{event.job_status}")]
    assert found == expected


def test_json_pointer_equals_is_json_equality() -> None:
    (event,) = parse_delivery(
        b'{"eventid":"e","specversion":"1.0","type":"t","data":{"n":1,"b":true,"s":"a/b"}}'
    ).events
    router = rules(one_rule("{fields: [{pointer: /data/n, equals: 1.0}]}"))
    assert keys(router, event) == HIT
    router = rules(one_rule("{fields: [{pointer: /data/b, equals: 1}]}"))
    assert keys(router, event) != HIT  # true is not 1
    router = rules(one_rule("{fields: [{pointer: /data/b, equals: true}]}"))
    assert keys(router, event) == HIT


@pytest.mark.parametrize(
    ("pointer", "expected"),
    [
        ("", {"a/b": {"~": [10, 20]}}),
        ("/a~1b", {"~": [10, 20]}),
        ("/a~1b/~0/1", 20),
        ("/a~1b/~0/2", "missing"),
        ("/a~1b/~0/x", "missing"),
        ("/nope", "missing"),
    ],
)
def test_resolve_pointer_follows_rfc_6901(pointer: str, expected: Any) -> None:
    found = resolve_pointer({"a/b": {"~": [10, 20]}}, pointer)
    assert (found if expected != "missing" else str(type(found))) == (
        expected if expected != "missing" else "<class 'object'>"
    )


def test_first_match_wins_and_stops() -> None:
    router = rules(
        "  - {name: a, match: {status: succeeded}, targets: [{exchange: adobe.events, "
        "routing_key: first}]}\n"
        "  - {name: b, targets: [{exchange: adobe.events, routing_key: second}]}\n"
    )
    decision = router.route(lightroom(), None, "main")
    assert [t.routing_key for t in decision.targets] == ["first"]
    assert decision.matched == ("a",)


def test_continue_lets_later_rules_add_targets() -> None:
    router = rules(
        "  - {name: audit, continue: true, targets: [{exchange: audit, routing_key: all}]}\n"
        "  - {name: main, targets: [{exchange: adobe.events}]}\n"
    )
    assert keys(router, lightroom()) == [
        ("audit", "all"),
        ("adobe.events", "lightroom-job-status.succeeded"),
    ]


def test_drop_discards_and_is_reported() -> None:
    router = rules(
        "  - {name: noise, match: {status: running}, action: drop}\n"
        "  - {name: main, targets: [{exchange: adobe.events}]}\n"
    )
    decision = router.route(lightroom("running"), None, "main")
    assert decision.dropped
    assert decision.dropped_by == "noise"
    assert not router.route(lightroom("failed"), None, "main").dropped


def test_drop_after_continue_keeps_the_earlier_targets() -> None:
    router = rules(
        "  - {name: audit, continue: true, targets: [{exchange: audit, routing_key: all}]}\n"
        "  - {name: noise, action: drop}\n"
    )
    decision = router.route(lightroom(), None, "main")
    assert [t.exchange for t in decision.targets] == ["audit"]
    assert decision.dropped_by == "noise"
    assert not decision.dropped


def test_nothing_matched_goes_to_unrouted_never_nowhere() -> None:
    router = rules(one_rule("{event_code: nothing-like-this}"))
    decision = router.route(lightroom(), None, "main")
    assert decision.unrouted
    assert decision.targets == (Target("adobe.unrouted", "lightroom-job-status.succeeded"),)


def test_templates_and_headers() -> None:
    router = rules(
        "  - name: t\n    targets:\n      - exchange: adobe.events\n"
        "        routing_key: '{registration}.{org_id}.{job_id}.{provider}.{/event/header/msgId}'\n"
        "        headers: {team: imaging, status: '{status}', missing: '{/no/such}'}\n"
    )
    (target,) = router.route(lightroom(), "p1", "main").targets
    assert target.routing_key == (
        "main.ORG1@AdobeOrg.eb4a9211-eb8a-4e88-b853-b9c08ba47427.p1."
        "eb4a9211-eb8a-4e88-b853-b9c08ba47427"
    )
    assert dict(target.headers) == {"team": "imaging", "status": "succeeded", "missing": "none"}


def test_long_routing_keys_are_cut_to_255_bytes() -> None:
    router = rules(
        "  - {name: t, targets: [{exchange: adobe.events, routing_key: "
        "'{event_code}.{event_code}.{event_code}.{event_code}.{event_code}.{event_code}.é'}]}\n"
    )
    (target,) = router.route(lightroom(), None, "main").targets
    assert len(target.routing_key.encode()) <= 255


def test_explain_says_why_for_every_rule() -> None:
    router = rules(
        "  - {name: only-failed, match: {status: failed}, targets: [{exchange: adobe.events}]}\n"
        "  - {name: all, targets: [{exchange: adobe.events}]}\n"
    )
    decision = router.route(lightroom(), None, "main", explain=True)
    assert decision.reasons == (
        "rule only-failed: no match: status 'succeeded' matches none of ['failed']",
        "rule all: matched: 1 target(s), search ends",
    )


def test_cloudevents_status_none_and_default_rule() -> None:
    config = parse_config("registrations:\n  - {name: m, client_ids: [c]}\n", "t.yaml", {})
    router = Router(config.routes, config.broker.unrouted_exchange)
    (event,) = parse_delivery(CLOUDEVENT).events
    assert keys(router, event) == [("adobe.events", "ASSET_DOWNLOAD_FAILED.none")]
    assert keys(router, lightroom("failed")) == [("adobe.events", "lightroom-job-status.failed")]


@pytest.mark.parametrize(
    ("routes", "problem"),
    [
        (
            "  - {name: a}\n",
            "routes[0].targets: required: a publish rule needs at least one target",
        ),
        (
            "  - {name: a, action: drop, targets: [{exchange: adobe.events}]}\n",
            "routes[0].targets: a drop rule has no targets",
        ),
        ("  - {name: a, action: send}\n", "routes[0].action: expected one of publish, drop"),
        (
            "  - {targets: [{exchange: nowhere}]}\n",
            "routes[0].targets[0].exchange: exchange 'nowhere' is not in topology.exchanges",
        ),
        ("  - {targets: [{routing_key: x}]}\n", "routes[0].targets[0].exchange: required"),
        (
            "  - {targets: [{exchange: adobe.events, routing_key: '{colour}'}]}\n",
            "routes[0].targets[0].routing_key: unknown placeholder {colour}",
        ),
        (
            "  - {match: {colour: red}, targets: [{exchange: adobe.events}]}\n",
            "routes[0].match.colour: unknown key",
        ),
        (
            "  - {match: {fields: [{pointer: x, exists: true}]},"
            " targets: [{exchange: adobe.events}]}\n",
            "routes[0].match.fields[0].pointer: required: a JSON pointer",
        ),
        (
            "  - {match: {fields: [{pointer: /a}]}, targets: [{exchange: adobe.events}]}\n",
            "routes[0].match.fields[0]: give exactly one of equals, one_of, exists, glob",
        ),
        (
            "  - {match: {fields: [{pointer: /a, one_of: x}]},"
            " targets: [{exchange: adobe.events}]}\n",
            "routes[0].match.fields[0].one_of: expected a list of values",
        ),
        (
            "  - {match: {status: []}, targets: [{exchange: adobe.events}]}\n",
            "routes[0].match.status: expected a glob or a non-empty list of globs",
        ),
        (
            "  - {continue: perhaps, targets: [{exchange: adobe.events}]}\n",
            "routes[0].continue: expected true or false",
        ),
    ],
)
def test_bad_rules_name_their_path(routes: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        rules(routes)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_a_registration_may_have_its_own_routes() -> None:
    text = (
        "registrations:\n"
        "  - {name: a, path: /a, client_ids: [c]}\n"
        "  - name: b\n    path: /b\n    client_ids: [c]\n"
        "    routes: [{name: only-b, targets: [{exchange: adobe.events, routing_key: b}]}]\n"
    )
    config = parse_config(text, "t.yaml", {})
    a, b = config.registrations
    assert config.routes_for(a) == config.routes
    assert [r.name for r in config.routes_for(b)] == ["only-b"]


@pytest.mark.parametrize(
    ("topology", "problem"),
    [
        (
            "  queues:\n    - {name: q, arguments: {x-max-length: 1.5}}\n",
            "topology.queues[0].arguments.x-max-length: expected a string, true/false or a whole",
        ),
        (
            "  queues:\n    - {name: q, type: classic, delivery_limit: 3}\n",
            "topology.queues[0].delivery_limit: only quorum queues have a delivery limit",
        ),
        (
            "  queues:\n    - {name: q, message_ttl_ms: 5000000000}\n",
            "topology.queues[0].message_ttl_ms: at most 4294967295 ms",
        ),
        (
            "  exchanges:\n    - {name: amq.topic}\n",
            "topology.exchanges[0].name: 'amq.topic': amq.* names belong to the broker",
        ),
        (
            "  exchanges:\n    - {name: adobe.events}\n",
            "broker.unrouted_exchange: exchange 'adobe.unrouted' (where events no rule takes go)",
        ),
    ],
)
def test_topology_values_the_broker_would_refuse_are_config_errors(
    topology: str, problem: str
) -> None:
    text = "registrations:\n  - {name: m, client_ids: [c]}\ntopology:\n" + topology
    if "exchanges" not in topology:
        text += (
            "  exchanges:\n    - {name: adobe.events}\n    - {name: adobe.unrouted, type: fanout}\n"
        )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "t.yaml", {})
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_equals_compares_lists_too() -> None:
    (event,) = parse_delivery(
        b'{"eventid":"e","specversion":"1.0","type":"t","data":{"tags":["a","b"]}}'
    ).events
    router = rules(one_rule("{fields: [{pointer: /data/tags, equals: [a, b]}]}"))
    assert keys(router, event) == HIT


def test_a_lone_surrogate_in_the_body_renders_as_none_not_a_crash() -> None:
    from bridge.adobe.envelope import parse_delivery
    from bridge.rules import Route, TargetSpec

    raw = b'{"event_id":"e","recipientclientid":"c","event":{"body":{"note":"\\ud800"}}}'
    (event,) = parse_delivery(raw).events
    router = Router(
        (
            Route(
                "r",
                targets=(TargetSpec("ex", "k.{/event/body/note}", (("n", "{/event/body/note}"),)),),
            ),
        ),
        "unrouted",
    )
    (target,) = router.route(event).targets
    assert target.routing_key == "k.none"
    assert target.headers == (("n", "none"),)
