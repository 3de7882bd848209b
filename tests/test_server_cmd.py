"""``meshctl server``, the FL server role in a cluster: its options, and a clear
failure when the controller's round API does not answer."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from meshctl import cli
from meshctl.exitcodes import ExitCode
from meshctl.flower import serverrole


@pytest.fixture
def round_api() -> Iterator[str]:
    """A stand-in controller that answers /healthz and nothing else."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def server(*args: str):
    return CliRunner().invoke(cli.app, ["server", "--health-port", "0", *args])


def test_an_unreachable_controller_fails_naming_its_url() -> None:
    result = server(
        "--mesh", "http://127.0.0.1:9", "--controller", "http://127.0.0.1:9"
    )

    assert result.exit_code == ExitCode.FAILED, result.output
    message = " ".join(result.output.split())
    assert "round API at http://127.0.0.1:9 is unreachable" in message
    assert "--controller" in message


@pytest.mark.parametrize(
    "app_ref",
    [
        pytest.param("fl_app.server_app", id="no-attribute"),
        pytest.param("fl_app.nothing_here:app", id="no-module"),
        pytest.param("meshctl.protocol:SERVICE_HOST", id="not-a-server-app"),
    ],
)
def test_a_bad_app_reference_is_a_usage_error(app_ref: str, round_api) -> None:
    result = server("--mesh", "http://m", "--controller", round_api, "--app", app_ref)

    assert result.exit_code == ExitCode.USAGE, result.output
    assert app_ref in result.output


def test_the_run_config_is_typed() -> None:
    config = serverrole.parse_run_config(
        ["num-rounds=3", "lr=0.01", "dataset=ton_iot", "fast=true"]
    )

    assert config == {"num-rounds": 3, "lr": 0.01, "dataset": "ton_iot", "fast": True}


def test_the_manifests_options_are_all_known() -> None:
    result = server(
        "--app=fl_app.server_app:app",
        "--controller=http://127.0.0.1:9",
        "--mesh=http://fl-clients.fl.svc",
    )

    assert result.exit_code != ExitCode.USAGE, result.output


def test_a_reply_limit_below_one_byte_is_a_usage_error_naming_the_option() -> None:
    result = server(
        "--mesh", "http://m", "--controller", "http://c", "--max-reply-bytes", "0"
    )

    assert result.exit_code == ExitCode.USAGE
    assert "--max-reply-bytes" in " ".join(result.output.split())


def test_the_servers_grid_refuses_replies_over_its_limit(monkeypatch) -> None:
    made = {}

    class Grid:
        def __init__(self, **options) -> None:
            made.update(options)
            raise RuntimeError("stop here")

    monkeypatch.setattr(serverrole, "MeshGrid", Grid)
    settings = serverrole.ServerSettings(
        app_ref="fl_app.server_app:app", mesh_url="http://m", max_reply_bytes=1234
    )

    with pytest.raises(RuntimeError, match="stop here"):
        serverrole.run(object(), settings, arm=print, report=print)

    assert made["max_reply_bytes"] == 1234
