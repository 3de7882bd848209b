"""A fake Kubernetes API server over real HTTP; see ``server.FakeKube``."""

from tests.fakekube.server import FakeKube
from tests.fakekube.store import ApiError, ResourceType

__all__ = ["ApiError", "FakeKube", "ResourceType"]
