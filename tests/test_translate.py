"""Translation of Istio routing objects to Envoy v3 resources."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshctl import protocol
from meshctl.localmesh import envoy, translate
from meshctl.localmesh.translate import TranslationError
from meshctl.types import Workload

VERSION = "r3-1a2b"


def virtual_service(*http: dict) -> dict:
    """A VirtualService for fl-clients with the given http routes."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {
            "name": "fl-clients",
            "namespace": "fl",
            "annotations": {protocol.ROUTING_VERSION_ANNOTATION: VERSION},
        },
        "spec": {"hosts": ["fl-clients"], "http": list(http)},
    }


def slot_route(slot: int, subset: str) -> dict:
    """An exact-mode route: slot header -> one subset."""
    return {
        "name": protocol.slot_route_name(slot),
        "match": [{"headers": {protocol.SLOT_HEADER: {"exact": str(slot)}}}],
        "route": [{"destination": {"host": "fl-clients", "subset": subset}}],
    }


FALLBACK = {
    "name": protocol.FALLBACK_ROUTE_NAME,
    "directResponse": {"status": 421, "body": {"string": "no client is armed"}},
}


def destination_rule(*subsets: str, policy: dict | None = None) -> dict:
    """A DestinationRule for fl-clients with one pod-name subset per client."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {
            "name": "fl-clients",
            "namespace": "fl",
            "annotations": {protocol.ROUTING_VERSION_ANNOTATION: VERSION},
        },
        "spec": {
            "host": "fl-clients",
            "trafficPolicy": policy
            if policy is not None
            else {
                "tls": {"mode": "ISTIO_MUTUAL"},
                "outlierDetection": {
                    "consecutive5xxErrors": 5,
                    "interval": "10s",
                    "baseEjectionTime": "30s",
                    "maxEjectionPercent": 100,
                },
                "connectionPool": {"http": {"http1MaxPendingRequests": 64}},
            },
            "subsets": [
                {"name": name, "labels": {protocol.CLIENT_LABEL: name}}
                for name in subsets
            ],
        },
    }


def workload(name: str, port: int) -> Workload:
    """A local client service labelled like a StatefulSet pod."""
    return Workload(name, "127.0.0.1", port, {protocol.CLIENT_LABEL: name})


WORKLOADS = [workload("c-03", 9003), workload("c-07", 9007), workload("c-09", 9009)]


def routes_of(route_config: dict) -> list[dict]:
    """The Envoy routes of the single virtual host."""
    return route_config["virtual_hosts"][0]["routes"]


def clusters_by_name(clusters: list[dict]) -> dict[str, dict]:
    """Clusters keyed by name."""
    return {cluster["name"]: cluster for cluster in clusters}


def endpoint_ports(cluster: dict) -> list[int]:
    """The ports of a cluster's static endpoints."""
    endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    return [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]


# ---------------------------------------------------------------- VirtualService


def test_slot_header_exact_match_routes_to_the_subset_cluster() -> None:
    config = translate.translate_virtual_service(
        virtual_service(slot_route(1, "c-03"), slot_route(2, "c-07"), FALLBACK)
    )

    first, second, fallback = routes_of(config)
    assert first["name"] == "meshctl-slot-1"
    assert first["match"] == {
        "prefix": "/",
        "headers": [{"name": "x-fl-slot", "string_match": {"exact": "1"}}],
    }
    assert first["route"]["cluster"] == "outbound|80|c-03|fl-clients"
    assert second["route"]["cluster"] == "outbound|80|c-07|fl-clients"
    assert fallback["name"] == "meshctl-no-slot"
    assert "headers" not in fallback["match"]


def test_route_configuration_is_named_and_answers_every_authority() -> None:
    config = translate.translate_virtual_service(virtual_service(FALLBACK))

    assert config["@type"] == translate.ROUTE_CONFIGURATION_TYPE
    assert config["name"] == "fl-clients"
    assert config["virtual_hosts"][0]["domains"] == ["fl-clients", "fl-clients:*", "*"]
    metadata = config["metadata"]["filter_metadata"]["meshctl.io"]
    assert metadata == {"routing_version": VERSION}


