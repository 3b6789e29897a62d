"""IMS access tokens (``bridge.ims.Tokens``) against the stand-in IMS of ``tests/adobe_journal.py``:
the form sent, the cache, the renewal before expiry and after a 401, and the refusals, which
never carry the secret."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from bridge import metrics
from bridge.adobe.journal import JournalProblem
from bridge.config_types import DEFAULT_IMS_SCOPES, ImsConfig
from bridge.ims import Tokens, problem_text
from tests.adobe_journal import JournalServer
from tests.processes import free_port

SECRET = "p8e-VeRy-S3cret-value"


@pytest.fixture
def server() -> Iterator[JournalServer]:
    with JournalServer(client_secret=SECRET) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as made:
        yield made


def credential(server: JournalServer, **changes: Any) -> ImsConfig:
    fields: dict[str, Any] = {
        "token_url": server.token_url,
        "client_id": server.client_id,
        "client_secret": server.client_secret,
        "org_id": server.org_id,
        "scopes": ("openid", "AdobeID", "adobeio_api"),
        **changes,
    }
    return ImsConfig(**fields)


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def renewals(reason: str) -> float:
    found = metrics.REGISTRY.get_sample_value(
        "bridge_journal_token_renewals_total", {"reason": reason}
    )
    return found or 0.0


def answers_with(
    server: JournalServer, monkeypatch: pytest.MonkeyPatch, answer: dict[str, Any]
) -> None:
    """IMS answers 200 with ``answer`` and a token the journal would take."""
    # Issued now: the server's lock, which issue_token takes, is held while it answers.
    tokens = [server.issue_token() for _ in range(4)]

    def grant(form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        return 200, {"access_token": tokens.pop(0), "token_type": "bearer", **answer}

    monkeypatch.setattr(server, "_grant", grant)


async def test_the_form_is_client_credentials_with_comma_joined_scopes(
    server: JournalServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    forms: list[dict[str, str]] = []
    real: Callable[[dict[str, str]], tuple[int, dict[str, Any]]] = server._grant  # noqa: SLF001

    def spy(form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        forms.append(dict(form))
        return real(form)

    monkeypatch.setattr(server, "_grant", spy)
    token = await Tokens(credential(server), session).token()
    assert token
    assert forms == [
        {
            "grant_type": "client_credentials",
            "client_id": server.client_id,
            "client_secret": SECRET,
            "scope": "openid,AdobeID,adobeio_api",
        }
    ]
    assert server.token_log[-1]["status"] == 200


async def test_the_default_scopes_are_sent_joined_by_commas(
    server: JournalServer, session: aiohttp.ClientSession
) -> None:
    await Tokens(credential(server, scopes=DEFAULT_IMS_SCOPES), session).token()
    assert server.token_log[-1]["scope"] == ",".join(DEFAULT_IMS_SCOPES)
    assert "adobeio_api" in server.token_log[-1]["scope"].split(",")


async def test_a_token_is_cached_one_request_for_many_calls(
    server: JournalServer, session: aiohttp.ClientSession
) -> None:
    first = renewals("first")
    tokens = Tokens(credential(server), session)
    many = [await tokens.token() for _ in range(10)]
    many += await asyncio.gather(*(tokens.token() for _ in range(10)))  # at once: one request
    assert len(set(many)) == 1
    assert server.token_requests == 1
    assert renewals("first") == first + 1


async def test_a_token_is_renewed_before_it_expires(
    server: JournalServer, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    expiring = renewals("expiring")
    tokens = Tokens(credential(server), session, clock=clock)
    first = await tokens.token()
    # An hour's token: renewed when a tenth of its life (6 minutes) is left, not later.
    clock.now += 3600 - 361
    assert await tokens.token() == first
    assert server.token_requests == 1
    clock.now += 2
    second = await tokens.token()
    assert second != first
    assert server.token_requests == 2
    assert renewals("expiring") == expiring + 1


async def test_a_rejected_token_gives_a_new_one_at_once(
    server: JournalServer, session: aiohttp.ClientSession
) -> None:
    rejected = renewals("rejected")
    tokens = Tokens(credential(server), session)
    first = await tokens.token()
    tokens.rejected("some-older-token")  # not the current one: nothing to do
    assert await tokens.token() == first
    tokens.rejected(first)
    second = await tokens.token()
    assert second != first
    assert server.token_requests == 2
    assert renewals("rejected") == rejected + 1
    tokens.rejected(first)  # a late 401 for the old token does not throw the new one away
    assert await tokens.token() == second
    assert server.token_requests == 2


async def test_a_refused_credential_is_a_token_problem_without_the_secret(
    server: JournalServer, session: aiohttp.ClientSession
) -> None:
    wrong = "wr0ng-" + SECRET
    tokens = Tokens(credential(server, client_secret=wrong), session)
    with pytest.raises(JournalProblem) as caught:
        await tokens.token()
    problem = caught.value
    assert problem.kind == "token"
    assert "400" in problem.detail
    assert "invalid_client" in problem.detail
    for text in (problem.detail, str(problem), repr(problem)):
        assert wrong not in text
        assert SECRET not in text
    assert "\n" not in problem.detail
    assert server.token_log[-1]["status"] == 400
    assert wrong not in repr(credential(server, client_secret=wrong))  # nor in the config's repr


async def test_an_unreachable_ims_is_a_network_problem(session: aiohttp.ClientSession) -> None:
    """Not the credential's fault: a one-shot retries it (``token`` is fatal there)."""
    config = ImsConfig(
        token_url=f"http://127.0.0.1:{free_port()}/ims/token/v3",
        client_id="cid",
        client_secret=SECRET,
        org_id="ORG@AdobeOrg",
    )
    with pytest.raises(JournalProblem) as caught:
        await Tokens(config, session, timeout=2.0).token()
    assert caught.value.kind == "network"
    assert caught.value.detail.startswith("IMS token request failed")
    assert SECRET not in caught.value.detail


