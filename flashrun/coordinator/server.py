"""The coordinator's gRPC shell: feeds agent messages and clock ticks to the pure `Job`, carries out its commands.

It runs on grpc.aio, in one event-loop thread of its own: an agent's stream costs a task, not a thread, so thousands
of nodes fit in one process, and a Recover or Shutdown reaches every agent through concurrent writes. The `Job` is
touched under a lock because `status()` and `abort()` are also called from the launcher's threads.

It also hosts the TCPStore the workers rendezvous on (MASTER_ADDR:MASTER_PORT). Workers under torchrun's agent
store do not prefix their keys by attempt, so every generation gets a fresh store. An in-place recovery keeps the
store and is published there once for the agents that watch it (agent/generation_notice.py); `RecoveryWatch` tells
the job when they acknowledged it and when the new generation's barrier was released. A job of more than
`JobSpec.nodes_per_store_shard` nodes gets more store servers, one per shard of its nodes, for that recovery work
(agent/store_barrier.py); the workers' keys stay on the first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import gc
import hmac
import json
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from flashrun import descriptors
from flashrun._proto import flashrun_pb2 as pb
from flashrun._proto import flashrun_pb2_grpc as pb_grpc
from flashrun.agent import generation_notice, store_barrier
from flashrun.agent.agent import local_agent_id
from flashrun.config import Endpoint
from flashrun.coordinator import job as jobs
from flashrun.coordinator.detector import RankReport
from flashrun.coordinator.recovery_watch import RecoveryWatch
from flashrun.errors import FlashrunError

TICK_INTERVAL_S = 0.05
"""How often deadlines (rendezvous last call, stop acknowledgements) and the failure detector are checked."""
PAUSE_S = 1.0
"""A tick this much later than due means the coordinator itself did not run (stopped, starved, its machine paused):
the job hears of it (Job.paused) before it checks anything, so that no node is taken for lost, and no job for stalled,
because of summaries the coordinator has not read yet."""
START_TIMEOUT_S = 30.0
"""How long starting or stopping the event loop's gRPC server may take."""
RECENT_EVENTS = 20
"""Events kept for the status snapshot (the live view's event list)."""
STATUS_CACHE_S = 0.2
"""A status snapshot is reused this long: many viewers polling a large job cost one snapshot per period."""

SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),  # two coordinators on one port must fail, not share it
    # Every agent opens its stream within moments of the others: gRPC's default of 1,000 calls waiting to be
    # dispatched (3,000 at most) would leave the rest of a large job unanswered.
    ("grpc.server.max_pending_requests", 1 << 20),
    ("grpc.server.max_pending_requests_hard_limit", 1 << 20),
    # Agents ping every COORDINATOR_PING_INTERVAL_S to learn that the coordinator's host is gone
    # (agent/protocol.py:channel_options); gRPC would hang up on a client that pings more than every 5 minutes.
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]

GC_THRESHOLDS = (5_000, 20, 1_000)
"""The cyclic collector's generation thresholds (Python's default: 700, 10, 10). A coordinator of thousands of nodes
allocates tens of thousands of short-lived objects a second (summaries), freed by reference counting; rarer young
collections and far rarer full ones mean fewer pauses of its event loop. During a recovery the collector is off
altogether (`_pause_collector`): at 4,096 simulated nodes its young collections, which found nothing to collect,
stalled the event loop for 0.6-0.8 s of each 4.7 s recovery (measured with gc.callbacks). Collecting on a fixed
schedule instead was tried: a full collection then took 0.1-0.5 s every time."""

EventSink = Callable[[jobs.Event], None]
_Outbox = asyncio.Queue  # of pb.CoordinatorMessage | None: None closes the agent's stream


def _store_factory(host: str, port: int) -> Any:
    import torch.distributed as dist  # deferred: only a coordinator pays for importing torch

    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False)


