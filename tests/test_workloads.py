"""Client service processes: readiness, a crash, a restart on the same port."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from meshctl import protocol
from meshctl.localmesh.workloads import ClientSpec, LocalWorkloads, WorkloadError

pytestmark = pytest.mark.slow


def _spec(name: str, index: int) -> ClientSpec:
    return ClientSpec(name, "tests.toy_client_app:app", {"mode": "double"}, index + 1)


def test_a_killed_service_is_not_ready_until_it_is_restarted(tmp_path: Path) -> None:
    with LocalWorkloads(tmp_path) as workloads:
        workloads.start([_spec("c-00", 0), _spec("c-01", 1)])
        workloads.wait_ready(timeout_s=60)
        port = {w.name: w.port for w in workloads.workloads}["c-01"]
        assert workloads.ready() == ["c-00", "c-01"]

        workloads.kill("c-01")

        assert not workloads.alive("c-01")
        assert workloads.ready() == ["c-00"]

        workloads.restart("c-01")
        workloads.wait_ready(timeout_s=60)

        assert workloads.ready() == ["c-00", "c-01"]
        # The same address: the routes that name it need no change (the
        # process that held it before is gone).
        answer = httpx.get(f"http://127.0.0.1:{port}{protocol.HEALTH_PATH}")
        assert answer.status_code == 200

        # A service that still runs (hung, say) is killed, then started again.
        before = workloads.pid("c-00")
        workloads.restart("c-00")
        workloads.wait_ready(timeout_s=60)
        assert workloads.pid("c-00") != before
        assert workloads.ready() == ["c-00", "c-01"]


def test_an_unknown_service_is_named(tmp_path: Path) -> None:
    with LocalWorkloads(tmp_path) as workloads:
        with pytest.raises(WorkloadError, match="no client service named 'c-09'"):
            workloads.kill("c-09")
