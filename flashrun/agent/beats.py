"""The agent's side of its workers' heartbeats: a gRPC service on a Unix socket and the latest beat per rank."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from flashrun._proto import flashrun_pb2 as pb
from flashrun._proto import flashrun_pb2_grpc as pb_grpc


@dataclasses.dataclass(frozen=True)
class LastBeat:
    received_at: float
    beat: pb.WorkerBeat


class HeartbeatBoard(pb_grpc.WorkerChannelServicer):
    """Keeps each local rank's latest heartbeat of the current generation; serves the workers' streams."""

    def __init__(self, socket_path: str, max_workers: int) -> None:
        self.socket_path = socket_path
        self._lock = threading.Lock()
        self._beats: dict[int, LastBeat] = {}
        self._generation = -1
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers + 2,
                                                              thread_name_prefix="flashrun-beats"))
        pb_grpc.add_WorkerChannelServicer_to_server(self, self._server)
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        self._server.add_insecure_port(f"unix:{socket_path}")
        self._server.start()

    def new_generation(self, generation: int) -> None:
        with self._lock:
            self._generation = generation
            self._beats.clear()

    def Attach(self, request_iterator: Iterator[pb.WorkerBeat], context: grpc.ServicerContext) -> Iterator[
            pb.WorkerCommand]:
        for beat in request_iterator:
            with self._lock:
                if beat.generation == self._generation:
                    self._beats[beat.local_rank] = LastBeat(time.monotonic(), beat)
        return iter(())

    def summary(self, generation: int, pids: dict[int, int], now: float) -> pb.NodeSummary:
        with self._lock:
            beats = dict(self._beats)
        ranks = []
        for local_rank, pid in sorted(pids.items()):
            last = beats.get(local_rank)
            if last is None:
                ranks.append(pb.RankProgress(local_rank=local_rank, pid=pid, step=-1, heartbeat_age_s=-1.0))
                continue
            beat = last.beat
            ranks.append(pb.RankProgress(
                local_rank=local_rank, pid=pid, step=beat.step, heartbeat_age_s=now - last.received_at,
                in_collective=beat.in_collective, collective=beat.collective, collective_seq=beat.collective_seq,
            ))
        return pb.NodeSummary(generation=generation, ranks=ranks)

    def close(self) -> None:
        self._server.stop(grace=None)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
