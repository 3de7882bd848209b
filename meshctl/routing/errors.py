"""The one error the routing layer and its backends raise."""

from __future__ import annotations


class RoutingError(Exception):
    """Routes could not be rendered, validated, planned or written.

    The message names the object and the field.  Whoever catches it keeps the
    last good routes: nothing in this layer leaves a half-written object behind.
    """
