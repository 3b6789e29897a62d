"""The authorize step, pure: may this registration take these events?

Each event must be addressed to one of the registration's client ids (its recipient, as
``bridge.adobe.envelope`` reads it, as the README's "Verification" says) and, when the registration
lists IMS orgs, come from one of them: every element of a batch, or the whole request is refused
(403). The webhook receiver and ``events-bridge route`` ask the same question here.
"""

from __future__ import annotations

from bridge.adobe.envelope import Delivery, Event
from bridge.config import Registration
from bridge.errors import Forbidden

NO_RECIPIENT = "no recipient client id"  # bridge.adobe.envelope's words for "none named"


def refusal(
    event: Event, registration: Registration, where: str = "", *, recipient_required: bool = True
) -> Forbidden | None:
    """Why ``registration`` may not take ``event`` (a 403), or None when it may.

    ``recipient_required=False`` (the journal, read from the registration's own URL with its
    own credential): an event that names no recipient at all is the registration's; one that
    names another client id, or a malformed one, is still not.
    """
    if event.recipient is None:
        unnamed = (event.recipient_problem or "").startswith(NO_RECIPIENT)
        if recipient_required or not unnamed:
            return Forbidden("recipient_mismatch", f"{where}{event.recipient_problem}")
        return _org_refusal(event, registration, where)
    if event.recipient not in registration.client_ids:
        return Forbidden(
            "recipient_mismatch",
            f"{where}recipient client id is not configured for this registration",
        )
    return _org_refusal(event, registration, where)


def _org_refusal(event: Event, registration: Registration, where: str) -> Forbidden | None:
    if registration.ims_orgs and event.ims_org not in registration.ims_orgs:
        return Forbidden("org_mismatch", f"{where}IMS org is not configured for this registration")
    return None


def authorize(delivery: Delivery, registration: Registration) -> None:
    """Raise the first event's :class:`Forbidden`, if any event is not ``registration``'s."""
    for i, event in enumerate(delivery.events):
        problem = refusal(event, registration, f"batch element {i}: " if delivery.batch else "")
        if problem is not None:
            raise problem
