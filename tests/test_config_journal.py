"""The ``journal:`` section (SPEC §10): the shipped file's variables, and the checks that keep a
token or a secret from going anywhere but Adobe (or loopback, for tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config import load_config, parse_config
from bridge.config_types import DEFAULT_IMS_SCOPES
from bridge.errors import ConfigError

SHIPPED = Path(__file__).parent.parent / "config" / "bridge.yaml"
JOURNAL = "https://events-va6.adobe.io/events/organizations/23294/integrations/54108/f89067f2"
CREDENTIAL = {
    "BRIDGE_IMS_CLIENT_ID": "cid",
    "BRIDGE_IMS_CLIENT_SECRET": "s3cret",
    "BRIDGE_IMS_ORG_ID": "ORG@AdobeOrg",
}
ENV = {"BRIDGE_CLIENT_IDS": "cid"}

BASE = """\
registrations:
  - {name: main, path: /hook, client_ids: [a]}
  - {name: other, path: /other, client_ids: [b]}
journal:
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(BASE + text, "t.yaml", {})
    return caught.value.problems


def test_shipped_config_has_no_journal_by_default() -> None:
    config = load_config(SHIPPED, ENV)
    journal = config.journal
    assert not journal.enabled
    assert (journal.start, journal.state_dir, journal.limit) == ("latest", ".local/journal", 100)
    assert journal.ims.token_url == "https://ims-na1.adobelogin.com/ims/token/v3"
    assert journal.ims.scopes == DEFAULT_IMS_SCOPES


def test_shipped_config_reads_every_journal_variable() -> None:
    env = {
        **ENV,
        **CREDENTIAL,
        "BRIDGE_JOURNAL_URL": JOURNAL,
        "BRIDGE_IMS_TOKEN_URL": "https://ims-eu1.adobelogin.com/ims/token/v3",
        "BRIDGE_IMS_SCOPES": "AdobeID, openid,adobeio_api",
        "BRIDGE_JOURNAL_STATE_DIR": "/var/lib/events-bridge/journal",
        "BRIDGE_JOURNAL_START": "-PT2H",
        "BRIDGE_JOURNAL_PROXY": "http://egress:pr0xy@proxy.internal:3128",
    }
    config = load_config(SHIPPED, env)
    journal = config.journal
    assert journal.enabled
    assert journal.url == JOURNAL
    assert (journal.start, journal.state_dir) == ("-PT2H", "/var/lib/events-bridge/journal")
    ims = journal.ims
    assert (ims.client_id, ims.client_secret, ims.org_id) == ("cid", "s3cret", "ORG@AdobeOrg")
    assert ims.token_url == "https://ims-eu1.adobelogin.com/ims/token/v3"
    assert ims.scopes == ("AdobeID", "openid", "adobeio_api")
    assert config.journal_registration().name == "default"
    assert journal.proxy == "http://egress:pr0xy@proxy.internal:3128"
    assert "s3cret" not in repr(config)
    assert "pr0xy" not in repr(config)


def test_a_journal_without_its_credential_names_each_missing_part() -> None:
    found = problems(f"  url: {JOURNAL}\n")
    assert [p.split(":")[0] for p in found] == [
        "journal.ims.client_id",
        "journal.ims.client_secret",
        "journal.ims.org_id",
    ]
    assert "required with journal.url" in found[0]


@pytest.mark.parametrize(
    "url",
    [
        "http://events-va6.adobe.io/events/x",  # a token in clear text
        "ftp://events-va6.adobe.io/x",
        "https://user:pw@events-va6.adobe.io/x",
        "events-va6.adobe.io/x",
        "https://:99999/x",
    ],
)
def test_a_journal_url_that_would_leak_the_token_is_refused(url: str) -> None:
    (found,) = problems(f"  url: '{url}'\n")
    assert found.startswith("journal.url: expected an https:// URL")
    assert "(t.yaml:5)" in found


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]", "localhost"])
def test_plain_http_is_for_loopback_only(host: str) -> None:
    text = f"""\
  url: http://{host}:8099/events/organizations/1/integrations/2/3
  ims: {{client_id: c, client_secret: s, org_id: o, token_url: 'http://{host}:8099/ims/token/v3'}}
"""
    config = parse_config(BASE + text, "t.yaml", {})
    assert config.journal.url.startswith("http://")


