"""Shared strategies of the fuzz tests: junk values and objects shaped like a
template, each field kept, dropped or replaced by junk."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

# Scalars a YAML or JSON document can hold, and a few that hurt: huge integers,
# NaN, infinities, empty and odd strings.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "NaN", "+Inf", "-Inf", "1e309", "10s", "-1s", "0", "a b"]),
)

JUNK = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def examples(count: int) -> int:
    """``count`` examples, or the active profile's number when it asks for more.

    ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``) raises every fuzz test's budget.
    """
    return max(count, settings.default.max_examples)


def fuzz(count: int) -> settings:
    """Settings of a fuzz test: ``count`` examples (see :func:`examples`), no
    deadline (the machine may be loaded)."""
    return settings(
        max_examples=examples(count),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def shaped(template: Any) -> st.SearchStrategy:
    """Objects like ``template``: each field kept, dropped, changed or junk."""
    if isinstance(template, dict):
        fields = {str(key): shaped(value) for key, value in template.items()}
        kept = st.fixed_dictionaries({}, optional=fields)
        extra = st.dictionaries(st.text(max_size=6), JUNK, max_size=2)
        mapped = st.tuples(kept, extra).map(lambda pair: {**pair[1], **pair[0]})
        return st.one_of(mapped, mapped, mapped, JUNK)
    if isinstance(template, list) and template:
        items = st.one_of(*[shaped(item) for item in template])
        return st.one_of(st.lists(items, max_size=4), JUNK)
    return st.one_of(st.just(template), st.just(template), SCALARS)
