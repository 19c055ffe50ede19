"""The agent's side of its workers' heartbeats: a gRPC service on a Unix socket, the latest beat per worker, and
the command stream back to each worker (the new generation to move to, a drill, a barrier's release)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from flashrun._proto import flashrun_pb2 as pb
from flashrun._proto import flashrun_pb2_grpc as pb_grpc
from flashrun.agent.protocol import heartbeat_age_s


@dataclasses.dataclass(frozen=True)
class LastBeat:
    received_at: float
    beat: pb.WorkerBeat


class HeartbeatBoard(pb_grpc.WorkerChannelServicer):
    """Keeps each worker's latest heartbeat (keyed by PID, so a replaced worker's old beats never count)."""

    def __init__(self, socket_path: str, max_workers: int, on_urgent: Callable[[], None],
                 on_arrival: Callable[[int, int, int], None], on_attach: Callable[[], None]) -> None:
        """`on_arrival(local_rank, pid, generation)`: a worker began waiting at a generation's barrier.
        `on_attach()`: a worker connected."""
        self.socket_path = socket_path
        self._on_urgent = on_urgent
        self._on_arrival = on_arrival
        self._on_attach = on_attach
        self._lock = threading.Lock()
        self._beats: dict[int, LastBeat] = {}
        self._commands: dict[int, queue.SimpleQueue[pb.WorkerCommand | None]] = {}
        # Two threads per attached worker (its stream and its beat reader), plus room for replacements.
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2 * max_workers + 4,
                                                              thread_name_prefix="flashrun-beats"))
        pb_grpc.add_WorkerChannelServicer_to_server(self, self._server)
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self._server.add_insecure_port(f"unix:{socket_path}")
        self._server.start()

    def Attach(self, request_iterator: Iterator[pb.WorkerBeat], context: grpc.ServicerContext) -> Iterator[
            pb.WorkerCommand]:
        commands: queue.SimpleQueue[pb.WorkerCommand | None] = queue.SimpleQueue()
        first = next(request_iterator, None)
        if first is None:
            return
        pid = first.pid
        with self._lock:
            self._commands[pid] = commands
            self._beats[pid] = LastBeat(time.monotonic(), first)
        self._on_attach()

        def read() -> None:
            awaiting = -1
            try:
                for beat in itertools.chain((first,), request_iterator):
                    with self._lock:
                        self._beats[pid] = LastBeat(time.monotonic(), beat)
                    if beat.urgent:
                        self._on_urgent()
                    # A worker names the barrier it waits at in every beat until released: act on the first only.
                    if beat.HasField("awaiting") and beat.awaiting.generation != awaiting:
                        awaiting = beat.awaiting.generation
                        self._on_arrival(beat.local_rank, pid, awaiting)
                    elif not beat.HasField("awaiting"):
                        awaiting = -1
            except grpc.RpcError:
                pass
            with self._lock:
                self._commands.pop(pid, None)
            commands.put(None)

        threading.Thread(target=read, name="flashrun-beat-read", daemon=True).start()
        while (command := commands.get()) is not None:
            yield command

    def command(self, pid: int, generation: int) -> bool:
        """Tell one worker to move to `generation`; False if it is not attached (it has no library or died)."""
        return self._send(pid, pb.WorkerCommand(generation=generation))

    def release(self, pid: int, generation: int, outcome: str, detail: str) -> bool:
        """Relay a barrier's outcome to a worker waiting at it; False if it is not attached (it died)."""
        return self._send(pid, pb.WorkerCommand(release=pb.BarrierRelease(generation=generation, outcome=outcome,
                                                                          detail=detail)))

    def drill(self, pid: int, kind: str, at_step: int) -> bool:
        """Relay a fault drill to one worker's step loop; False if it is not attached."""
        return self._send(pid, pb.WorkerCommand(fault=pb.Fault(kind=kind, at_step=at_step)))

    def _send(self, pid: int, command: pb.WorkerCommand) -> bool:
        with self._lock:
            commands = self._commands.get(pid)
        if commands is None:
            return False
        commands.put(command)
        return True

    def forget(self, pids: set[int]) -> None:
        with self._lock:
            for pid in pids:
                self._beats.pop(pid, None)

    def summary(self, generation: int, pids: dict[int, int], now: float,
                counted_from: float = -math.inf) -> pb.NodeSummary:
        """`counted_from`: see agent/protocol.py:heartbeat_age_s."""
        with self._lock:
            beats = dict(self._beats)
        ranks = []
        for local_rank, pid in sorted(pids.items()):
            last = beats.get(pid)
            if last is None:
                ranks.append(pb.RankProgress(local_rank=local_rank, pid=pid, step=-1, heartbeat_age_s=-1.0))
                continue
            beat = last.beat
            ranks.append(pb.RankProgress(
                local_rank=local_rank, pid=pid, step=beat.step,
                heartbeat_age_s=heartbeat_age_s(now, last.received_at, counted_from),
                in_collective=beat.in_collective, collective=beat.collective, collective_seq=beat.collective_seq,
                generation=beat.generation, recoverable=beat.recoverable, finished=beat.finished,
                recovery=beat.recovery if beat.HasField("recovery") else None,
            ))
        return pb.NodeSummary(generation=generation, ranks=ranks)

    def close(self) -> None:
        with self._lock:
            for commands in self._commands.values():
                commands.put(None)
        self._server.stop(grace=None)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