def test_the_token_url_is_checked_too() -> None:
    text = f"""\
  url: {JOURNAL}
  ims: {{client_id: c, client_secret: s, org_id: o, token_url: 'http://ims.example/token'}}
"""
    (found,) = problems(text)
    assert found.startswith("journal.ims.token_url: expected an https:// URL")


@pytest.mark.parametrize("start", ["yesterday", "PT2H", "-P30D", "-PT"])
def test_a_start_point_is_oldest_latest_or_a_duration_within_seven_days(start: str) -> None:
    (found,) = problems(f"  start: '{start}'\n")
    assert found.startswith("journal.start: expected oldest, latest, or a negative duration")


def test_the_journal_belongs_to_a_named_registration() -> None:
    text = f"""\
  url: {JOURNAL}
  registration: nobody
  ims: {{client_id: c, client_secret: s, org_id: o}}
"""
    (found,) = problems(text)
    assert found.startswith("journal.registration: no registration named 'nobody'")
    assert "main, other" in found
    good = parse_config(BASE + text.replace("nobody", "other"), "t.yaml", {})
    assert good.journal_registration().name == "other"


def test_unknown_journal_keys_are_problems() -> None:
    (found,) = problems("  since: p1\n")
    assert found.startswith("journal.since: unknown key")


@pytest.mark.parametrize(
    "proxy",
    [
        "proxy.internal:3128",  # no scheme
        "socks5://proxy.internal:1080",
        "https://proxy.internal:3128",  # TLS to the proxy itself: not spoken here
        "http://proxy.internal",  # no port: say which
        "http://proxy.internal:3128/path",
        "http://:3128",
        "http://proxy.internal:0",
        "http://proxy.internal:3128#here",
    ],
)
def test_a_proxy_is_an_http_url_with_a_port(proxy: str) -> None:
    (found,) = problems(f"  proxy: '{proxy}'\n")
    assert found.startswith(
        "journal.proxy: expected an http:// proxy URL with a port, like http://proxy:3128, got"
    )
    assert "(t.yaml:5)" in found


@pytest.mark.parametrize(
    ("proxy", "shown"),
    [
        ("http://egress:pr0:xy@proxy.internal/", "http://***@proxy.internal/"),
        ("http://egress:pr0@xy@proxy.internal", "http://***@proxy.internal"),
        ("egress:pr0xy@proxy.internal:3128", "***@proxy.internal:3128"),  # no scheme
        ("http://pr0xy@proxy.internal", "http://***@proxy.internal"),  # a token as the user
        ("http://egress:pr0 xy@proxy.internal", "http://***@proxy.internal"),
        ("u:pr0://x@proxy.internal", "***@proxy.internal"),  # no scheme, "://" in the password
    ],
)
def test_a_bad_proxy_url_never_shows_its_user_or_password(proxy: str, shown: str) -> None:
    (found,) = problems(f"  proxy: '{proxy}'\n")
    assert f"got '{shown}'" in found
    assert "pr0" not in found


def test_no_proxy_by_default_and_an_empty_one_is_none() -> None:
    assert parse_config(BASE, "t.yaml", {}).journal.proxy == ""
    assert parse_config(BASE + "  proxy: ''\n", "t.yaml", {}).journal.proxy == ""


def test_a_proxy_url_without_its_host_is_not_echoed() -> None:
    (found,) = problems("  proxy: 'http://egress:pr0xy'\n")  # the host forgotten
    assert found.endswith("got a value not shown here (it may hold a password) (t.yaml:5)")
