"""Simulated flashrun agents: many per process, each speaking the real gRPC protocol to a real coordinator.

Each simulated agent joins like `flashrun` does (flashrun.agent.protocol builds every message and paces the node
summaries, exactly as in the real agent), pretends to own --nproc ranks that complete a step every --step-s seconds,
and answers the coordinator's commands like a real agent: StartWorkers starts its ranks, Recover moves them to the new
generation (a Recover for a generation the agent is already in is a duplicate and ignored), Shutdown ends it.

With --store, each agent also opens its connections to the coordinator's TCPStore when its ranks start, and one more
on which it watches for the next generation's notice (flashrun/agent/generation_notice.py); its summaries say
`watching` from then on. An in-place recovery then reaches it as the notice, not as a Recover: unless its node is one
of the notice's direct nodes (those ignore it and get a Recover), the agent acknowledges the notice on the store, runs
the new generation's barrier, and only then reports the generation (an urgent summary): the recovery costs no gRPC
message until then (regular summaries go on). The barrier is the real one, as a real agent runs it once all of its
ranks arrived (flashrun/agent/node_barrier.py): one arrival and one blocking wait per node
(flashrun/agent/store_barrier.py). Without --store an agent does not watch: every recovery reaches it as a Recover.

Used by scripts/bench_scale.py. Control lines on stdin: `silence NODE` (the agent stops summarising, watching and
acting on messages but keeps its stream open: a frozen node), `drop NODE` (the agent's stream breaks: a dead node).
Every observation is one JSON line on stdout: {"event": "started"|"silenced"|"noticed"|"rebuilt"|..., "ts": unix
time, ...} ("noticed": one per batch of notices a simulator process handed its agents).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import random
import resource
import sys
import threading
import time
from typing import Any, NamedTuple

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flashrun._proto import flashrun_pb2 as pb  # noqa: E402
from flashrun._proto import flashrun_pb2_grpc as pb_grpc  # noqa: E402
from flashrun.agent import generation_notice, store_barrier  # noqa: E402
from flashrun.agent.protocol import (  # noqa: E402
    SummaryPacer,
    channel_options,
    join_message,
    stopped_message,
    summary_message,
)

FAKE_PID_BASE = 10_000_000
"""Simulated ranks' PIDs: far above real ones, unique per rank."""
CONNECT_CONCURRENCY = 64
"""Connections a simulator process opens at once: thousands of simultaneous SYNs overflow the listen backlog, and
the connections that lose out sit in TCP's and gRPC's reconnect backoff for tens of seconds."""
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
"""One TCP connection per simulated agent, as real agents on separate hosts have (gRPC would share one otherwise)."""


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "ts": time.time(), **fields}), flush=True)


STORE_THREADS = 4
"""Threads per simulator process that open the agents' store connections."""
WATCH_TIMEOUT_S = 30.0
"""How long the watch thread blocks on one agent's watcher for the next notice before it looks again at which
agents watch which generation (a timed-out get costs the store server a CANCEL_WAIT, and torch two warnings)."""


class StoreEntry(NamedTuple):
    """One agent's store work for a generation, done on the arrivals thread in this order."""

    agent: SimulatedAgent
    generation: int
    acks_expected: int | None
    """Acknowledge the generation's notice first (None: told by a Recover message, nothing to acknowledge)."""
    released: asyncio.Future[bytes] | None
    """Arrive at the generation's barrier; the future gets the release (None: only acknowledge)."""


