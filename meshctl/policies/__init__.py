"""Selection policies, by the name users give them."""

from __future__ import annotations

from collections.abc import Callable

from meshctl.policies.base import Policy, Selection, SelectionInput
from meshctl.policies.meshaware import MeshPolicy
from meshctl.policies.uniform import RandomPolicy

_FACTORIES: dict[str, Callable[[], Policy]] = {
    RandomPolicy.name: RandomPolicy,
    MeshPolicy.name: MeshPolicy,
}

NAMES = tuple(sorted(_FACTORIES))


class UnknownPolicy(ValueError):
    """A policy name that meshctl does not know."""


def create(name: str) -> Policy:
    """A new policy instance for ``name``."""
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise UnknownPolicy(
            f"unknown policy {name!r}; choose one of {', '.join(NAMES)}"
        ) from None


__all__ = ["NAMES", "Policy", "Selection", "SelectionInput", "UnknownPolicy", "create"]
