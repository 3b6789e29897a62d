"""The few Prometheus metrics that matter, in one registry served at ``/metrics``.

Owns: metric names, labels and buckets. Labels stay low-cardinality: never an event id, a
delivery id or a job id; event codes and job statuses (which signed input chooses) only on
counters of published events, and bounded there: the first ``metrics.max_event_codes`` codes and
``metrics.max_job_statuses`` statuses a process sees keep their own series, any later one is
counted as ``other`` (:func:`configure`). Every other label value comes from the code or the
configuration.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess

if TYPE_CHECKING:
    from bridge.message import Outbound

REGISTRY = CollectorRegistry(auto_describe=True)


def registry() -> CollectorRegistry:
    """What ``/metrics`` reports: this process's metrics, or with ``serve --workers N`` (which
    sets ``PROMETHEUS_MULTIPROC_DIR``) those of all workers together."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    combined = CollectorRegistry()
    multiprocess.MultiProcessCollector(combined)  # type: ignore[no-untyped-call]
    return combined


REQUESTS = Counter(
    "bridge_requests",
    "Webhook requests answered, by registration, HTTP status and outcome.",
    ["registration", "status", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "bridge_request_seconds",
    "Time from request to answer for webhook POSTs.",
    ["registration"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 7.5, 10),
    registry=REGISTRY,
)
EVENTS_PUBLISHED = Counter(
    "bridge_events_published",
    "Events confirmed by the broker (once each, live or from the outbox), by event code and "
    "job status (bounded: see metrics.max_event_codes).",
    ["event_code", "job_status"],
    registry=REGISTRY,
)
EVENTS_STORED = Counter(
    "bridge_events_stored",
    "Events answered from the outbox (counted as published once the broker confirms them).",
    registry=REGISTRY,
)
EVENTS_DROPPED = Counter(
    "bridge_events_dropped",
    "Events a drop rule took: accepted and never published, by rule.",
    ["rule"],
    registry=REGISTRY,
)
PUBLISH_FAILURES = Counter(
    "bridge_publish_failures",
    "Publishes that were not confirmed, by reason.",
    ["reason"],
    registry=REGISTRY,
)
PUBLISH_LATE_CONFIRMS = Counter(
    "bridge_publish_late_confirms",
    "Confirms that came after the publish timeout: the outbox copy was then not replayed.",
    registry=REGISTRY,
)
HEADERS_OMITTED = Counter(
    "bridge_headers_omitted",
    "Message headers left out because their value was too large (named in bridge-omitted).",
    ["header"],
    registry=REGISTRY,
)
PUBLISH_SECONDS = Histogram(
    "bridge_publish_seconds",
    "Time from publish to broker confirm.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
VALIDATION_POSTS = Counter(
    "bridge_validation_url_posts",
    "Asynchronous validation POSTs (validationUrl) received; an operator must open the URL.",
    ["registration"],
    registry=REGISTRY,
)
KEY_LOOKUPS = Counter(
    "bridge_public_key_lookups",
    "Public key lookups by result: cached, fetched, missing, unavailable, limited.",
    ["result"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "bridge_duplicate_events",
    "Events not published again: their id was confirmed within the deduplication window.",
    registry=REGISTRY,
)
OUTBOX_DEPTH = Gauge(
    "bridge_outbox_depth",
    "Events in the outbox, accepted and waiting for the broker.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
# The age of the outbox's head, not a histogram of waits: "how late is the broker's copy of what
# Adobe was told is safe" is one number, and it must grow while nothing at all happens (the
# outbox's watchdog sets it every second). With workers: the largest of the live ones.
OUTBOX_OLDEST_AGE = Gauge(
    "bridge_outbox_oldest_age_seconds",
    "Seconds the oldest event waiting in the outbox has waited since the bridge received it; "
    "0 when empty.",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
OUTBOX_REPLAYED = Counter(
    "bridge_outbox_replayed",
    "Events the outbox replayed to the broker (confirmed).",
    registry=REGISTRY,
)
OUTBOX_REFUSED = Counter(
    "bridge_outbox_refused",
    "Appends the outbox refused (503), by reason: full, write_failed.",
    ["reason"],
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "bridge_quarantined",
    "Events the broker refuses for what they are, kept in the quarantine file, by kind: "
    "unpublishable (refused before sending), broker_refused (the broker closed over it).",
    ["kind"],
    registry=REGISTRY,
)
OUTBOX_FSYNC_SECONDS = Histogram(
    "bridge_outbox_write_seconds",
    "Time of one grouped outbox write with its fsync.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
    registry=REGISTRY,
)
BROKER_READY = Gauge(
    "bridge_broker_ready",
    "1 while the publish channel to the broker is open (with workers: every worker's).",
    multiprocess_mode="livemin",
    registry=REGISTRY,
)
CONNECTIONS_OPEN = Gauge(
    "bridge_connections_open",
    "HTTP connections open on the webhook port.",
    multiprocess_mode="livesum",
    registry=REGISTRY,
)
CONNECTIONS_CLOSED = Counter(
    "bridge_connections_closed",
    "HTTP connections the bridge closed, by reason: idle_timeout, headers_timeout, "
    "shed_idle, shed_headers, shed_request, over_limit, bad_request, body_timeout; "
    "HTTPS: handshake_timeout, shed_handshake, handshake_failed, stopping.",
    ["reason"],
    registry=REGISTRY,
)
DESCRIPTORS_EXHAUSTED = Counter(
    "bridge_descriptors_exhausted",
    "Connections the kernel could not hand over for want of file descriptors.",
    registry=REGISTRY,
)
BROKER_CONNECTS = Counter(
    "bridge_broker_connects",
    "Broker connection attempts by result.",
    ["result"],
    registry=REGISTRY,
)
BROKER_NODE = Gauge(
    "bridge_broker_node_info",
    "1 for the broker node (host:port) the publish connection is on, 0 for the other "
    "configured nodes; all 0 while not connected.",
    ["node"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
PUBLISH_PATH = Gauge(
    "bridge_publish_path",
    "1 for the path publishes take: fast (aiormq's writer and confirm tables) or portable "
    "(aiormq's basic_publish, when its internals are not what the bridge expects).",
    ["path"],
    multiprocess_mode="livemax",
    registry=REGISTRY,
)


JOURNAL_EVENTS = Counter(
    "bridge_journal_events",
    "Events pulled from Adobe's journal (each then walks the webhooks' road: dedup, routes).",
    registry=REGISTRY,
)
JOURNAL_PAGES = Counter(
    "bridge_journal_pages",
    "Journal answers read, by result: events (a page), empty (the end, for now).",
    ["result"],
    registry=REGISTRY,
)
JOURNAL_ERRORS = Counter(
    "bridge_journal_errors",
    "Journal problems, by kind: network, token, unauthorized, rejected, throttled, server, "
    "expired, bad_page, page_too_large, bad_link, deliver, refused, bad_event, unpublishable, "
    "state, internal (a bug: the reader runs again).",
    ["kind"],
    registry=REGISTRY,
)
JOURNAL_NEWEST_AGE = Gauge(
    "bridge_journal_newest_event_age_seconds",
    "Age of the newest event the journal gave (by its own time), set at every poll; how far "
    "behind Adobe the journal reader is.",
    multiprocess_mode="livemax",
    registry=REGISTRY,
)
JOURNAL_TOKEN_RENEWALS = Counter(
    "bridge_journal_token_renewals",
    "IMS access tokens obtained, by reason: first, expiring, rejected (a 401).",
    ["reason"],
    registry=REGISTRY,
)


def broker_node(current: str | None, nodes: list[str]) -> None:
    """Say which configured node is in use (None: none)."""
    for name in nodes:
        BROKER_NODE.labels(name).set(1 if name == current else 0)


OTHER = "other"
MAX_LABEL_CHARS = 128


class FirstSeen:
    """A label's first ``limit`` distinct values; every later one (or a long one) is ``other``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit or len(value) > MAX_LABEL_CHARS:
            return OTHER
        self.seen.add(value)
        return value


_CODES = FirstSeen(100)
_STATUSES = FirstSeen(20)


def configure(max_event_codes: int, max_job_statuses: int) -> None:
    """Bound the event-code and job-status labels (``metrics.*`` in the config)."""
    global _CODES, _STATUSES
    _CODES, _STATUSES = FirstSeen(max_event_codes), FirstSeen(max_job_statuses)
    events_published.cache_clear()


# The hot path's labelled children, looked up once: ``labels()`` takes a lock and builds a key
# on every call. Bounded, and the label values are few (see the module docstring).
@functools.lru_cache(maxsize=1024)
def requests(registration: str, status: int, outcome: str) -> Counter:
    return REQUESTS.labels(registration, str(status), outcome)


@functools.lru_cache(maxsize=256)
def request_seconds(registration: str) -> Histogram:
    return REQUEST_SECONDS.labels(registration)


@functools.lru_cache(maxsize=1024)
def events_published(event_code: str, job_status: str) -> Counter:
    return EVENTS_PUBLISHED.labels(_CODES(event_code), _STATUSES(job_status))


def count_published(messages: Iterable[Outbound]) -> None:
    """Count the events of ``messages`` the broker confirmed: one per event (its first
    message), by code and job status, one metric update a kind."""
    kinds: dict[tuple[str, str], int] = {}
    for message in messages:
        if message.primary:
            kind = (message.type, message.headers.get("job-status", "none"))
            kinds[kind] = kinds.get(kind, 0) + 1
    for (code, status), count in kinds.items():
        events_published(code, status).inc(count)


KEYS_CACHED = KEY_LOOKUPS.labels("cached")
