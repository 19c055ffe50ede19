"""The agent's main loop: one thread acts on one queue of events.

Events come from the coordinator's stream (a reader thread), from worker exit watchers and from signal handlers;
`queue.SimpleQueue.put` is reentrant, so handlers may enqueue directly and never act themselves.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import grpc

from flashrun._proto import flashrun_pb2 as pb
from flashrun._proto import flashrun_pb2_grpc as pb_grpc
from flashrun.agent import generation_notice
from flashrun.agent.beats import HeartbeatBoard
from flashrun.agent.node_barrier import NodeBarrier, Release
from flashrun.agent.output import OutputPolicy, attempt_dir
from flashrun.agent.prewarm import Zygote
from flashrun.agent.protocol import SummaryPacer, channel_options, join_message, stopped_message
from flashrun.agent.worker_env import WorkerPlacement, launcher_env, worker_env
from flashrun.agent.workers import ExitReport, WorkerGroup, die_with_agent
from flashrun.config import COORDINATOR_PING_TIMEOUT_S, Endpoint, LaunchConfig
from flashrun.errors import EXIT_JOB_FAILED, EXIT_SIGNAL_BASE, FlashrunError
from flashrun.inject import NODE_FAULT
from flashrun.worker.link import REPLACEMENT_ENV

JOIN_POLL_S = 0.5
"""Before the job starts, how often the agent checks its join deadline."""
OUTPUT_DRAIN_S = 2.0
"""After workers exit, how long their last output may take to reach the console and files."""
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@dataclasses.dataclass(frozen=True)
class _FromCoordinator:
    message: pb.CoordinatorMessage


@dataclasses.dataclass(frozen=True)
class _CoordinatorLost:
    detail: str


@dataclasses.dataclass(frozen=True)
class _Notice:
    notice: pb.GenerationNotice


@dataclasses.dataclass(frozen=True)
class _Signal:
    signum: int


def local_agent_id() -> str:
    """The id of the agent in this process, unique per host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


def say(message: str) -> None:
    print(f"flashrun: {message}", file=sys.stderr, flush=True)


