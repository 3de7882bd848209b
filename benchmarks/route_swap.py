"""How fast a real local Envoy serves a new route configuration.

For each of ``--changes`` routing changes, the VirtualService's slot assignment is
rotated, its RDS file swapped in by rename, and ``/config_dump`` polled until
Envoy reports the new version.  Prints p50, p99 and max of the time from the
rename to the version being served, for a few route-table sizes, and the same
for cluster (CDS) swaps.

    .venv/bin/python benchmarks/route_swap.py --changes 100
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
import tempfile
import time

from meshctl import protocol
from meshctl.localmesh.envoy import LocalMesh
from meshctl.types import Workload


def objects(version: str, slots: int, clients: int, shift: int) -> tuple[dict, dict]:
    """A VirtualService with ``slots`` slot routes, rotated by ``shift``, and its DR."""
    names = [protocol.client_id(i) for i in range(clients)]
    metadata = {
        "name": "fl-clients",
        "namespace": "fl",
        "annotations": {protocol.ROUTING_VERSION_ANNOTATION: version},
    }
    http = [
        {
            "name": protocol.slot_route_name(slot),
            "match": [{"headers": {protocol.SLOT_HEADER: {"exact": str(slot)}}}],
            "route": [
                {
                    "destination": {
                        "host": protocol.SERVICE_HOST,
                        "subset": names[(slot + shift) % clients],
                    }
                }
            ],
        }
        for slot in range(1, slots + 1)
    ]
    vs = {
        "metadata": metadata,
        "spec": {"hosts": [protocol.SERVICE_HOST], "http": http},
    }
    subsets = [{"name": n, "labels": {protocol.CLIENT_LABEL: n}} for n in names]
    dr = {
        "metadata": metadata,
        "spec": {"host": protocol.SERVICE_HOST, "subsets": subsets},
    }
    return vs, dr


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def measure(mesh: LocalMesh, kind: str, slots: int, changes: int) -> list[float]:
    """Milliseconds from each file swap to Envoy serving its version."""
    clients = max(slots * 2, 4)
    samples = []
    for change in range(changes):
        version = f"{kind}-{slots}-{change}"
        vs, dr = objects(version, slots, clients, change)
        if kind == "routes":
            mesh.apply_virtual_service(vs)
        else:
            dr["spec"]["subsets"] = dr["spec"]["subsets"][change % 2 :]
            mesh.apply_destination_rule(dr)
        samples.append(
            mesh.wait_served(kind, version, timeout_s=10, poll_s=0.0005) * 1e3
        )
    return samples


def main() -> None:
    """Run the benchmark and print one line per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=100, help="changes per size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--cluster-sizes", type=int, nargs="+", default=[10, 100])
    args = parser.parse_args()
    # A SIGTERM ends the run through the context managers, so Envoy is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory(prefix="meshctl-bench-") as work_dir:
        workloads = [
            Workload(n, "127.0.0.1", 9, {protocol.CLIENT_LABEL: n})
            for n in (
                protocol.client_id(i)
                for i in range(2 * max(args.sizes + args.cluster_sizes))
            )
        ]
        with LocalMesh(work_dir, workloads=workloads, log_level="warning") as mesh:
            started = time.monotonic()
            for kind, sizes in [
                ("routes", args.sizes),
                ("clusters", args.cluster_sizes),
            ]:
                for slots in sizes:
                    ms = measure(mesh, kind, slots, args.changes)
                    print(
                        f"{kind:8} {slots:5} slots  n={len(ms)}  "
                        f"p50={statistics.median(ms):6.2f} ms  "
                        f"p99={percentile(ms, 0.99):6.2f} ms  max={max(ms):6.2f} ms"
                    )
            print(f"total {time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
