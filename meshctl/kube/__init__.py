"""Talking to a Kubernetes API server: connection, errors, ``meshctl apply``.

Built on the official ``kubernetes`` client, with raw dicts on the wire so that
no typed round-trip drops a field meshctl does not model.
"""