def test_several_match_blocks_become_several_routes_with_the_same_action() -> None:
    route = slot_route(1, "c-03")
    route["match"].append({"uri": {"prefix": "/flower"}, "method": {"exact": "POST"}})

    first, second = routes_of(
        translate.translate_virtual_service(virtual_service(route))
    )

    assert first["name"] == second["name"] == "meshctl-slot-1"
    assert first["route"] == second["route"]
    assert second["match"] == {
        "prefix": "/flower",
        "headers": [{"name": ":method", "string_match": {"exact": "POST"}}],
    }


@pytest.mark.parametrize(
    ("istio", "envoy_match"),
    [
        pytest.param({"uri": {"exact": "/a"}}, {"path": "/a"}, id="uri-exact"),
        pytest.param({"uri": {"prefix": "/a"}}, {"prefix": "/a"}, id="uri-prefix"),
        pytest.param(
            {"uri": {"regex": "/a.*"}},
            {"safe_regex": {"regex": "/a.*"}},
            id="uri-regex",
        ),
        pytest.param(
            {"headers": {"x-fl-slot": {"prefix": "1"}}},
            {
                "prefix": "/",
                "headers": [{"name": "x-fl-slot", "string_match": {"prefix": "1"}}],
            },
            id="header-prefix",
        ),
        pytest.param(
            {"headers": {"x-fl-slot": {"regex": "[12]"}}},
            {
                "prefix": "/",
                "headers": [
                    {
                        "name": "x-fl-slot",
                        "string_match": {"safe_regex": {"regex": "[12]"}},
                    }
                ],
            },
            id="header-regex",
        ),
    ],
)
def test_string_matches_translate_to_envoy_matchers(
    istio: dict, envoy_match: dict
) -> None:
    route = {"match": [istio], "route": [{"destination": {"host": "fl-clients"}}]}

    (translated,) = routes_of(
        translate.translate_virtual_service(virtual_service(route))
    )

    assert translated["match"] == envoy_match
    assert translated["route"]["cluster"] == "outbound|80||fl-clients"


def test_weighted_destinations_become_weighted_clusters() -> None:
    route = {
        "name": "meshctl-weighted",
        "route": [
            {"destination": {"host": "fl-clients", "subset": "c-03"}, "weight": 90},
            {"destination": {"host": "fl-clients", "subset": "c-07"}, "weight": 10},
            {"destination": {"host": "fl-clients", "subset": "c-09"}, "weight": 0},
        ],
    }

    (translated,) = routes_of(
        translate.translate_virtual_service(virtual_service(route))
    )

    assert translated["route"]["weighted_clusters"] == {
        "clusters": [
            {"name": "outbound|80|c-03|fl-clients", "weight": 90},
            {"name": "outbound|80|c-07|fl-clients", "weight": 10},
        ]
    }


def test_a_single_destination_takes_all_traffic_whatever_its_weight() -> None:
    route = {
        "route": [
            {"destination": {"host": "fl-clients", "subset": "c-03"}, "weight": 30}
        ]
    }

    (translated,) = routes_of(
        translate.translate_virtual_service(virtual_service(route))
    )

    assert translated["route"]["cluster"] == "outbound|80|c-03|fl-clients"


def test_timeout_defaults_to_none_like_istio() -> None:
    config = translate.translate_virtual_service(virtual_service(slot_route(1, "c-03")))

    assert routes_of(config)[0]["route"]["timeout"] == "0s"


def test_timeout_and_retries_translate() -> None:
    route = slot_route(1, "c-03")
    route["timeout"] = "1.5s"
    route["retries"] = {"attempts": 3, "perTryTimeout": "500ms", "retryOn": "5xx,503"}

    action = routes_of(translate.translate_virtual_service(virtual_service(route)))[0]

    assert action["route"]["timeout"] == "1.500000000s"
    policy = action["route"]["retry_policy"]
    assert policy["num_retries"] == 3
    assert policy["per_try_timeout"] == "0.500000000s"
    assert policy["retry_on"] == "5xx,retriable-status-codes"
    assert policy["retriable_status_codes"] == [503]