async def test_a_200_without_a_token_is_a_token_problem(
    server: JournalServer, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "_grant", lambda form: (200, {"token_type": "bearer"}))
    with pytest.raises(JournalProblem) as caught:
        await Tokens(credential(server), session).token()
    assert (caught.value.kind, caught.value.detail) == (
        "token",
        "IMS answered 200 without an access_token",
    )


@pytest.mark.parametrize(
    ("answer", "lifetime"),
    [
        ({}, 3600),  # not said: an hour
        ({"expires_in": None}, 3600),
        ({"expires_in": "86399"}, 86399),  # a string of digits
        ({"expires_in": 86_399_956}, 86_399.956),  # milliseconds, as IMS v2 said it
        ({"expires_in": 0}, 3600),
        ({"expires_in": -5}, 3600),
        ({"expires_in": True}, 3600),
    ],
)
async def test_expires_in_missing_or_in_milliseconds_is_read_sensibly(
    server: JournalServer,
    session: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    answer: dict[str, Any],
    lifetime: float,
) -> None:
    answers_with(server, monkeypatch, answer)
    clock = Clock()
    tokens = Tokens(credential(server), session, clock=clock)
    first = await tokens.token()
    margin = min(max(lifetime / 10, 60.0), 3600.0)
    clock.now += lifetime - margin - 1
    assert await tokens.token() == first, "renewed too early"
    clock.now += 2
    assert await tokens.token() != first, "not renewed before it expires"


async def test_an_answer_that_comes_in_pieces_is_read_whole(
    server: JournalServer, session: aiohttp.ClientSession
) -> None:
    """IMS's JSON over several chunks (TLS records, chunked encoding): read to its end."""
    token = server.issue_token()
    answer = orjson.dumps({"access_token": token, "token_type": "bearer", "expires_in": 86399})

    async def in_pieces(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        for start in range(0, len(answer), 16):
            await response.write(answer[start : start + 16])
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/ims/token/v3", in_pieces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        config = credential(server, token_url=f"http://127.0.0.1:{port}/ims/token/v3")
        assert await Tokens(config, session).token() == token
    finally:
        await runner.cleanup()


async def test_a_live_token_is_used_while_its_renewal_fails(
    server: JournalServer, session: aiohttp.ClientSession
) -> None:
    clock = Clock()
    config = credential(server)
    tokens = Tokens(config, session, clock=clock)
    first = await tokens.token()
    clock.now += 3600 - 300  # renewal due (360 s before expiry), 300 s of life left
    server.client_secret = "rotated"  # IMS now refuses the credential we hold
    assert await tokens.token() == first
    asked = server.token_requests
    assert await tokens.token() == first  # not asked again at every request
    assert server.token_requests == asked
    clock.now += 30
    assert await tokens.token() == first  # asked again after a while: still refused
    assert server.token_requests == asked + 1
    clock.now += 300  # the token's life is over: now the refusal is the answer
    with pytest.raises(JournalProblem) as caught:
        await tokens.token()
    assert caught.value.kind == "token"


def test_a_failures_text_masks_the_user_and_password_of_every_url() -> None:
    exc = aiohttp.ClientConnectionError("no http://u:p@ss@proxy:3128/x, nor https://tok@h/?a=b@c")
    assert problem_text(exc) == "no http://***@proxy:3128/x, nor https://***@h/?a=b@c"
    assert problem_text(TimeoutError()) == "TimeoutError"
