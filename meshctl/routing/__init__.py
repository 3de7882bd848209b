"""Routing: render, validate and plan the VirtualService and DestinationRule."""

from meshctl.routing.errors import RoutingError
from meshctl.routing.hysteresis import Hysteresis
from meshctl.routing.plan import Step, plan_transition
from meshctl.routing.render import (
    check_size,
    render_exact,
    render_weighted,
    weights_for_clients,
    weights_from_scores,
)
from meshctl.routing.validate import (
    Problem,
    load_crd_schemas,
    load_yaml_documents,
    validate_objects,
)

__all__ = [
    "Hysteresis",
    "Problem",
    "RoutingError",
    "Step",
    "check_size",
    "load_crd_schemas",
    "load_yaml_documents",
    "plan_transition",
    "render_exact",
    "render_weighted",
    "validate_objects",
    "weights_for_clients",
    "weights_from_scores",
]
