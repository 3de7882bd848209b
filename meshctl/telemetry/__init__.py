"""Telemetry sources: per-client traffic as the mesh saw it over a window.

``envoystats`` reads a local Envoy's own statistics.
"""
