"""The node's side of a generation's barrier: the workers arrive at their agent, the agent arrives once for the node.

Every rank of a new generation must have left the old process group before any rank enters the new one's gloo
rendezvous (which cannot be aborted). Each worker reports its arrival on its agent link; once all of the node's
local ranks arrived, the agent arrives at the job-wide store barrier (flashrun/agent/store_barrier.py) for all of
them and relays the outcome to each. So the store server sees one participant per node, not per rank: O(nodes)
operations per generation instead of O(ranks).

The rule that keeps every rank's outcome the same: a node whose arrival at the store was decided takes the store's
outcome, whatever happens locally (a newer generation only releases the store barrier as superseded, which wins only
if it comes first). A node that had not decided to arrive never will, and answers its ranks "superseded" itself:
without its arrival the barrier cannot complete anywhere.

`NodeArrivals` decides (pure); `NodeBarrier` carries the decisions out on the store, on two threads of its own. A
third thread, on a third connection, watches the store for the next generation's notice (agent/generation_notice.py)
and acknowledges the notices the agent acted on. In a sharded job (store_barrier.py) these three connections go to
the node's shard; a shard's leader opens two more, to the root store, and passes its shard on to the root on its
wait thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from flashrun._proto import flashrun_pb2 as pb
from flashrun.agent import generation_notice, store_barrier
from flashrun.config import GENERATION_BARRIER_S

COMPLETE = store_barrier.COMPLETE.decode()
SUPERSEDED = store_barrier.SUPERSEDED.decode()
TIMEOUT = "timeout"
ERROR = "error"
OUTCOMES_KEPT = 8
"""Resolved generations whose outcome is kept for a worker that asks again (only the latest ever are)."""
STORE_CONNECT_TIMEOUT_S = 60.0
"""How long the agent's store connections wait for the coordinator's store server (and for each operation)."""
NOTICE_WAIT_S = 3600.0
"""A watch's blocking get for the next notice is renewed this often: a timed-out get logs warnings and costs reverse
DNS lookups (store_barrier.py), so not often; nothing is missed meanwhile, the key stays."""


@dataclasses.dataclass(frozen=True)
class Release:
    """Tell these workers (by PID) the outcome of `generation`'s barrier."""

    pids: tuple[int, ...]
    generation: int
    outcome: str
    detail: str = ""


@dataclasses.dataclass
class Decision:
    releases: list[Release] = dataclasses.field(default_factory=list)
    arrive: int | None = None
    """Arrive at this generation's store barrier for the node."""
    supersede: list[int] = dataclasses.field(default_factory=list)
    """Release these generations' store barriers as superseded (each was arrived at and is unresolved)."""


class StoreLocation(NamedTuple):
    """Where a node's barrier lives: the job's store, and the node's shard of it (agent/store_barrier.py)."""

    host: str
    port: int
    """The job's store (the root, when sharded)."""
    shard_port: int
    """The node's shard's store (the job's when unsharded)."""
    shard: int
    shards: int
    leads: bool
    """The node leads its shard: it passes the shard on to the root."""


class NodeArrivals:
    """Which local ranks are waiting at which generation, and what to do next. Pure: no clock, no I/O."""

    def __init__(self, local_world_size: int) -> None:
        self.local_world_size = local_world_size
        self._waiting: dict[int, dict[int, int]] = {}
        """generation -> {local rank: PID} of the workers waiting at it."""
        self._arrived: set[int] = set()
        """Generations this node decided to arrive at in the store, still unresolved."""
        self._superseded_below = 0
        self._outcomes: dict[int, tuple[str, str]] = {}

    def arrive(self, local_rank: int, pid: int, generation: int, current: Mapping[int, int]) -> Decision:
        """Worker `pid` (local rank `local_rank`) waits at `generation`; `current` is the node's live worker PID per
        local rank. The node arrives once every local rank's current worker waits at the same generation."""
        decision = Decision()
        if generation in self._outcomes:
            outcome, detail = self._outcomes[generation]
            decision.releases.append(Release((pid,), generation, outcome, detail))
            return decision
        if generation < self._superseded_below and generation not in self._arrived:
            self._resolve(generation, SUPERSEDED, "", decision, extra=(pid,))
            return decision
        waiting = self._waiting.setdefault(generation, {})
        waiting[local_rank] = pid
        if generation not in self._arrived and len(current) == self.local_world_size \
                and all(waiting.get(rank) == worker for rank, worker in current.items()):
            self._arrived.add(generation)
            decision.arrive = generation
        return decision

    def supersede_below(self, generation: int) -> Decision:
        """The node was put in `generation` (Recover or StartWorkers): older barriers will never be needed."""
        decision = Decision()
        self._superseded_below = max(self._superseded_below, generation)
        for older in sorted(g for g in self._waiting if g < generation):
            if older in self._arrived:
                decision.supersede.append(older)
            else:
                self._resolve(older, SUPERSEDED, "", decision)
        return decision

    def resolved(self, generation: int, outcome: str, detail: str = "") -> Decision:
        """The store barrier of `generation` was released (or failed): tell its waiting workers."""
        decision = Decision()
        self._arrived.discard(generation)
        self._resolve(generation, outcome, detail, decision)
        return decision

    def _resolve(self, generation: int, outcome: str, detail: str, decision: Decision,
                 extra: tuple[int, ...] = ()) -> None:
        pids = tuple(sorted(set(self._waiting.pop(generation, {}).values()) | set(extra)))
        if pids:
            decision.releases.append(Release(pids, generation, outcome, detail))
        self._outcomes[generation] = (outcome, detail)
        for old in sorted(self._outcomes)[:-OUTCOMES_KEPT]:
            del self._outcomes[old]


