"""Validation: meshctl's rules, the CRD schema, and YAML files."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from meshctl.routing import validate
from meshctl.routing.errors import RoutingError


def _vs() -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "VirtualService",
        "metadata": {"name": "fl-clients", "namespace": "fl"},
        "spec": {
            "hosts": ["fl-clients"],
            "http": [
                {
                    "name": "meshctl-slot-1",
                    "match": [{"headers": {"x-fl-slot": {"exact": "1"}}}],
                    "route": [
                        {"destination": {"host": "fl-clients", "subset": "c-01"}}
                    ],
                },
                {
                    "name": "split",
                    "route": [
                        {
                            "destination": {"host": "fl-clients", "subset": "c-01"},
                            "weight": 60,
                        },
                        {
                            "destination": {"host": "fl-clients", "subset": "c-02"},
                            "weight": 40,
                        },
                    ],
                },
            ],
        },
    }


def _dr() -> dict:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": "fl-clients", "namespace": "fl"},
        "spec": {
            "host": "fl-clients",
            "subsets": [
                {"name": "c-01", "labels": {"pod": "c-01"}},
                {"name": "c-02", "labels": {"pod": "c-02"}},
            ],
        },
    }


def _route(vs: dict, i: int) -> dict:
    return vs["spec"]["http"][i]


def _set_object_name(objs: list[dict]) -> None:
    objs[0]["metadata"]["name"] = "FL_clients"


def _set_namespace(objs: list[dict]) -> None:
    objs[0]["metadata"]["namespace"] = "fl.prod"


def _upper_header(objs: list[dict]) -> None:
    _route(objs[0], 0)["match"] = [{"headers": {"X-FL-Slot": {"exact": "1"}}}]


def _long_regex(objs: list[dict]) -> None:
    _route(objs[0], 0)["match"] = [{"uri": {"regex": "a" * 1025}}]


def _float_weight(objs: list[dict]) -> None:
    _route(objs[0], 1)["route"][0]["weight"] = 60.5


def _negative_weight(objs: list[dict]) -> None:
    _route(objs[0], 1)["route"][0]["weight"] = -1


def _no_weights(objs: list[dict]) -> None:
    for entry in _route(objs[0], 1)["route"]:
        del entry["weight"]


def _zero_sum(objs: list[dict]) -> None:
    for entry in _route(objs[0], 1)["route"]:
        entry["weight"] = 0


def _missing_subset(objs: list[dict]) -> None:
    objs[1]["spec"]["subsets"].pop()


def _bad_subset_name(objs: list[dict]) -> None:
    objs[1]["spec"]["subsets"].append({"name": "C_03", "labels": {"pod": "c-03"}})


def _duplicate_subset(objs: list[dict]) -> None:
    objs[1]["spec"]["subsets"].append({"name": "c-01", "labels": {"pod": "c-03"}})


def _duplicate_route_name(objs: list[dict]) -> None:
    _route(objs[0], 1)["name"] = "meshctl-slot-1"


def _no_routes(objs: list[dict]) -> None:
    objs[0]["spec"]["http"] = []


def _route_without_action(objs: list[dict]) -> None:
    del _route(objs[0], 0)["route"]


def _destination_without_host(objs: list[dict]) -> None:
    del _route(objs[0], 0)["route"][0]["destination"]["host"]


def _dr_without_host(objs: list[dict]) -> None:
    del objs[1]["spec"]["host"]


RULE_CASES: list[tuple[Callable[[list[dict]], None], str, str]] = [
    (_set_object_name, "metadata.name", "not a DNS-1123 subdomain"),
    (_set_namespace, "metadata.namespace", "not a DNS-1123 label"),
    (_upper_header, "spec.http[0].match[0].headers.X-FL-Slot", "lower case"),
    (_long_regex, "spec.http[0].match[0].uri.regex", "1025 chars, over 1024"),
    (_float_weight, "spec.http[1].route[0].weight", "not an integer >= 0"),
    (_negative_weight, "spec.http[1].route[0].weight", "not an integer >= 0"),
    (_no_weights, "spec.http[1].route", "2 destinations and no weights"),
    (_zero_sum, "spec.http[1].route", "weights sum to 0"),
    (_missing_subset, "spec.http[1].route[1].destination.subset", "not defined"),
    (_bad_subset_name, "spec.subsets[2].name", "not a DNS-1123 label"),
    (_duplicate_subset, "spec.subsets[2].name", "defined twice"),
    (_duplicate_route_name, "spec.http[1].name", "repeats spec.http[0]"),
    (_no_routes, "spec", "has no route"),
    (_route_without_action, "spec.http[0]", "no destination, redirect"),
    (_destination_without_host, "spec.http[0].route[0].destination.host", "missing"),
    (_dr_without_host, "spec.host", "missing"),
]


def test_the_valid_pair_has_no_problems(istio_schemas: dict) -> None:
    assert validate.validate_objects([_vs(), _dr()], schemas=istio_schemas) == []


@pytest.mark.parametrize(
    ("breaks", "path", "message"),
    RULE_CASES,
    ids=[case[0].__name__.lstrip("_").replace("_", "-") for case in RULE_CASES],
)
def test_each_meshctl_rule_flags_its_broken_field(
    breaks: Callable[[list[dict]], None], path: str, message: str
) -> None:
    objs = [_vs(), _dr()]
    breaks(objs)

    problems = validate.validate_objects(objs, source="case.yaml")

    assert [p.path for p in problems] == [path]
    assert message in problems[0].message


def test_several_destinations_without_weights_are_not_an_even_split() -> None:
    vs = _vs()
    _no_weights([vs])

    (problem,) = validate.validate_objects([vs])

    assert problem.object == "VirtualService fl/fl-clients"
    assert "no weights" in problem.message


def test_references_are_not_checked_without_a_destination_rule_in_the_batch() -> None:
    vs = _vs()
    _route(vs, 0)["route"][0]["destination"]["subset"] = "c-99"

    assert validate.validate_objects([vs]) == []


def test_references_match_a_destination_rule_host_given_as_fqdn() -> None:
    dr = _dr()
    dr["spec"]["host"] = "fl-clients.fl.svc.cluster.local"
    dr["spec"]["subsets"].pop()

    problems = validate.validate_objects([_vs(), dr])

    assert [p.path for p in problems] == ["spec.http[1].route[1].destination.subset"]


def test_a_problem_is_one_line_naming_source_object_path_and_message() -> None:
    problem = validate.Problem(
        "routes.yaml",
        "VirtualService fl/fl-clients",
        "spec.http[1].route[0].weight",
        "bad",
    )

    assert str(problem) == (
        "routes.yaml: VirtualService fl/fl-clients: spec.http[1].route[0].weight: bad"
    )


# --- CRD schema --------------------------------------------------------------


def test_crd_schemas_cover_every_served_istio_networking_version(
    istio_schemas: dict,
) -> None:
    for version in ("v1", "v1beta1", "v1alpha3"):
        assert ("networking.istio.io", "VirtualService", version) in istio_schemas
        assert ("networking.istio.io", "DestinationRule", version) in istio_schemas


def test_the_schema_check_collects_every_error_with_its_path(
    istio_schemas: dict,
) -> None:
    vs = _vs()
    _route(vs, 1)["route"][0]["weight"] = "sixty"
    _route(vs, 0)["timeout"] = 5
    _route(vs, 0)["retriez"] = {}

    problems = validate.validate_objects([vs], schemas=istio_schemas)
    schema_paths = {
        p.path for p in problems if "schema" in p.message or "unknown" in p.message
    }

    assert schema_paths == {
        "spec.http[1].route[0].weight",
        "spec.http[0].timeout",
        "spec.http[0]",
    }


def test_unknown_fields_are_accepted_when_not_strict(crd_path: Path) -> None:
    schemas = validate.load_crd_schemas(crd_path, reject_unknown_fields=False)
    vs = _vs()
    _route(vs, 0)["retriez"] = {}

    assert validate.validate_objects([vs], schemas=schemas) == []


def test_mutually_exclusive_fields_are_refused_by_the_schema(
    istio_schemas: dict,
) -> None:
    vs = _vs()
    _route(vs, 0)["match"] = [{"headers": {"x-fl-slot": {"exact": "1", "prefix": "1"}}}]

    problems = validate.validate_objects([vs], schemas=istio_schemas)

    assert [p.path for p in problems] == ["spec.http[0].match[0].headers.x-fl-slot"]


def test_nullable_and_int_or_string_fields_are_converted(istio_schemas: dict) -> None:
    vs = _vs()
    vs["status"] = {"observedGeneration": "7"}
    _route(vs, 0)["retries"] = {"attempts": 2, "retryRemoteLocalities": None}
    dr = _dr()
    dr["status"] = {"observedGeneration": 7}

    assert validate.validate_objects([vs, dr], schemas=istio_schemas) == []


def test_an_unknown_kind_has_no_schema(istio_schemas: dict) -> None:
    obj = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}

    (problem,) = validate.validate_objects([obj], schemas=istio_schemas)

    assert "no CRD schema for example.com/v1 Widget" in problem.message


# --- YAML files --------------------------------------------------------------


def test_a_multi_document_file_gives_every_object(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(
        "---\napiVersion: v1\nkind: A\nmetadata: {name: a}\n---\n---\n"
        "apiVersion: v1\nkind: B\nmetadata: {name: b}\n"
    )

    docs = validate.load_yaml_documents(path)

    assert [d["kind"] for d in docs] == ["A", "B"]


def test_a_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("kind: A\nmetadata:\n  name: a\n  labels: {x: [1, 2}\n")

    with pytest.raises(RoutingError, match=r"broken\.yaml:4:\d+: YAML syntax error"):
        validate.load_yaml_documents(path)


def test_a_document_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("kind: A\n---\n- 1\n- 2\n")

    with pytest.raises(RoutingError, match=r"list\.yaml: document 2 is a list"):
        validate.load_yaml_documents(path)


def test_a_file_of_objects_validates_with_its_name_as_source(tmp_path: Path) -> None:
    import yaml

    vs = copy.deepcopy(_vs())
    _no_weights([vs])
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump_all([vs, _dr()]))

    problems = validate.validate_objects(
        validate.load_yaml_documents(path), source=str(path)
    )

    assert [str(p) for p in problems] == [
        f"{path}: VirtualService fl/fl-clients: spec.http[1].route: "
        "2 destinations and no weights"
    ]


# --- CEL rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "path", "message"),
    [
        ("timeout", "0s", "spec.http[0].timeout", "valid duration greater than 1ms"),
        (
            "retries",
            {"attempts": 3, "perTryTimeout": "soon"},
            "spec.http[0].retries.perTryTimeout",
            "cannot be evaluated",
        ),
        (
            "fault",
            {"delay": {"fixedDelay": "500us", "percentage": {"value": 5}}},
            "spec.http[0].fault.delay.fixedDelay",
            "valid duration greater than 1ms",
        ),
    ],
    ids=["zero-timeout", "unparsable-per-try-timeout", "sub-millisecond-delay"],
)
def test_the_crds_cel_rules_flag_the_field_they_sit_on(
    istio_schemas: dict, field: str, value: object, path: str, message: str
) -> None:
    vs = _vs()
    vs["spec"]["http"][0][field] = value

    (problem,) = validate.validate_objects([vs], schemas=istio_schemas)

    assert (problem.object, problem.path) == ("VirtualService fl/fl-clients", path)
    assert problem.message.startswith("CEL: must be a valid duration")
    assert message in problem.message


def test_cel_rules_on_maps_check_keys_and_values(istio_schemas: dict) -> None:
    dr = _dr()
    dr["spec"]["workloadSelector"] = {"matchLabels": {"app*": "fl", "tier": "a*"}}

    problems = validate.validate_objects([dr], schemas=istio_schemas)

    assert {(p.path, p.message.split(" (rule")[0]) for p in problems} == {
        (
            "spec.workloadSelector.matchLabels",
            "CEL: wildcard not allowed in label key match",
        ),
        (
            "spec.workloadSelector.matchLabels.tier",
            "CEL: wildcard not allowed in label value match",
        ),
    }


def test_durations_the_cel_rules_accept_pass(istio_schemas: dict) -> None:
    vs = _vs()
    vs["spec"]["http"][0]["timeout"] = "1h30m"
    vs["spec"]["http"][0]["retries"] = {"attempts": 3, "perTryTimeout": "1.5s"}

    assert validate.validate_objects([vs, _dr()], schemas=istio_schemas) == []


_CRD_WITH_RULES = """\
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  names: {kind: Widget}
  versions:
  - name: v1
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size:
                type: integer
                x-kubernetes-validations:
                - {rule: "self >= 2", message: "size must be at least 2"}
                - {rule: "self.frobnicate(", message: "never compiles"}
                - {rule: "self >= oldSelf", message: "never shrinks"}
