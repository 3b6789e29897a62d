"""Fold an Imaging job-status body (Lightroom, Photoshop, Sensei) into one status word.

Rule (the README, "What is published"): a top-level ``status`` wins; else over ``outputs[].status``:
``failed`` if any output failed, ``succeeded`` if all succeeded, ``running`` if any is running,
starting or uploading, else ``pending``. The word is lower-cased and every character outside
``[a-z0-9_-]`` becomes ``_``, so it is always safe inside a routing key.

Owns: that rule and where the job id lives (``jobId``, or ``jobID`` in older Photoshop and
Sensei bodies). Does not: decide which events are job-status events; any body that has a status
or outputs is folded.
"""

from __future__ import annotations

import re
from typing import Any

_UNSAFE = re.compile(r"[^a-z0-9_-]")
_ACTIVE = frozenset({"running", "starting", "uploading"})
MAX_STATUS_LENGTH = 64


def normalize(word: str) -> str:
    return _UNSAFE.sub("_", word.strip().lower())[:MAX_STATUS_LENGTH]


def job_status(body: Any) -> str | None:
    """The aggregate status of a job-status body, or None when it is not one."""
    if not isinstance(body, dict):
        return None
    top = body.get("status")
    if isinstance(top, str) and top.strip():
        return normalize(top)
    outputs = body.get("outputs")
    if not isinstance(outputs, list):
        return None
    words = [
        normalize(o["status"])
        for o in outputs
        if isinstance(o, dict) and isinstance(o.get("status"), str)
    ]
    if "failed" in words:
        return "failed"
    if words and all(w == "succeeded" for w in words):
        return "succeeded"
    if any(w in _ACTIVE for w in words):
        return "running"
    return "pending"


def job_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    for key in ("jobId", "jobID"):
        value = body.get(key)
        if isinstance(value, str) and value:
            return value
    return None
