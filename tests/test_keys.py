"""The key store: paths never seen are fetched at a bounded rate, apart from Adobe's own."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bridge.config import VerificationConfig
from bridge.errors import KeyHostUnavailable
from bridge.keys import MAX_CONCURRENT_FETCHES, UNKNOWN_BURST, KeyMissing, KeyStore
from tests.helpers import KEY_PATH, SigningKey


@pytest.fixture
async def slow_host(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]],
) -> tuple[str, list[str]]:
    """A key host that has one key, and takes a second to say it has no other."""
    hits: list[str] = []
    pem = SigningKey.generate().public_pem

    async def key(request: web.Request) -> web.Response:
        hits.append(request.path)
        if request.path == KEY_PATH:
            return web.Response(body=pem)
        await asyncio.sleep(1.0)
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_get("/{tail:.*}", key)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), hits


async def test_made_up_paths_are_fetched_at_a_bounded_rate_and_never_queue(
    slow_host: tuple[str, list[str]],
) -> None:
    url, hits = slow_host
    now = [0.0]
    keys = KeyStore(VerificationConfig(key_base_url=url, key_cache_seconds=1), clock=lambda: now[0])
    await keys.get(KEY_PATH)  # Adobe's own path: known from now on
    now[0] += 5  # its cache entry has expired; the bucket has refilled
    made_up = [keys.get(f"/prod/keys/pub-key-made-up-{i}.pem") for i in range(100)]
    results = await asyncio.gather(*made_up, return_exceptions=True)
    limited = [r for r in results if isinstance(r, KeyHostUnavailable)]
    assert {r.reason for r in limited} == {"key_fetch_limited"}
    assert len(results) - len(limited) == UNKNOWN_BURST
    assert all(isinstance(r, KeyMissing | KeyHostUnavailable) for r in results)
    assert len(hits) == 1 + UNKNOWN_BURST
    await keys.close()


async def test_a_known_path_is_fetched_again_past_a_flood_of_made_up_ones(
    slow_host: tuple[str, list[str]],
) -> None:
    url, _ = slow_host
    now = [0.0]
    keys = KeyStore(VerificationConfig(key_base_url=url, key_cache_seconds=1), clock=lambda: now[0])
    await keys.get(KEY_PATH)
    now[0] += 5
    flood = [
        asyncio.ensure_future(keys.get(f"/prod/keys/pub-key-flood-{i}.pem"))
        for i in range(MAX_CONCURRENT_FETCHES * 2)
    ]
    await asyncio.sleep(0.05)  # every unknown slot is busy with a slow miss
    started = asyncio.get_running_loop().time()
    await keys.get(KEY_PATH)
    assert asyncio.get_running_loop().time() - started < 0.5
    await asyncio.gather(*flood, return_exceptions=True)
    await keys.close()


async def test_known_paths_outlive_a_restart(
    slow_host: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, _ = slow_host
    config = VerificationConfig(key_base_url=url)
    first = KeyStore(config, known_file=tmp_path / "known-key-paths")
    await first.get(KEY_PATH)
    await first.close()
    assert (tmp_path / "known-key-paths").read_text() == KEY_PATH + "\n"
    now = [0.0]
    again = KeyStore(config, clock=lambda: now[0], known_file=tmp_path / "known-key-paths")
    # A flood of made-up paths right after the restart spends every token.
    flood = [
        asyncio.create_task(again.get(f"/prod/keys/pub-key-flood-{n}.pem"))
        for n in range(int(UNKNOWN_BURST))
    ]
    await asyncio.sleep(0)
    with pytest.raises(KeyHostUnavailable):
        await again.get("/prod/keys/pub-key-never-seen.pem")
    await again.get(KEY_PATH)  # known: no token needed
    for task in flood:
        task.cancel()
    await asyncio.gather(*flood, return_exceptions=True)
    await again.close()
