"""Adobe's public signing keys: fetched from the key base URL, parsed once, cached by path.

Owns: the one outbound HTTP client of the daemon. Rules, each a defence:

- only paths matching ``/prod/keys/pub-key-<id>.pem`` are ever asked for, appended to the
  configured base URL (no other host, scheme or folder can be reached from a header);
- redirects are not followed, bodies are capped (``key_max_bytes``), every fetch has a timeout;
- a key is cached by path for ``key_cache_seconds`` (at most 24 h, as Adobe asks); a path that
  does not exist (403/404/410) or holds no acceptable RSA key is remembered for 10 s only;
- concurrent requests for the same path share one fetch, and misses are cached apart from keys,
  so made-up paths cannot evict a real key;
- paths that once held a good key (``known``: Adobe's, at most 64, kept across restarts in
  ``outbox.dir/known-key-paths`` when there is an outbox) are fetched again on slots of their
  own; a path never seen (anyone can make one up, unsigned) waits for no one: at most
  :data:`UNKNOWN_PER_SECOND` such fetches a second start (a burst of :data:`UNKNOWN_BURST`), and
  one past that is a 503 at once (``key_fetch_limited``), so a flood of made-up paths never
  delays the requests whose keys are known;
- ``file:///folder`` base URLs read ``folder/prod/keys/pub-key-<id>.pem`` (tests, ``make run``).

A definite "no such key" raises :class:`KeyMissing` (the signature cannot verify: 401); a host
that cannot be asked (refused, timeout, 5xx, redirect, oversized answer) raises
:class:`KeyHostUnavailable` (503, so Adobe retries later). Does not: verify signatures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final, TypeVar

import aiohttp
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa

from bridge import metrics
from bridge.adobe.signature import BadKey, key_path_allowed, load_public_key
from bridge.config import VerificationConfig
from bridge.errors import KeyHostUnavailable

log = structlog.get_logger("bridge.keys")
T = TypeVar("T")

NEGATIVE_TTL: Final = 10.0
MAX_KEYS: Final = 64  # Adobe uses two keys at a time; rotations add a few
MAX_MISSES: Final = 1024
MAX_CONCURRENT_FETCHES: Final = 4  # for paths never seen
MAX_KNOWN_FETCHES: Final = 2  # for paths that held a good key: never behind the others
UNKNOWN_PER_SECOND: Final = 2.0
UNKNOWN_BURST: Final = 8.0
_MISSING_STATUSES: Final = frozenset({403, 404, 410})  # CloudFront/S3 answer 403 for no object


class KeyMissing(Exception):
    """There is no acceptable key at this path: a definite answer (401). The host saying "no
    such key" is remembered for 10 s; unacceptable key material is not remembered at all, so a
    host that serves a good key again is believed at once."""

    def __init__(self, reason: str, remember: bool = True) -> None:
        super().__init__(reason)
        self.remember = remember


class KeyStore:
    """Resolve key paths to parsed RSA public keys; see the module docstring for the rules."""

    def __init__(
        self,
        config: VerificationConfig,
        clock: Callable[[], float] = time.monotonic,
        known_file: Path | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        # The known paths outlive a restart (``outbox.dir/known-key-paths``), so a flood of
        # made-up paths right after one does not shut out Adobe's: paths only, never keys.
        self._known_file = known_file
        # Keys and misses are kept apart, so that a flood of made-up paths (each one allowed by
        # the pattern, each one a miss) can never push a real key out of the cache.
        self._keys: dict[str, tuple[float, rsa.RSAPublicKey]] = {}
        self._misses: dict[str, tuple[float, KeyMissing]] = {}
        self._fetch_slots = asyncio.Semaphore(MAX_CONCURRENT_FETCHES)
        self._known_slots = asyncio.Semaphore(MAX_KNOWN_FETCHES)
        self._known: dict[str, None] = dict.fromkeys(_read_known(known_file))  # oldest first
        self._tokens = UNKNOWN_BURST
        self._refilled = clock()
        self._pending: dict[str, asyncio.Task[rsa.RSAPublicKey]] = {}
        self._session: aiohttp.ClientSession | None = None
        base = config.key_base_url
        self._folder = Path(base.removeprefix("file://")) if base.startswith("file://") else None

    async def close(self) -> None:
        for task in list(self._pending.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def cached(self, path: str) -> rsa.RSAPublicKey | KeyMissing | None:
        """The key (or the remembered miss) for ``path`` when the cache answers; else None.

        The hot path of every request: no task, no await."""
        now = self._clock()
        known = self._keys.get(path)
        if known is not None and known[0] > now:
            metrics.KEYS_CACHED.inc()
            return known[1]
        miss = self._misses.get(path)
        if miss is not None and miss[0] > now:
            metrics.KEYS_CACHED.inc()
            return miss[1]
        return None

    async def get(self, path: str) -> rsa.RSAPublicKey:
        if not key_path_allowed(path):  # the receiver checks first; this is the last guard
            raise KeyMissing(f"key path not allowed: {path!r}")
        known = self.cached(path)
        if isinstance(known, KeyMissing):
            raise known
        if known is not None:
            return known
        task = self._pending.get(path)
        if task is None:
            seen = path in self._known
            if not seen:
                self._admit_unknown()
            # The fetch runs in its own task: a request that gives up (deadline, client gone)
            # does not cancel it for the others waiting on the same path.
            task = asyncio.create_task(self._fetch_and_store(path, seen), name=f"fetch-key {path}")
            self._pending[path] = task
            task.add_done_callback(self._fetch_done)
        return await asyncio.shield(task)

    def _fetch_done(self, task: asyncio.Task[rsa.RSAPublicKey]) -> None:
        self._pending = {p: t for p, t in self._pending.items() if t is not task}
        if not task.cancelled():
            task.exception()  # retrieved here, so an unwaited failure is not reported as lost

    def _admit_unknown(self) -> None:
        """A token for a fetch of a path never seen, or a 503 now (a token bucket)."""
        now = self._clock()
        self._tokens = min(
            UNKNOWN_BURST, self._tokens + (now - self._refilled) * UNKNOWN_PER_SECOND
        )
        self._refilled = now
        if self._tokens < 1.0:
            metrics.KEY_LOOKUPS.labels("limited").inc()
            raise KeyHostUnavailable(
                "key_fetch_limited", "too many public keys of unknown paths asked for: retry later"
            )
        self._tokens -= 1.0

    async def _fetch_and_store(self, path: str, known: bool) -> rsa.RSAPublicKey:
        # A few fetches at a time: made-up paths cannot open a hundred connections at once,
        # and Adobe's own paths have slots of their own.
        async with self._known_slots if known else self._fetch_slots:
            try:
                key = await self._fetch(path)
            except KeyMissing as exc:
                if exc.remember:
                    now = self._clock()
                    _store(self._misses, MAX_MISSES, now, path, (now + NEGATIVE_TTL, exc))
                raise
        self._misses.pop(path, None)
        now = self._clock()
        _store(self._keys, MAX_KEYS, now, path, (now + self._config.key_cache_seconds, key))
        if path not in self._known:
            self._known[path] = None
            while len(self._known) > MAX_KEYS:
                del self._known[next(iter(self._known))]
            if self._known_file is not None:
                await asyncio.to_thread(_write_known, self._known_file, list(self._known))
        return key

    async def _fetch(self, path: str) -> rsa.RSAPublicKey:
        started = time.perf_counter()
        try:
            pem = await (self._read_file(path) if self._folder else self._download(path))
            try:
                key = load_public_key(pem)
            except BadKey as exc:
                raise KeyMissing(f"{path}: {exc}", remember=False) from None
        except KeyMissing as exc:
            metrics.KEY_LOOKUPS.labels("missing").inc()
            log.warning("public_key_refused", key_path=path, reason=str(exc))
            raise
        except KeyHostUnavailable as exc:
            metrics.KEY_LOOKUPS.labels("unavailable").inc()
            log.warning("public_key_unavailable", key_path=path, reason=exc.detail)
            raise
        metrics.KEY_LOOKUPS.labels("fetched").inc()
        log.info(
            "public_key_fetched",
            key_path=path,
            duration_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return key

    async def _read_file(self, path: str) -> bytes:
        assert self._folder is not None
        file = self._folder / path.lstrip("/")
        try:
            with file.open("rb") as handle:
                data = handle.read(self._config.key_max_bytes + 1)
        except FileNotFoundError:
            raise KeyMissing(f"{path}: no such key file") from None
        except OSError as exc:
            raise KeyHostUnavailable("key_unavailable", f"cannot read key file: {exc}") from None
        if len(data) > self._config.key_max_bytes:
            raise KeyMissing(f"{path}: key file larger than {self._config.key_max_bytes} bytes")
        return data

    async def _download(self, path: str) -> bytes:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._config.key_fetch_timeout),
                headers={"User-Agent": "events-bridge"},
            )
        url = self._config.key_base_url + path
        limit = self._config.key_max_bytes
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status in _MISSING_STATUSES:
                    raise KeyMissing(f"{path}: key host answered {response.status}")
                if response.status != 200:
                    raise KeyHostUnavailable(
                        "key_unavailable", f"key host answered {response.status}"
                    )
                if (response.content_length or 0) > limit:
                    raise KeyHostUnavailable("key_unavailable", "key larger than the cap")
                data = bytearray()
                while len(data) <= limit:
                    chunk = await response.content.read(limit + 1 - len(data))
                    if not chunk:
                        return bytes(data)
                    data += chunk
                raise KeyHostUnavailable("key_unavailable", "key larger than the cap")
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__ if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise KeyHostUnavailable("key_unavailable", f"key host unreachable: {reason}") from None


def _read_known(file: Path | None) -> list[str]:
    """The known paths a previous run kept (any that is not an allowed path is ignored)."""
    if file is None:
        return []
    try:
        lines = file.read_text().split()
    except (OSError, UnicodeDecodeError):
        return []
    return [p for p in lines if key_path_allowed(p)][-MAX_KEYS:]


def _write_known(file: Path, paths: list[str]) -> None:
    """Replace the file atomically; a failure costs only a fetch on the shared slots later."""
    temporary = file.with_name(file.name + ".tmp")
    try:
        temporary.write_text("".join(p + "\n" for p in paths))
        temporary.replace(file)
    except OSError as exc:
        log.warning("known_key_paths_not_kept", file=str(file), error=str(exc))


def _store(
    cache: dict[str, tuple[float, T]], limit: int, now: float, path: str, entry: tuple[float, T]
) -> None:
    """Insert, first dropping expired entries and then the oldest, to stay within ``limit``."""
    cache.pop(path, None)
    if len(cache) >= limit:
        for stale in [p for p, (expires, _) in cache.items() if expires <= now]:
            del cache[stale]
        while len(cache) >= limit:
            del cache[next(iter(cache))]
    cache[path] = entry