class Agent:
    def __init__(self, config: LaunchConfig, run_dir: str) -> None:
        self._config = config
        self._endpoint = Endpoint("localhost", 0)
        self._run_dir = run_dir
        """Where attempt_N/RANK/{error.json,stdout.log,stderr.log} go: --log-dir, or a temporary dir."""
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._outbox: queue.SimpleQueue[pb.AgentMessage | None] = queue.SimpleQueue()
        self._workers: WorkerGroup | None = None
        self._board: HeartbeatBoard | None = None
        self._barrier = NodeBarrier(config.nproc_per_node, self._relay_release,
                                    on_notice=lambda notice: self._events.put(_Notice(notice)))
        self._placement: pb.StartWorkers | None = None
        """Where this node is in the job (from StartWorkers or Recover): what a notice leaves out."""
        self._pacer = SummaryPacer()
        self._summary_now = threading.Event()
        self._zygote: Zygote | None = None
        self._finished = threading.Event()
        self._env = launcher_env(config.base_env, config.nproc_per_node)
        self.agent_id = local_agent_id()
        self.on_stop_signal: Callable[[int], None] | None = None
        """Called on the agent's loop with a signal that stops this node, before its workers are stopped: the
        launcher that hosts the coordinator ends the job with the reason (the other nodes would otherwise only see
        this node's agent go)."""

    def on_signal(self, signum: int, _frame: object = None) -> None:
        self._events.put(_Signal(signum))

    # The loop -----------------------------------------------------------------------------------------------

    def run(self, endpoint: Endpoint) -> int:
        """Join the coordinator at `endpoint`, run this node's share of the job, return the exit code."""
        self._endpoint = endpoint
        channel = grpc.insecure_channel(str(self._endpoint), options=channel_options())
        socket_dir = tempfile.mkdtemp(prefix="flashrun-agent-")  # short: Unix socket paths max out near 107 bytes
        try:
            self._board = HeartbeatBoard(os.path.join(socket_dir, "agent.sock"), self._config.nproc_per_node,
                                         self._summary_now.set, self._on_arrival, self._barrier.prepare)
            self._wait_for_coordinator(channel)
            stub = pb_grpc.CoordinatorStub(channel)
            config = self._config
            self._outbox.put(join_message(config.run_id, config.token, config.node_rank,
                                          config.local_addr or socket.gethostname(), config.nproc_per_node,
                                          self.agent_id))
            responses = stub.Connect(self._requests())
            threading.Thread(target=self._read_coordinator, args=(responses,), name="flashrun-agent-read",
                             daemon=True).start()
            threading.Thread(target=self._summarise, name="flashrun-agent-summary", daemon=True).start()
            return self._loop()
        finally:
            self._finished.set()
            self._summary_now.set()
            self._outbox.put(None)
            if self._zygote is not None:
                self._zygote.close()
            self._barrier.close()
            channel.close()
            if self._board is not None:
                self._board.close()
            shutil.rmtree(socket_dir, ignore_errors=True)

    def _wait_for_coordinator(self, channel: grpc.Channel) -> None:
        ready = grpc.channel_ready_future(channel)
        deadline = time.monotonic() + self._config.timeouts.join_s
        while True:
            try:
                ready.result(timeout=0.2)
                return
            except grpc.FutureTimeoutError:
                pass
            if self._signalled_while_waiting():
                ready.cancel()
                raise FlashrunError("interrupted while waiting for the coordinator", EXIT_JOB_FAILED)
            if time.monotonic() >= deadline:
                ready.cancel()
                raise FlashrunError(
                    f"no coordinator answered at {self._endpoint} within {self._config.timeouts.join_s:g} s: check "
                    "--rdzv-endpoint and that the node-rank-0 launcher is running",
                    EXIT_JOB_FAILED,
                )

    def _signalled_while_waiting(self) -> bool:
        try:
            event = self._events.get_nowait()
        except queue.Empty:
            return False
        if isinstance(event, _Signal):
            return True
        self._events.put(event)
        return False

    def _requests(self) -> Iterator[pb.AgentMessage]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _read_coordinator(self, responses: Iterator[pb.CoordinatorMessage]) -> None:
        try:
            for message in responses:
                self._events.put(_FromCoordinator(message))
            detail = "the coordinator closed the connection"
        except grpc.RpcError as err:
            detail = f"{err.code().name}: {err.details()}"  # type: ignore[attr-defined]
            if "ping timeout" in (err.details() or ""):  # type: ignore[attr-defined]
                detail = (f"it did not answer for {COORDINATOR_PING_TIMEOUT_S:g} s: its host is down, frozen or "
                          "cut off")
        self._events.put(_CoordinatorLost(detail))

    def _loop(self) -> int:
        join_deadline = time.monotonic() + self._config.timeouts.join_s
        started = False
        spare = False
        while True:
            try:
                event = self._events.get(timeout=None if started else JOIN_POLL_S)
            except queue.Empty:
                if not started and not spare and time.monotonic() >= join_deadline:
                    raise FlashrunError(
                        f"the rendezvous at {self._endpoint} did not complete within "
                        f"{self._config.timeouts.join_s:g} s: start the other nodes' launchers or lower --nnodes",
                        EXIT_JOB_FAILED,
                    ) from None
                continue
            if isinstance(event, _Signal):
                if self.on_stop_signal is not None:
                    self.on_stop_signal(event.signum)
                self._stop_workers(event.signum)
                say(f"received {signal.Signals(event.signum).name}; workers stopped")
                return EXIT_SIGNAL_BASE + event.signum
            if isinstance(event, ExitReport):
                self._report_exit(event)
            elif isinstance(event, _Notice):
                self._on_notice(event.notice)
            elif isinstance(event, _CoordinatorLost):
                self._stop_workers(signal.SIGTERM)
                raise FlashrunError(f"lost the coordinator at {self._endpoint} ({event.detail}); workers stopped",
                                    EXIT_JOB_FAILED)
            elif isinstance(event, _FromCoordinator):
                message = event.message
                kind = message.WhichOneof("body")
                if kind == "rejected":
                    raise FlashrunError(f"the coordinator rejected this node: {message.rejected.reason}")
                if kind == "waiting":
                    say(f"waiting for nodes: {message.waiting.joined}/{message.waiting.needed} joined")
                elif kind == "spare":
                    spare = True
                    say(f"standing by as a spare node: {message.spare.reason}")
                    # Taking over a lost node then forks its workers and finds the store's client imported.
                    self._prepare_zygote()
                    self._barrier.warm()
                elif kind == "start":
                    started = True
                    self._start_workers(message.start)
                elif kind == "recover":
                    started = True
                    self._recover(message.recover)
                elif kind == "stop":
                    self._stop_workers(signal.SIGTERM, kill_first=message.stop.kill_local_ranks)
                    self._outbox.put(stopped_message(message.stop.generation))
                elif kind == "inject":
                    self._inject(message.inject)
                elif kind == "shutdown":
                    self._stop_workers(signal.SIGTERM)
                    if message.shutdown.summary and message.shutdown.exit_code != 0:
                        say(message.shutdown.summary)
                    return message.shutdown.exit_code

    # Workers ------------------------------------------------------------------------------------------------

    def _start_workers(self, start: pb.StartWorkers) -> None:
        self._stop_workers(signal.SIGTERM)
        config = self._config
        assert self._board is not None
        self._pacer.configure(start.detection)
        self._placement = start
        self._place_barrier(start)
        group = WorkerGroup(start.generation, self._events.put)
        for local_rank in range(config.nproc_per_node):
            self._spawn(group, start, local_rank, replacement=False)
        self._prepare_zygote()
        self._workers = group
        self._summary_now.set()

    def _spawn(self, group: WorkerGroup, start: pb.StartWorkers, local_rank: int, replacement: bool) -> None:
        config = self._config
        assert self._board is not None
        rank = start.rank_offset + local_rank
        directory = attempt_dir(self._run_dir, start.generation, rank)
        placement = WorkerPlacement(
            local_rank=local_rank, local_world_size=config.nproc_per_node, rank_offset=start.rank_offset,
            world_size=start.world_size, node_rank=start.node_rank, nnodes=start.nnodes,
            generation=start.generation, max_restarts=start.max_restarts, run_id=config.run_id, role=config.role,
            master_addr=self._master_addr(start),
            master_port=start.master_port, error_file=os.path.join(directory, "error.json"),
            agent_socket=self._board.socket_path, heartbeat_interval_s=self._pacer.heartbeat_interval_s,
        )
        policy = OutputPolicy(
            prefix=f"[rank{rank}]:".encode(), log_dir=config.log_dir,
            redirect=config.redirects[local_rank], tee=config.tee[local_rank],
            on_console=config.local_ranks_filter is None or local_rank in config.local_ranks_filter,
        )
        env = worker_env(self._env, placement)
        zygote = None
        if replacement:
            env[REPLACEMENT_ENV] = repr(time.time())
            zygote = self._zygote
        forked = group.spawn(local_rank, [*config.entrypoint, *config.script_args], env, policy,
                             placement.error_file, zygote)
        if zygote is not None and not forked:
            self._note("prewarm_fallback", f"rank {rank}: the zygote was not ready or did not answer; spawned "
                                           "a fresh interpreter instead")
        if forked or (zygote is not None and zygote.broken.is_set()):
            self._prepare_zygote()

    def _master_addr(self, start: pb.StartWorkers) -> str:
        return start.master_addr or self._config.master_addr or self._endpoint.host

    def _place_barrier(self, start: pb.StartWorkers) -> None:
        """Before any worker of `start.generation` is commanded or spawned: older barriers are superseded first."""
        self._barrier.place(self._master_addr(start), start.master_port, start.nnodes, start.generation,
                            start.node_rank, start.nodes_per_shard, start.control_port)

    def _on_arrival(self, local_rank: int, pid: int, generation: int) -> None:
        """A worker waits at a generation's barrier (on its beat reader's thread)."""
        workers = self._workers
        self._barrier.arrive(local_rank, pid, generation, workers.pids_by_local_rank if workers else {})

    def _relay_release(self, release: Release) -> None:
        if self._board is not None:
            for pid in release.pids:
                self._board.release(pid, release.generation, release.outcome, release.detail)

    def _prepare_zygote(self) -> None:
        """Keep a pre-warmed zygote for the next replacement (a broken one is replaced; a working one reused:
        forking leaves it untouched)."""
        config = self._config
        if not config.prewarm or config.entrypoint[1:2] != ("-u",):
            return  # --no-prewarm, or --no-python: nothing to pre-import
        if self._zygote is not None and not self._zygote.broken.is_set():
            return
        if self._zygote is not None:
            self._zygote.close()
            self._note("prewarm_restarted", "the zygote broke; a new one is being prepared")
        self._zygote = Zygote(config.entrypoint[0], config.prewarm_modules, self._env, die_with_agent)

    def _note(self, event: str, detail: str) -> None:
        say(detail)
        self._outbox.put(pb.AgentMessage(note=pb.AgentNote(event=event, detail=detail)))

    def _on_notice(self, notice: pb.GenerationNotice) -> None:
        """A new generation published on the store: act on it as on a Recover (unless a Recover came first), then
        acknowledge it there. No summary goes at once: thousands of them would be the coordinator's load."""
        placement = self._placement
        respawn = None if placement is None else generation_notice.respawn_for(notice, placement.node_rank)
        if placement is None or respawn is None or self._workers is None:
            return  # a direct node: told by a Recover, or replaced (a spare has its node rank now)
        if notice.generation > self._workers.generation:
            moved = pb.StartWorkers()
            moved.CopyFrom(placement)
            moved.generation = notice.generation
            self._recover(pb.Recover(generation=notice.generation, respawn_local_ranks=respawn, placement=moved),
                          urgent=False)
        self._barrier.acknowledge(notice.generation, notice.acks_expected)

    def _recover(self, recover: pb.Recover, urgent: bool = True) -> None:
        """In place: replace the faulty local workers, move the healthy ones to the new generation."""
        assert self._board is not None
        if self._workers is not None and recover.generation <= self._workers.generation:
            return  # the same generation's notice came first
        placement = recover.placement
        self._placement = placement
        self._pacer.configure(placement.detection)
        self._place_barrier(placement)
        if self._workers is None:  # a spare taking over a lost node: every local rank is a replacement
            self._workers = WorkerGroup(recover.generation, self._events.put)
            respawn = list(range(self._config.nproc_per_node))
        else:
            respawn = list(recover.respawn_local_ranks)
        self._workers.generation = recover.generation
        self._board.forget(self._workers.retire(respawn, self._config.timeouts.kill_wait_s))
        for local_rank, pid in self._workers.pids_by_local_rank.items():
            if local_rank not in respawn and not self._board.command(pid, recover.generation):
                respawn.append(local_rank)  # not attached to the library: it cannot recover in place
                self._board.forget(self._workers.retire([local_rank], self._config.timeouts.kill_wait_s))
        for local_rank in sorted(respawn):
            self._spawn(self._workers, placement, local_rank, replacement=True)
        if urgent:
            self._summary_now.set()

    def _inject(self, inject: pb.InjectFault) -> None:
        """A fault drill (`flashrun inject`): signal the worker now, hand it to the worker's step loop, or lose the
        whole node."""
        if inject.fault == NODE_FAULT:
            self._lose_node()
        what = f"fault drill {inject.fault} for rank {inject.rank}"
        pid = self._workers.pids_by_local_rank.get(inject.local_rank) if self._workers else None
        if pid is None or (inject.pid and inject.pid != pid):
            self._note("fault_skipped", f"{what}: its process {inject.pid or ''} is gone; nothing done")
            return
        if inject.at_step < 0 and inject.fault in ("kill", "stop"):
            say(f"{what}: sending {'SIGKILL' if inject.fault == 'kill' else 'SIGSTOP'} to pid {pid}")
            try:
                os.kill(pid, signal.SIGKILL if inject.fault == "kill" else signal.SIGSTOP)
            except ProcessLookupError:
                self._note("fault_skipped", f"{what}: pid {pid} exited first; nothing done")
        elif self._board is None or not self._board.drill(pid, inject.fault, inject.at_step):
            self._note("fault_skipped", f"{what}: pid {pid} is not attached to flashrun's library; nothing done")

    def _lose_node(self) -> NoReturn:
        """kill-node: SIGKILL every worker (and the zygote), then exit at once without a word to the coordinator, as
        a machine that dies would: the coordinator sees the broken stream (node_lost) and a spare takes over."""
        say("fault drill kill-node: killing this node's workers and leaving the job without telling the "
            f"coordinator (a simulated node loss); exit code {EXIT_JOB_FAILED}")
        if self._workers is not None:
            self._workers.kill(list(self._workers.pids_by_local_rank))
        if self._zygote is not None:
            self._zygote.close()
        os._exit(EXIT_JOB_FAILED)

    def _summarise(self) -> None:
        """One message per node per summary interval, whatever the number of workers; at once when something is
        urgent (a worker's recovery progress, or a worker newly silent past the heartbeat timeout). Its own thread:
        a main loop busy stopping or spawning workers must not make them look silent."""
        while not self._finished.is_set():
            urgent = self._summary_now.wait(self._pacer.wait_s(time.monotonic()))
            self._summary_now.clear()
            now = time.monotonic()
            counted_from = self._pacer.look(now)
            workers, board = self._workers, self._board
            if workers is None or board is None or self._finished.is_set():
                continue
            summary = board.summary(workers.generation, workers.pids_by_local_rank, now, counted_from)
            summary.watching = self._barrier.watching
            if self._pacer.should_send(now, urgent, {r.pid: r.heartbeat_age_s for r in summary.ranks}):
                self._outbox.put(pb.AgentMessage(summary=summary))

    def _report_exit(self, report: ExitReport) -> None:
        self._outbox.put(pb.AgentMessage(worker_exited=pb.WorkerExited(
            generation=report.generation, local_rank=report.local_rank, exit_code=report.exit_code,
            error_message=report.error_message, traceback=report.traceback, timestamp=report.timestamp,
            pid=report.pid,
        )))

    def _stop_workers(self, signum: int, kill_first: Sequence[int] = ()) -> None:
        if self._workers is None:
            return
        timeouts = self._config.timeouts
        self._workers.kill(kill_first)
        survivors = self._workers.stop(signum, timeouts.stop_grace_s, timeouts.kill_wait_s, OUTPUT_DRAIN_S)
        if survivors:
            say(f"worker PIDs {survivors} did not exit after SIGKILL within {timeouts.kill_wait_s:g} s")
        self._workers = None