@dataclasses.dataclass(frozen=True)
class _Stores:
    """A generation's store servers: the job's (the workers' and the root of the recovery work), and one per shard of
    the nodes, the first of them the job's (agent/store_barrier.py)."""

    job: Any
    shards: tuple[Any, ...]
    nodes_per_shard: int
    """0: one shard, the job's store."""

    def control_port(self, node_rank: int, nnodes: int) -> int:
        """Where `node_rank` arrives and watches; 0 when that is the job's store (unsharded)."""
        if len(self.shards) == 1:
            return 0
        return int(self.shards[store_barrier.shard_of(node_rank, nnodes, self.nodes_per_shard)[0]].port)


class CoordinatorServer(pb_grpc.CoordinatorServicer):
    def __init__(
        self, spec: jobs.JobSpec, bind: Endpoint, store_host: str, first_store_port: int | None,
        on_event: EventSink, on_finished: Callable[[], None] | None = None,
    ) -> None:
        self._job = jobs.Job(spec)
        self._bind = bind
        self._store_host = store_host
        self._first_store_port = first_store_port
        self._on_event = on_event
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._outboxes: dict[str, _Outbox] = {}
        self._stores: collections.deque[_Stores] = collections.deque(maxlen=2)
        self._next_store: Any = None
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=RECENT_EVENTS)
        self._status_cache: dict[int, tuple[float, dict[str, Any]]] = {}
        self._started_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._collector_paused = False
        self._watch: RecoveryWatch | None = None
        self.port = 0

    # Lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> int:
        warning = descriptors.ensure(self._job.spec.max_nodes, self._job.spec.nodes_per_store_shard)
        if warning:
            self._emit(jobs.Event("descriptor_limit", 0, {"detail": warning}))
        # The first store is made before any agent joins: creating it imports torch (over a second), which must
        # not delay the start of generation 0 once the rendezvous completes.
        try:
            self._next_store = _store_factory(self._store_host, self._first_store_port or 0)
        except Exception as err:  # noqa: BLE001 - torch reports a taken port as a generic error
            raise FlashrunError(f"cannot host the workers' TCPStore on port {self._first_store_port}: {err}; "
                                "choose another --master-port") from None
        gc.set_threshold(*GC_THRESHOLDS)
        self._watch = RecoveryWatch(self._store_host, self._job.spec.recovery_deadline_s, self._notice_acknowledged,
                                    self._barrier_released)
        self._watch.use_store(self._next_store.port)
        loop = asyncio.new_event_loop()
        started: futures.Future[int] = futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(loop, started), name="flashrun-coordinator",
                                        daemon=True)
        self._thread.start()
        try:
            port = started.result(START_TIMEOUT_S)
        except FlashrunError:
            self._thread.join(START_TIMEOUT_S)
            raise
        self._loop = loop
        self.port = port
        self._started_at = time.monotonic()
        return port

    def _serve(self, loop: asyncio.AbstractEventLoop, started: futures.Future[int]) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open(started))
            if started.exception() is None:
                loop.run_forever()
        finally:
            loop.close()

    async def _open(self, started: futures.Future[int]) -> None:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        pb_grpc.add_CoordinatorServicer_to_server(self, server)
        try:
            port = server.add_insecure_port(str(self._bind))
        except RuntimeError:
            port = 0
        if port == 0:
            started.set_exception(FlashrunError(
                f"cannot listen on {self._bind}: the port is in use or the address is not on this machine; "
                "choose another --rdzv-endpoint port"
            ))
            await server.stop(None)
            return
        await server.start()
        self._server = server
        self._ticker = asyncio.get_running_loop().create_task(self._tick_loop())
        started.set_result(port)

    @property
    def finished(self) -> bool:
        with self._lock:
            return self._job.finished

    @property
    def exit_code(self) -> int:
        with self._lock:
            return self._job.exit_code if self._job.exit_code is not None else 1

    def abort(self, reason: str) -> None:
        self._call_in_loop(lambda: self._apply(self._job.abort(reason)))

    def stop(self, grace_s: float) -> None:
        """Wait up to `grace_s` for agents to read their Shutdown and hang up, then close everything."""
        loop = self._loop
        if loop is None:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._outboxes:
                    break
            time.sleep(TICK_INTERVAL_S)
        with contextlib.suppress(futures.TimeoutError, RuntimeError):  # the loop is gone already
            asyncio.run_coroutine_threadsafe(self._close_all(), loop).result(START_TIMEOUT_S)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)
        self._loop = None
        if self._watch is not None:
            self._watch.close()
        self._stores.clear()
        if self._collector_paused:
            self._resume_collector()  # the process may go on (tests, an embedding program)

    async def _close_all(self) -> None:
        with self._lock:
            for outbox in self._outboxes.values():
                outbox.put_nowait(None)
            self._outboxes.clear()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            await self._server.stop(None)

    def _call_in_loop(self, action: Callable[[], None]) -> None:
        """Run `action` under the lock on the loop thread (outboxes are asyncio queues); inline when called there."""
        loop = self._loop
        if loop is None or threading.current_thread() is self._thread:
            with self._lock:
                action()
            return

        def locked() -> None:
            with self._lock:
                action()

        done: futures.Future[None] = futures.Future()

        def run() -> None:
            try:
                locked()
                done.set_result(None)
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                done.set_exception(err)

        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError:
            return  # the loop is closed: nothing is left to tell
        done.result(START_TIMEOUT_S)

    # Status -------------------------------------------------------------------------------------------------

    def status(self, max_ranks: int = 0) -> dict[str, Any]:
        """The job snapshot (see Job.snapshot) with uptime and the recent events; callable from any thread."""
        now = time.monotonic()
        cached = self._status_cache.get(max_ranks)
        if cached is not None and now - cached[0] < STATUS_CACHE_S:
            return cached[1]
        with self._lock:
            snapshot = self._job.snapshot(now, max_ranks)
            snapshot["events"] = list(self._recent)
        snapshot["uptime_s"] = round(now - self._started_at, 3)
        self._status_cache[max_ranks] = (now, snapshot)
        return snapshot

    # gRPC ---------------------------------------------------------------------------------------------------

    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        if first.WhichOneof("body") != "join":
            await context.write(pb.CoordinatorMessage(rejected=pb.Rejected(reason="the first message must be a Join")))
            return
        join = first.join
        agent_id = join.agent_id
        outbox: _Outbox = asyncio.Queue()
        request = jobs.JoinRequest(
            agent_id=agent_id, hostname=join.hostname, run_id=join.run_id, token=join.token,
            protocol_version=join.protocol_version,
            requested_node_rank=join.node_rank if join.node_rank >= 0 else None,
            local_world_size=join.local_world_size,
        )
        with self._lock:
            if agent_id not in self._outboxes:
                self._outboxes[agent_id] = outbox
            self._apply(self._job.join(request, time.monotonic()))
            admitted = self._outboxes.get(agent_id) is outbox
        if not admitted:
            # Rejected: _apply has put the Rejected message and the end marker in our outbox.
            await _drain(outbox, context)
            return
        reader = asyncio.get_running_loop().create_task(self._read_agent(agent_id, context))
        try:
            await _drain(outbox, context)
        finally:
            reader.cancel()

    async def _read_agent(self, agent_id: str, context: grpc.aio.ServicerContext) -> None:
        try:
            while (message := await context.read()) is not grpc.aio.EOF:
                with self._lock:
                    self._apply(self._handle(agent_id, message))
        except (grpc.RpcError, asyncio.CancelledError):
            pass
        finally:
            with self._lock:
                self._apply(self._job.disconnect(agent_id, time.monotonic()))
                outbox = self._outboxes.pop(agent_id, None)
            if outbox is not None:
                outbox.put_nowait(None)

    def _handle(self, agent_id: str, message: pb.AgentMessage) -> jobs.Output:
        now = time.monotonic()
        kind = message.WhichOneof("body")
        if kind == "summary":
            summary = message.summary
            reports = [
                RankReport(-1, -1, r.local_rank, r.pid, r.step, r.heartbeat_age_s, r.in_collective, r.collective,
                           r.collective_seq, r.generation, r.recoverable,
                           _recovery_fields(r.recovery) if r.HasField("recovery") else None, r.finished)
                for r in summary.ranks
            ]
            return self._job.node_summary(agent_id, summary.generation, reports, now, summary.watching)
        if kind == "worker_exited":
            exited = message.worker_exited
            return self._job.worker_exited(agent_id, jobs.WorkerExit(
                exited.generation, exited.local_rank, exited.exit_code, exited.error_message, exited.traceback,
                exited.timestamp, exited.pid,
            ), now)
        if kind == "workers_stopped":
            return self._job.workers_stopped(agent_id, message.workers_stopped.generation, now)
        if kind == "note":
            return self._job.note(agent_id, message.note.event, message.note.detail)
        return jobs.Output()

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.JobStatus:
        if not hmac.compare_digest(request.token.encode(), self._job.spec.token.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                "wrong token: give the job's --token-file or FLASHRUN_TOKEN")
        snapshot = self.status(request.max_ranks)
        return pb.JobStatus(
            run_id=snapshot["run_id"], phase=snapshot["phase"], generation=snapshot["generation"],
            restarts=snapshot["restarts"], world_size=snapshot["world_size"], json=json.dumps(snapshot),
            ranks=[pb.RankStatus(rank=r["rank"], node_rank=r["node"], hostname=r["host"], pid=r["pid"],
                                 state=r["state"], step=r["step"], steps_per_s=r["steps_per_s"],
                                 heartbeat_age_s=r["heartbeat_age_s"]) for r in snapshot["ranks"]],
        )

    async def Inject(self, request: pb.InjectRequest, context: grpc.aio.ServicerContext) -> pb.InjectReply:
        """A fault drill: the job decides whether and where it goes; refusals carry the job's reason."""
        drill = jobs.InjectRequest(
            token=request.token, fault=request.fault, rank=request.rank if request.rank >= 0 else None,
            node=request.node if request.node >= 0 else None,
            at_step=request.at_step if request.at_step >= 0 else None,
        )
        with self._lock:
            output = self._job.inject(drill, colocated_agent=local_agent_id())
            self._apply(output)
        for command in output.commands:
            if isinstance(command, jobs.InjectRefused):
                await context.abort(grpc.StatusCode[command.code.upper()], command.reason)
            if isinstance(command, jobs.Inject):
                return pb.InjectReply(detail=command.detail)
        raise AssertionError("Job.inject answers with an Inject or an InjectRefused")

    def _notice_acknowledged(self, generation: int, now: float) -> None:
        self._call_in_loop(lambda: self._apply(self._job.notice_acknowledged(generation, now)))

    def _barrier_released(self, generation: int, outcome: str, now: float) -> None:
        self._call_in_loop(lambda: self._apply(self._job.barrier_released(generation, outcome, now)))

    async def _tick_loop(self) -> None:
        due = time.monotonic() + TICK_INTERVAL_S
        while True:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            with self._lock:
                now = time.monotonic()
                if now - due > PAUSE_S:
                    self._apply(self._job.paused(now - due, now))
                due = now + TICK_INTERVAL_S
                self._apply(self._job.tick(now))
                if self._collector_paused and self._job.phase is not jobs.Phase.RECOVERING:
                    self._resume_collector()

    # Commands -----------------------------------------------------------------------------------------------

    def _apply(self, output: jobs.Output) -> None:
        """Carry out the job's commands; called with the lock held so their order is the job's order."""
        # A recovery's notice goes out before anything else: every agent is waiting for it, and the events (a file
        # write and flush each, a console line for a failure) can follow.
        publish_failures = [self._publish(c) for c in output.commands if isinstance(c, jobs.Publish)]
        for event in [*output.events, *(failure for failure in publish_failures if failure is not None)]:
            self._emit(event)
        settle = False
        for command in output.commands:
            if isinstance(command, jobs.StartGeneration):
                self._start_generation(command)
            elif isinstance(command, jobs.Reject):
                self._send(command.agent_id, pb.CoordinatorMessage(rejected=pb.Rejected(reason=command.reason)))
                self._close(command.agent_id)
            elif isinstance(command, jobs.Wait):
                self._send(command.agent_id, pb.CoordinatorMessage(
                    waiting=pb.Waiting(joined=command.joined, needed=command.needed)))
            elif isinstance(command, jobs.MakeSpare):
                self._send(command.agent_id, pb.CoordinatorMessage(spare=pb.Spare(reason=command.reason)))
            elif isinstance(command, jobs.Stop):
                self._send(command.agent_id, pb.CoordinatorMessage(stop=pb.StopWorkers(
                    generation=command.generation, kill_local_ranks=command.kill_local_ranks)))
            elif isinstance(command, jobs.Recover):
                settle = True
                a = command.assignment
                self._send(command.agent_id, pb.CoordinatorMessage(recover=pb.Recover(
                    generation=command.generation, respawn_local_ranks=command.respawn_local_ranks,
                    placement=self._placement(command.generation, a.node_rank, a.rank_offset, command.world_size,
                                              command.nnodes, self._stores[-1]),
                )))
            elif isinstance(command, jobs.Publish):
                settle = True  # published above
            elif isinstance(command, jobs.Shutdown):
                self._send(command.agent_id, pb.CoordinatorMessage(
                    shutdown=pb.Shutdown(exit_code=command.exit_code, summary=command.summary)))
            elif isinstance(command, jobs.Inject):
                self._send(command.agent_id, pb.CoordinatorMessage(inject=pb.InjectFault(
                    fault=command.fault, local_rank=-1 if command.local_rank is None else command.local_rank,
                    at_step=-1 if command.at_step is None else command.at_step, pid=command.pid,
                    rank=command.rank or 0,
                )))
        if settle:
            self._job.settle()  # the new generation's detector, left until the notice was out
            _settle_heap()  # it lives until the next failure
            self._pause_collector()

    def _emit(self, event: jobs.Event) -> None:
        self._recent.append(event.record(time.time()))
        self._on_event(event)
        if event.name in ("job_succeeded", "job_failed") and self._on_finished is not None:
            self._on_finished()

    def _publish(self, command: jobs.Publish) -> jobs.Event | None:
        """One store operation for every watching agent, whatever their number; the rest get a Recover message.
        Returns the `notice_failed` event when the store refused it (the job then falls back to messages)."""
        stores = self._stores[-1]
        notice = pb.GenerationNotice(
            generation=command.generation, direct_nodes=command.direct_nodes, acks_expected=command.acks_expected,
            respawn=[pb.NodeRespawn(node_rank=node, local_ranks=ranks)
                     for node, ranks in sorted(command.respawn.items())],
        )
        notices = [(stores.job, notice)]
        acks = [(stores.job.port, command.acks_expected)]
        if len(stores.shards) > 1:
            notices, acks = [], []
            for shard, count in zip(stores.shards, command.acks_by_shard, strict=True):
                own = pb.GenerationNotice()
                own.CopyFrom(notice)
                own.acks_expected = count
                notices.append((shard, own))
                acks.append((shard.port, count))
        try:
            generation_notice.publish_sharded(stores.job, notices)
        except Exception as err:  # noqa: BLE001 - the job falls back to Recover messages (JobSpec.notice_fallback_s)
            return jobs.Event("notice_failed", command.generation, {"detail": str(err)})
        if self._watch is not None:
            self._watch.follow(stores.job.port, command.generation,
                               [(port, index) for index, (port, count) in enumerate(acks) if count], len(acks))
        return None

    def _pause_collector(self) -> None:
        """No cyclic collection while a recovery is under way (see GC_THRESHOLDS); reference counting goes on."""
        if gc.isenabled():
            gc.disable()
            self._collector_paused = True

    def _resume_collector(self) -> None:
        self._collector_paused = False
        gc.enable()

    def _start_generation(self, command: jobs.StartGeneration) -> None:
        store, self._next_store = self._next_store, None
        if store is None:
            try:
                store = _store_factory(self._store_host, 0)
            except Exception as err:  # noqa: BLE001 - any failure to host the store ends the job with its reason
                self._apply(self._job.abort(f"cannot host the workers' TCPStore: {err}"))
                return
        per = self._job.spec.nodes_per_store_shard
        try:
            shards = (store, *(_store_factory(self._store_host, 0)
                               for _ in range(store_barrier.shard_count(command.nnodes, per) - 1)))
        except Exception as err:  # noqa: BLE001 - as for the job's store
            self._apply(self._job.abort(f"cannot host the store's shards: {err}"))
            return
        stores = _Stores(store, shards, per if len(shards) > 1 else 0)
        if self._stores:  # whoever still waits at the previous generation's barrier there moves on
            previous = self._stores[-1]
            with contextlib.suppress(Exception):  # that store is gone: its waits ended with it
                store_barrier.supersede(previous.job, previous.shards, command.generation - 1)
        self._stores.append(stores)  # the previous generation's stores stay until these are in use
        if self._watch is not None:
            self._watch.use_store(store.port, [shard.port for shard in shards])
        for agent_id, a in command.assignments.items():
            self._send(agent_id, pb.CoordinatorMessage(start=self._placement(
                command.generation, a.node_rank, a.rank_offset, command.world_size, command.nnodes, stores)))
        _settle_heap()

    def _placement(self, generation: int, node_rank: int, rank_offset: int, world_size: int, nnodes: int,
                   stores: _Stores) -> pb.StartWorkers:
        # An in-place recovery keeps the store: healthy workers keep their connection, on a new key namespace.
        detection = self._job.spec.detection
        return pb.StartWorkers(
            generation=generation, node_rank=node_rank, nnodes=nnodes, world_size=world_size,
            rank_offset=rank_offset, master_addr="", master_port=stores.job.port,
            control_port=stores.control_port(node_rank, nnodes), nodes_per_shard=stores.nodes_per_shard,
            max_restarts=self._job.spec.max_restarts,
            detection=pb.Detection(heartbeat_interval_s=detection.heartbeat_interval_s,
                                   summary_interval_s=detection.summary_interval_s(nnodes),
                                   heartbeat_timeout_s=detection.heartbeat_timeout_s),
        )

    def _send(self, agent_id: str, message: pb.CoordinatorMessage) -> None:
        outbox = self._outboxes.get(agent_id)
        if outbox is not None:
            outbox.put_nowait(message)

    def _close(self, agent_id: str) -> None:
        outbox = self._outboxes.pop(agent_id, None)
        if outbox is not None:
            outbox.put_nowait(None)


def _settle_heap() -> None:
    """Keep the job's long-lived bookkeeping out of the cyclic garbage collector's way.

    With thousands of nodes the detector's per-rank state is hundreds of thousands of objects; each full collection
    traversed them all (up to half a second, measured), and a young detector was traversed again by every young
    collection. Frozen, they are skipped; their memory is still freed by reference counting when replaced.
    """
    gc.freeze()


def _recovery_fields(recovery: pb.Recovery) -> dict[str, float]:
    return {field.name: float(value) for field, value in recovery.ListFields()}


async def _drain(outbox: _Outbox, context: grpc.aio.ServicerContext) -> None:
    while (message := await outbox.get()) is not None:
        await context.write(message)