def test_retries_default_to_istio_policy_and_zero_attempts_disable_them() -> None:
    default = slot_route(1, "c-03")
    disabled = {**slot_route(2, "c-07"), "retries": {"attempts": 0}}

    first, second = routes_of(
        translate.translate_virtual_service(virtual_service(default, disabled))
    )

    assert first["route"]["retry_policy"]["num_retries"] == 2
    assert first["route"]["retry_policy"]["retriable_status_codes"] == [503]
    assert "connect-failure" in first["route"]["retry_policy"]["retry_on"]
    assert "retry_policy" not in second["route"]


def test_fault_becomes_per_route_fault_filter_config() -> None:
    route = slot_route(1, "c-03")
    route["fault"] = {
        "delay": {"fixedDelay": "2s", "percentage": {"value": 12.5}},
        "abort": {"httpStatus": 503},
    }

    (translated,) = routes_of(
        translate.translate_virtual_service(virtual_service(route))
    )

    assert translated["typed_per_filter_config"]["envoy.filters.http.fault"] == {
        "@type": translate.FAULT_TYPE,
        "delay": {
            "fixed_delay": "2s",
            "percentage": {"numerator": 125_000, "denominator": "MILLION"},
        },
        "abort": {
            "http_status": 503,
            "percentage": {"numerator": 1_000_000, "denominator": "MILLION"},
        },
    }


def test_direct_response_keeps_status_and_body() -> None:
    (fallback,) = routes_of(
        translate.translate_virtual_service(virtual_service(FALLBACK))
    )

    assert fallback["direct_response"] == {
        "status": 421,
        "body": {"inline_string": "no client is armed"},
    }
    assert "route" not in fallback


def test_unarmed_route_configuration_answers_421_to_everything() -> None:
    config = translate.unarmed_route_configuration("unarmed")

    (route,) = routes_of(config)
    assert route["match"] == {"prefix": "/"}
    assert route["direct_response"]["status"] == protocol.UNARMED_SLOT_STATUS


# --------------------------------------------------------------- DestinationRule


def test_destination_rule_gives_one_cluster_per_subset_and_one_for_the_host() -> None:
    clusters = clusters_by_name(
        translate.translate_destination_rule(
            destination_rule("c-03", "c-07"), WORKLOADS
        )
    )

    assert list(clusters) == [
        "outbound|80||fl-clients",
        "outbound|80|c-03|fl-clients",
        "outbound|80|c-07|fl-clients",
    ]
    assert endpoint_ports(clusters["outbound|80||fl-clients"]) == [9003, 9007, 9009]
    assert endpoint_ports(clusters["outbound|80|c-03|fl-clients"]) == [9003]
    assert clusters["outbound|80|c-03|fl-clients"]["type"] == "STATIC"
    assert clusters["outbound|80|c-03|fl-clients"]["@type"] == translate.CLUSTER_TYPE


def test_a_subset_selecting_no_workload_gets_a_cluster_without_endpoints() -> None:
    clusters = clusters_by_name(
        translate.translate_destination_rule(destination_rule("c-42"), WORKLOADS)
    )

    assert endpoint_ports(clusters["outbound|80|c-42|fl-clients"]) == []


def test_outlier_detection_and_connection_pool_translate() -> None:
    clusters = translate.translate_destination_rule(destination_rule("c-03"), WORKLOADS)
    cluster = clusters_by_name(clusters)["outbound|80|c-03|fl-clients"]

    detection = cluster["outlier_detection"]
    assert detection["consecutive_5xx"] == 5
    assert detection["enforcing_consecutive_5xx"] == 100
    assert detection["interval"] == "10s"
    assert detection["base_ejection_time"] == "30s"
    assert detection["max_ejection_percent"] == 100
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0.0}
    thresholds = cluster["circuit_breakers"]["thresholds"][0]
    assert thresholds["max_pending_requests"] == 64
    assert thresholds["max_connections"] == 4294967295
    assert "transport_socket" not in cluster