class StorePools:
    """The store work of a simulator process's agents, off the event loop.

    Each agent's store operations are its own, on its own three connections, but they run in batches on three threads
    per process (notices, arrivals, then waits), and each batch hands its results on at once. A handoff per agent (two
    thread switches and GIL round trips each, for thousands of agents in one process) was the largest cost of a
    simulated recovery; real agents, each on its own machine, do not share it.
    Arrivals and waits have a thread each because a wait blocks until every node arrived: arrivals must never queue
    behind it. Watching has its own because its get blocks until the coordinator publishes the next notice.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, deadline_s: float) -> None:
        self.connects = concurrent.futures.ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="sim-connect")
        self._loop = loop
        self._deadline_s = deadline_s
        self._arrivals: queue.SimpleQueue[list[StoreEntry]] = queue.SimpleQueue()
        self._waits: queue.SimpleQueue[
            list[tuple[store_barrier.GenerationBarrier, asyncio.Future[bytes]]]] = queue.SimpleQueue()
        self._watched: list[SimulatedAgent] = []
        """The agents with a watcher connection, in the order they got it (appended on the loop)."""
        self._newly_watched = threading.Event()
        threading.Thread(target=self._arrive, name="sim-arrive", daemon=True).start()
        threading.Thread(target=self._wait, name="sim-wait", daemon=True).start()
        threading.Thread(target=self._watch, name="sim-watch", daemon=True).start()

    def barrier(self, agent: SimulatedAgent, generation: int) -> asyncio.Future[bytes]:
        """The agent's arrival at `generation`'s barrier; the future gets the release."""
        released: asyncio.Future[bytes] = self._loop.create_future()
        self._arrivals.put([StoreEntry(agent, generation, None, released)])
        return released

    def watch(self, agent: SimulatedAgent) -> None:
        """From now on the watch thread waits for the agent's next notice on its watcher connection."""
        self._watched.append(agent)
        self._newly_watched.set()

    @staticmethod
    def _drain(first: Any, pending: queue.SimpleQueue[Any]) -> list[Any]:
        batch = [first]
        with contextlib.suppress(queue.Empty):
            while True:
                batch.append(pending.get_nowait())
        return batch

    def _watch(self) -> None:
        """Each watching agent's own blocking get of its next generation's notice, on its own watcher connection.

        The agents of a process are in one generation but for moments in a recovery (a notice being handed over, a
        direct node told by a Recover first), so they watch in groups by the generation after theirs. The first get
        of a group blocks until the coordinator publishes its notice; the rest of the group's find the key there, and
        the whole group's notices go to the event loop as one batch.
        """
        while True:
            watching = [agent for agent in self._watched if agent.watchable]
            if not watching:
                self._newly_watched.wait()
                self._newly_watched.clear()
                continue
            for generation in sorted({agent.next_notice for agent in watching}):
                first = next(agent for agent in watching if agent.next_notice == generation)
                notice = self._await_notice(first, generation)
                if notice is None:
                    continue  # not yet published (or this agent's watcher failed): look at the next group
                noticed = [(first, notice, time.time())]
                for agent in self._watched:  # agents that started watching meanwhile are in the group too
                    if agent is not first and agent.watchable and agent.next_notice == generation \
                            and (own := self._await_notice(agent, generation)) is not None:
                        noticed.append((agent, own, time.time()))
                for agent, _, _ in noticed:
                    agent.noticed = generation
                self._loop.call_soon_threadsafe(self._noticed, generation, noticed)
                break  # the group moved on: regroup

    @staticmethod
    def _await_notice(agent: SimulatedAgent, generation: int) -> pb.GenerationNotice | None:
        try:
            return generation_notice.await_notice(agent.watcher, generation, WATCH_TIMEOUT_S, agent.shard_index,
                                                  agent.shards)
        except Exception as err:  # noqa: BLE001 - this agent stops watching; the simulator goes on
            agent.watch_failed = True
            print(f"agent {agent.index}: watching generation {generation} failed: {err}", file=sys.stderr, flush=True)
            return None

    def _noticed(self, generation: int, noticed: list[tuple[SimulatedAgent, pb.GenerationNotice, float]]) -> None:
        """On the loop: each agent acts on its notice; the store work of those that do goes to the store threads as
        one batch."""
        entries, rebuilds, ignored = [], [], 0
        for agent, notice, received in noticed:
            if not agent.watchable or generation_notice.respawn_for(notice, agent.node_rank) is None:
                ignored += 1  # a direct node (told by a Recover, or shut down), or a frozen or dropped node
                continue
            if notice.generation > agent.generation:
                agent.generation = notice.generation  # the placement stays: a notice moves no node
                released: asyncio.Future[bytes] = self._loop.create_future()
                entries.append(StoreEntry(agent, notice.generation, notice.acks_expected, released))
                rebuilds.append((agent, received, released))
            else:  # a Recover message came first: the coordinator still counts the acknowledgement
                entries.append(StoreEntry(agent, notice.generation, notice.acks_expected, None))
        if entries:
            self._arrivals.put(entries)
        for agent, received, released in rebuilds:
            agent.rebuild(generation, received, released)
        emit("noticed", generation=generation, agents=len(noticed), rebuilding=len(rebuilds),
             acknowledged_only=len(entries) - len(rebuilds), ignored=ignored)

    def _arrive(self) -> None:
        while True:
            batch = [entry for entries in self._drain(self._arrivals.get(), self._arrivals) for entry in entries]
            arrived, failed = [], []
            for agent, generation, acks_expected, released in batch:
                try:
                    if acks_expected is not None:
                        agent.acknowledge(generation, acks_expected)
                    if released is not None:
                        arrived.append((agent.arrive(generation), released))
                except Exception as err:  # noqa: BLE001 - reported as this agent's outcome; the simulator goes on
                    if released is not None:
                        failed.append((released, f"failed: {err}".encode()))
                    print(f"agent {agent.index}: generation {generation}: store failed: {err}", file=sys.stderr,
                          flush=True)
            if failed:
                self._loop.call_soon_threadsafe(self._resolve, failed)
            if arrived:
                self._waits.put(arrived)

    def _wait(self) -> None:
        while True:
            batches = self._drain(self._waits.get(), self._waits)
            # The first wait blocks until the release; the rest of the generation's find it there. A sharded job's
            # leaders first pass their shards up to the root, all of them (a root release needs every shard's), then
            # copy the root's release to their shards, which the other agents wait for.
            waits = sorted((pair for batch in batches for pair in batch),
                           key=lambda pair: not (pair[0].shard and pair[0].shard.leads))
            failed = {id(barrier): outcome for barrier, _ in waits if (outcome := self._pass_up(barrier))}
            done = [(released, failed.get(id(barrier)) or self._await(barrier)) for barrier, released in waits]
            self._loop.call_soon_threadsafe(self._resolve, done)

    def _pass_up(self, barrier: store_barrier.GenerationBarrier) -> bytes:
        try:
            barrier.pass_up(self._deadline_s)
        except Exception as err:  # noqa: BLE001 - reported as this agent's outcome; the simulator goes on
            print(f"generation {barrier.generation}: passing the shard up failed: {err}", file=sys.stderr, flush=True)
            return f"failed: {err}".encode()
        return b""

    def _await(self, barrier: store_barrier.GenerationBarrier) -> bytes:
        try:
            return barrier.await_release(self._deadline_s)
        except Exception as err:  # noqa: BLE001 - reported as this agent's outcome; the simulator goes on
            print(f"generation {barrier.generation}: barrier wait failed: {err}", file=sys.stderr, flush=True)
            return f"failed: {err}".encode()

    @staticmethod
    def _resolve(done: list[tuple[asyncio.Future[bytes], bytes]]) -> None:
        for released, outcome in done:
            if not released.done():
                released.set_result(outcome)


