"""The configuration's frozen dataclasses and their defaults: what ``bridge.config`` parses into.

Owns: one dataclass per section of the YAML file (see the README, "Configuration", for every key
and its default) and :class:`Config`, which holds them all with the topology and the routes.
Does not: read YAML or the environment (``bridge.config`` does, and re-exports these types, so
``from bridge.config import Config`` is the way in). Pure data: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bridge.rules import Route, default_routes
from bridge.topology import Topology, default_topology

MAX_KEY_CACHE_SECONDS = 24 * 3600  # Adobe: cache a public key for not more than 24 h


@dataclass(frozen=True)
class ServerTls:
    """HTTPS on the webhook port (SPEC §8); no ``cert_file``: plain HTTP."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""  # set: a client certificate from this CA is required (mTLS)

    @property
    def enabled(self) -> bool:
        return bool(self.cert_file)


@dataclass(frozen=True)
class BrokerTls:
    """How an ``amqps://`` broker is verified, and the certificate we show it (SPEC §8)."""

    ca_file: str = ""  # empty: the system's trusted CAs
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""  # empty: the URL's host

    @property
    def configured(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file, self.server_name))


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 10 * 1024 * 1024
    max_batch_events: int = 1000  # Adobe sends at most 20; more is refused before any work
    max_in_flight: int = 256  # verified webhook requests at once; more get 429
    max_connections: int = 1024  # open connections; at the bound, idle ones are shed first
    # Adobe gives up after 10 s including connection set-up; we answer within this.
    answer_deadline: float = 7.5
    body_timeout: float = 5.0  # the body must arrive within this once the headers have
    header_timeout: float = 5.0  # a request's headers must arrive within this
    idle_timeout: float = 15.0  # a connection with no request in progress is closed after this
    shutdown_timeout: float = 20.0
    tls: ServerTls = field(default_factory=ServerTls)


@dataclass(frozen=True)
class BrokerConfig:
    # The nodes of one cluster, tried in order (SPEC §9); one URL for a single broker.
    urls: tuple[str, ...] = ("amqp://guest:guest@127.0.0.1:5672/",)
    heartbeat: int = 10
    connect_timeout: float = 5.0
    publish_timeout: float = 5.0
    reconnect_max_delay: float = 5.0
    # Bodies over this the broker refuses (its max_message_size); 0: learn it from the broker.
    max_message_bytes: int = 0
    exchange: str = "adobe.events"
    unrouted_exchange: str = "adobe.unrouted"
    unrouted_queue: str = "adobe.unrouted"
    tls: BrokerTls = field(default_factory=BrokerTls)

    @property
    def url(self) -> str:
        """The first node's URL (commands that need one broker: tail, declare)."""
        return self.urls[0]


_DEFAULT_BROKER = BrokerConfig()
_DEFAULT_TOPOLOGY = default_topology(
    _DEFAULT_BROKER.exchange, _DEFAULT_BROKER.unrouted_exchange, _DEFAULT_BROKER.unrouted_queue
)
_DEFAULT_ROUTES = default_routes(_DEFAULT_BROKER.exchange)


@dataclass(frozen=True)
class VerificationConfig:
    enabled: bool = True
    key_base_url: str = "https://static.adobeioevents.com"
    key_cache_seconds: float = float(MAX_KEY_CACHE_SECONDS)
    key_fetch_timeout: float = 3.0
    key_max_bytes: int = 16 * 1024


@dataclass(frozen=True)
class Registration:
    name: str
    path: str
    client_ids: tuple[str, ...]
    ims_orgs: tuple[str, ...] = ()  # empty: any org
    routes: tuple[Route, ...] | None = None  # None: the shared top-level routes


@dataclass(frozen=True)
class OutboxConfig:
    dir: str = ".local/outbox"
    # off: a broker that cannot take an event gives a 503; fallback: the event is written here
    # and answered 200; always: every event is written here first (write-ahead).
    mode: str = "fallback"
    max_bytes: int = 256 * 1024 * 1024
    drain_seconds: float = 10.0  # on SIGTERM, time for the replayer to empty the outbox
    # A backlog the connected broker takes nothing of for this long: /readyz says not ready.
    stall_seconds: float = 30.0


@dataclass(frozen=True)
class DedupConfig:
    """An event id confirmed within the window is not published again."""

    enabled: bool = True
    seconds: float = 600.0
    size: int = 100_000


@dataclass(frozen=True)
class MetricsConfig:
    """Label values that signed input chooses are bounded: the first N keep their own series."""

    max_event_codes: int = 100
    max_job_statuses: int = 20


@dataclass(frozen=True)
class LoggingConfig:
    format: str = "auto"  # json, console, or auto (console on a terminal)
    level: str = "info"


DEFAULT_IMS_TOKEN_URL = "https://ims-na1.adobelogin.com/ims/token/v3"  # noqa: S105 - a URL
DEFAULT_IMS_SCOPES = (
    "AdobeID",
    "openid",
    "read_organizations",
    "additional_info.projectedProductContext",
    "additional_info.roles",
    "adobeio_api",
    "read_client_secret",
    "manage_client_secrets",
)


@dataclass(frozen=True)
class ImsConfig:
    """The OAuth Server-to-Server credential the journal is read with (SPEC §10)."""

    token_url: str = DEFAULT_IMS_TOKEN_URL
    client_id: str = ""  # also sent as x-api-key
    client_secret: str = field(default="", repr=False)  # never in a log line or a repr
    org_id: str = ""  # sent as x-ims-org-id
    scopes: tuple[str, ...] = DEFAULT_IMS_SCOPES


@dataclass(frozen=True)
class JournalConfig:
    """Adobe's journal of one registration, pulled (SPEC §10); no ``url``: no journal."""

    url: str = ""
    registration: str = ""  # whose routes, client ids and dedup; empty: the first one
    start: str = "latest"  # with no kept position: oldest, latest or -PT2H
    state_dir: str = ".local/journal"
    limit: int = 100  # events a page (Adobe caps a page at 1.5 MB whatever the limit)
    timeout: float = 30.0  # seconds for one answer, body included
    ims: ImsConfig = field(default_factory=ImsConfig)
    proxy: str = field(default="", repr=False)  # http:// egress proxy (may hold a password)

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    registrations: tuple[Registration, ...] = ()
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    topology: Topology = field(default_factory=lambda: _DEFAULT_TOPOLOGY)
    routes: tuple[Route, ...] = field(default_factory=lambda: _DEFAULT_ROUTES)
    source: str = "<config>"

    def routes_for(self, registration: Registration) -> tuple[Route, ...]:
        return self.routes if registration.routes is None else registration.routes

    def journal_registration(self) -> Registration:
        """The registration whose journal ``journal.url`` is (checked when the file is read)."""
        wanted = self.journal.registration
        return next(r for r in self.registrations if not wanted or r.name == wanted)