"""


def test_a_rule_the_library_cannot_compile_is_skipped_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "crd.yaml"
    path.write_text(_CRD_WITH_RULES)
    widget = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"size": 1},
    }

    schemas = validate.load_crd_schemas(path)
    first = validate.validate_objects([widget], schemas=schemas)
    second = validate.validate_objects([widget], schemas=schemas)

    assert [p.message for p in first] == [
        "CEL: size must be at least 2 (rule self >= 2)"
    ]
    assert second == first
    skipped = [r for r in caplog.records if "self.frobnicate(" in r.getMessage()]
    assert len(skipped) == 1
    assert "cannot be compiled by cel-python" in skipped[0].getMessage()
    assert "it is skipped" in skipped[0].getMessage()


# --- the command line --------------------------------------------------------


def _run_validate(*args: str):
    from typer.testing import CliRunner

    from meshctl.cli import app

    return CliRunner().invoke(app, ["validate", *args])


def test_meshctl_validate_exits_0_for_a_valid_multi_document_file(
    tmp_path: Path, crd_path: Path
) -> None:
    import yaml

    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump_all([_vs(), _dr()]))

    result = _run_validate(str(path), "--crds", str(crd_path))

    assert result.exit_code == 0, result.output
    assert result.stdout == ""


def test_meshctl_validate_exits_4_with_one_line_per_problem(
    tmp_path: Path, crd_path: Path
) -> None:
    import yaml

    vs = _vs()
    vs["spec"]["http"][0]["timeout"] = "0s"
    _no_weights([vs])
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump_all([vs, _dr()]))

    result = _run_validate(str(path), "--crds", str(crd_path))

    assert result.exit_code == 4
    assert result.stdout.splitlines() == [
        f"{path}: VirtualService fl/fl-clients: spec.http[1].route: "
        "2 destinations and no weights",
        f"{path}: VirtualService fl/fl-clients: spec.http[0].timeout: CEL: must be "
        "a valid duration greater than 1ms (rule duration(self) >= duration('1ms'))",
    ]


def test_a_route_to_a_subset_defined_in_no_given_file_is_flagged_across_files(
    tmp_path,
) -> None:
    from typer.testing import CliRunner

    from meshctl import cli, protocol
    from meshctl.routing import render

    vs, dr = render.render_exact({1: "c-01"}, routing_version="r1")
    vs["spec"]["http"][0]["route"][0]["destination"]["subset"] = "c-99"
    (tmp_path / "vs.yaml").write_text(yaml.safe_dump(vs))
    (tmp_path / "dr.yaml").write_text(yaml.safe_dump(dr))

    result = CliRunner().invoke(
        cli.app, ["validate", str(tmp_path / "vs.yaml"), str(tmp_path / "dr.yaml")]
    )

    assert result.exit_code == 4
    assert "c-99" in result.output and protocol.SERVICE_HOST in result.output


def test_a_file_that_is_not_utf8_is_one_clear_problem(tmp_path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: VirtualService\nname: caf\xe9\n")

    with pytest.raises(RoutingError, match="not UTF-8"):
        validate.load_yaml_documents(path)


def test_kinds_without_rules_are_said_to_be_unchecked_not_valid(tmp_path) -> None:
    from typer.testing import CliRunner

    from meshctl import cli
    from meshctl.routing import render

    vs, dr = render.render_exact({1: "c-01"}, routing_version="r1")
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}}
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump_all([vs, dr, config_map]))

    result = CliRunner().invoke(cli.app, ["validate", str(path)])

    assert result.exit_code == 0
    assert "2 objects valid" in result.output
    assert "not checked" in result.output and "1 ConfigMap" in result.output
