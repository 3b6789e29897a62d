"""The ``journal:`` section (SPEC §10): which journal to pull, from where to start, and the
IMS credential to read it with.

Owns: its checks. The journal URL and the token URL are ``https://`` (plain ``http://`` only to
a loopback host, for local tests: both carry a bearer token or a client secret); with a journal
URL the credential's client id, secret and org are required; the start point is ``oldest``,
``latest`` or a negative ISO-8601 duration within Adobe's 7 days; the registration named is one
of ``registrations``. Does not: read files or talk to anyone.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import fields
from typing import Final
from urllib.parse import urlsplit

import yaml

from bridge.adobe.journal import START_WORDS, seek_duration
from bridge.config_types import ImsConfig, JournalConfig, Registration
from bridge.yamldoc import Doc, Section

_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")


def journal_section(doc: Doc, node: yaml.Node | None) -> JournalConfig:
    s = doc.mapping(node, "journal", {f.name for f in fields(JournalConfig)})
    d = JournalConfig()
    url = _url(s, "url", "")
    ims = _ims(doc, s.items.get("ims"), required=bool(url))
    start = s.get("start", d.start, _start, "oldest, latest, or a negative duration like -PT2H")
    return JournalConfig(
        url=url,
        registration=s.get("registration", d.registration, str.strip, "a registration's name"),
        start=start,
        state_dir=s.string("state_dir", d.state_dir),
        limit=s.integer("limit", d.limit, 1, 10_000),
        timeout=s.number("timeout", d.timeout, 1.0, 300.0),
        ims=ims,
        proxy=_proxy(doc, s),
    )


def _proxy(doc: Doc, section: Section) -> str:
    """An ``http://host:port`` proxy (a user and password allowed), or "" for none. The
    journal and IMS are ``https://``: through the proxy they go by ``CONNECT``, still TLS. A
    problem shows the URL with its password masked."""
    text = _optional(section, "proxy")
    try:
        parts = urlsplit(text)
        good = (
            parts.scheme == "http"
            and bool(parts.hostname)
            and bool(parts.port)
            and parts.path in ("", "/")
            and not parts.query
            and not parts.fragment
        )
    except ValueError:
        good = False
    if text and not good:
        doc.fail(
            "journal.proxy",
            section.items.get("proxy"),
            "expected an http:// proxy URL with a port, like http://proxy:3128, got "
            + _shown(text),
        )
    return text if good else ""


def _shown(proxy: str) -> str:
    """A bad proxy URL as a problem may show it: no user or password, nor what may be one."""
    userinfo, at, rest = proxy.rpartition("@")  # a password may hold "@" and ":"
    scheme, slashes, _ = userinfo.partition("://")
    if at:
        return repr(
            f"{scheme}://***@{rest}" if slashes and _SCHEME.fullmatch(scheme) else f"***@{rest}"
        )
    if ":" in proxy.partition("://")[2].split("/")[0]:  # host:port, or a user:password typo
        return "a value not shown here (it may hold a password)"
    return repr(proxy)


def _start(text: str) -> str:
    text = text.strip()
    if text in START_WORDS or seek_duration(text) is not None:
        return text
    raise ValueError(text)


def _ims(doc: Doc, node: yaml.Node | None, required: bool) -> ImsConfig:
    s = doc.mapping(node, "journal.ims", {f.name for f in fields(ImsConfig)})
    d = ImsConfig()
    ims = ImsConfig(
        token_url=_url(s, "token_url", d.token_url),
        client_id=_optional(s, "client_id"),
        client_secret=_optional(s, "client_secret"),
        org_id=_optional(s, "org_id"),
        scopes=s.strings("scopes") or d.scopes,
    )
    if required:
        for key in ("client_id", "client_secret", "org_id"):
            if not getattr(ims, key):
                doc.fail(
                    f"journal.ims.{key}",
                    s.items.get(key, s.node),
                    "is required with journal.url (the OAuth Server-to-Server credential)",
                )
    return ims


def _optional(section: Section, key: str) -> str:
    """A string that may be empty: an empty variable is unset."""
    return section.get(key, "", str.strip, "a string")


def _url(section: Section, key: str, default: str) -> str:
    """An ``https://`` URL (or ``http://`` to a loopback host), or "" when empty."""

    def convert(text: str) -> str:
        text = text.strip()
        if text and url_problem(text) is not None:
            raise ValueError(text)
        return text

    return section.get(key, default, convert, "an https:// URL (http:// only to 127.0.0.1 or ::1)")


def url_problem(url: str) -> str | None:
    """Why ``url`` may not carry a credential, or None."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        parts.port  # noqa: B018 - a port that is not a number raises here
    except ValueError:
        return "not a URL"
    if not host or parts.username or parts.password:
        return "no host, or a password in the URL"
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and (host == "localhost" or _loopback(host)):
        return None
    return "not https://"


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_journal_registration(
    doc: Doc,
    node: yaml.Node | None,
    journal: JournalConfig,
    registrations: tuple[Registration, ...],
) -> None:
    """``journal.registration`` names one of ``registrations`` (any when it is empty)."""
    if not journal.enabled:
        return
    names = [r.name for r in registrations]
    if journal.registration and journal.registration not in names:
        doc.fail(
            "journal.registration",
            node,
            f"no registration named {journal.registration!r} (there are: {', '.join(names)})",
        )
    elif not names:
        doc.fail("journal.url", node, "needs a registration (whose client ids and routes apply)")
