"""Security: client services only on loopback, no raw data in any message or
log, and a round API that takes only authenticated, well-formed calls."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from meshctl import demo, policies, protocol
from meshctl.backends.directory import DirectoryBackend
from meshctl.controller import loop, roundapi
from meshctl.controller.cycle import Controller
from meshctl.flower import clientservice, grid
from meshctl.localmesh.workloads import ClientSpec, LocalWorkloads
from meshctl.types import ArmedRound

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- loopback only


def _own_non_loopback_addresses() -> list[str]:
    """This machine's own IPv4 addresses that are not loopback (``hostname -I``)."""
    try:
        out = subprocess.run(
            ["hostname", "-I"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except OSError:
        return []
    return [a for a in out.split() if "." in a and not a.startswith("127.")]


def _connects(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((address, port)) == 0


def test_a_client_service_binds_to_loopback_by_default() -> None:
    args = clientservice._parser().parse_args(
        ["--app=tests.toy_client_app:app", "--name=c", "--node-id=1", "--port=1"]
    )
    assert args.host == "127.0.0.1"


def test_a_local_client_service_is_not_reachable_on_the_hosts_own_address(
    tmp_path: Path,
) -> None:
    addresses = _own_non_loopback_addresses()
    if not addresses:
        pytest.skip("this machine has no non-loopback IPv4 address")
    workloads = LocalWorkloads(tmp_path)
    try:
        workloads.start(
            [ClientSpec("c-00", "tests.toy_client_app:app", {"mode": "double"}, 1)]
        )
        workloads.wait_ready(timeout_s=60)
        [workload] = workloads.workloads

        assert workload.address == "127.0.0.1"
        assert _connects("127.0.0.1", workload.port)
        for address in addresses:
            assert not _connects(address, workload.port), address
    finally:
        workloads.stop()


# ------------------------------------------------------- no raw data leaves a client

FEATURES, ROWS = 6, 24
LABEL_TEXT = "planted-label-zq7"


def _planted_shard() -> tuple[np.ndarray, np.ndarray]:
    """Rows of distinctive values in [3, 4), outside any weight's usual range,
    and labels no message should ever carry."""
    base = 3.0 + np.arange(ROWS * FEATURES, dtype=np.float64).reshape(ROWS, FEATURES)
    x = (3.0 + (base - 3.0) * 7.77e-3 + 1.234567e-5).astype(np.float32)
    labels = np.array([918273645 + i for i in range(ROWS)], dtype=np.int64)
    return x, labels


def _needles(x: np.ndarray, labels: np.ndarray) -> list[tuple[str, bytes]]:
    """Byte patterns that reveal a sample or a label: whole rows, single values
    in float32 and float64 (both byte orders) and as text, labels as integers
    and text."""
    needles = []
    for i, row in enumerate(x):
        needles.append((f"row {i} float32", row.astype("<f4").tobytes()))
        needles.append((f"row {i} float64", row.astype("<f8").tobytes()))
    for value in x.ravel()[:: max(1, x.size // 40)]:
        for fmt in ("<f", ">f", "<d", ">d"):
            needles.append((f"{value} as {fmt}", struct.pack(fmt, float(value))))
        needles.append((f"{value} as text", f"{float(value):.6g}".encode()))
    for label in labels:
        needles.append((f"label {label}", struct.pack("<q", int(label))))
        needles.append((f"label {label} as text", str(int(label)).encode()))
    needles.append(("label text", LABEL_TEXT.encode()))
    return needles


def _leaks(blob: bytes, needles: list[tuple[str, bytes]]) -> list[str]:
    return [name for name, needle in needles if needle in blob]


def test_the_leak_check_finds_planted_data_when_it_is_there() -> None:
    x, labels = _planted_shard()
    record = ArrayRecord([x[:2]])
    blob = b"".join(a.data for a in record.values())
    assert _leaks(blob, _needles(x, labels))
    assert _leaks(f"loss for {float(x[0, 0]):.6g}".encode(), _needles(x, labels))
    assert _leaks(str(labels[3]).encode(), _needles(x, labels))


@pytest.fixture
def fluids_service(tmp_path: Path) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """A client service hosting the real FLUIDS ClientApp on a planted shard."""
    from fl_app import client_app

    x, labels = _planted_shard()
    shard = tmp_path / "shard.npz"
    np.savez(shard, x=x, y=labels, label_names=np.array([LABEL_TEXT] * ROWS))
    service = clientservice.ClientService(
        client_app.app,
        name="c-00",
        node_id=1,
        node_config={
            "data-path": str(shard),
            "ms-per-sample": 1.0,
            "kbps": 1000.0,
            "time-scale": 0.0,
            "seed": 1,
        },
    )
    server = clientservice.serve(service, host="127.0.0.1", port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", x, labels
    server.shutdown()
    server.server_close()


def test_no_sample_or_label_appears_in_any_message_or_log_of_a_round(
    fluids_service, caplog: pytest.LogCaptureFixture
) -> None:
    from fl_app import model

    url, x, labels = fluids_service
    wire: list[bytes] = []

    def keep_request(request: httpx.Request) -> None:
        wire.append(request.content + str(request.headers).encode())

    def keep_response(response: httpx.Response) -> None:
        wire.append(response.read() + str(response.headers).encode())

    http = httpx.Client(
        event_hooks={"request": [keep_request], "response": [keep_response]}
    )
    mesh_grid = grid.MeshGrid(
        mesh_url=url,
        arm=lambda r: ArmedRound(r, (1,), f"r{r}"),
        report=lambda r, outcomes: None,
        deadline_s=60.0,
        http=http,
    )
    weights = ArrayRecord(model.build_autoencoder(FEATURES).state_dict())
    content = RecordDict(
        {
            "arrays": weights,
            "config": ConfigRecord(
                {"server-round": 1, "local-steps": 3, "batch-size": 8}
            ),
        }
    )
    caplog.set_level(logging.DEBUG)
    try:
        list(mesh_grid.get_node_ids())
        message = Message(
            content=content, message_type=MessageType.TRAIN, dst_node_id=1
        )
        [reply] = mesh_grid.send_and_receive([message])
    finally:
        mesh_grid.close()

    # The round really trained on the shard: a sound update came back.
    assert not reply.has_error(), reply.error.reason
    assert reply.content["metrics"]["num-examples"] == ROWS
    assert len(wire) == 2 and all(wire)

    needles = _needles(x, labels)
    for blob in wire:
        assert not _leaks(blob, needles)
    logs = "\n".join(r.getMessage() for r in caplog.records).encode()
    assert caplog.records
    assert not _leaks(logs, needles)


# ------------------------------------------------------------- the round API token

TOKEN = "s3cret-token-for-tests"


class _NoTelemetry:
    """Telemetry that knows nothing of any client."""

    def read(self, window_s: float) -> dict:
        return {}


def _controller(work_dir: Path, **options) -> Controller:
    """A controller of four clients routing into ``work_dir``."""
    clients = [f"c-0{i}" for i in range(4)]
    return Controller(
        clients=clients,
        policy=policies.create("random"),
        telemetry=_NoTelemetry(),
        backend=DirectoryBackend(work_dir / "routing"),
        wait=lambda step: 0.0,
        ready=lambda: clients,
        **options,
    )


@pytest.fixture
def api(tmp_path: Path) -> Iterator[roundapi.RoundAPIServer]:
    """A round API with a token, over a controller with four clients."""
    server = roundapi.RoundAPIServer(_controller(tmp_path), token=TOKEN).start()
    yield server
    server.stop()


ARM_BODY = {"server_round": 1, "per_round": 2}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-token"),
        pytest.param({"authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param({"authorization": f"Bearer {TOKEN}x"}, id="longer-token"),
        pytest.param({"authorization": TOKEN}, id="no-scheme"),
        pytest.param({"authorization": f"Basic {TOKEN}"}, id="basic-scheme"),
    ],
)
@pytest.mark.parametrize("path", [roundapi.ARM_PATH, roundapi.FEEDBACK_PATH])
def test_the_round_api_refuses_a_call_without_the_token(api, path, headers) -> None:
    response = httpx.post(api.url + path, json=ARM_BODY, headers=headers)

    assert response.status_code == 401
    assert "bearer token" in response.json()["error"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_the_round_api_takes_a_call_with_the_token(api) -> None:
    client = roundapi.RoundAPIClient(api.url, per_round=2, token=TOKEN)
    try:
        armed = client.arm(1)
        client.report(1, [])
    finally:
        client.close()
    assert len(armed.slots) == 2


def test_a_client_without_the_token_is_told_why(api) -> None:
    client = roundapi.RoundAPIClient(api.url, per_round=2, token="")
    try:
        with pytest.raises(roundapi.RoundAPIError, match="answered 401"):
            client.arm(1)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{", "not JSON", id="not-json"),
        pytest.param(b"[1]", "JSON object", id="not-an-object"),
        pytest.param(
            b'{"server_round": "1", "per_round": 2}', "server_round", id="str"
        ),
        pytest.param(b'{"server_round": 1, "per_round": true}', "per_round", id="bool"),
    ],
)
def test_an_authenticated_but_malformed_call_is_a_bad_request(api, body, message):
    response = httpx.post(
        api.url + roundapi.ARM_PATH,
        content=body,
        headers={"authorization": f"Bearer {TOKEN}"},
    )
    assert response.status_code == 400
    assert message in response.json()["error"]


def test_health_and_metrics_stay_open(api) -> None:
    assert httpx.get(api.url + "/healthz").status_code == 200
    assert httpx.get(api.url + roundapi.METRICS_PATH).status_code == 200


def test_the_demos_round_api_takes_only_its_token_across_a_controller_restart(
    tmp_path: Path,
) -> None:
    def make_controller() -> Controller:
        return _controller(tmp_path, state_path=tmp_path / "controller" / "state.json")

    host = demo.ControllerHost(make_controller, TOKEN)
    client = roundapi.RoundAPIClient(host.url, per_round=2, token=TOKEN)
    try:
        for server_round in (1, 2):  # round 2 is armed by the new controller
            refused = httpx.post(host.url + roundapi.ARM_PATH, json=ARM_BODY)
            assert refused.status_code == 401
            assert len(client.arm(server_round).slots) == 2
            host.restart()
    finally:
        client.close()
        host.stop()


def test_the_token_comes_from_a_file_before_the_variable(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    environ = {roundapi.TOKEN_FILE_ENV: str(path), roundapi.TOKEN_ENV: "other"}

    assert roundapi.token_from_environment(environ) == TOKEN
    assert roundapi.token_from_environment({roundapi.TOKEN_ENV: "other"}) == "other"
    assert roundapi.token_from_environment({}) is None


@pytest.mark.parametrize(
    "content", [None, "", "  \n"], ids=["missing", "empty", "blank"]
)
def test_an_unusable_token_file_is_an_error_naming_it(tmp_path: Path, content):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(roundapi.TokenError, match=str(path)):
        roundapi.token_from_environment({roundapi.TOKEN_FILE_ENV: str(path)})


def test_the_cluster_controller_takes_its_token_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    monkeypatch.setenv(roundapi.TOKEN_FILE_ENV, str(path))

    assert loop.LoopSettings().round_api_token == TOKEN
    assert TOKEN not in repr(loop.LoopSettings())


@pytest.mark.parametrize("manifest", ["controller.yaml", "fl-server.yaml"])
def test_the_controller_and_the_server_mount_the_token_from_a_secret(manifest):
    docs = yaml.safe_load_all((ROOT / "manifests" / "base" / manifest).read_text())
    [deployment] = [d for d in docs if d and d.get("kind") == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    token_file = env[roundapi.TOKEN_FILE_ENV]
    mount = mounts["round-api-token"]
    assert token_file == mount["mountPath"] + "/token" and mount["readOnly"]
    secret = volumes["round-api-token"]["secret"]
    assert secret["secretName"] == "meshctl-round-api-token"
    assert protocol.HEALTH_PATH == "/healthz"
