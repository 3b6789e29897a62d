"""bridge.adobe.handshake, pure: the challenge a URL must echo, and Adobe's validation URL."""

from __future__ import annotations

import orjson
import pytest

from bridge.adobe.handshake import CHALLENGE, adobe_validation_url, try_validation


@pytest.mark.parametrize(
    "value", ["8ec8d794-e0ab-42df-9d5a-1c2b1e3f4a5b", "a", "x" * 256, "A.b_c~d"]
)
def test_challenges_adobe_sends_are_taken(value: str) -> None:
    assert CHALLENGE.fullmatch(value)


@pytest.mark.parametrize("value", ["", "x" * 257, "<script>", '"q"', "a b", "a\nb", "é"])
def test_anything_else_is_not_a_challenge(value: str) -> None:
    assert not CHALLENGE.fullmatch(value)


@pytest.mark.parametrize(
    "url",
    [
        "https://csm.adobe.io/csm/registrations/validate?id=abc&challenge=def",
        "https://CSM.adobe.io/csm/registrations/validate?id=1",
        "https://csm.adobe.io:443/csm/registrations/validate",
    ],
)
def test_adobe_s_validation_url_is_recognised(url: str) -> None:
    assert adobe_validation_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://csm.adobe.io/csm/registrations/validate",  # not https
        "https://csm.adobe.io:8443/csm",  # another port
        "https://evil.example/csm.adobe.io",
        "https://csm.adobe.io.evil.example/",
        "https://user@csm.adobe.io/",  # user info
        "https://csm.adobe.io\\@evil.example/",  # a backslash a browser reads otherwise
        "https://csm.adobe.io/ space",
        "https://csm.adobe.io/\x00",
        "https://[::1/",  # not a URL
        "",
        "https://csm.adobe.io/" + "a" * 2100,
    ],
)
def test_other_urls_are_not_adobe_s(url: str) -> None:
    assert not adobe_validation_url(url)


def test_an_unsigned_body_is_taken_only_as_the_validation_handshake() -> None:
    url = "https://csm.adobe.io/csm/registrations/validate?id=1"
    delivery = try_validation(orjson.dumps({"validationUrl": url}))
    assert delivery is not None
    assert delivery.validation_url == url
    assert delivery.events == ()
    assert try_validation(b"not json") is None
    assert try_validation(orjson.dumps({"event_id": "x", "event": {}})) is None
    # An event that also names a validationUrl is an event, not the handshake.
    assert try_validation(orjson.dumps({"validationUrl": url, "event_id": "x"})) is None