def test_subset_traffic_policy_overrides_the_top_level_field_by_field() -> None:
    policy = {
        "connectionPool": {
            "tcp": {"maxConnections": 10, "connectTimeout": "250ms"},
            "http": {"maxRequestsPerConnection": 1},
        },
        "outlierDetection": {"consecutive5xxErrors": 5},
    }
    dr = destination_rule("c-03", "c-07", policy=policy)
    dr["spec"]["subsets"][0]["trafficPolicy"] = {
        "outlierDetection": {"consecutive5xxErrors": 1, "interval": "1s"}
    }

    clusters = clusters_by_name(translate.translate_destination_rule(dr, WORKLOADS))

    overridden = clusters["outbound|80|c-03|fl-clients"]
    inherited = clusters["outbound|80|c-07|fl-clients"]
    assert overridden["outlier_detection"]["consecutive_5xx"] == 1
    assert overridden["outlier_detection"]["interval"] == "1s"
    assert inherited["outlier_detection"]["consecutive_5xx"] == 5
    for cluster in (overridden, inherited):
        assert cluster["connect_timeout"] == "0.250000000s"
        assert cluster["circuit_breakers"]["thresholds"][0]["max_connections"] == 10
        options = cluster["typed_extension_protocol_options"]
        common = options[translate.HTTP_OPTIONS_EXTENSION][
            "common_http_protocol_options"
        ]
        assert common == {"max_requests_per_connection": 1}


# ------------------------------------------------------------------- bad objects


def _set(obj: dict, path: list[Any], value: Any) -> dict:
    """A copy of ``obj`` with the field at ``path`` set to ``value``."""
    obj = copy.deepcopy(obj)
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return obj


GOOD_VS = virtual_service(slot_route(1, "c-03"), slot_route(2, "c-07"), FALLBACK)
GOOD_DR = destination_rule("c-03", "c-07")


@pytest.mark.parametrize(
    ("bad", "field_path"),
    [
        pytest.param(
            _set(
                GOOD_VS, ["spec", "http", 1, "route", 0, "destination", "subset"], "C_7"
            ),
            "spec.http[1].route[0].destination.subset",
            id="subset-not-dns1123",
        ),
        pytest.param(
            _set(GOOD_VS, ["spec", "http", 0, "timeout"], "soon"),
            "spec.http[0].timeout",
            id="bad-duration",
        ),
        pytest.param(
            _set(
                GOOD_VS,
                ["spec", "http", 0, "route"],
                [
                    {"destination": {"host": "fl-clients", "subset": "c-03"}},
                    {"destination": {"host": "fl-clients", "subset": "c-07"}},
                ],
            ),
            "spec.http[0].route",
            id="several-destinations-without-weights",
        ),
        pytest.param(
            _set(
                GOOD_VS, ["spec", "http", 0, "match", 0, "headers"], {"X-Fl-Slot": {}}
            ),
            "spec.http[0].match[0].headers.X-Fl-Slot",
            id="upper-case-header",
        ),
        pytest.param(
            _set(GOOD_VS, ["spec", "http", 2], {"name": "meshctl-no-slot"}),
            "spec.http[2]",
            id="no-action",
        ),
        pytest.param(
            _set(GOOD_VS, ["spec", "http", 0, "fault"], {"abort": {"httpStatus": 99}}),
            "spec.http[0].fault.abort.httpStatus",
            id="abort-status-out-of-range",
        ),
        pytest.param(
            _set(GOOD_VS, ["spec", "http", 0, "redirect"], {"uri": "/x"}),
            "spec.http[0].redirect",
            id="redirect-unsupported",
        ),
        pytest.param(_set(GOOD_VS, ["spec", "hosts"], []), "spec.hosts", id="no-hosts"),
    ],
)
def test_a_bad_virtual_service_raises_naming_the_field(
    bad: dict, field_path: str
) -> None:
    with pytest.raises(TranslationError) as caught:
        translate.translate_virtual_service(bad)

    assert caught.value.path == field_path
    assert str(caught.value).startswith(f"VirtualService fl/fl-clients: {field_path}: ")


