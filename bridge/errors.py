"""The one error tree of events-bridge.

::

    BridgeError
    ├── ConfigError                  bad configuration; the CLI exits 78 (EX_CONFIG)
    ├── UsageError                   bad command-line input; the CLI exits 2
    └── Refusal                      a webhook request we answer with a 4xx/5xx (``status``)
        ├── BadRequest               400  not JSON, not an event or a batch of events
        ├── Unauthenticated          401  signature missing or wrong, key path not allowed
        ├── Forbidden                403  recipient client id or IMS org not configured
        ├── PayloadTooLarge          413  body over the configured limit
        ├── UnsupportedMediaType     415  content type is not JSON
        ├── TooManyRequests          429  too many requests in flight (``Retry-After``)
        ├── ClientGone               499  the client went away mid-request: nothing to answer
        └── Unavailable              503  try again later (``Retry-After``)
            ├── KeyHostUnavailable        the public-key host could not be asked
            └── BrokerUnavailable         no confirm from the broker in time

Every refusal carries a short ``reason`` (a stable snake_case word for logs and metrics) and a
``detail`` for the response body. Refusals are mapped to HTTP in exactly one place, the error
middleware in :mod:`bridge.receiver`. A 4xx tells Adobe not to retry; a 503 makes it retry, so the
choice between them is the choice of what may succeed later.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error events-bridge raises on purpose."""


class ConfigError(BridgeError):
    """The configuration is invalid. ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UsageError(BridgeError):
    """A command was given input it cannot use (a missing file, a bad option value)."""


class Refusal(BridgeError):
    """A request we refuse; ``status`` is the HTTP answer."""

    status: int = 500

    def __init__(self, reason: str, detail: str, *, close: bool = False) -> None:
        self.reason = reason
        self.detail = detail
        # Close the connection after the answer: the body was not read (a refusal before it,
        # or one that stopped reading it), so nothing else could follow on this connection.
        self.close = close
        super().__init__(f"{reason}: {detail}")


class BadRequest(Refusal):
    status = 400


class Unauthenticated(Refusal):
    status = 401


class Forbidden(Refusal):
    status = 403


class TooManyRequests(Refusal):
    """Retryable: Adobe retries 429 too."""

    status = 429
    retry_after: int = 1


class PayloadTooLarge(Refusal):
    status = 413


class UnsupportedMediaType(Refusal):
    status = 415


class ClientGone(Refusal):
    """The client closed the connection before we could answer (nginx's 499, never sent)."""

    status = 499


class Unavailable(Refusal):
    """Retryable: Adobe retries 5xx (but 505) with backoff for 24 h."""

    status = 503
    retry_after: int = 5


RETRYABLE = (TooManyRequests, Unavailable)


class KeyHostUnavailable(Unavailable):
    pass


class BrokerUnavailable(Unavailable):
    pass
