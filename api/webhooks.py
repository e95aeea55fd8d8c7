"""Routes of webhook endpoints: create (the secret shown once), list, show, delete, test, log."""

from __future__ import annotations

from flask import Blueprint
from flask.typing import ResponseReturnValue

from api.auth import caller, owner_scope
from api.db import get_session
from api.extensions import services
from api.inputs import json_body
from api.openapi import operation
from api.serialize import dump, utc
from shared import webhooks
from shared.models import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from shared.schemas import (
    WebhookCreate,
    WebhookCreatedOut,
    WebhookDeliveryListOut,
    WebhookDeliveryOut,
    WebhookListOut,
    WebhookOut,
    WebhookTryOut,
)

bp = Blueprint("webhooks", __name__, url_prefix="/api/v1/webhooks")


def endpoint_out(endpoint: WebhookEndpoint) -> WebhookOut:
    """An endpoint as the API shows it, without its secret."""
    return WebhookOut(
        id=endpoint.id, url=endpoint.url, events=list(endpoint.events),
        description=endpoint.description, created_at=utc(endpoint.created_at),
        disabled_at=utc(endpoint.disabled_at), disabled_reason=endpoint.disabled_reason,
    )  # fmt: skip


def delivery_out(delivery: WebhookDelivery, tries: list[WebhookAttempt]) -> WebhookDeliveryOut:
    """A delivery with its tries."""
    pending = delivery.status == "pending"
    return WebhookDeliveryOut(
        id=delivery.id, event_type=delivery.event_type, status=delivery.status,
        attempts=delivery.attempts,
        next_attempt_at=utc(delivery.next_attempt_at) if pending else None,
        created_at=utc(delivery.created_at), finished_at=utc(delivery.finished_at),
        payload=delivery.payload,
        tries=[
            WebhookTryOut(
                number=t.number, time=utc(t.created_at), outcome=t.outcome,
                status_code=t.status_code, error=t.error, duration_ms=t.duration_ms,
            )
            for t in tries
        ],
    )  # fmt: skip


@bp.post("")
@operation(
    summary="Create a webhook endpoint", body=WebhookCreate, responses={201: WebhookCreatedOut},
    errors=(400, 413, 422),
)  # fmt: skip
def create() -> ResponseReturnValue:
    """Store an endpoint for the caller's events; 201 with its secret, shown this once."""
    body = json_body(WebhookCreate)
    endpoint = webhooks.create_endpoint(
        get_session(), caller().user.id, url=body.url, event_types=body.events,
        description=body.description, allow_private=services().settings.webhook_allow_private,
    )  # fmt: skip
    out = WebhookCreatedOut(**endpoint_out(endpoint).model_dump(), secret=endpoint.secret)
    return dump(out), 201


@bp.get("")
@operation(summary="List webhook endpoints", responses={200: WebhookListOut})
def index() -> ResponseReturnValue:
    """The caller's endpoints (an admin's: everyone's)."""
    found = webhooks.list_endpoints(get_session(), owner_id=owner_scope())
    return dump(WebhookListOut(items=[endpoint_out(e) for e in found]))


@bp.get("/<endpoint_id>")
@operation(summary="Show a webhook endpoint", responses={200: WebhookOut}, errors=(404,))
def get(endpoint_id: str) -> ResponseReturnValue:
    """One endpoint, without its secret."""
    return dump(endpoint_out(webhooks.get_endpoint(get_session(), endpoint_id,
                                                   owner_id=owner_scope())))  # fmt: skip


@bp.delete("/<endpoint_id>")
@operation(summary="Delete a webhook endpoint", responses={204: ()}, errors=(404,))
def delete(endpoint_id: str) -> ResponseReturnValue:
    """Remove the endpoint with its deliveries; nothing more is sent to it."""
    session = get_session()
    session.delete(webhooks.get_endpoint(session, endpoint_id, owner_id=owner_scope()))
    session.commit()
    return "", 204


@bp.post("/<endpoint_id>/test")
@operation(summary="Send a test event", responses={202: WebhookDeliveryOut}, errors=(404,))
def test(endpoint_id: str) -> ResponseReturnValue:
    """Queue a ``webhook.test`` event for this endpoint; the workers send it within seconds."""
    session = get_session()
    endpoint = webhooks.get_endpoint(session, endpoint_id, owner_id=owner_scope())
    delivery_id = webhooks.enqueue_test(session, endpoint)
    delivery = session.get(WebhookDelivery, delivery_id)
    assert delivery is not None
    return dump(delivery_out(delivery, [])), 202


@bp.get("/<endpoint_id>/deliveries")
@operation(
    summary="An endpoint's deliveries and every try", responses={200: WebhookDeliveryListOut},
    errors=(404,),
)  # fmt: skip
def deliveries(endpoint_id: str) -> ResponseReturnValue:
    """The newest 100 deliveries to this endpoint, each with its tries."""
    session = get_session()
    endpoint = webhooks.get_endpoint(session, endpoint_id, owner_id=owner_scope())
    found = webhooks.deliveries_of(session, endpoint.id)
    return dump(WebhookDeliveryListOut(items=[delivery_out(d, t) for d, t in found]))