@pytest.mark.parametrize(
    ("bad", "field_path"),
    [
        pytest.param(
            _set(GOOD_DR, ["spec", "subsets", 1, "name"], "c-03"),
            "spec.subsets[1].name",
            id="duplicate-subset",
        ),
        pytest.param(
            _set(
                GOOD_DR, ["spec", "trafficPolicy", "outlierDetection", "interval"], 10
            ),
            "spec.trafficPolicy.outlierDetection.interval",
            id="duration-not-a-string",
        ),
        pytest.param(
            _set(GOOD_DR, ["spec", "subsets", 0, "labels"], {"app": 3}),
            "spec.subsets[0].labels.app",
            id="label-not-a-string",
        ),
        pytest.param(_set(GOOD_DR, ["spec", "host"], None), "spec.host", id="no-host"),
    ],
)
def test_a_bad_destination_rule_raises_naming_the_field(
    bad: dict, field_path: str
) -> None:
    with pytest.raises(TranslationError) as caught:
        translate.translate_destination_rule(bad, WORKLOADS)

    assert caught.value.path == field_path
    assert "DestinationRule fl/fl-clients" in str(caught.value)


# --------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("10s", 10.0, id="seconds"),
        pytest.param("500ms", 0.5, id="milliseconds"),
        pytest.param("1m", 60.0, id="minutes"),
        pytest.param("1.5s", 1.5, id="fraction"),
        pytest.param("1h30m", 5400.0, id="compound"),
        pytest.param("250us", 0.00025, id="microseconds"),
        pytest.param("0", 0.0, id="zero"),
    ],
)
def test_istio_durations_parse(text: str, seconds: float) -> None:
    assert translate.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "10", "-1s", "1.5", "s", "10 s", "1d"])
def test_malformed_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        translate.parse_duration(text)


def test_routing_version_falls_back_to_a_hash_of_the_spec() -> None:
    unannotated = copy.deepcopy(GOOD_VS)
    del unannotated["metadata"]["annotations"]

    version = translate.routing_version(unannotated)

    assert translate.routing_version(GOOD_VS) == VERSION
    assert version.startswith("sha256-")
    assert version == translate.routing_version(copy.deepcopy(unannotated))


# ----------------------------------------------------------------- real Envoy


@pytest.mark.envoy
def test_envoy_accepts_a_full_translated_configuration() -> None:
    route = slot_route(1, "c-03")
    route["fault"] = {"delay": {"fixedDelay": "1s", "percentage": {"value": 50}}}
    route["retries"] = {"attempts": 3, "perTryTimeout": "2s", "retryOn": "5xx"}
    route["timeout"] = "30s"
    weighted = {
        "name": "meshctl-weighted",
        "match": [{"headers": {protocol.SLOT_HEADER: {"regex": "[3-9]"}}}],
        "route": [
            {"destination": {"host": "fl-clients", "subset": "c-03"}, "weight": 90},
            {"destination": {"host": "fl-clients", "subset": "c-07"}, "weight": 10},
        ],
    }
    policy = copy.deepcopy(GOOD_DR["spec"]["trafficPolicy"])
    policy["connectionPool"]["tcp"] = {"maxConnections": 8, "connectTimeout": "1s"}
    policy["connectionPool"]["http"]["maxRequestsPerConnection"] = 10
    policy["loadBalancer"] = {"simple": "ROUND_ROBIN"}

    envoy.validate_config(
        virtual_service(route, weighted, FALLBACK),
        destination_rule("c-03", "c-07", "c-42", policy=policy),
        WORKLOADS,
    )
