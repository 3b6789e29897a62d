"""The stand-in for Adobe's Journaling API and IMS (tests/adobe_journal.py), checked over HTTP."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message
from typing import Any

import aiohttp
import pytest

from tests.adobe_journal import JournalServer


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def positions(self) -> list[str]:
        return [item["position"] for item in self.json()["events"]]

    def links(self) -> dict[str, str]:
        """Every ``Link`` header line, by relation."""
        found: dict[str, str] = {}
        for value in self.headers.get_all("Link") or []:
            match = re.fullmatch(r'\s*<([^>]*)>\s*;\s*rel="([^"]+)"\s*', value)
            assert match, value
            found[match[2]] = match[1]
        return found


def fetch(url: str, *, data: bytes | None = None, headers: dict[str, str] | None = None) -> Reply:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return Reply(answer.status, answer.headers, answer.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read())


class Client:
    """Adobe's three headers, with a token from the server."""

    def __init__(self, server: JournalServer) -> None:
        self.server = server
        self.token = server.issue_token()

    def headers(self, **changes: str) -> dict[str, str]:
        headers = {
            "Authorization": f"Bearer {self.token}",
            "x-api-key": self.server.client_id,
            "x-ims-org-id": self.server.org_id,
        }
        headers.update({name.replace("_", "-"): value for name, value in changes.items()})
        return {name: value for name, value in headers.items() if value}

    def get(self, target: str = "", **changes: str) -> Reply:
        """``target``: a query (``?limit=2``) or a relative link, resolved as a browser would."""
        url = urllib.parse.urljoin(self.server.journal_url, target)
        return fetch(url, headers=self.headers(**changes))


def ims(server: JournalServer, **form: str) -> Reply:
    fields = {
        "grant_type": "client_credentials",
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "scope": "AdobeID,openid,adobeio_api",
    }
    body = urllib.parse.urlencode({**fields, **form}).encode()
    kind = {"Content-Type": "application/x-www-form-urlencoded"}
    return fetch(server.token_url, data=body, headers=kind)


@pytest.fixture
def server() -> Iterator[JournalServer]:
    with JournalServer() as running:
        yield running


@pytest.fixture
def client(server: JournalServer) -> Client:
    return Client(server)


def test_urls_are_adobes_shape(server: JournalServer) -> None:
    pattern = r"http://127\.0\.0\.1:\d+/events/organizations/23294/integrations/54108/[0-9a-f-]{36}"
    assert re.fullmatch(pattern, server.journal_url)
    assert server.token_url == f"http://127.0.0.1:{server.port}/ims/token/v3"


def test_ims_issues_bearer_tokens_for_the_credential(server: JournalServer) -> None:
    reply = ims(server)
    assert reply.status == 200
    body = reply.json()
    assert set(body) == {"access_token", "token_type", "expires_in"}
    assert (body["token_type"], body["expires_in"]) == ("bearer", 3600)
    client = Client(server)
    client.token = body["access_token"]
    assert client.get().status == 204  # accepted by the journal (empty: the end)
    for form, error, description in [
        ({"client_secret": "nope"}, "invalid_client", "invalid client_secret parameter"),
        ({"client_id": "other"}, "invalid_client", "invalid client_id parameter"),
        ({"grant_type": "password"}, "unsupported_grant_type", "unsupported grant_type parameter"),
        ({"scope": ""}, "invalid_scope", "missing scope parameter"),
    ]:
        refused = ims(server, **form)
        assert refused.status == 400
        assert refused.json() == {"error": error, "error_description": description}
    query = urllib.parse.urlencode(
        {"grant_type": "client_credentials", "client_id": server.client_id}
    )
    secret = urllib.parse.urlencode({"client_secret": server.client_secret, "scope": "adobeio_api"})
    assert fetch(f"{server.token_url}?{query}", data=secret.encode()).status == 200
    assert server.token_requests == 6
    assert [entry["status"] for entry in server.token_log] == [200, 400, 400, 400, 400, 200]


