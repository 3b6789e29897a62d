"""Envelopes: every sample in events/ gets the code, id and status its INDEX.md gives."""

from __future__ import annotations

import hashlib
import json

import orjson
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from bridge.adobe.batch import _VALUES, _compact_elements, _scan_array, batch_elements, split_array
from bridge.adobe.envelope import parse_delivery
from bridge.errors import BadRequest, PayloadTooLarge
from tests.helpers import EVENTS, SAMPLES

H_ID, H_CODE = "header-event-id", "header.event.code"  # x-adobe-event-id/-code (derived)

# file → [(event code, event id, job id, job status)], from events/INDEX.md §3. Judgments:
# CloudEvents without eventid take the header id (never the CloudEvents `id`); InDesign's
# data.value.state is a state-machine step, not an Imaging job status, so it routes as `.none`.
EXPECTED: dict[str, list[tuple[str, str, str | None, str | None]]] = {
    "imaging_lightroom-job-status_succeeded.json": [
        (
            "lightroom-job-status",
            "7b59cc70-88d7-4895-b204-87f5350a0cce",
            "eb4a9211-eb8a-4e88-b853-b9c08ba47427",
            "succeeded",
        )
    ],
    "imaging_photoshop-job-status_succeeded_documentManifest.json": [
        (
            "photoshop-job-status",
            "b412a90e-8bc0-4f0d-931e-9e9b8d24993d",
            "63c6e812-6cb8-43de-8a60-3681a9ec6feb",
            "succeeded",
        )
    ],
    "cloudevents_aem_sites_contentFragment_modified_captured.json": [
        ("aem.sites.contentFragment.modified", "a0f3fb7d-b02c-4612-aac6-e472b80af793", None, None)
    ],
    "cloudevents_marketo_changesegment_webhook-example.json": [
        (
            "com.adobe.platform.marketo.activity.standard.changesegment",
            "8927ce83-2f10-4df9-9eb4-09c381bc4778",
            None,
            None,
        )
    ],
    "cloudevents_indesign_ASSET_DOWNLOAD_FAILED_single.json": [
        ("ASSET_DOWNLOAD_FAILED", "f60a502e-c16b-49c6-b3c1-770666a1921f", None, None)
    ],
    "cloudevents_aem_assets_asset_published_sdf-example.json": [
        ("aem.assets.asset.published", H_ID, None, None)
    ],
    "cloudevents_admin_auditlogs_v1.json": [
        ("com.adobe.adminconsole.auditlogs.v1", H_ID, None, None)
    ],
    "cloudevents_contentlogs_read.json": [
        ("com.adobe.acp.contentlogs.read", "1abfc513-da4b-45ad-91ed-439ba7273b45", None, None)
    ],
    "cloudevents_faq_examplelogin.json": [("examplelogin", H_ID, None, None)],
    "cloudevents_aem_faq_template.json": [("the_AEM_event_code", H_ID, None, None)],
    "cloudevents_journal_entry_aio-lib-java.json": [
        ("com.adobe.events.egqa.code1", "b6430251-14ec-454e-b49a-f8d9c41026be", None, None)
    ],
    "batch_cloudevents_indesign_job_states.json": [
        ("QUEUED", "420c1092", None, None),
        ("ASSETS_DOWNLOAD_STARTED", "d1c47805", None, None),
        ("ASSET_DOWNLOAD_STARTED", "1bf6e136", None, None),
    ],
    "batch_cloudevents_marketo_lead_activity.json": [
        ("com.adobe.platform.marketo.activity.standard.openemail", "ec2c6092", None, None),
        ("com.adobe.platform.marketo.activity.standard.visitwebpage", "97980214", None, None),
    ],
    "batch_wrapped_marketo_user_audit.json": [
        ("com.adobe.platform.marketo.audit.user.email", "cf904f43", None, None),
        ("com.adobe.platform.marketo.audit.user.landingpage", "e931c3ec", None, None),
    ],
    "batch_wrapped_marketo_notification.json": [
        ("com.adobe.platform.marketo.notification.web_services", "64e73a16", None, None),
        ("com.adobe.platform.marketo.notification.campaign_failure", "1519a09d", None, None),
    ],
    "wrapped_marketo_user_audit_single.json": [
        ("com.adobe.platform.marketo.audit.user.email", "a9ef9c3c", None, None)
    ],
    "legacy_analytics_triggers.json": [
        (H_CODE, "52ebf673-8aeb-4347-8852-bf86a18292e4", None, None)
    ],
    "legacy_aem_faq_template.json": [(H_CODE, "the_AEM_event_id", None, None)],
    "legacy_aem_asset_created_with_recipient_client_id.json": [
        (H_CODE, "xxxxx-ac2f-4825-ad46-07dc417f5a8d", None, None)
    ],
    "legacy_aem_asset_created_without_recipient_client_id.json": [
        (H_CODE, "xxxxx-ac2f-4825-ad46-07dc417f5a8d", None, None)
    ],
    "xdm_bare_aem_asset_created_acme-example.json": [(H_CODE, H_ID, None, None)],
    "xdm_bare_cc_asset_created_aio-lib-java.json": [(H_CODE, H_ID, None, None)],
}


