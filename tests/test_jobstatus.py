"""Job-status aggregation over every poll body in job_status/ (expected values: its INDEX.md)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bridge.adobe.jobstatus import job_id, job_status, normalize
from tests.helpers import SAMPLES

# file → aggregate, from job_status/INDEX.md; not_started passes through (a top-level status is
# used as is), and a failed status *call* (404 body) is no job status at all.
EXPECTED = {
    "lr_status_failed_errorDetails_string.json": "failed",
    "lr_status_pending.json": "pending",
    "lr_status_succeeded.json": "succeeded",
    "lr_status_succeeded_openapi.json": "succeeded",
    "ps_api_status_failed_error_code.json": "failed",
    "ps_api_status_not_started.json": "not_started",
    "ps_status_call_error_404.json": None,
    "ps_status_mixed_pending_running_succeeded_failed.json": "failed",
    "ps_status_rendition_batch_all_succeeded.json": "succeeded",
    "ps_status_rendition_running_succeeded_failed.json": "failed",
    "ps_status_single_failed_error_object.json": "failed",
    "ps_v1_status_succeeded_renditions.json": "succeeded",
    "ps_v2_status_failed_errorDetails_array.json": "failed",
    "ps_v2_status_running.json": "running",
    "ps_v2_status_succeeded_result_outputs.json": "succeeded",
    "sensei_cutout_status_failed_templated.json": "failed",
    "sensei_cutout_status_pending.json": "pending",
    "sensei_cutout_status_succeeded.json": "succeeded",
}


def test_every_sample_is_in_the_table() -> None:
    assert {p.name for p in (SAMPLES / "job_status").glob("*.json")} == set(EXPECTED)


@pytest.mark.parametrize(("name", "expected"), sorted(EXPECTED.items()))
def test_sample_aggregates_to_its_index_status(name: str, expected: str | None) -> None:
    body = orjson.loads((SAMPLES / "job_status" / name).read_bytes())
    assert job_status(body) == expected


def outputs(*statuses: str) -> dict[str, Any]:
    return {"jobId": "j", "outputs": [{"status": s} for s in statuses]}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (outputs("succeeded", "succeeded"), "succeeded"),
        (outputs("succeeded", "failed"), "failed"),
        (outputs("pending", "running", "succeeded"), "running"),
        (outputs("starting", "succeeded"), "running"),
        (outputs("uploading"), "running"),
        (outputs("pending", "succeeded"), "pending"),
        (outputs("not_started"), "pending"),
        (outputs(), "pending"),
        (outputs("SUCCEEDED"), "succeeded"),
        ({"status": "Partially Succeeded!", "outputs": []}, "partially_succeeded_"),
        ({"status": "", "outputs": [{"status": "failed"}]}, "failed"),
        ({"status": 3}, None),
        ({"outputs": "nope"}, None),
        ({"outputs": [1, None, {"status": 2}]}, "pending"),
        ("text", None),
        (None, None),
    ],
)
def test_aggregation_rule(body: Any, expected: str | None) -> None:
    assert job_status(body) == expected


def test_job_id_reads_both_spellings() -> None:
    assert job_id({"jobId": "a"}) == "a"
    assert job_id({"jobID": "b"}) == "b"
    assert job_id({"jobId": 5}) is None


def test_normalized_status_is_always_routing_key_safe() -> None:
    assert normalize(" Failed.Hard/#* ") == "failed_hard___"
    assert len(normalize("x" * 1000)) == 64