class SimulatedAgent:
    def __init__(self, index: int, args: argparse.Namespace, pools: StorePools | None,
                 connecting: asyncio.Semaphore) -> None:
        self.index = index
        self.connecting = connecting
        self.args = args
        self.agent_id = f"sim-{args.host_prefix}-{index}"
        self.pacer = SummaryPacer()
        self.generation = -1
        """The generation the coordinator put this agent in (its summaries say it)."""
        self.rank_generation = 0
        """The generation the simulated ranks' process group belongs to (0, as a worker reports, before any)."""
        self.node_rank = -1
        self.rank_offset = 0
        self.world_size = 0
        self.nnodes = 0
        self.store_port = 0
        """The job's store (the root of a sharded one)."""
        self.shard_port = 0
        """The agent's shard of the store (the job's store when unsharded)."""
        self.shard_index, self.shards, self.shard_nodes, self.leads = 0, 1, 0, False
        self.root: Any = None
        """A shard's leader: its two connections to the root store."""
        self.silent = False
        self.active = False
        self.urgent = asyncio.Event()
        self.call: Any = None
        self.store: Any = None
        """The agent's two store connections (arrivals and acknowledgements, then the barrier's blocking wait)."""
        self.watcher: Any = None
        """The agent's third store connection, for the blocking get of the next generation's notice."""
        self.watching = False
        """The watch thread has this agent (its summaries say so: the coordinator may send it notices)."""
        self.noticed = -1
        """The latest generation whose notice the watch thread got for this agent (written by that thread only)."""
        self.watch_failed = False
        self._pools = pools
        self._summaries: asyncio.Task[None] | None = None
        self._rebuilding: asyncio.Task[None] | None = None

    @property
    def watchable(self) -> bool:
        """Whether the agent acts on notices: a frozen (`silence`) or dropped node no longer does anything."""
        return self.watching and self.active and not self.silent and not self.watch_failed

    @property
    def next_notice(self) -> int:
        """The generation whose notice the agent waits for: the one after both its own and the last one noticed."""
        return max(self.generation, self.noticed) + 1

    async def run(self, endpoint: str) -> None:
        options = channel_options() + ([] if self.args.shared_connection else CHANNEL_OPTIONS)
        async with grpc.aio.insecure_channel(endpoint, options=options) as channel:
            async with self.connecting:  # real agents start at different moments, not in one SYN burst
                await channel.channel_ready()  # as the real agent, wait for a coordinator that is still starting
            self.call = pb_grpc.CoordinatorStub(channel).Connect()
            self.active = True
            await self.call.write(join_message(self.args.run_id, self.args.token, None,
                                               f"{self.args.host_prefix}-{self.index}", self.args.nproc,
                                               self.agent_id))
            emit("joining", agent=self.index)
            try:
                async for message in self.call:
                    if await self._handle(message):
                        break
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.CANCELLED:
                    emit("stream_error", agent=self.index, detail=str(err.details()))
            except asyncio.CancelledError:
                pass  # dropped on purpose (`drop NODE`)
            finally:
                self.active = False
                if self._summaries is not None:
                    self._summaries.cancel()

    async def _handle(self, message: pb.CoordinatorMessage) -> bool:
        if self.silent:
            # A frozen node acts on nothing, the Shutdown that follows its replacement included. (Acting on it closed
            # the agent's channel in this process's event loop just as the notice arrived, and held up this
            # process's other agents by about 15 ms: 21-28 ms recoveries at 8 nodes instead of 6-8 ms.)
            return False
        kind = message.WhichOneof("body")
        if kind == "start":
            self._place(message.start)
            if self.args.store:
                assert self._pools is not None
                await asyncio.get_running_loop().run_in_executor(self._pools.connects, self._connect_all)
                self._watch()
            self.rank_generation = self.generation
            emit("started", agent=self.index, node=self.node_rank, generation=self.generation)
            if self._summaries is None:
                self._summaries = asyncio.get_running_loop().create_task(self._summarise())
            self.urgent.set()
        elif kind == "recover":
            received = time.time()
            if message.recover.generation <= self.generation:
                return False  # a duplicate: the agent moved to that generation on its notice first
            self._place(message.recover.placement)
            if self._summaries is None:  # a spare taking over a lost node
                self._summaries = asyncio.get_running_loop().create_task(self._summarise())
            self.urgent.set()  # acknowledges the new generation, as the real agent's summary after a Recover does
            self.rebuild(self.generation, received)
        elif kind == "stop":
            await self.call.write(stopped_message(message.stop.generation))
        elif kind == "shutdown":
            return True
        elif kind == "rejected":
            emit("rejected", agent=self.index, reason=message.rejected.reason)
            return True
        elif kind == "spare":
            emit("spare", agent=self.index)
        return False

    def _place(self, placement: pb.StartWorkers) -> None:
        self.generation = placement.generation
        self.node_rank = placement.node_rank
        self.rank_offset = placement.rank_offset
        self.world_size = placement.world_size
        self.nnodes = placement.nnodes
        self.store_port = placement.master_port
        self.shards = store_barrier.shard_count(placement.nnodes, placement.nodes_per_shard)
        self.shard_index, self.shard_nodes = store_barrier.shard_of(placement.node_rank, placement.nnodes,
                                                                    placement.nodes_per_shard)
        self.shard_port = placement.control_port or placement.master_port
        self.leads = store_barrier.leads_shard(placement.node_rank, placement.nnodes, placement.nodes_per_shard)
        self.pacer.configure(placement.detection)

    def rebuild(self, generation: int, received: float, released: asyncio.Future[bytes] | None = None) -> None:
        """Move the ranks to `generation` (told at `received`); `released`: the barrier's release, when the store
        threads already have the agent's arrival (a notice), else the agent arrives now (a Recover)."""
        self._rebuilding = asyncio.get_running_loop().create_task(self._rebuild(generation, received, released))

    async def _rebuild(self, generation: int, received: float, released: asyncio.Future[bytes] | None) -> None:
        """The ranks' side of a recovery: the new generation's barrier, then report that generation."""
        if self.args.store:
            assert self._pools is not None
            if await (released or self._pools.barrier(self, generation)) != store_barrier.COMPLETE:
                emit("barrier_not_complete", agent=self.index, generation=generation)
                return
        if generation == self.generation:
            self.rank_generation = generation
            self.urgent.set()
        emit("rebuilt", agent=self.index, generation=generation, received=received)
        if self.args.store and not self.watching:  # a spare that took over: it watches from now on
            assert self._pools is not None
            await asyncio.get_running_loop().run_in_executor(self._pools.connects, self._connect_watcher)
            self._watch()

    def _connect_all(self) -> None:
        self._connect_store()
        self._connect_watcher()

    def _connect_store(self) -> None:
        """The agent's two store connections, opened when its ranks start, as a real agent's are: the store server
        accepts connections one at a time (with a reverse DNS lookup each, in torch 2.13)."""
        self.store = store_barrier.connect(self.args.store_host, self.shard_port, self.args.rendezvous_deadline_s)
        if self.leads:
            self.root = self.store if self.shard_port == self.store_port else \
                store_barrier.connect(self.args.store_host, self.store_port, self.args.rendezvous_deadline_s)

    def _connect_watcher(self) -> None:
        """The watcher connection: with the others when the ranks start; a spare that takes over opens it once its
        barrier was released (the Recover told it where the store is; the store server accepts connections one at a
        time, and a third one before its arrival would hold the barrier up)."""
        self.watcher = store_barrier.connect_one(self.args.store_host, self.shard_port,
                                                     self.args.rendezvous_deadline_s)

    def _watch(self) -> None:
        if not self.watching:
            assert self._pools is not None
            self.watching = True
            self._pools.watch(self)

    def shard(self) -> store_barrier.Shard | None:
        """Where the agent arrives beyond its shard (None: unsharded)."""
        if self.shards == 1:
            return None
        return store_barrier.Shard(self.shard_index, self.shards, *(self.root if self.leads else ()))

    def acknowledge(self, generation: int, expected: int) -> None:
        """The agent acted on `generation`'s notice (on its first store connection: the waiter's may be blocked)."""
        generation_notice.acknowledge(self.store[0], generation, expected, self.shard_index, self.shards)

    def arrive(self, generation: int) -> store_barrier.GenerationBarrier:
        """The node's arrival at the job-wide barrier, made once all of its simulated ranks arrived (at once: they
        are simulated). The local hop of real ranks to their agent is not simulated."""
        if self.store is None:
            self._connect_store()
        barrier = store_barrier.GenerationBarrier(*self.store, generation, self.shard_nodes, self.shard())
        barrier.arrive()
        return barrier

    async def _summarise(self) -> None:
        while True:
            try:
                # Simulated workers never fall silent, so there is nothing to look for between regular summaries.
                await asyncio.wait_for(self.urgent.wait(), self.pacer.due_in_s(time.monotonic()))
                urgent = True
            except asyncio.TimeoutError:
                urgent = False
            self.urgent.clear()
            if self.silent:
                # A frozen node: nothing leaves it from here on. (Looping on instead spun this process's event loop,
                # the pacer being past due forever, and slowed every other agent it simulates.)
                return
            now = time.monotonic()
            ages = {FAKE_PID_BASE + self.rank_offset + local: random.uniform(0, self.pacer.heartbeat_interval_s)
                    for local in range(self.args.nproc)}
            if not self.pacer.should_send(now, urgent, ages):
                continue
            # A data-parallel job steps in lockstep (its collectives couple the ranks): every simulated rank counts
            # from the one epoch, so agents that joined seconds apart do not look like stragglers.
            step = int((time.time() - self.args.epoch) / self.args.step_s) - 1
            ranks = [
                pb.RankProgress(local_rank=local, pid=pid, step=step, heartbeat_age_s=age,
                                generation=self.rank_generation, recoverable=True)
                for local, (pid, age) in enumerate(ages.items())
            ]
            await self.call.write(summary_message(self.generation, ranks, watching=self.watching))


