"""The monitoring files of ``deploy/`` against the daemon itself: the Grafana dashboard
(``deploy/grafana/events-bridge.json``) and the Prometheus alerts
(``deploy/prometheus/alerts.yaml``).

Checks: every PromQL expression (the dashboard's targets and template variables, the alert
rules) parses with ``promql_parser``; every metric they select is exported on the ``/metrics`` of
a real ``events-bridge serve`` on the real broker, after a few requests and with a local Adobe
journal to pull (``tests/adobe_journal.py``: one failed answer, a page of events, the end), so that
the journal's labelled series exist; every label they match on or group by exists on that metric;
every value they match a label against exactly (``=``, ``!=``) is one the daemon exported or its
metric's help names; the dashboard's structure; the rules' shape; and ``promtool check rules``
where promtool is installed (it is not required: the parse is the check).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import promql_parser
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from bridge import metrics
from bridge.config import BrokerConfig
from tests.adobe_journal import JournalServer
from tests.conftest import ROOT
from tests.helpers import CLIENT_ID, EVENTS, SAMPLES, SigningKey
from tests.processes import Daemon, daemon_env
from tests.test_cli import isolated_config

DASHBOARD = ROOT / "deploy" / "grafana" / "events-bridge.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
# promtool's unit tests of the journal's alerts (run where promtool is installed)
JOURNAL_ALERT_TESTS = Path(__file__).with_name("journal_alerts_test.yaml")

# What Prometheus itself provides, the only names allowed besides the daemon's: the series
# ``up`` of every target, and the target labels it puts on every series it scrapes.
BUILTIN_METRICS: dict[str, frozenset[str]] = {"up": frozenset({"job", "instance"})}
TARGET_LABELS = frozenset({"job", "instance"})

# Grafana's own variables ($__rate_interval, ${__range}) stand for a duration, the dashboard's
# ($job, ${instance:regex}) for a label value: substituted so that the text is plain PromQL.
GRAFANA_DURATION = re.compile(r"\$(?:\{__\w+\}|__\w+)")
GRAFANA_VARIABLE = re.compile(r"\$(?:\{\w+(?::\w+)?\}|\w+)")
# A template variable's query: Grafana's label_values(<selector>, <label>), not PromQL itself.
LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$", re.S)


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    """Every panel, those nested in collapsed rows too."""
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def expressions() -> list[tuple[str, str, str | None]]:
    """``(where, PromQL, label)`` for every query of the two files; ``label`` is the label a
    template variable lists (it must exist on the metric its selector names)."""
    found: list[tuple[str, str, str | None]] = []
    for panel in panels():
        for target in panel.get("targets", []):
            where = f"dashboard: {panel['title']} [{target['refId']}]"
            found.append((where, grafana_to_promql(target["expr"]), None))
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        listed = LABEL_VALUES.match(text)
        assert listed, f"variable {variable['name']}: only label_values(selector, label) is used"
        where = f"dashboard: variable {variable['name']}"
        found.append((where, grafana_to_promql(listed["selector"]), listed["label"]))
    found.extend((f"alerts: {rule['alert']}", rule["expr"], None) for rule in rules())
    return found


def grafana_to_promql(text: str) -> str:
    return GRAFANA_VARIABLE.sub("x", GRAFANA_DURATION.sub("5m", text))


@dataclass
class Uses:
    """What the queries ask of the exporter: metric names, and (metric, label) pairs."""

    metrics: set[str] = field(default_factory=set)
    labels: set[tuple[str, str]] = field(default_factory=set)
    # (metric, label, value) of every exact matcher (= and !=): a made-up value matches nothing
    values: set[tuple[str, str, str]] = field(default_factory=set)


def selected(expr: promql_parser.Expr) -> list[promql_parser.VectorSelector]:
    """Every vector selector under ``expr`` (a range selector's included: walk visits it)."""
    found: list[promql_parser.VectorSelector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(expr, visit)
    return found


def matchers_of(selector: promql_parser.VectorSelector) -> list[promql_parser.Matcher]:
    """Its matchers, those of ``{a="1" or b="2"}`` too."""
    return [*selector.matchers.matchers, *itertools.chain(*selector.matchers.or_matchers)]


def metric_of(selector: promql_parser.VectorSelector) -> str:
    """The metric a selector names, by name or by an ``__name__`` matcher; one it must name."""
    matchers = matchers_of(selector)
    names = {
        m.value for m in matchers if m.name == "__name__" and m.op == promql_parser.MatchOp.Equal
    }
    if selector.name:
        names.add(selector.name)
    assert len(names) == 1, f"{selector}: select one metric by its name"
    return names.pop()


def uses_of(expr: promql_parser.Expr) -> Uses:
    """Metric names, and the labels of matchers, ``by (...)`` and ``on (...)``, per metric.

    A ``by`` or ``on`` label must exist on every metric selected beneath it (an approximation:
    what an inner aggregation removed is not followed; ``without`` and ``ignoring`` need
    nothing; ``group_left``/``group_right`` with labels are refused, being unchecked)."""
    uses = Uses()

    def grouped(labels: Iterable[str], *under: promql_parser.Expr) -> None:
        for part in under:
            for selector in selected(part):
                uses.labels.update((metric_of(selector), label) for label in labels)

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            name = metric_of(node)
            uses.metrics.add(name)
            uses.labels.update((name, m.name) for m in matchers_of(node) if m.name != "__name__")
            exact = (promql_parser.MatchOp.Equal, promql_parser.MatchOp.NotEqual)
            uses.values.update(
                (name, m.name, m.value)
                for m in matchers_of(node)
                if m.name != "__name__" and m.op in exact
            )
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            if node.modifier.type == promql_parser.AggModifierType.By:
                grouped(node.modifier.labels, node.expr)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            assert not node.modifier.group_labels, "group_left/right (labels): not checked yet"
            matching = node.modifier.matching
            if matching is not None and matching.type == promql_parser.LabelModifierType.Include:
                grouped(matching.labels, node.lhs, node.rhs)

    promql_parser.walk(expr, visit)
    return uses


EXPRESSIONS = expressions()


@pytest.mark.parametrize(("where", "text", "label"), EXPRESSIONS, ids=[e[0] for e in EXPRESSIONS])
def test_every_expression_parses_and_names_its_metrics(
    where: str, text: str, label: str | None
) -> None:
    uses = uses_of(promql_parser.parse(text))
    assert uses.metrics, f"{where}: selects no metric"
    assert label is None or len(uses.metrics) == 1, f"{where}: label_values of one metric"


def test_the_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert {"job", "instance"} <= variables.keys()
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels():
        title = panel.get("title", panel["id"])
        grid = panel.get("gridPos", {})
        assert {"h", "w", "x", "y"} <= grid.keys(), f"{title}: gridPos"
        assert grid["x"] + grid["w"] <= 24, f"{title}: wider than the dashboard"
        if panel["type"] == "row":  # a section heading: no query of its own
            continue
        assert panel.get("datasource") == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, title
        assert panel.get("targets"), f"{title}: no query"
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), f"{title}: refIds repeat"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"{title}: an empty query"
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title


def test_every_alert_says_how_long_how_bad_and_what_to_do() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in rules():
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), f"{rule['alert']}: for"
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
    promtool = shutil.which("promtool")
    if promtool is not None:  # optional: the PromQL parse above is the check that always runs
        checked = subprocess.run(
            [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr


def with_labels(template: str, labels: dict[str, str]) -> str:
    """An annotation as Prometheus renders it, where it says only ``{{ $labels.x }}``."""
    for name, value in labels.items():
        template = template.replace(f"{{{{ $labels.{name} }}}}", value)
    return template


def test_journal_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    """``promtool test rules`` on journal_alerts_test.yaml: each journal alert has a case, and
    the quiet journal, the backlog that ends, the outage that mends fire nothing."""
    by_name = {rule["alert"]: rule for rule in rules()}
    doc = yaml.safe_load(JOURNAL_ALERT_TESTS.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test["alert_rule_test"]}
    assert {name for name in by_name if name.startswith("EventsBridgeJournal")} <= tested
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    doc["rule_files"] = [str(ALERTS)]
    for test in doc["tests"]:
        for case in test["alert_rule_test"]:
            for alert in case["exp_alerts"]:
                annotations = by_name[case["alertname"]]["annotations"].items()
                filled = {key: with_labels(text, alert["exp_labels"]) for key, text in annotations}
                alert["exp_annotations"] = {**filled, **alert.get("exp_annotations", {})}
    written = tmp_path / JOURNAL_ALERT_TESTS.name
    written.write_text(yaml.safe_dump(doc, sort_keys=False, width=1000))
    checked = subprocess.run(
        [promtool, "test", "rules", str(written)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- against a real daemon -----------------------------------------------------------------------


def declared_labels() -> dict[str, frozenset[str]]:
    """Each family's label names as bridge/metrics.py declares them: a labelled metric with no
    child yet (nothing quarantined) shows no sample, hence no label, on /metrics. prometheus_client
    keeps them only in ``_labelnames``."""
    return {
        next(iter(metric.describe())).name: frozenset(metric._labelnames)  # noqa: SLF001
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }


def documented_values() -> dict[tuple[str, str], set[str]]:
    """(series, label) to the values its metric's help names: "..., by kind: network, token
    (IMS), state." gives kind: network, token, state (parenthesised remarks left out)."""
    found: dict[tuple[str, str], set[str]] = {}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        family = next(iter(metric.describe()))
        help_text = re.sub(r"\([^)]*\)", "", metric._documentation)  # noqa: SLF001
        for label, listed in re.findall(r"\bby (\w+): ([^.]*)", help_text):
            words = set(re.findall(r"\b[a-z][a-z0-9_]*\b", listed))
            for suffix in SUFFIXES.get(family.type, ("",)):
                found.setdefault((family.name + suffix, label), set()).update(words)
    return found


def unknown_values(uses: Uses, text: str) -> list[tuple[str, str, str]]:
    """The exact matches of ``uses`` on a value that neither the exposition ``text`` shows nor
    the metric's help names (target labels and Prometheus's own series left aside)."""
    known = documented_values()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for label, value in sample.labels.items():
                known.setdefault((sample.name, label), set()).add(value)
    return sorted(
        (name, label, value)
        for name, label, value in uses.values
        if name not in BUILTIN_METRICS
        and label not in TARGET_LABELS
        and value not in known.get((name, label), set())
    )


def test_a_made_up_label_value_is_caught() -> None:
    """The value check has teeth: a kind the daemon never sets is refused, a documented one is
    not (even before any series has it)."""
    made_up = uses_of(promql_parser.parse('rate(bridge_journal_errors_total{kind="tokens"}[5m])'))
    assert unknown_values(made_up, "") == [("bridge_journal_errors_total", "kind", "tokens")]
    real = uses_of(promql_parser.parse('rate(bridge_journal_errors_total{kind!="token"}[5m])'))
    assert unknown_values(real, "") == []


SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def exported(text: str) -> dict[str, set[str]]:
    """Every series name the exposition ``text`` declares, with its label names: from ``# TYPE``
    (so a labelled counter with no child yet counts) and from the samples."""
    declared = declared_labels()
    series: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            labels = set(declared.get(family.name, ())) | TARGET_LABELS
            series.setdefault(family.name + suffix, set()).update(labels)
        for sample in family.samples:
            series.setdefault(sample.name, set(TARGET_LABELS)).update(sample.labels)
    for name in [name for name in series if name.endswith("_bucket")]:
        series[name].add("le")
    return series


def send(url: str, body: bytes, headers: dict[str, str], method: str = "POST") -> int:
    request = urllib.request.Request(url, data=body or None, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as refused:
        return refused.code


def exercise(daemon: Daemon, signer: SigningKey) -> list[int]:
    """A few requests, so that labelled series exist: a good event, a redelivery of it, a bad
    signature, a validation POST, a challenge, a malformed request. Their statuses."""
    hook = daemon.url + "/webhook"
    event = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())
    body = orjson.dumps({**event, "event_id": str(uuid.uuid4()), "recipientclientid": CLIENT_ID})
    forged = SigningKey.generate().headers(body)
    validation = (SAMPLES / "control" / "async_validation_post_body.json").read_bytes()
    validation = validation.replace(b"<guid1>", b"a1").replace(b"<guid2>", b"b2")
    statuses = [
        send(hook, body, signer.headers(body)),
        send(hook, body, signer.headers(body)),  # a duplicate: published once
        send(hook, body, forged),
        send(hook, validation, {"content-type": "application/json"}),
        send(hook + "?challenge=monitoring", b"", {}, method="GET"),
    ]
    with socket.create_connection(("127.0.0.1", int(daemon.env["BRIDGE_PORT"])), 5) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        raw.settimeout(5)
        statuses.append(int(raw.recv(64).split()[1]))
    return statuses


def scrape(daemon: Daemon) -> str:
    with urllib.request.urlopen(daemon.url + "/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


JOURNAL_EVENTS = 3
# What the local journal makes the daemon export: a 500 first, then a page of events, then the
# end (204); and the token it asked IMS for.
JOURNAL_SERIES = (
    'bridge_journal_errors_total{kind="server"}',
    'bridge_journal_pages_total{result="events"}',
    'bridge_journal_pages_total{result="empty"}',
    'bridge_journal_token_renewals_total{reason="first"}',
    f"bridge_journal_events_total {float(JOURNAL_EVENTS)}",
)


def journal_env(server: JournalServer, folder: Path) -> dict[str, str]:
    """The variables the shipped config reads for the journal, pointed at ``server``."""
    return {
        "BRIDGE_JOURNAL_URL": server.journal_url,
        "BRIDGE_JOURNAL_START": "oldest",
        "BRIDGE_JOURNAL_STATE_DIR": str(folder),
        "BRIDGE_IMS_TOKEN_URL": server.token_url,
        "BRIDGE_IMS_CLIENT_ID": server.client_id,
        "BRIDGE_IMS_CLIENT_SECRET": server.client_secret,
        "BRIDGE_IMS_ORG_ID": server.org_id,
    }


def journal_events(count: int) -> list[dict[str, Any]]:
    event = orjson.loads((EVENTS / "imaging_lightroom-job-status_succeeded.json").read_bytes())
    return [
        {**event, "event_id": str(uuid.uuid4()), "recipientclientid": CLIENT_ID}
        for _ in range(count)
    ]


def scrape_until(daemon: Daemon, ready: Callable[[str], bool], seconds: float = 30) -> str:
    deadline = time.monotonic() + seconds
    text = scrape(daemon)
    while not ready(text):
        assert time.monotonic() < deadline, f"{text}\n{daemon.log_file.read_text()[-3000:]}"
        time.sleep(0.2)
        text = scrape(daemon)
    return text


def test_the_daemon_exports_every_metric_and_label_the_queries_use(
    tmp_path: Path, amqp_url: str, forget_topology: list[BrokerConfig]
) -> None:
    signer = SigningKey.generate()
    env = daemon_env(tmp_path, signer, amqp_url)
    with JournalServer(retry_after=0.5) as journal:
        env.update(journal_env(journal, tmp_path / "journal"))
        journal.add_many(journal_events(JOURNAL_EVENTS))
        journal.fail_next(500)  # a problem of one kind, so that the errors have a series
        daemon = Daemon(isolated_config(tmp_path, forget_topology), env)
        try:
            daemon.wait_ready()
            statuses = exercise(daemon, signer)
            text = scrape_until(daemon, lambda text: all(s in text for s in JOURNAL_SERIES))
            code, logs = daemon.stop()
        finally:
            daemon.kill()
    assert statuses == [200, 200, 401, 200, 200, 400]
    assert code == 0
    assert "journal_started" in {line["event"] for line in logs}
    series = exported(text)
    assert "bridge_outbox_oldest_age_seconds 0.0" in text.splitlines()  # nothing waits
    assert {"bridge_events_published_total", "bridge_requests_total"} <= series.keys()
    uses = Uses()
    for _, query, label in EXPRESSIONS:
        found = uses_of(promql_parser.parse(query))
        uses.metrics |= found.metrics
        uses.labels |= found.labels
        uses.labels.update((name, label) for name in found.metrics if label is not None)
        uses.values |= found.values
    known = {**series, **{name: set(labels) for name, labels in BUILTIN_METRICS.items()}}
    assert sorted(uses.metrics - known.keys()) == [], "queried, but not exported"
    unknown = sorted((name, label) for name, label in uses.labels if label not in known[name])
    assert unknown == [], "labels the metric does not have"
    assert unknown_values(uses, text) == [], "label values the daemon never sets"
    assert any(name.startswith("bridge_journal_") for name in uses.metrics)
