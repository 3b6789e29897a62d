"""bridge.authorize, pure: a registration takes an event addressed to it, from its orgs."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bridge.adobe.envelope import parse_delivery
from bridge.authorize import authorize, refusal
from bridge.config import Registration
from bridge.errors import Forbidden

MINE = Registration("default", "/webhook", ("client-a",), ims_orgs=("ORG1@AdobeOrg",))


def event(**fields: Any) -> dict[str, Any]:
    return {
        "event_id": "e1",
        "event": {"header": {"eventCode": "x"}, "body": {}},
        "recipient_client_id": "client-a",
        "imsOrgId": "ORG1@AdobeOrg",
        **fields,
    }


def test_an_event_for_this_registration_is_taken() -> None:
    (taken,) = parse_delivery(orjson.dumps(event())).events
    assert refusal(taken, MINE) is None


@pytest.mark.parametrize(
    ("fields", "reason", "detail"),
    [
        ({"recipient_client_id": "client-b"}, "recipient_mismatch", "not configured"),
        ({"recipient_client_id": None}, "recipient_mismatch", "recipient"),
        ({"imsOrgId": "ORG2@AdobeOrg"}, "org_mismatch", "IMS org"),
    ],
)
def test_others_are_refused_with_why(fields: dict[str, Any], reason: str, detail: str) -> None:
    (other,) = parse_delivery(orjson.dumps(event(**fields))).events
    problem = refusal(other, MINE)
    assert isinstance(problem, Forbidden)
    assert problem.reason == reason
    assert detail in problem.detail


def test_any_org_when_the_registration_names_none() -> None:
    anyone = Registration("any", "/any", ("client-a",))
    (other,) = parse_delivery(orjson.dumps(event(imsOrgId="ORG2@AdobeOrg"))).events
    assert refusal(other, anyone) is None


def test_one_foreign_element_refuses_the_whole_batch_and_names_it() -> None:
    batch = parse_delivery(orjson.dumps([event(), event(event_id="e2", imsOrgId="ORG9")]))
    with pytest.raises(Forbidden) as caught:
        authorize(batch, MINE)
    assert caught.value.detail.startswith("batch element 1: ")
    authorize(parse_delivery(orjson.dumps([event(), event(event_id="e2")])), MINE)


def _journal_refusal(doc: dict[str, Any]) -> Forbidden | None:
    (taken,) = parse_delivery(orjson.dumps(doc)).events
    return refusal(taken, MINE, recipient_required=False)


def test_a_journal_event_that_names_no_recipient_is_the_registrations() -> None:
    doc = event()
    del doc["recipient_client_id"]
    assert _journal_refusal(doc) is None
    problem = _journal_refusal({**doc, "imsOrgId": "ORG2@AdobeOrg"})  # the org still counts
    assert problem is not None
    assert problem.reason == "org_mismatch"


@pytest.mark.parametrize(
    "fields",
    [
        {"recipient_client_id": "client-b"},  # another client's
        {"recipient_client_id": None},  # named, but not a client id
        {"recipient_client_id": "client-a", "recipientclientid": "client-b"},  # disagreeing
    ],
)
def test_a_journal_event_that_names_another_recipient_is_refused(fields: dict[str, Any]) -> None:
    problem = _journal_refusal(event(**fields))
    assert problem is not None
    assert problem.reason == "recipient_mismatch"
