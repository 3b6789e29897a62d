"""The 2026 catalog (issue 14): what Adobe sends now that the Lightroom API and Photoshop API v1
are gone, and how it routes.

Every file of ``tests/data/adobe-2026/`` (its INDEX.md names each source) parses to the code, job
status, job id and IMS org below; the IMS org is found wherever each provider puts it, Adobe's
envelope before the provider's payload. The routing recipes of the README section "What Adobe
sends now" are held here as data (kept in sync with the README by hand) and checked against the
samples: the default rule's routing key, the binding keys a consumer would use, and each
``routes:`` snippet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.adobe.envelope import Event, parse_delivery
from bridge.config import parse_config
from bridge.routing import Router
from tests.helpers import EVENTS
from tests.processes import cli

CATALOG = Path(__file__).parent / "data" / "adobe-2026"
H_ID = "header-event-id"  # x-adobe-event-id, for the samples that carry no eventid
EXPRESS_ORG = "<YOUR_IMS_ORG_ID>@AdobeOrg"  # Adobe's placeholder, kept verbatim

# file → (event code, job status, job id, IMS org, event id)
EXPECTED: dict[str, tuple[str, str | None, str | None, str | None, str]] = {
    "express-api_v1_succeeded.json": (
        "com.adobe.express-api.v1.succeeded",
        "succeeded",
        "57b96a1e-4896-4cad-bb82-b5674454b4b5",
        EXPRESS_ORG,
        H_ID,
    ),
    "express-api_v1_partially_succeeded.json": (
        "com.adobe.express-api.v1.partially_succeeded",
        "partially_succeeded",
        "2f6a4c1d-8e3b-4b7a-9c20-5d1e7f8a9b31",
        EXPRESS_ORG,
        H_ID,
    ),
    "express-api_v1_failed.json": (
        "com.adobe.express-api.v1.failed",
        "failed",
        "9a7b3e52-1c4d-4f6a-8b0e-6d2c5a1f7e94",
        EXPRESS_ORG,
        H_ID,
    ),
    "express-api_v1_cancelled.json": (
        "com.adobe.express-api.v1.cancelled",
        "cancelled",
        "57b96a1e-4896-4cad-bb82-b5674454b4b5",
        EXPRESS_ORG,
        H_ID,
    ),
    # The other published version of the guide: no adobeinternal, so no org at all.
    "express-api_v1_cancelled_without-adobeinternal.json": (
        "com.adobe.express-api.v1.cancelled",
        "cancelled",
        "57b96a1e-4896-4cad-bb82-b5674454b4b5",
        None,
        H_ID,
    ),
    # AEM as a Cloud Service names its org only in the (unsigned) x-adobe-provider header.
    "aem_sites_contentFragment_modified_2025_captured.json": (
        "aem.sites.contentFragment.modified",
        None,
        None,
        None,
        "b555a1b1-935b-4541-b410-1915775338b5",
    ),
    # Asset events are addressed to a user (recipient.userid), not to an org.
    "asset-events_file_created.json": (
        "com.adobe.platform.events.file_created",
        None,
        None,
        None,
        "57d927c6-51cf-4316-933f-385eb9360b5d",
    ),
    "commerce_catalog_product_save_commit_after.json": (
        "com.adobe.commerce.observer.catalog_product_save_commit_after",
        None,
        None,
        None,
        "b0f2b088-5490-4d16-9ce9-0cb1fb3e5ed0",
    ),
    "custom-event_sdk-publish-sample.json": ("event_code", None, None, None, "event_id"),
    "custom-event_eventsingress-curl.json": ("<event_code>", None, None, None, H_ID),
}


def parse_one(raw: bytes) -> Event:
    (event,) = parse_delivery(raw, H_ID, "header.event.code").events
    return event


def read(name: str) -> bytes:
    """A sample of adobe-2026/, else of the shared corpus; ``indesign:<STATE>`` is Adobe's
    InDesign sample in another state (no published sample shows the last states)."""
    if name.startswith("indesign:"):
        state = name.removeprefix("indesign:")
        doc = orjson.loads(
            (EVENTS / "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json").read_bytes()
        )
        doc["type"] = doc["data"]["value"]["state"] = state
        doc["data"]["value"].pop("data")
        return orjson.dumps(doc)
    folder = CATALOG if (CATALOG / name).exists() else EVENTS
    return (folder / name).read_bytes()


def test_every_catalog_file_is_in_the_table_and_the_index() -> None:
    files = sorted(p.name for p in CATALOG.glob("*.json"))
    assert files == sorted(EXPECTED)
    index = (CATALOG / "INDEX.md").read_text(encoding="utf-8")
    assert [name for name in files if f"`{name}`" not in index] == []


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_sample_gives_its_code_status_job_and_org(name: str) -> None:
    code, status, job, org, event_id = EXPECTED[name]
    event = parse_one(read(name))
    assert (event.event_code, event.job_status, event.job_id, event.ims_org) == (
        code,
        status,
        job,
        org,
    )
    assert event.event_id == event_id
    assert event.envelope == "cloudevents"


# The shared corpus (tests/data/adobe-samples/events): where each provider there names its org.
SHARED_ORGS = {
    "imaging_lightroom-job-status_succeeded.json": "<IMS org ID>",  # event.header.imsOrgId
    "batch_wrapped_marketo_notification.json": "your_ims_org_id@AdobeOrg",  # event.body.data
    "wrapped_marketo_user_audit_single.json": "your_ims_org_id@AdobeOrg",
    "legacy_analytics_triggers.json": "6578A55456E84E247F000101@AdobeOrg",  # pipeline header
    "legacy_aem_asset_created_with_recipient_client_id.json": "xxxxx@AdobeOrg",  # XDM addressee
    "xdm_bare_aem_asset_created_acme-example.json": "08B3E5CE5822FC520A494229@AdobeOrg",
    "cloudevents_admin_auditlogs_v1.json": "33911245002965270A49422F@AdobeOrg",  # OCSF cloud.org
    "cloudevents_aem_sites_contentFragment_modified_captured.json": None,
    "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json": None,
    "batch_cloudevents_marketo_lead_activity.json": None,
    "xdm_bare_cc_asset_created_aio-lib-java.json": None,  # addressed to a user
}


@pytest.mark.parametrize("name", sorted(SHARED_ORGS))
def test_the_shared_samples_name_their_org_where_their_provider_puts_it(name: str) -> None:
    events = parse_delivery((EVENTS / name).read_bytes(), H_ID, "c").events
    assert {e.ims_org for e in events} == {SHARED_ORGS[name]}


def express(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads((CATALOG / "express-api_v1_succeeded.json").read_bytes())
    doc.update(extra)
    return doc


@pytest.mark.parametrize(
    ("doc", "org"),
    [
        # Adobe's envelope field wins over one the payload's author wrote.
        (
            express(adobeinternal={"imsOrg": "ADOBE@AdobeOrg"}, data={"imsOrgId": "P@AdobeOrg"}),
            "ADOBE@AdobeOrg",
        ),
        (
            express(adobeinternal={"imsOrg": "ADOBE@AdobeOrg"}, imsorgid="TOP@AdobeOrg"),
            "ADOBE@AdobeOrg",
        ),
        # ...and when the envelope says nothing usable, the payload's own field is taken.
        (express(adobeinternal={"imsOrg": ""}, data={"imsOrgId": "P@AdobeOrg"}), "P@AdobeOrg"),
        (express(adobeinternal="ADOBE@AdobeOrg", data={"imsOrgId": "P@AdobeOrg"}), "P@AdobeOrg"),
        (express(adobeinternal={"imsOrg": 7}), None),
        # AEM add-on module events in a CloudEvent: the XDM payload is data.
        (
            {
                "specversion": "1.0",
                "type": "com.adobe.aem.asset_created",
                "source": "urn:uuid:the_AEM_provider_id",
                "id": "1",
                "data": {
                    "activitystreams:to": {"@type": "xdmImsOrg", "xdmImsOrg:id": "X@AdobeOrg"}
                },
            },
            "X@AdobeOrg",
        ),
    ],
)
def test_the_org_comes_from_adobes_envelope_before_the_payload(
    doc: dict[str, Any], org: str | None
) -> None:
    assert parse_one(orjson.dumps(doc)).ims_org == org


# -- the README's recipes ("What Adobe sends now"), as data -----------------------------------


def topic_matches(binding: str, key: str) -> bool:
    """AMQP topic matching: words split on ``.``, ``*`` one word, ``#`` zero or more."""

    def match(b: list[str], k: list[str]) -> bool:
        if not b:
            return not k
        if b[0] == "#":
            return any(match(b[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and b[0] in ("*", k[0]) and match(b[1:], k[1:])

    return match(binding.split("."), key.split("."))


DEFAULT_RULE = """\
  - name: default
    targets:
      - {exchange: adobe.events, routing_key: "{event_code}.{status}"}
"""


@dataclass(frozen=True)
class Recipe:
    """One product's recipe: what its samples get with the default rule, the binding keys the
    README suggests (each must take exactly the samples named), and its ``routes:`` snippet with
    the keys it gives (None: dropped)."""

    samples: tuple[str, ...]
    default_keys: tuple[str, ...]
    bindings: dict[str, tuple[str, ...]]  # binding key → the samples it takes (default rule)
    routes: str
    routed_keys: tuple[str | None, ...]
    routed_bindings: dict[str, tuple[str, ...]] = field(default_factory=dict)  # with `routes`


RECIPES: dict[str, Recipe] = {
    "express": Recipe(
        samples=(
            "express-api_v1_succeeded.json",
            "express-api_v1_partially_succeeded.json",
            "express-api_v1_failed.json",
            "express-api_v1_cancelled.json",
        ),
        default_keys=(
            "com.adobe.express-api.v1.succeeded.succeeded",
            "com.adobe.express-api.v1.partially_succeeded.partially_succeeded",
            "com.adobe.express-api.v1.failed.failed",
            "com.adobe.express-api.v1.cancelled.cancelled",
        ),
        bindings={
            "com.adobe.express-api.v1.#": (
                "express-api_v1_succeeded.json",
                "express-api_v1_partially_succeeded.json",
                "express-api_v1_failed.json",
                "express-api_v1_cancelled.json",
            ),
            "com.adobe.express-api.v1.failed.#": ("express-api_v1_failed.json",),
            "#.failed": ("express-api_v1_failed.json",),  # README: `*.failed` is one word only
            "*.failed": (),
        },
        routes="""\
routes:
  - name: express
    match: {event_code: "com.adobe.express-api.v1.*"}
    targets:
      - exchange: adobe.events
        routing_key: "express.{status}"
        headers: {express-endpoint: "{/apiendpoint}"}
"""
        + DEFAULT_RULE,
        routed_keys=(
            "express.succeeded",
            "express.partially_succeeded",
            "express.failed",
            "express.cancelled",
        ),
        routed_bindings={
            "express.failed": ("express-api_v1_failed.json",),
            "express.cancelled": ("express-api_v1_cancelled.json",),
            "express.partially_succeeded": ("express-api_v1_partially_succeeded.json",),
            "express.#": (
                "express-api_v1_succeeded.json",
                "express-api_v1_partially_succeeded.json",
                "express-api_v1_failed.json",
                "express-api_v1_cancelled.json",
            ),
        },
    ),
    "indesign": Recipe(
        samples=(
            "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json",
            "batch_cloudevents_indesign_job_states.json",
            "indesign:COMPLETED",
            "indesign:FAILED",
        ),
        default_keys=("ASSET_DOWNLOAD_FAILED.none", "QUEUED.none", "COMPLETED.none", "FAILED.none"),
        bindings={
            "COMPLETED.none": ("indesign:COMPLETED",),
            "FAILED.none": ("indesign:FAILED",),
            "ASSET_DOWNLOAD_FAILED.none": (
                "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json",
            ),
        },
        routes="""\
routes:
  - name: indesign
    match:
      fields:
        - {pointer: /data/source, equals: indesign}
    targets:
      - exchange: adobe.events
        routing_key: "indesign.{event_code}"
        headers: {job-id: "{/data/value/jobId}"}
"""
        + DEFAULT_RULE,
        routed_keys=(
            "indesign.ASSET_DOWNLOAD_FAILED",
            "indesign.QUEUED",
            "indesign.COMPLETED",
            "indesign.FAILED",
        ),
        routed_bindings={
            "indesign.#": (
                "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json",
                "batch_cloudevents_indesign_job_states.json",
                "indesign:COMPLETED",
                "indesign:FAILED",
            ),
            "indesign.COMPLETED": ("indesign:COMPLETED",),
            "indesign.FAILED": ("indesign:FAILED",),
            "indesign.ASSET_DOWNLOAD_FAILED": (
                "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json",
            ),
        },
    ),
    "aem": Recipe(
        samples=(
            "aem_sites_contentFragment_modified_2025_captured.json",
            "cloudevents_aem_assets_asset_published_sdf-example.json",
        ),
        default_keys=("aem.sites.contentFragment.modified.none", "aem.assets.asset.published.none"),
        bindings={
            "aem.sites.contentFragment.#": (
                "aem_sites_contentFragment_modified_2025_captured.json",
            ),
            "aem.assets.#": ("cloudevents_aem_assets_asset_published_sdf-example.json",),
            "aem.#": (
                "aem_sites_contentFragment_modified_2025_captured.json",
                "cloudevents_aem_assets_asset_published_sdf-example.json",
            ),
        },
        routes="""\
routes:
  - name: aem
    match: {event_code: "aem.*"}
    targets:
      - exchange: adobe.events
        routing_key: "{event_code}"
        headers: {aem-path: "{/data/path}"}
"""
        + DEFAULT_RULE,
        routed_keys=("aem.sites.contentFragment.modified", "aem.assets.asset.published"),
        routed_bindings={
            "aem.sites.contentFragment.*": (
                "aem_sites_contentFragment_modified_2025_captured.json",
            ),
            "aem.#": (
                "aem_sites_contentFragment_modified_2025_captured.json",
                "cloudevents_aem_assets_asset_published_sdf-example.json",
            ),
        },
    ),
    "asset-events": Recipe(
        samples=("asset-events_file_created.json",),
        default_keys=("com.adobe.platform.events.file_created.none",),
        bindings={"com.adobe.platform.events.#": ("asset-events_file_created.json",)},
        routes="routes:\n" + DEFAULT_RULE,
        routed_keys=("com.adobe.platform.events.file_created.none",),
    ),
    "marketo": Recipe(
        samples=(
            "cloudevents_marketo_changesegment_webhook-example.json",
            "batch_cloudevents_marketo_lead_activity.json",
            "batch_wrapped_marketo_notification.json",
        ),
        default_keys=(
            "com.adobe.platform.marketo.activity.standard.changesegment.none",
            "com.adobe.platform.marketo.activity.standard.openemail.none",
            "com.adobe.platform.marketo.notification.web_services.none",
        ),
        bindings={
            "com.adobe.platform.marketo.activity.#": (
                "cloudevents_marketo_changesegment_webhook-example.json",
                "batch_cloudevents_marketo_lead_activity.json",
            ),
            "com.adobe.platform.marketo.notification.#": (
                "batch_wrapped_marketo_notification.json",
            ),
        },
        routes="""\
routes:
  - name: marketo-page-visits
    match: {event_code: com.adobe.platform.marketo.activity.standard.visitwebpage}
    action: drop
"""
        + DEFAULT_RULE,
        routed_keys=(
            "com.adobe.platform.marketo.activity.standard.changesegment.none",
            "com.adobe.platform.marketo.activity.standard.openemail.none",
            "com.adobe.platform.marketo.notification.web_services.none",
        ),
    ),
    "commerce": Recipe(
        samples=("commerce_catalog_product_save_commit_after.json",),
        default_keys=("com.adobe.commerce.observer.catalog_product_save_commit_after.none",),
        bindings={
            "com.adobe.commerce.#": ("commerce_catalog_product_save_commit_after.json",),
            "com.adobe.commerce.observer.catalog_product_save_commit_after.#": (
                "commerce_catalog_product_save_commit_after.json",
            ),
            "com.adobe.commerce.observer.catalog_product_*": (),
        },
        routes="routes:\n" + DEFAULT_RULE,
        routed_keys=("com.adobe.commerce.observer.catalog_product_save_commit_after.none",),
    ),
    "custom": Recipe(
        samples=("custom-event_sdk-publish-sample.json",),
        default_keys=("event_code.none",),
        bindings={"event_code.#": ("custom-event_sdk-publish-sample.json",)},
        routes="""\
routes:
  - name: my-provider
    match:
      fields:
        - {pointer: /source, equals: "urn:uuid:provider_id"}
    targets:
      - exchange: adobe.events
        routing_key: "custom.{event_code}"
"""
        + DEFAULT_RULE,
        routed_keys=("custom.event_code",),
        routed_bindings={"custom.#": ("custom-event_sdk-publish-sample.json",)},
    ),
}


def router(routes: str) -> Router:
    text = (
        "registrations:\n  - {name: main, client_ids: [c]}\n"
        "topology:\n  exchanges:\n"
        "    - {name: adobe.events, type: topic, alternate_exchange: adobe.unrouted}\n"
        "    - {name: adobe.unrouted, type: fanout}\n" + routes
    )
    config = parse_config(text, "recipe.yaml", {})
    return Router(config.routes, config.broker.unrouted_exchange)


def first_event(name: str) -> Event:
    return parse_delivery(read(name), H_ID, "c").events[0]


def keys(routes: str, name: str) -> list[str]:
    decision = router(routes).route(first_event(name), registration="main")
    return [t.routing_key for t in decision.targets]


@pytest.mark.parametrize("product", sorted(RECIPES))
def test_each_recipe_routes_its_samples_as_the_readme_says(product: str) -> None:
    recipe = RECIPES[product]
    default = "routes:\n" + DEFAULT_RULE
    assert [keys(default, s)[0] for s in recipe.samples] == list(recipe.default_keys)
    routed = [keys(recipe.routes, s) for s in recipe.samples]
    assert [r[0] if r else None for r in routed] == list(recipe.routed_keys)
    # what each binding key takes of the samples, with the default rule and with the recipe's
    for routes, bindings in ((default, recipe.bindings), (recipe.routes, recipe.routed_bindings)):
        got = {s: keys(routes, s) for s in recipe.samples}
        for binding, wanted in bindings.items():
            taken = {s for s, ks in got.items() if any(topic_matches(binding, k) for k in ks)}
            assert taken == set(wanted), binding


def test_a_dropped_marketo_page_visit_is_accepted_and_never_published() -> None:
    routes = RECIPES["marketo"].routes
    visit = parse_delivery(
        (EVENTS / "batch_cloudevents_marketo_lead_activity.json").read_bytes()
    ).events[1]
    decision = router(routes).route(visit, registration="main")
    assert (decision.dropped, decision.dropped_by) == (True, "marketo-page-visits")


def test_recipe_headers_carry_the_payloads_own_fields() -> None:
    express_decision = router(RECIPES["express"].routes).route(
        first_event("express-api_v1_failed.json"), registration="main"
    )
    assert express_decision.targets[0].headers == (("express-endpoint", "beta/export-rendition"),)
    indesign = router(RECIPES["indesign"].routes).route(
        first_event("cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json"), registration="main"
    )
    assert indesign.targets[0].headers == (("job-id", "8b524c70-6779-47f1-ac2a-ce93c23b3f5f"),)


@pytest.mark.parametrize(
    ("binding", "key", "matches"),
    [
        ("a.#", "a", True),
        ("a.#", "a.b.c", True),
        ("a.*", "a.b.c", False),
        ("*.b.#", "a.b", True),
        ("#", "", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_the_topic_matcher_is_amqps(binding: str, key: str, matches: bool) -> None:
    assert topic_matches(binding, key) is matches


# -- events-bridge route: the org is seen -----------------------------------------------------


def test_route_prints_the_express_events_ims_org(tmp_path: Path) -> None:
    """`events-bridge route` on the Express sample: its org, its job, and a registration that
    lists the org takes it while one listing another refuses it (403 org_mismatch)."""
    doc = express(eventid="4f1d0c2a-express", recipientclientid="c1")
    event = tmp_path / "express.json"
    event.write_bytes(orjson.dumps(doc))
    config = tmp_path / "bridge.yaml"
    config.write_text(
        "registrations:\n"
        f"  - {{name: ours, path: /a, client_ids: [c1], ims_orgs: ['{EXPRESS_ORG}']}}\n"
        "  - {name: theirs, path: /b, client_ids: [c1], ims_orgs: [OTHER@AdobeOrg]}\n"
    )
    ours = cli("route", "--config", str(config), "--registration", "ours", str(event))
    assert ours.returncode == 0, ours.stderr
    assert f"IMS org:    {EXPRESS_ORG}" in ours.stdout
    assert "job status: succeeded  job id: 57b96a1e-4896-4cad-bb82-b5674454b4b5" in ours.stdout
    assert "routing key com.adobe.express-api.v1.succeeded.succeeded" in ours.stdout
    theirs = cli("route", "--config", str(config), "--registration", "theirs", str(event))
    assert theirs.returncode == 0, theirs.stderr
    assert "refused with 403 (org_mismatch)" in theirs.stdout