def test_every_sample_is_in_the_table() -> None:
    assert {p.name for p in EVENTS.glob("*.json")} == set(EXPECTED)


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED.items()))
def test_sample_parses_as_its_index_says(
    name: str, expected: list[tuple[str, str, str | None, str | None]]
) -> None:
    raw = (EVENTS / name).read_bytes()
    delivery = parse_delivery(raw, H_ID, H_CODE)
    assert delivery.batch == name.startswith("batch_")
    assert len(delivery.events) == len(expected)
    for event, (code, event_id, job, status) in zip(delivery.events, expected, strict=True):
        assert event.event_code == code
        assert event.event_id.startswith(event_id)
        assert event.job_id == job
        assert event.job_status == status
        assert orjson.loads(event.body) == event.document
    if not delivery.batch:
        assert delivery.events[0].body == raw  # single delivery: the exact request bytes


def test_batch_headers_never_name_an_event() -> None:
    raw = (EVENTS / "batch_cloudevents_marketo_lead_activity.json").read_bytes()
    events = parse_delivery(raw, H_ID, H_CODE).events
    assert H_ID not in {e.event_id for e in events}


def test_cloudevents_id_is_never_the_event_id() -> None:
    raw = (EVENTS / "cloudevents_aem_assets_asset_published_sdf-example.json").read_bytes()
    (event,) = parse_delivery(raw).events
    assert event.event_id == "sha256:" + hashlib.sha256(raw).hexdigest()


def test_an_event_without_code_is_published_as_unknown_not_dropped() -> None:
    raw = b'[{"event_id":"a","event":{}},{"eventid":"b","event":{}}]'
    events = parse_delivery(raw, H_ID, H_CODE).events
    assert [(e.event_id, e.event_code) for e in events] == [("a", "unknown"), ("b", "unknown")]


def test_validation_post_is_not_an_event() -> None:
    raw = (SAMPLES / "control" / "async_validation_post_body.json").read_bytes()
    delivery = parse_delivery(raw)
    assert delivery.events == ()
    assert delivery.validation_url is not None
    assert delivery.validation_url.startswith("https://")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "bad_json"),
        (b"not json", "bad_json"),
        (b"\xff\xfe{}", "bad_utf8"),
        (b"[]", "empty_batch"),
        (b'"a string"', "not_an_event"),
        (b"42", "not_an_event"),
        (b"[1, 2]", "not_an_event"),
        (b'{"a": NaN}', "bad_json"),
        (b"[" * 100_000, "bad_json"),
    ],
)
def test_malformed_bodies_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_delivery(raw)
    assert caught.value.reason == reason


def test_valid_json_orjson_refuses_still_parses() -> None:
    # A lone surrogate escape is valid JSON; Adobe could sign it. It must not crash us.
    raw = b'{"eventid": "e1", "specversion": "1.0", "type": "t", "data": {"s": "\\ud800"}}'
    (event,) = parse_delivery(raw).events
    assert event.event_id == "e1"
    assert event.body == raw


