"""Faults injected on purpose into a demo run, so that a user can watch meshctl cope.

A fault spec is a comma-separated list; rounds count from 1:

- ``crash:CLIENT@ROUND[+ROUNDS]``: the client's service process is killed
  halfway through its training in ROUND (at the start of ROUND when no slot
  routes to it), and started again once ROUNDS more rounds (default 1) are
  over, as a kubelet restarts a crashed container;
- ``slow:CLIENTxFACTOR@ROUND``: from ROUND on, the client's device computes
  FACTOR times slower;
- ``fail:CLIENTxSHARE@ROUND``: from ROUND on, the client fails SHARE of its
  training requests;
- ``nan:CLIENT@ROUND``, ``shape:CLIENT@ROUND``, ``oversized:CLIENT@ROUND``: in
  ROUND, the client's reply carries NaN weights, an array of the wrong shape,
  or more bytes than the server accepts;
- ``envoy-restart@ROUND``: Envoy is killed in the middle of ROUND and started
  again, with the routes of the routing directory;
- ``controller-restart@ROUND``: the controller stops in the middle of ROUND and
  a new one takes over from the state and the routes it wrote.

Client faults reach the client through its node config, which the FLUIDS
``ClientApp`` reads; the others are carried out by a :class:`FaultInjector`
that the run calls when it arms and closes each round.  A fault of the mesh
itself lands before the round's training replies are reported, so that the
round it names is the round it hits.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger("meshctl.faults")

CLIENT_KINDS = ("crash", "slow", "fail", "nan", "shape", "oversized")
MESH_KINDS = ("envoy-restart", "controller-restart")
REPLY_KINDS = ("nan", "shape", "oversized")
# Beyond this a device would not answer before any deadline: it is down, not slow.
MAX_SLOW_FACTOR = 1000.0
_SPOILED = {
    "nan": "carries NaN weights",
    "shape": "carries an array of the wrong shape",
    "oversized": "is larger than the server accepts",
}
KINDS = CLIENT_KINDS + MESH_KINDS

_ITEM = re.compile(
    r"^(?P<kind>[a-z-]+)"
    r"(?::(?P<client>[A-Za-z0-9_.-]+?)(?:x(?P<factor>[^@+]*))?)?"
    r"@(?P<round>[0-9]+)(?:\+(?P<down>[0-9]+))?$"
)


class FaultSpecError(ValueError):
    """A ``--faults`` spec that cannot be carried out; the message names the item."""


@dataclass(frozen=True)
class Fault:
    """One fault: what, to whom, from or in which round."""

    kind: str
    server_round: int
    client: str | None = None
    factor: float | None = None  # slow: times slower; fail: share of requests
    down_rounds: int = 1  # crash: rounds over before the restart

    def __str__(self) -> str:
        target = f":{self.client}" if self.client else ""
        factor = f"x{self.factor:g}" if self.factor is not None else ""
        down = f"+{self.down_rounds}" if self.kind == "crash" else ""
        return f"{self.kind}{target}{factor}@{self.server_round}{down}"


def parse(spec: str, clients: Sequence[str], rounds: int) -> tuple[Fault, ...]:
    """The faults of ``spec``; raises :class:`FaultSpecError` naming the bad item."""
    if not spec.strip():
        return ()
    faults = []
    for position, item in enumerate(part.strip() for part in spec.split(",")):
        if not item:
            raise FaultSpecError(f"--faults item {position + 1} is empty")
        faults.append(_parse_item(item, clients, rounds))
    _check_unique(faults)
    return tuple(faults)


def _parse_item(item: str, clients: Sequence[str], rounds: int) -> Fault:
    def bad(message: str) -> FaultSpecError:
        return FaultSpecError(f"--faults item {item!r}: {message}")

    match = _ITEM.match(item)
    if match is None:
        raise bad(
            "expected KIND:CLIENT@ROUND (crash may add +ROUNDS, slow and fail "
            "need xFACTOR) or envoy-restart@ROUND / controller-restart@ROUND"
        )
    kind, client = match["kind"], match["client"]
    if kind not in KINDS:
        raise bad(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    server_round = int(match["round"])
    if not 1 <= server_round <= rounds:
        raise bad(f"round {server_round} is not between 1 and --rounds ({rounds})")
    if kind in MESH_KINDS:
        if client is not None or match["down"] is not None:
            raise bad(f"{kind} takes only a round: {kind}@ROUND")
        return Fault(kind, server_round)
    if client is None:
        raise bad(f"{kind} needs a client: {kind}:CLIENT@ROUND")
    if client not in clients:
        raise bad(f"no client {client!r}; the run has {clients[0]} to {clients[-1]}")
    if match["down"] is not None and kind != "crash":
        raise bad("only crash takes +ROUNDS")
    factor = _factor(kind, match["factor"], bad)
    down = int(match["down"]) if match["down"] is not None else 1
    if down < 1:
        raise bad("a crashed client stays down at least one round (+1)")
    return Fault(kind, server_round, client, factor, down)


def _factor(
    kind: str, text: str | None, bad: Callable[[str], FaultSpecError]
) -> float | None:
    """The xFACTOR of slow and fail, checked; None for every other kind."""
    if kind not in ("slow", "fail"):
        if text is not None:
            raise bad(f"{kind} takes no xFACTOR")
        return None
    if text is None:
        raise bad(
            f"{kind} needs xFACTOR, e.g. {kind}:c-01x{4 if kind == 'slow' else 0.5}@2"
        )
    try:
        factor = float(text)
    except ValueError:
        raise bad(f"factor {text!r} is not a number") from None
    if kind == "slow" and not 1 <= factor <= MAX_SLOW_FACTOR:
        raise bad(
            f"a slow device is 1x to {MAX_SLOW_FACTOR:g}x slower, not {factor:g}x"
        )
    if kind == "fail" and not 0 < factor <= 1:
        raise bad(f"the share of failed requests must be in (0, 1], not {factor:g}")
    return factor


def _check_unique(faults: Sequence[Fault]) -> None:
    """A client takes one fault of each family; the mesh one fault per round."""
    seen: dict[tuple, Fault] = {}
    for fault in faults:
        family = "reply" if fault.kind in REPLY_KINDS else fault.kind
        key = (
            (family, fault.client) if fault.client else (fault.kind, fault.server_round)
        )
        if key in seen:
            raise FaultSpecError(
                f"--faults items {str(seen[key])!r} and {str(fault)!r} overlap: "
                "one crash, one slow-down, one failure rate and one bad reply per "
                "client, one restart of each kind per round"
            )
        seen[key] = fault


def node_config(
    faults: Sequence[Fault], client: str, oversized_bytes: int
) -> dict[str, float | int | str]:
    """The node config keys that carry ``client``'s faults to the FLUIDS app."""
    config: dict[str, float | int | str] = {}
    for fault in faults:
        if fault.client != client:
            continue
        if fault.kind == "crash":
            config["crash-in-round"] = fault.server_round
        elif fault.kind == "slow":
            config["slow-factor"] = fault.factor
            config["slow-from-round"] = fault.server_round
        elif fault.kind == "fail":
            config["fail-rate"] = fault.factor
            config["fail-from-round"] = fault.server_round
        else:
            config["reply-fault"] = fault.kind
            config["reply-fault-round"] = fault.server_round
            if fault.kind == "oversized":
                config["oversized-bytes"] = oversized_bytes
    return config