def test_pages_follow_next_links_and_since_is_exclusive(
    server: JournalServer, client: Client
) -> None:
    positions = server.add_many({"id": n} for n in range(5))
    assert server.positions == positions
    first = client.get("?limit=2")
    assert first.status == 200
    assert first.headers.get_content_type() == "application/json"
    assert first.positions() == positions[:2]
    assert [item["event"] for item in first.json()["events"]] == [{"id": 0}, {"id": 1}]
    assert first.json()["_page"] == {"last": positions[1], "count": 2}
    assert first.links() == {"next": f"{server.path}?since={positions[1]}&limit=2"}
    second = client.get(first.links()["next"])
    assert second.positions() == positions[2:4]
    third = client.get(second.links()["next"])
    assert third.json()["_page"] == {"last": positions[4], "count": 1}
    end_link = third.links()["next"]
    end = client.get(end_link)
    assert (end.status, end.body, end.headers["retry-after"]) == (204, b"", "1")
    assert end.links() == {
        "next": end_link,  # the same request
        "validate": f"{server.path}/validate?since={positions[4]}",
    }
    newer = server.add({"id": 5})
    assert client.get(end_link).positions() == [newer]
    assert client.get(f"?since={positions[0]}").positions() == [*positions[1:], newer]


def test_without_limit_every_kept_event_comes(server: JournalServer, client: Client) -> None:
    positions = server.add_many({"id": n} for n in range(150))
    reply = client.get()
    assert reply.positions() == positions
    assert reply.links() == {"next": f"{server.path}?since={positions[-1]}"}


def test_latest_jumps_to_the_end(server: JournalServer, client: Client) -> None:
    positions = server.add_many({"id": n} for n in range(3))
    jump = client.get("?latest=true&limit=5")
    assert (jump.status, jump.headers["retry-after"]) == (204, "1")
    assert jump.links()["next"] == f"{server.path}?since={positions[-1]}&limit=5"
    assert client.get(jump.links()["next"]).status == 204
    newer = server.add({"id": 3})
    assert client.get(jump.links()["next"]).positions() == [newer]
    assert client.get("?latest=true&since=" + positions[0]).status == 400


def test_seek_goes_back_in_time(server: JournalServer, client: Client) -> None:
    now = datetime.now(UTC)
    positions = [
        server.add({"id": n}, at=now - ago)
        for n, ago in enumerate([timedelta(hours=3), timedelta(hours=1), timedelta(minutes=1)])
    ]
    assert client.get("?seek=-PT2H").positions() == positions[1:]
    assert client.get("?seek=-P1D&limit=1").positions() == positions[:1]
    assert client.get("?seek=-P0DT1H30M").positions() == positions[1:]
    nothing = client.get("?seek=-PT30S")
    assert nothing.status == 204
    assert nothing.links()["next"] == f"{server.path}?since={positions[-1]}"
    for bad in ["PT2H", "-P1W", "-PT", "-2h", "-PT0S"]:
        assert client.get(f"?seek={bad}").status == 400, bad
    together = client.get(f"?seek=-PT2H&since={positions[0]}")
    assert (together.status, together.json()["error_code"]) == (400, "400")


def test_expired_positions_answer_410(server: JournalServer, client: Client) -> None:
    positions = server.add_many({"id": n} for n in range(4))
    server.expire(2)
    for gone in positions[:2]:
        reply = client.get(f"?since={gone}")
        assert reply.status == 410
        assert reply.body.decode() == f"Events at position {gone} have expired."
    assert client.get(f"?since={positions[2]}").positions() == positions[3:]
    assert client.get().positions() == positions[2:]  # the oldest kept
    assert client.get("?since=moose:not-a-position").status == 400
    server.expire(10)
    empty = client.get()
    assert empty.status == 204
    assert empty.links() == {"next": server.path}  # no expired position handed out again