def test_huge_numbers_survive_byte_exact_in_a_batch() -> None:
    element = b'{"eventid":"e1","specversion":"1.0","type":"t","data":{"n":' + b"9" * 40 + b"}}"
    raw = b"[ " + element + b" ,\n" + element.replace(b"e1", b"e2") + b"]"
    events = parse_delivery(raw).events
    assert [e.body for e in events] == [element, element.replace(b"e1", b"e2")]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.lists(json_values, max_size=6), st.sampled_from(["", " ", "\n  "]))
def test_split_array_returns_each_element_byte_exact(items: list[object], gap: str) -> None:
    parts = [json.dumps(item, separators=(",", ":")).encode() for item in items]
    raw = ("[" + gap).encode() + (gap + "," + gap).encode().join(parts) + (gap + "]").encode()
    assert split_array(raw) == parts
    assert [json.loads(p) for p in parts] == items


@given(st.lists(json_values, max_size=6), st.sampled_from(["", " ", "\n  "]))
def test_split_array_keeps_non_ascii_bytes_and_escapes(items: list[object], gap: str) -> None:
    parts = [json.dumps(item, ensure_ascii=False, indent=1).encode() for item in items]
    parts += [b'"\\ud800 \\u00e9 \\/"', b"1e400", b"-0.0"]
    raw = ("[" + gap).encode() + (gap + "," + gap).encode().join(parts) + (gap + "]").encode()
    assert split_array(raw) == parts


def test_split_array_handles_nesting_deeper_than_the_scanner() -> None:
    deep = b"[" * 5000 + b"]" * 5000
    assert split_array(b"[" + deep + b', {"a": 1}]') == [deep, b'{"a": 1}']


@given(st.lists(json_values, max_size=6), st.sampled_from(["", " ", "\n  "]))
def test_a_batch_is_parsed_and_cut_in_one_pass_like_the_careful_path(
    items: list[object], gap: str
) -> None:
    raw = ("[" + gap + ("," + gap).join(json.dumps(i) for i in items) + gap + "]").encode()
    assert batch_elements(raw) == list(zip(split_array(raw), json.loads(raw), strict=True))


json_values_with_floats = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.lists(json_values_with_floats, max_size=6))
def test_a_compact_batch_takes_the_orjson_path_and_agrees_with_the_scanner(
    items: list[object],
) -> None:
    assume(all(_fits_64_bits(item) for item in items))  # orjson writes no larger integer
    raw = orjson.dumps(items)  # compact, as Adobe's serializer writes a batch (infinity: null)
    compact = _compact_elements(raw)
    assert compact is not None
    assert compact == _scan_array(raw, _VALUES)


@pytest.mark.parametrize(
    "number", [b"-0.0", b"5e-324", b"1e16", b"1.5e-7", b"0.1", b"1.7976931348623157e308"]
)
def test_floats_orjson_writes_as_received_are_cut_and_read_alike(number: bytes) -> None:
    raw = b'[{"n":' + number + b"}]"
    expected = list(zip(split_array(raw), json.loads(raw), strict=True))
    assert batch_elements(raw) == expected
    compact = _compact_elements(raw)
    assert compact is None or compact == expected


@pytest.mark.parametrize(
    "raw",
    [
        b'[{"a": 1}]',  # spaces
        b'[{"a":1.0e0}]',  # numbers orjson writes otherwise
        b'[{"a":-0}]',
        b'[{"a":1e400}]',
        b'[{"a":"\\u00e9"}]',  # an escape orjson writes otherwise
        b'[{"a":1,"a":2}]',  # a key twice
        b"[" + b"[" * 300 + b"]" * 300 + b"]",  # deeper than orjson writes
        b"[" + b"9" * 30 + b"]",  # over 64 bits
    ],
)
def test_a_batch_orjson_would_write_otherwise_is_cut_by_the_scanner(raw: bytes) -> None:
    assert _compact_elements(raw) is None
    assert batch_elements(raw) == list(zip(split_array(raw), json.loads(raw), strict=True))