@dataclass(frozen=True)
class FaultActions:
    """What the run can do to its own processes."""

    kill_client: Callable[[str], None]
    restart_client: Callable[[str], None]
    restart_envoy: Callable[[], None]
    restart_controller: Callable[[], None]


class FaultInjector:
    """Carries out the faults that the run, not a client, must cause.

    ``armed`` is called once a round's routes are in place, ``settle`` before
    its training replies are reported and ``evaluated`` once it is over.  A
    restart of Envoy or the controller starts ``mid_round_s`` after the round
    was armed, while its training requests are in flight, and ``settle``
    waits for it: the restart always falls inside the round it names.
    """

    def __init__(
        self,
        faults: Sequence[Fault],
        actions: FaultActions,
        *,
        mid_round_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.faults = tuple(faults)
        self._actions = actions
        self._mid_round_s = mid_round_s
        self._clock = clock
        self._started = clock()
        self._pending: dict[int, list[Future[None]]] = {}
        # One thread for every restart, alive for the whole run: a process
        # started by a thread is stopped when that thread ends (see
        # meshctl.localmesh.processes), and a restarted Envoy must live on.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faults")
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self.events: list[dict] = []

    def armed(self, server_round: int, routed: Collection[str]) -> None:
        """Start the faults of ``server_round`` that follow its arming."""
        for fault in self._of_round(server_round):
            if fault.kind == "crash" and fault.client not in routed:
                self._act(
                    fault,
                    f"{fault.client} trains no slot this round: killed now",
                    lambda f=fault: self._actions.kill_client(f.client),
                )
            elif fault.kind == "crash":
                self._record(fault, f"{fault.client} crashes halfway through training")
            elif fault.kind in MESH_KINDS:
                self._start_timer(server_round, fault)
            elif fault.kind == "slow":
                self._record(
                    fault, f"{fault.client} computes {fault.factor:g}x slower from now"
                )
            elif fault.kind == "fail":
                self._record(
                    fault,
                    f"{fault.client} fails {fault.factor:.0%} of its requests from now",
                )
            elif fault.kind in REPLY_KINDS:
                self._record(fault, f"{fault.client}'s reply {_SPOILED[fault.kind]}")

    def settle(self, server_round: int) -> None:
        """Wait for the restarts of ``server_round`` to be over."""
        for future in self._pending.pop(server_round, []):
            future.result()

    def evaluated(self, server_round: int) -> None:
        """Restart the crashed clients whose time down is over."""
        self.settle(server_round)
        for fault in self.faults:
            if fault.kind == "crash" and fault.server_round + fault.down_rounds == (
                server_round
            ):
                self._act(
                    fault,
                    f"{fault.client} restarted after {fault.down_rounds} round(s) down",
                    lambda f=fault: self._actions.restart_client(f.client),
                )

    def close(self) -> None:
        """Stop the restart thread; a restart not yet due is dropped.

        A run that ends normally has settled every round already; one that is
        interrupted must not restart what it is about to stop.
        """
        self._closing.set()
        self._worker.shutdown(wait=True, cancel_futures=True)
        self._pending.clear()

    def _of_round(self, server_round: int) -> list[Fault]:
        return [f for f in self.faults if f.server_round == server_round]

    def _start_timer(self, server_round: int, fault: Fault) -> None:
        action = (
            self._actions.restart_envoy
            if fault.kind == "envoy-restart"
            else self._actions.restart_controller
        )
        name = "Envoy" if fault.kind == "envoy-restart" else "the controller"
        due = self._clock() + self._mid_round_s

        def later() -> None:
            if self._closing.wait(max(0.0, due - self._clock())):
                return  # the run is ending
            self._act(fault, f"{name} restarted in the middle of the round", action)

        future = self._worker.submit(later)
        self._pending.setdefault(server_round, []).append(future)

    def _act(self, fault: Fault, what: str, action: Callable[[], None]) -> None:
        """Carry out one fault; a fault that fails to land is logged, not raised."""
        started = self._clock()
        try:
            action()
        except Exception as exc:  # the run goes on; the report says what happened
            log.error("fault %s: %s failed: %s", fault, what, exc)
            self._record(fault, f"{what}: FAILED ({exc})", started)
            return
        self._record(fault, what, started)

    def _record(self, fault: Fault, what: str, started: float | None = None) -> None:
        now = self._clock()
        started = now if started is None else started
        event = {
            "fault": str(fault),
            "round": fault.server_round,
            "at_s": round(started - self._started, 3),
            "took_s": round(now - started, 3),
            "what": what,
        }
        with self._lock:
            self.events.append(event)
        log.warning("fault %s (round %d): %s", fault, fault.server_round, what)