def test_the_gateway_refuses_bad_credentials(server: JournalServer, client: Client) -> None:
    def refusal(reply: Reply) -> tuple[int, str]:
        return reply.status, reply.json()["error_code"]

    assert refusal(client.get(Authorization="")) == (401, "401013")
    assert refusal(client.get(Authorization="Bearer forged")) == (401, "401013")
    assert refusal(client.get(x_api_key="someone-else")) == (403, "403003")
    assert refusal(client.get(x_api_key="")) == (403, "403000")
    assert client.get(x_ims_org_id="OTHER@AdobeOrg").status == 403
    assert client.get(Authorization=f"Bearer {server.issue_token('openid')}").status == 403
    server.token_seconds = 0
    assert client.get(Authorization=f"Bearer {server.issue_token()}").status == 401  # expired
    server.token_seconds = 3600
    assert client.get().status == 204
    server.revoke_tokens()
    assert client.get().status == 401
    client.token = ims(server).json()["access_token"]
    assert client.get().status == 204
    assert server.requests[-1] == {
        "path": server.path,
        "query": {},
        "token": client.token,
        "status": 204,
        "events": 0,
    }


def test_pages_stay_under_the_size_cap() -> None:
    with JournalServer(page_cap_bytes=10_000) as server:
        client = Client(server)
        positions = server.add_many({"id": n, "pad": "x" * 3000} for n in range(7))
        big = server.add({"pad": "y" * 20_000})
        seen: list[str] = []
        reply = client.get()
        while reply.status == 200:
            assert reply.json()["_page"]["count"] == len(reply.positions()) >= 1
            assert len(reply.body) <= 10_000 or reply.positions() == [big]
            seen += reply.positions()
            reply = client.get(reply.links()["next"])
        assert seen == [*positions, big]
        assert [record["events"] for record in server.requests] == [3, 3, 1, 1, 0]


def test_fail_next_injects_errors(server: JournalServer, client: Client) -> None:
    server.fail_next(503, times=2, retry_after=2)
    server.fail_next(429)
    for status in (503, 503):
        reply = client.get()
        assert (reply.status, reply.headers["Retry-After"]) == (status, "2")
        assert reply.json()["error_code"] == "503"
    assert client.get().headers["Retry-After"] is None
    assert client.get().status == 204
    assert [record["status"] for record in server.requests] == [503, 503, 429, 204]


def test_events_given_as_bytes_come_verbatim(server: JournalServer, client: Client) -> None:
    raw = b'{"b": 1,  "a": "\\u00e9"}'
    position = server.add(raw)
    assert b'"event":' + raw in client.get().body
    assert client.get().positions() == [position]
    with pytest.raises(ValueError, match="JSON object"):
        server.add(b"[1]")


def test_validate_link_and_limits(server: JournalServer, client: Client) -> None:
    positions = server.add_many({"id": n} for n in range(2))
    assert client.get(f"{server.path}/validate?since={positions[0]}").positions() == positions[1:]
    assert client.get(f"{server.path}/validate").status == 400
    for bad in ["0", "-1", "x", "2147483648"]:
        assert client.get(f"?limit={bad}").status == 400, bad
    assert client.get("?latest=maybe").status == 400


async def test_an_async_client_sees_each_link_line(server: JournalServer) -> None:
    client = Client(server)
    position = server.add({"id": 0})
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{server.journal_url}?since={position}", headers=client.headers()) as answer,
    ):
        assert answer.status == 204
        assert len(answer.headers.getall("Link")) == 2
        assert set(answer.links) == {"next", "validate"}
        assert str(answer.links["next"]["url"]) == f"{server.journal_url}?since={position}"


def test_extra_links_as_the_sdk_sees_them() -> None:
    with JournalServer(extra_links=True) as server:
        client = Client(server)
        position = server.add({"id": 0})
        links = client.get().links()
        assert set(links) == {"events", "next", "latest", "page", "seek"}
        assert links["next"] == f"{server.path}?since={position}"


def test_stops_cleanly_and_restarts() -> None:
    server = JournalServer()
    with server:
        port = server.port
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
    assert not any(thread.name == "adobe-journal" for thread in threading.enumerate())
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port)):
        pass
    server.stop()  # twice is fine
    with server:
        assert Client(server).get().status == 204
