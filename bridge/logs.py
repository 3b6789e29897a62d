"""Logging: structlog, JSON (via orjson) in production, readable console lines on a terminal.

Owns: the one configuration call made by the CLI. Conventions: snake_case past-tense event names
(``webhook_handled``, ``broker_connected``), values as key=value, never secrets or whole bodies;
one canonical line per webhook request (see ``bridge.receiver``). Logs go to stderr, so stdout
stays free for command output (``tail``, ``route``).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Configure structlog and the standard library's logging (aiohttp, aio-pika)."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    numeric = _LEVELS[level]
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors = [
            *shared,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:
        processors = [
            *shared,
            structlog.dev.ConsoleRenderer(
                colors=sys.stderr.isatty(),
                # never rich's: it prints local variables, and a token or a secret is one
                exception_formatter=structlog.dev.plain_traceback,
            ),
        ]
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library: warnings and worse, one plain line each.
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s",
        force=True,
    )
    # The publisher logs every connection loss and failed publish itself (broker_connection_lost,
    # webhook_handled); aiormq and aio-pika would add a traceback for each one.
    for name in ("aiormq", "aio_pika"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _dumps(value: Any, **_kwargs: Any) -> bytes:
    """orjson, else the standard library for what orjson refuses (a lone surrogate): a log line
    must never fail a request."""
    try:
        return orjson.dumps(value, default=str)
    except TypeError:
        return json.dumps(value, default=str).encode()
