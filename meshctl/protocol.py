"""Names that the FL server, the client services and the controller agree on.

The server never addresses a client: it sends every Flower message to one service
host with a slot header, and the routes decide which client stands behind the slot.
"""

from __future__ import annotations

import re

# The Kubernetes Service (and local virtual host) in front of every client.
SERVICE_HOST = "fl-clients"
SERVICE_PORT = 80

# HTTP path on which a client service accepts one serialised Flower ``Message``.
MESSAGE_PATH = "/flower/message"
HEALTH_PATH = "/healthz"
MESSAGE_CONTENT_TYPE = "application/x-protobuf"

# Request headers set by the server on every message.
SLOT_HEADER = "x-fl-slot"
ROUND_HEADER = "x-fl-round"
DEADLINE_HEADER = "x-fl-deadline-ms"

# Workload label that a subset selects: one pod, one client.  In a cluster the
# StatefulSet controller sets it; local client services carry it as well.
CLIENT_LABEL = "statefulset.kubernetes.io/pod-name"
APP_LABEL = "app"
APP_VALUE = "fl-client"

# Everything meshctl writes carries this label; routes it owns carry the prefix.
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "meshctl"
ROUTING_VERSION_ANNOTATION = "meshctl.io/routing-version"
OWNED_ROUTE_PREFIX = "meshctl-"
FALLBACK_ROUTE_NAME = OWNED_ROUTE_PREFIX + "no-slot"

# Status the mesh answers for a slot that no client is armed for.
UNARMED_SLOT_STATUS = 421

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def slot_route_name(slot: int) -> str:
    """The name of the route that serves ``slot`` in exact mode."""
    return f"{OWNED_ROUTE_PREFIX}slot-{slot}"


def is_dns1123_label(name: str) -> bool:
    """True when ``name`` can be a subset name (a DNS-1123 label)."""
    return len(name) <= 63 and bool(_DNS1123_LABEL.match(name))


def client_id(index: int) -> str:
    """The id of the ``index``-th local client service: ``c-00``, ``c-01``, ..."""
    return f"c-{index:02d}"


# Metrics a ClientApp may put in its train reply for the controller's feedback.
# ``num-examples`` is Flower's own convention for the aggregation weight.
NUM_EXAMPLES_METRIC = "num-examples"
TRAIN_LOSS_METRIC = "train-loss"
EMULATED_SECONDS_METRIC = "emulated-s"
