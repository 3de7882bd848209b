"""The embedded mesh: Istio routing objects served by a real local Envoy.

``translate`` turns a VirtualService and a DestinationRule into Envoy routes and
clusters; ``envoy`` runs the Envoy process that serves them from watched files.
"""
