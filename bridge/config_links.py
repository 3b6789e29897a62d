"""The configuration of both links: the broker's URLs (one, or the nodes of a cluster) and TLS
on either side (SPEC §8 and §9). Part of ``bridge.config``, which calls these for ``broker:``
and ``server:``.

Owns: splitting ``broker.url`` into its nodes (a YAML list, or one string with commas, as
``BRIDGE_AMQP_URL`` gives it), checking each, and the ``tls:`` mappings, whose files must exist
and be readable (a problem naming the file, exit 78, rather than a failure at the first
connection). Passwords never appear in a problem: :func:`redact` masks them, here and in logs.

Does not: read the certificates (``bridge.tls`` builds the SSL contexts) or connect.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields
from typing import Final

import yaml

from bridge.config_types import BrokerTls, ServerTls
from bridge.yamldoc import Section

_AMQP_URL: Final = re.compile(
    r"^amqps?://(?:[^@/?#]*@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/?#@\[\],\s]+)"
    r"(?::(?P<port>[0-9]{1,5}))?(?:/[^?#,]*)?(?:\?[^#,]*)?$"
)
_SCHEME: Final = re.compile(r"^amqps?://")
# The userinfo's password, up to the last "@" before the host: masked whatever it holds.
_PASSWORD: Final = re.compile(r"(amqps?://[^:/@\s,]*:)[^@\s]*@")
EXPECTED_URLS: Final = "amqp:// or amqps:// URLs with a host, separated by commas"


def redact(text: str) -> str:
    """``text`` with the password of every AMQP URL in it replaced by ``***``."""
    return _PASSWORD.sub(r"\1***@", text)


def split_urls(text: str) -> list[str]:
    """The URLs of a comma-separated list. A comma inside a password stays in it: only a comma
    followed by a scheme starts the next URL."""
    pieces: list[str] = []
    for raw in text.split(","):
        piece = raw.strip()
        if pieces and not _SCHEME.match(piece):
            pieces[-1] = f"{pieces[-1]},{piece}"
        elif piece:
            pieces.append(piece)
    return pieces


def amqp_url(text: str) -> str:
    """Accept amqp(s)://[user:pass@]host[:port][/vhost][?query] whose port is a number."""
    match = _AMQP_URL.match(text)
    if not match or not match.group("host"):
        raise ValueError(text)
    if match.group("port") is not None and not 0 < int(match.group("port")) < 65536:
        raise ValueError(text)
    return text


def broker_urls(section: Section, default: tuple[str, ...]) -> tuple[str, ...]:
    """``broker.url``: one URL, a comma-separated list, or a YAML list of them."""
    node = section.items.get("url")
    if node is None:
        return default
    path = section.path + ".url"
    if isinstance(node, yaml.SequenceNode):
        found = [
            (f"{path}[{i}]", item, section.doc.scalar(item, f"{path}[{i}]"))
            for i, item in enumerate(node.value)
        ]
        texts = [
            (where, item, piece)
            for where, item, text in found
            if text is not None
            for piece in split_urls(text)
        ]
    else:
        text = section.doc.scalar(node, path)
        if text is None:
            return default
        texts = [(path, node, piece) for piece in split_urls(text)]
    urls: list[str] = []
    for where, item, text in texts:
        try:
            urls.append(amqp_url(text))
        except ValueError:
            section.doc.fail(where, item, f"expected {EXPECTED_URLS}, got {redact(text)!r}")
            continue
        if urls.count(text) > 1:
            section.doc.fail(where, item, f"{redact(text)!r} is listed twice")
    if not texts:
        section.doc.fail(path, node, f"expected {EXPECTED_URLS}, got nothing")
    return tuple(urls) or default


def broker_tls(section: Section, urls: tuple[str, ...]) -> BrokerTls:
    """``broker.tls``: how ``amqps://`` nodes are verified, and our client certificate."""
    s = section.doc.mapping(section.items.get("tls"), section.path + ".tls", _keys(BrokerTls))
    tls = BrokerTls(
        ca_file=readable_file(s, "ca_file"),
        cert_file=readable_file(s, "cert_file"),
        key_file=readable_file(s, "key_file"),
        server_name=_optional(s, "server_name"),
    )
    _pair(s, tls.cert_file, tls.key_file)
    if tls.configured and not any(url.startswith("amqps://") for url in urls):
        section.doc.fail(
            s.path, s.node, "is set, but no broker.url is amqps://: the link would not use it"
        )
    return tls


def server_tls(section: Section) -> ServerTls:
    """``server.tls``: HTTPS on the webhook port, and optionally a required client certificate."""
    s = section.doc.mapping(section.items.get("tls"), section.path + ".tls", _keys(ServerTls))
    tls = ServerTls(
        cert_file=readable_file(s, "cert_file"),
        key_file=readable_file(s, "key_file"),
        client_ca_file=readable_file(s, "client_ca_file"),
    )
    _pair(s, tls.cert_file, tls.key_file)
    if tls.client_ca_file and not tls.cert_file:
        s.doc.fail(
            s.path + ".client_ca_file",
            s.items.get("client_ca_file"),
            "needs server.tls.cert_file and key_file: client certificates are asked for over HTTPS",
        )
    return tls


def readable_file(section: Section, key: str) -> str:
    """A path to a file this process can read, or "" when the value is absent or empty. A path
    that cannot be read is a problem (the config is refused), and is returned as given, so that
    a check pairing it with another key does not call it missing as well."""
    path = _optional(section, key)
    if path and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        reason = "not a file" if os.path.exists(path) else "no such file"
        if os.path.isfile(path):
            reason = "not readable by this process"
        section.doc.fail(f"{section.path}.{key}", section.items.get(key), f"{path}: {reason}")
    return path


def _optional(section: Section, key: str) -> str:
    """A string that may be empty: an empty variable (``${BRIDGE_AMQP_CA_FILE:-}``) is unset."""
    return section.get(key, "", lambda text: text.strip(), "a string")


def _pair(section: Section, cert_file: str, key_file: str) -> None:
    if bool(cert_file) != bool(key_file):
        missing, given = ("key_file", "cert_file") if cert_file else ("cert_file", "key_file")
        section.doc.fail(
            f"{section.path}.{missing}",
            section.items.get(given),
            f"is required with {section.path}.{given} (a certificate and its private key)",
        )


def _keys(cls: type[BrokerTls] | type[ServerTls]) -> set[str]:
    return {f.name for f in fields(cls)}
