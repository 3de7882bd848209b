"""Selection policies, by the name users give them or from a policy document."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meshctl.policies import documents
from meshctl.policies.base import Policy, Selection, SelectionInput
from meshctl.policies.documents import PolicyDocument, PolicyDocumentError
from meshctl.policies.meshaware import MeshPolicy, MeshSettings
from meshctl.policies.oort import OortPolicy, OortSettings
from meshctl.policies.powerofchoice import PowerOfChoicePolicy, PowerOfChoiceSettings
from meshctl.policies.pyramidfl import AdaptationSettings, PyramidFLPolicy
from meshctl.policies.uniform import RandomPolicy

_FACTORIES: dict[str, Callable[[], Policy]] = {
    RandomPolicy.name: RandomPolicy,
    OortPolicy.name: OortPolicy,
    PyramidFLPolicy.name: PyramidFLPolicy,
    PowerOfChoicePolicy.name: PowerOfChoicePolicy,
    MeshPolicy.name: MeshPolicy,
}

NAMES = tuple(sorted(_FACTORIES))


class UnknownPolicy(ValueError):
    """A policy name that meshctl does not know."""


def create(name: str) -> Policy:
    """A new policy instance for ``name``, with its documented defaults."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise UnknownPolicy(
            f"unknown policy {name!r}; choose one of {', '.join(NAMES)} "
            "or give the path of a SelectionPolicy file"
        ) from None


def create_from_document(document: PolicyDocument) -> Policy:
    """A new policy instance configured by a validated ``SelectionPolicy``."""
    spec = document.spec
    if document.algorithm == "oort":
        return OortPolicy(_oort_settings(spec))
    if document.algorithm == "pyramidfl":
        adaptation = spec["adaptation"]
        return PyramidFLPolicy(
            _oort_settings(spec),
            AdaptationSettings(
                beta=adaptation["beta"],
                max_extra_factor=adaptation["maxExtraFactor"],
            ),
        )
    if document.algorithm == "power-of-choice":
        candidates = spec["candidates"]
        return PowerOfChoicePolicy(
            PowerOfChoiceSettings(d=candidates["d"], d_factor=candidates["dFactor"])
        )
    if document.algorithm == "mesh":
        return MeshPolicy(_mesh_settings(spec))
    return create(document.algorithm)


def resolve(name_or_path: str) -> tuple[Policy, PolicyDocument | None]:
    """A policy from a name, or from a ``SelectionPolicy`` file and its document.

    A value that names a known policy is a name; anything else that looks like
    a path (a ``.yaml`` or ``.yml`` suffix, a path separator, an existing path)
    is loaded as a file.  Raises :class:`UnknownPolicy` or
    :class:`PolicyDocumentError`.
    """
    if name_or_path in _FACTORIES:
        return create(name_or_path), None
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or "/" in name_or_path or path.exists():
        document = documents.load_file(path)
        return create_from_document(document), document
    return create(name_or_path), None


def _oort_settings(spec: Mapping[str, Any]) -> OortSettings:
    exploration, deadline = spec["exploration"], spec["deadline"]
    weights, fairness = spec["weights"], spec["fairness"]
    return OortSettings(
        exploration=exploration["initial"],
        exploration_decay=exploration["decay"],
        exploration_min=exploration["min"],
        sample_window=exploration["sampleWindow"],
        round_threshold=deadline["percentile"],
        round_penalty=deadline["penalty"],
        pacer_step=deadline["pacerStep"],
        pacer_delta=deadline["pacerDelta"],
        clip_bound=weights["clipBound"],
        cut_off=weights["cutOff"],
        staleness_weight=weights["staleness"],
        overcommit=spec["overcommit"],
        blocklist_rounds=fairness["blocklistRounds"],
        blocklist_max_share=fairness["blocklistMaxShare"],
    )


def _mesh_settings(spec: Mapping[str, Any]) -> MeshSettings:
    smoothing, weights = spec["smoothing"], spec["weights"]
    filters, fairness = spec["filters"], spec["fairness"]
    return MeshSettings(
        exploration=spec["exploration"]["share"],
        smoothing=smoothing["level"],
        trend_smoothing=smoothing["trend"],
        latency_penalty=weights["latencyPenalty"],
        reliability_exponent=weights["reliability"],
        utility_weight=weights["utility"],
        staleness=weights["staleness"],
        max_error_ratio=filters["maxErrorRatio"],
        exclude_ejected=filters["excludeEjected"],
        ejection_cooldown_rounds=filters["ejectionCooldownRounds"],
        deadline_ms=filters["deadlineMs"],
        max_idle_rounds=fairness["maxIdleRounds"],
        max_share=fairness["maxShare"],
        share_window_rounds=fairness["shareWindowRounds"],
        hysteresis=spec["hysteresis"]["stickiness"],
    )


__all__ = [
    "NAMES",
    "Policy",
    "PolicyDocument",
    "PolicyDocumentError",
    "Selection",
    "SelectionInput",
    "UnknownPolicy",
    "create",
    "create_from_document",
    "resolve",
]
