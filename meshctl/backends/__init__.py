"""Backends: where the routing objects are written (a directory, a cluster)."""