async def control(agents: dict[int, SimulatedAgent]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError):
        return  # stdin is not a pipe (e.g. /dev/null): no control lines
    while line := await reader.readline():
        command, _, node_text = line.decode().strip().partition(" ")
        target = next((a for a in agents.values() if a.active and a.node_rank == int(node_text or -1)), None)
        if target is None:
            continue  # another simulator process runs that node
        if command == "silence":
            target.silent = True
            emit("silenced", agent=target.index, node=target.node_rank)
        elif command == "drop":
            emit("dropped", agent=target.index, node=target.node_rank)
            target.call.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--endpoint", required=True, help="HOST:PORT of the coordinator")
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--token", default=os.environ.get("FLASHRUN_TOKEN", ""))
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--first", type=int, default=0, help="index of this process's first agent")
    parser.add_argument("--host-prefix", default="sim")
    parser.add_argument("--nproc", type=int, default=8, help="ranks each simulated agent owns")
    parser.add_argument("--step-s", type=float, default=0.1, help="simulated step time")
    parser.add_argument("--epoch", type=float, default=None,
                        help="Unix time of the job's step 0, shared by the simulator processes (default: now)")
    parser.add_argument("--shared-connection", action="store_true",
                        help="the agents of this process share one TCP connection, each on its own stream (default: "
                             "a connection per agent, as on separate hosts)")
    parser.add_argument("--store", action="store_true", help="run the ranks' store rendezvous on each recovery")
    parser.add_argument("--store-host", default="127.0.0.1")
    parser.add_argument("--rendezvous-deadline-s", type=float, default=60.0)
    args = parser.parse_args()
    if args.epoch is None:
        args.epoch = time.time()
    if args.store:
        import torch.distributed  # noqa: F401 - imported now, as a worker has before any recovery, not mid-recovery
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pool = StorePools(asyncio.get_running_loop(), args.rendezvous_deadline_s) if args.store else None
    connecting = asyncio.Semaphore(CONNECT_CONCURRENCY)
    agents = {i: SimulatedAgent(i, args, pool, connecting) for i in range(args.first, args.first + args.agents)}
    controller = asyncio.get_running_loop().create_task(control(agents))  # referenced: tasks are weakly held
    await asyncio.gather(*(agent.run(args.endpoint) for agent in agents.values()), return_exceptions=True)
    controller.cancel()
    emit("finished", agents=len(agents))
    os._exit(0)  # store connections and executor threads need no orderly teardown


if __name__ == "__main__":
    asyncio.run(main())