def _fits_64_bits(value: object) -> bool:
    if isinstance(value, int) and not isinstance(value, bool):
        return -(2**63) <= value < 2**64
    if isinstance(value, list):
        return all(_fits_64_bits(v) for v in value)
    if isinstance(value, dict):
        return all(_fits_64_bits(v) for v in value.values())
    return True


@pytest.mark.parametrize(
    "raw", [b"[NaN]", b"[1] x", b"x[1]", b"[1,]", b"\xef\xbb\xbf[1]", b"[" + b"9" * 5000 + b"]"]
)
def test_what_the_one_pass_does_not_take_goes_the_careful_way(raw: bytes) -> None:
    assert batch_elements(raw) is None


# SPEC §4: the top-level recipientclientid, else the top-level recipient_client_id (the two
# agreeing); inside `event` only in Marketo's wrapped form, and only with none at the top.
WRAPPED = {"body": {"specversion": "1.0", "type": "m"}}


@pytest.mark.parametrize(
    ("doc", "recipient"),
    [
        ({"recipientclientid": "a"}, "a"),
        ({"recipient_client_id": "a"}, "a"),
        ({"recipientclientid": "a", "recipient_client_id": "a"}, "a"),
        ({"recipientclientid": "a", "recipient_client_id": "b"}, None),
        ({"recipientclientid": "a", "event": {"recipientclientid": "b"}}, "a"),
        ({"recipientclientid": "b", "event": {**WRAPPED, "recipientclientid": "a"}}, "b"),
        ({"event": {"recipientclientid": "a"}}, None),  # not the wrapped form: a provider's
        ({"event": {"recipient_client_id": "a", "body": {"x": 1}}}, None),
        ({"event": {**WRAPPED, "recipientclientid": "a"}}, "a"),
        ({"event": {**WRAPPED, "recipient_client_id": "a"}}, "a"),
        ({"event": {**WRAPPED, "recipientclientid": "a", "recipient_client_id": "b"}}, None),
        ({"specversion": "1.0", "type": "t", "data": {"recipientclientid": "a"}}, None),
        ({"recipientclientid": ["a"]}, None),
        ({"recipientclientid": ""}, None),
        ({"recipientclientid": None, "recipient_client_id": "a"}, None),
        ({}, None),
    ],
)
def test_the_recipient_is_the_signed_bodys_own(
    doc: dict[str, object], recipient: str | None
) -> None:
    raw = orjson.dumps({"event_id": "e", **doc})
    (event,) = parse_delivery(raw).events
    assert event.recipient == recipient
    assert (event.recipient_problem is None) == (recipient is not None)


def test_every_sample_that_names_a_recipient_is_read_as_adobe_sends_it() -> None:
    for name in ("wrapped_marketo_user_audit_single.json", "batch_wrapped_marketo_user_audit.json"):
        events = parse_delivery((EVENTS / name).read_bytes()).events
        assert {e.recipient for e in events} == {"your_client_id"}  # beside the wrapped event
    top = parse_delivery((EVENTS / "batch_wrapped_marketo_notification.json").read_bytes())
    assert {e.recipient for e in top.events} == {"0f13cce22f4645328e01b90262b3ee51"}


@pytest.mark.parametrize(
    "raw",
    [
        b"[" + b",".join([b"{}"] * 1001) + b"]",
        b"[ " + b" , ".join([b"1"] * 5000) + b" ]",
        b"[" + b",".join([b"[[]]"] * 2000) + b"]",
        b'[{"a":"' + b"," * 3000 + b'"}' + b",{}" * 1000 + b"]",
    ],
)
def test_a_batch_over_the_bound_is_refused_before_any_work_per_element(raw: bytes) -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        parse_delivery(raw, max_events=1000)
    assert caught.value.reason == "too_many_events"


def test_commas_inside_events_do_not_count_as_events() -> None:
    element = orjson.dumps({"eventid": "e", "data": {"list": list(range(2000))}})
    raw = b"[" + b",".join([element] * 3) + b"]"
    assert len(parse_delivery(raw, max_events=20).events) == 3
