"""TLS on both links (SPEC §8): the SSL context the broker link verifies ``amqps://`` nodes
with, the one the webhook port serves HTTPS with, and a failed handshake said in words.

Owns: building both contexts from the config (TLS 1.2 at least; the system's CAs unless
``broker.tls.ca_file``; a client certificate when one is configured; on the server,
``CERT_REQUIRED`` from ``server.tls.client_ca_file`` for Adobe's mTLS option, which alone is
trusted then), a new server context on SIGHUP (new handshakes get it, open connections keep
theirs), and :func:`tls_problem`, which turns OpenSSL's reasons into one sentence for the log
and ``/readyz``. A certificate or key that cannot be loaded is a :class:`ConfigError` naming
the key and file (exit 78 at start-up).

Does not: connect or listen (``bridge.link``, ``bridge.cli.daemon``), or read the YAML.
"""

from __future__ import annotations

import ssl
from typing import Final

from bridge.config_types import BrokerTls, Config, ServerTls
from bridge.errors import ConfigError

# OpenSSL's words (in ssl.SSLError's text, which aiormq keeps when it wraps the error) → ours.
_REASONS: Final = (
    ("certificate has expired", "the broker's certificate has expired"),
    ("certificate is not yet valid", "the broker's certificate is not valid yet"),
    (
        "mismatch",
        "the broker's certificate is not for the name checked "
        "(the URL's host, or broker.tls.server_name)",
    ),
    (
        "unable to get local issuer",
        "the broker's certificate is not signed by a trusted CA (broker.tls.ca_file)",
    ),
    ("self-signed", "the broker's certificate is not signed by a trusted CA (broker.tls.ca_file)"),
    ("self signed", "the broker's certificate is not signed by a trusted CA (broker.tls.ca_file)"),
    (
        "certificate required",
        "the broker requires a client certificate (broker.tls.cert_file, key_file)",
    ),
    # TLS 1.2: a broker that requires a client certificate ends the handshake with this alert
    # when none comes (RabbitMQ's fail_if_no_peer_cert); TLS 1.3 says "certificate required".
    (
        "alert handshake failure",
        "the broker refused the handshake: it requires a client certificate "
        "(broker.tls.cert_file, key_file), or shares no TLS version or cipher with us",
    ),
    ("unknown ca", "the broker does not trust our client certificate's CA"),
    ("bad certificate", "the broker refused our client certificate"),
    ("certificate unknown", "the broker refused our client certificate"),
    ("wrong version number", "the broker's port does not speak TLS (amqps:// to a plain port?)"),
    ("record layer failure", "the broker's port does not speak TLS (amqps:// to a plain port?)"),
)


def client_context(tls: BrokerTls) -> ssl.SSLContext:
    """The context ``amqps://`` connections verify the broker with (and show our certificate)."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise _unusable("broker.tls.ca_file", tls.ca_file, exc) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file:
        _load_pair(context, "broker.tls", tls.cert_file, tls.key_file)
    return context


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """The context the webhook port serves HTTPS with; with ``client_ca_file``, a client
    certificate signed by that CA is required (the handshake fails without one)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_pair(context, "server.tls", tls.cert_file, tls.key_file)
    if tls.client_ca_file:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise _unusable("server.tls.client_ca_file", tls.client_ca_file, exc) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def reload_server_context(tls: ServerTls, running: ssl.SSLContext | None) -> ssl.SSLContext | None:
    """SIGHUP: a new context from the files as they are now, for the listener to use instead of
    ``running`` (handshakes from then on present the new pair; connections already open keep
    theirs); None when HTTPS is off and stays off. Files that do not load raise
    :class:`ConfigError`, and the running context is untouched: loading a pair into it in place
    would not do, as OpenSSL takes the new certificate, drops the old key, then fails on a
    broken key, leaving a context that completes no handshake. A new context also forgets a
    client CA the config no longer names."""
    if running is None and tls.enabled:
        raise ConfigError(["server.tls: HTTPS cannot be turned on by a reload: restart"])
    if running is not None and not tls.enabled:
        raise ConfigError(["server.tls: HTTPS cannot be turned off by a reload: restart"])
    return server_context(tls) if tls.enabled else None


def check_tls(config: Config) -> None:
    """Build the contexts ``config`` asks for once, so that a certificate, key or CA bundle that
    does not load is a :class:`ConfigError` before the daemon starts."""
    if config.server.tls.enabled:
        server_context(config.server.tls)
    if any(url.startswith("amqps://") for url in config.broker.urls):
        client_context(config.broker.tls)


def tls_problem(exc: BaseException) -> str | None:
    """One sentence for a failed TLS handshake with the broker, or None when ``exc`` (or what
    it wraps) is not about TLS."""
    seen: set[int] = set()
    current: BaseException | None = exc
    texts: list[str] = []
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(str(current))
        if isinstance(current, ssl.SSLCertVerificationError) and current.verify_message:
            texts.append(current.verify_message)
        current = current.__cause__ or current.__context__
    text = " ".join(texts).lower()
    if "ssl" not in text and "certificate" not in text and "tls" not in text:
        return None
    for words, sentence in _REASONS:
        if words in text:
            return sentence
    return "the TLS handshake with the broker failed"


def _load_pair(context: ssl.SSLContext, section: str, cert_file: str, key_file: str) -> None:
    """Load a certificate and its key; a problem names the file at fault. An encrypted key is
    refused at once (OpenSSL would otherwise ask for its passphrase on the terminal)."""
    try:
        context.load_cert_chain(cert_file, key_file or None, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            [
                f"{section}.key_file: {key_file or cert_file}: an encrypted private key "
                "(there is no passphrase setting: give the key unencrypted)"
            ]
        ) from None
    except ssl.SSLError as exc:
        raise ConfigError([_pair_problem(section, cert_file, key_file, exc)]) from None
    except OSError as exc:
        raise _unusable(f"{section}.cert_file", cert_file, exc) from None


class _Encrypted(Exception):
    """The private key asked for a passphrase."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def _pair_problem(section: str, cert_file: str, key_file: str, exc: ssl.SSLError) -> str:
    """Which of the two files :meth:`ssl.SSLContext.load_cert_chain` could not use, and why."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=cert_file)
    except (OSError, ssl.SSLError):
        return f"{section}.cert_file: {cert_file}: not a PEM certificate"
    key = key_file or cert_file
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"{section}.key_file: {key}: not the private key of {section}.cert_file {cert_file}"
    return f"{section}.key_file: {key}: not a PEM private key"


def _unusable(key: str, path: str, exc: BaseException) -> ConfigError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, ssl.SSLError):
        reason = f"not a PEM certificate bundle ({exc.reason or exc})"
    return ConfigError([f"{key}: {path}: {reason}"])
