"""An Express API event end to end (issue 14): the real daemon on the real broker.

The body is Adobe's published Express sample (``tests/data/adobe-2026/``) with what Adobe I/O
Events adds on delivery (``eventid``, ``recipientclientid``), signed as Adobe signs it. The bridge
reads its IMS org from ``adobeinternal.imsOrg``: the message carries it as ``ims-org-id``, and a
registration that lists the org (``ims_orgs``) takes the event while another org's is refused
(403 ``org_mismatch``) and never published.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from tests.helpers import CLIENT_ID
from tests.rig import Rig, config_text

SAMPLE = Path(__file__).parent / "data" / "adobe-2026" / "express-api_v1_failed.json"
OURS = "A1B2C3D4E5F6A7B8C9D0E1F2@AdobeOrg"
THEIRS = "0F1E2D3C4B5A69788796A5B4@AdobeOrg"


def express_delivery(event_id: str, org: str) -> bytes:
    """The Express sample as I/O Events delivers it: the provider's body plus its own fields."""
    doc: dict[str, Any] = orjson.loads(SAMPLE.read_bytes())
    doc["adobeinternal"] = {"imsOrg": org}
    doc["eventid"] = event_id
    doc["recipientclientid"] = CLIENT_ID
    return orjson.dumps(doc)


def only_our_org(rig: Rig) -> None:
    """The rig's registration, with ``ims_orgs: [OURS]``."""
    plain = f"  - {{name: default, path: /webhook, client_ids: [{CLIENT_ID}]}}"
    text = config_text(rig.prefix)
    assert plain in text
    rig.config.write_text(text.replace(plain, plain[:-1] + f", ims_orgs: ['{OURS}']}}"))


async def test_an_express_event_is_published_with_its_org_and_refused_for_another(
    rig: Rig,
) -> None:
    only_our_org(rig)
    await rig.start()
    ours = express_delivery("express-ours-1", OURS)
    status, answer = await rig.post(ours, {"x-adobe-event-code": "com.adobe.express-api.v1.failed"})
    assert (status, answer.get("status")) == (200, "published"), answer
    status, answer = await rig.post(express_delivery("express-theirs-1", THEIRS))
    assert (status, answer.get("error")) == (403, "org_mismatch"), answer
    await rig.settle()
    (message,) = await rig.delivered()
    assert message.body == ours  # published as signed, byte for byte
    assert message.message_id == "express-ours-1"
    assert message.routing_key == "com.adobe.express-api.v1.failed.failed"
    assert message.type == "com.adobe.express-api.v1.failed"
    headers = message.headers
    assert headers["ims-org-id"] == OURS
    assert headers["job-id"] == "9a7b3e52-1c4d-4f6a-8b0e-6d2c5a1f7e94"
    assert headers["job-status"] == "failed"
    assert headers["event-code"] == "com.adobe.express-api.v1.failed"
    assert headers["registration"] == "default"