class NodeBarrier:
    """Runs `NodeArrivals`' decisions against the job's store: one thread for connecting, arrivals and releases, one
    for the blocking wait (it holds its connection). torch.distributed is imported and the store connected once a
    worker attaches (`prepare`), so an agent whose workers do not use flashrun's library never imports it."""

    def __init__(self, local_world_size: int, send: Callable[[Release], None],
                 deadline_s: float = GENERATION_BARRIER_S,
                 on_notice: Callable[[pb.GenerationNotice], None] | None = None) -> None:
        """`on_notice`: called (on the watch's thread) with each new generation's notice; without it, no watch."""
        self._state = NodeArrivals(local_world_size)
        self._on_notice = on_notice
        self._generation = -1
        self._watch_id = 0
        """Which watch is current: a store move starts a new one, and the old one's notices are dropped."""
        self._watching = False
        self._send = send
        self._deadline_s = deadline_s
        self._lock = threading.Lock()
        self._store_at: StoreLocation | None = None
        self._nodes = 0
        """The nodes that arrive where this one does (its shard's, when sharded)."""
        self._connected_at = StoreLocation("", 0, 0, 0, 1, False)
        """`_store_at` as of the connections made (on the ops thread)."""
        self._root: tuple[Any, Any] | None = None
        """A shard's leader: two connections to the root store (the job's; None when its shard's is the root)."""
        self._ops: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._waits: queue.SimpleQueue[store_barrier.GenerationBarrier | None] = queue.SimpleQueue()
        self._connections: tuple[Any, Any] | None = None
        self._broken = ""
        self._threads_started = False

    def place(self, host: str, port: int, nodes: int, generation: int, node_rank: int = 0,
              nodes_per_shard: int = 0, shard_port: int = 0) -> None:
        """The node's placement (StartWorkers or Recover): where the job's store is (a full restart moves it), how
        many nodes arrive, the generation the node is in now, and (sharded) the node's shard of the store, whose
        server listens at `shard_port`. Older barriers are superseded on the old store."""
        index, arriving = store_barrier.shard_of(node_rank, nodes, nodes_per_shard)
        shards = store_barrier.shard_count(nodes, nodes_per_shard)
        leads = store_barrier.leads_shard(node_rank, nodes, nodes_per_shard)
        at = StoreLocation(host, port, (shard_port or port) if shards > 1 else port, index, shards, leads)
        with self._lock:
            decision = self._state.supersede_below(generation)
            self._generation = max(self._generation, generation)
            self._nodes = arriving
            moved = at != self._store_at
            self._store_at = at
        self._carry_out(decision)
        if moved:
            self._ops.put(("connect", at))

    def prepare(self) -> None:
        """Connect to the store now (a worker attached: its first barrier is coming)."""
        with self._lock:
            if self._threads_started:
                return
            self._threads_started = True
        threading.Thread(target=self._run_ops, name="flashrun-node-barrier", daemon=True).start()
        threading.Thread(target=self._run_waits, name="flashrun-node-barrier-wait", daemon=True).start()

    def warm(self) -> None:
        """Import the store's client now, in a thread of its own, for a node that may have to pass a barrier at short
        notice (a spare: taking over a lost node, its workers would otherwise wait for the import at their first)."""
        threading.Thread(target=store_barrier.load, name="flashrun-store-import", daemon=True).start()

    def arrive(self, local_rank: int, pid: int, generation: int, current: Mapping[int, int]) -> None:
        self.prepare()
        with self._lock:
            decision = self._state.arrive(local_rank, pid, generation, current)
        self._carry_out(decision)

    @property
    def watching(self) -> bool:
        """A watch waits on the current store for the next generation's notice."""
        return self._watching

    def acknowledge(self, generation: int, expected: int) -> None:
        """The agent acted on `generation`'s notice."""
        self._ops.put(("acknowledge", (generation, expected)))

    def close(self) -> None:
        with self._lock:
            self._watch_id += 1
            self._watching = False
        self._ops.put(None)
        self._waits.put(None)

    def _carry_out(self, decision: Decision) -> None:
        for release in decision.releases:
            self._send(release)
        if decision.arrive is not None:
            self._ops.put(("arrive", decision.arrive))
        for generation in decision.supersede:
            self._ops.put(("supersede", generation))

    def _resolved(self, generation: int, outcome: str, detail: str = "") -> None:
        with self._lock:
            decision = self._state.resolved(generation, outcome, detail)
        self._carry_out(decision)

    def _connect(self, at: StoreLocation) -> None:
        host, port, shard_port = at.host, at.port, at.shard_port
        self._connections, self._root, self._broken = None, None, ""
        self._connected_at = at
        with self._lock:
            self._watch_id += 1
            watch_id = self._watch_id
            self._watching = False
        try:
            self._connections = store_barrier.connect(host, shard_port, STORE_CONNECT_TIMEOUT_S)
            if at.leads and shard_port != port:
                self._root = store_barrier.connect(host, port, STORE_CONNECT_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - any failure to connect ends the same way
            self._connections = None
            self._broken = f"the agent cannot reach the job's store at {host}:{shard_port}: {err}"
            return
        if self._on_notice is not None:
            threading.Thread(target=self._watch, args=(watch_id, host, shard_port, at.shard, at.shards),
                             name="flashrun-notice-watch", daemon=True).start()

    def _shard(self) -> store_barrier.Shard | None:
        """Where this node arrives beyond its shard (None: unsharded, its store is the root)."""
        at = self._connected_at
        if at.shards == 1:
            return None
        if not at.leads:
            return store_barrier.Shard(at.shard, at.shards)
        root = self._root or self._connections
        assert root is not None
        return store_barrier.Shard(at.shard, at.shards, *root)

    def _watch(self, watch_id: int, host: str, port: int, shard: int, shards: int) -> None:
        """Wait for each next generation's notice and hand it to the agent. A store move (full restart) leaves this
        thread blocked on the old store until that store goes away; its notices are not delivered."""
        assert self._on_notice is not None
        try:
            connection = store_barrier.connect_one(host, port, STORE_CONNECT_TIMEOUT_S)
            with self._lock:
                if watch_id != self._watch_id:
                    return
                self._watching = True
                generation = self._generation + 1
            while True:
                notice = generation_notice.await_notice(connection, generation, NOTICE_WAIT_S, shard, shards)
                with self._lock:
                    if watch_id != self._watch_id:
                        return
                    current = self._generation
                if notice is not None:
                    self._on_notice(notice)
                    generation = notice.generation + 1
                generation = max(generation, current + 1)  # the agent may have been told directly meanwhile
        except Exception:  # noqa: BLE001 - no watch: the agent says so in its summaries and gets Recover messages
            with self._lock:
                if watch_id == self._watch_id:
                    self._watching = False

    def _run_ops(self) -> None:
        while (op := self._ops.get()) is not None:
            action, argument = op
            if action == "connect":
                self._connect(argument)
                continue
            if action == "acknowledge":
                if self._connections is not None:
                    at = self._connected_at
                    with contextlib.suppress(Exception):  # unacknowledged, the coordinator sends a Recover instead
                        generation_notice.acknowledge(self._connections[0], *argument, at.shard, at.shards)
                continue
            generation = argument
            if self._connections is None:
                self._resolved(generation, ERROR, self._broken or "the agent has no store to arrive at")
                continue
            barrier = store_barrier.GenerationBarrier(*self._connections, generation, self._nodes, self._shard())
            try:
                if action == "arrive":
                    barrier.arrive()
                    self._waits.put(barrier)
                else:
                    barrier.release(store_barrier.SUPERSEDED)
            except Exception as err:  # noqa: BLE001 - the store server is gone: the generation cannot form
                self._resolved(generation, ERROR, f"the job's store failed: {err}")

    def _run_waits(self) -> None:
        while (barrier := self._waits.get()) is not None:
            try:
                self._resolved(barrier.generation, barrier.await_release(self._deadline_s).decode())
            except TimeoutError as err:
                self._resolved(barrier.generation, TIMEOUT, str(err))
            except Exception as err:  # noqa: BLE001 - the store server is gone: the generation cannot form
                self._resolved(barrier.generation, ERROR, f"the job's store failed: {err}")
