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
