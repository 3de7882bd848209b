"""Kubernetes Events that meshctl posts about the objects it manages.

An operator sees them with ``kubectl describe`` or ``kubectl get events``.
Posting is best effort: a refused or failed post is logged and never stops
the caller.
"""

from __future__ import annotations

import datetime
import logging
import secrets
from collections.abc import Mapping
from typing import Any

from meshctl.kube import errors
from meshctl.kube.client import Api

log = logging.getLogger(__name__)

COMPONENT = "meshctl"


def warning_event(
    involved: Mapping[str, Any], reason: str, message: str, *, instance: str = ""
) -> dict:
    """A core/v1 ``Event`` of type Warning about ``involved``."""
    meta = involved.get("metadata") or {}
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{meta.get('name', 'meshctl')}.{secrets.token_hex(8)}",
            "namespace": meta.get("namespace"),
        },
        "involvedObject": {
            "apiVersion": involved.get("apiVersion"),
            "kind": involved.get("kind"),
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": "Warning",
        "reason": reason,
        "message": message[:1000],
        "source": {"component": COMPONENT},
        "reportingComponent": COMPONENT,
        "reportingInstance": instance or COMPONENT,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def post_warning(
    api: Api, involved: Mapping[str, Any], reason: str, message: str
) -> dict | None:
    """Post a Warning event; the stored event, or None when the post failed."""
    event = warning_event(involved, reason, message)
    namespace = event["metadata"]["namespace"]
    target = errors.Target("create", "events", namespace)
    try:
        resource = api.resource("v1", "Event")
        return api.request("POST", resource.path(namespace), target, body=event)
    except errors.KubeError as exc:
        log.warning("could not post the %s event (%s); continuing", reason, exc)
        return None
