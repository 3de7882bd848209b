"""Make-before-break: the order in which new routes reach the data plane.

Configuration reaches the proxies eventually, so a route must never reference a
subset that some proxy does not know yet, and a subset must not disappear while
some proxy still routes to it.  A transition is therefore at most three writes,
each followed by a wait for the data plane:

1. the DestinationRule with the union of the live and the desired subsets, when
   that adds any (or when there is no live DestinationRule yet);
2. the desired VirtualService, when it differs from the live one;
3. the desired DestinationRule, when it differs from what step 1 left (it
   prunes subsets no route references any more, or changes other fields).

Objects are compared without their routing-version annotation, so a new version
alone writes nothing.  The final objects carry the desired routing version; the
union DestinationRule of step 1 carries ``<version>-mbb`` when it is not yet the
desired one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from meshctl import protocol
from meshctl.routing import render, validate
from meshctl.routing.errors import RoutingError

UNION_VERSION_SUFFIX = "-mbb"


@dataclass(frozen=True)
class Step:
    """One write of a transition; the data plane must catch up before the next."""

    kind: Literal["DestinationRule", "VirtualService"]
    obj: dict
    reason: str


class StepFailed(RoutingError):
    """A step of a plan failed; ``kept`` steps took effect before it."""

    def __init__(self, message: str, kept: int) -> None:
        super().__init__(message)
        self.kept = kept


def apply_steps(
    steps: Sequence[Step],
    write: Callable[[dict], object],
    wait: Callable[[Step], float],
    place: str,
) -> list[float]:
    """Write the steps in order, waiting after each; the seconds each wait took.

    On a failure ``place`` (the directory, the cluster) keeps the state of the
    last step that succeeded; :class:`StepFailed` names the step that failed.
    """
    waits = []
    for number, step in enumerate(steps, start=1):
        written = False
        try:
            write(step.obj)
            written = True
            waits.append(wait(step))
        except Exception as err:
            kept = number if written else number - 1
            raise StepFailed(
                f"step {number}/{len(steps)} ({step.kind}: {step.reason}) failed: "
                f"{err}; {place} keeps the state after step {kept}",
                kept,
            ) from err
    return waits


def plan_transition(
    live_vs: dict | None,
    live_dr: dict | None,
    desired_vs: dict,
    desired_dr: dict,
    *,
    ready_subsets: Collection[str] | None = None,
) -> list[Step]:
    """The writes, in order, that take the live objects to the desired ones.

    Refuses (``RoutingError``) a desired VirtualService that references a subset
    the desired DestinationRule lacks, or, when ``ready_subsets`` is given, one
    whose meshctl routes send traffic to a subset with no ready endpoint.
    """
    validate.check_live_shape(live_vs, validate.VIRTUAL_SERVICE)
    validate.check_live_shape(live_dr, validate.DESTINATION_RULE)
    _check_desired(desired_vs, desired_dr, ready_subsets)
    steps = []

    union = _union_step(live_dr, desired_dr)
    dr_after_union = live_dr
    if union is not None:
        steps.append(union)
        dr_after_union = union.obj

    if live_vs is None or not _same(live_vs, desired_vs):
        steps.append(Step(validate.VIRTUAL_SERVICE, desired_vs, _vs_reason(desired_vs)))

    if dr_after_union is None or not _same(dr_after_union, desired_dr):
        reason = _prune_reason(dr_after_union, desired_dr)
        steps.append(Step(validate.DESTINATION_RULE, desired_dr, reason))
    return steps


def _check_desired(vs: dict, dr: dict, ready_subsets: Collection[str] | None) -> None:
    """Desired references exist in the desired DR and have ready endpoints."""
    problems = [
        p
        for p in validate.validate_objects([vs, dr], source="plan")
        if p.path.endswith(".destination.subset")
    ]
    if problems:
        raise RoutingError("; ".join(str(p) for p in problems))
    if ready_subsets is None:
        return
    not_ready = sorted(
        validate.referenced_subsets(vs, owned_only=True) - set(ready_subsets)
    )
    if not_ready:
        raise RoutingError(
            f"{validate.object_label(vs)}: no ready endpoint for client(s) "
            f"{', '.join(not_ready)}; the live routes stay"
        )


def _union_step(live_dr: dict | None, desired_dr: dict) -> Step | None:
    """Step 1: add the desired subsets to the live ones, if that adds any."""
    if live_dr is None:
        names = ", ".join(_subset_names(desired_dr)) or "none"
        return Step(
            validate.DESTINATION_RULE, desired_dr, f"create with subsets {names}"
        )
    live_names = set(_subset_names(live_dr))
    added = [n for n in _subset_names(desired_dr) if n not in live_names]
    if not added:
        return None
    union = _union(live_dr, desired_dr)
    if _same(union, desired_dr):
        union = desired_dr
    reason = f"add subsets {', '.join(added)} before any route references them"
    return Step(validate.DESTINATION_RULE, union, reason)


def _union(live_dr: dict, desired_dr: dict) -> dict:
    """The desired DR that also keeps every live subset it would remove."""
    union = copy.deepcopy(desired_dr)
    desired_names = set(_subset_names(desired_dr))
    kept = [
        copy.deepcopy(s)
        for s in _subsets(live_dr)
        if s.get("name") not in desired_names
    ]
    union["spec"]["subsets"] = [*_subsets(union), *kept]

    owned = render.owned_subset_names(desired_dr)
    owned |= render.owned_subset_names(live_dr) & {s.get("name") for s in kept}
    render.set_owned_subsets(union, owned)
    annotations = union["metadata"]["annotations"]
    version = annotations.get(protocol.ROUTING_VERSION_ANNOTATION, "")
    annotations[protocol.ROUTING_VERSION_ANNOTATION] = version + UNION_VERSION_SUFFIX
    return union


def _vs_reason(vs: Mapping[str, Any]) -> str:
    """What the VirtualService step routes, for logs."""
    routes = (vs.get("spec") or {}).get("http") or []
    parts = []
    for route in routes:
        if validate.is_owned_route(route):
            subsets = [d.get("subset", "?") for d in validate.route_destinations(route)]
            if subsets:
                parts.append(f"{route['name']} -> {'+'.join(subsets)}")
    return "route " + (", ".join(parts) if parts else "no slot to any client")


def _prune_reason(before: dict | None, desired_dr: dict) -> str:
    """What the last DestinationRule step removes or changes, for logs."""
    if before is None:
        return "create"
    desired_names = set(_subset_names(desired_dr))
    removed = [n for n in _subset_names(before) if n not in desired_names]
    if removed:
        return f"prune subsets {', '.join(removed)} that no route references"
    return "update fields other than subsets"


def _subsets(dr: Mapping[str, Any]) -> list[dict]:
    """The subsets of a DestinationRule (an empty list when it has none)."""
    return list((dr.get("spec") or {}).get("subsets") or [])


def _subset_names(dr: Mapping[str, Any]) -> list[str]:
    """Subset names in their order."""
    return [s.get("name") for s in _subsets(dr)]


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Equal apart from the routing-version annotation."""
    return _without_version(a) == _without_version(b)


def _without_version(obj: Mapping[str, Any]) -> dict:
    """A copy of the object without its routing-version annotation."""
    stripped = copy.deepcopy(dict(obj))
    annotations = (stripped.get("metadata") or {}).get("annotations")
    if isinstance(annotations, dict):
        annotations.pop(protocol.ROUTING_VERSION_ANNOTATION, None)
    return stripped
