"""The agent's half of the coordinator protocol, shared by the real agent and the simulated ones of the scale
benchmark (scripts/sim_agents.py): the messages an agent sends, and when it sends its node summary."""

from __future__ import annotations

import math

from flashrun._proto import flashrun_pb2 as pb
from flashrun.config import COORDINATOR_PING_INTERVAL_S, COORDINATOR_PING_TIMEOUT_S, PROTOCOL_VERSION, Detection

OWN_STALL_FRACTION = 0.5
"""An agent looks at its workers every heartbeat interval. A look that comes later than that by more than this
fraction of the rest of the heartbeat timeout means the agent itself did not run (stopped, starved, its machine
paused): the beats its workers sent meanwhile are still unread, so their heartbeat ages count only from that look."""


def channel_options(ping_interval_s: float = COORDINATOR_PING_INTERVAL_S,
                    ping_timeout_s: float = COORDINATOR_PING_TIMEOUT_S) -> list[tuple[str, int]]:
    """gRPC options for an agent's channel to the coordinator: keepalive pings, so that a coordinator whose host
    vanished without closing the connection breaks the agent's stream ("ping timeout") instead of leaving the node
    waiting forever. Pings go whether or not the agent has sent data (a spare standing by sends none)."""
    interval_ms, timeout_ms = int(ping_interval_s * 1000), int(ping_timeout_s * 1000)
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.http2.ping_timeout_ms", timeout_ms),  # grpcio 1.85 times a ping out by this one
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", interval_ms),
    ]


def heartbeat_age_s(now: float, received_at: float, counted_from: float) -> float:
    """A worker's heartbeat age as its agent reports it: since its last beat arrived, but not from before
    `counted_from` (SummaryPacer.look: the agent's own pause is not its workers' silence)."""
    return now - max(received_at, counted_from)


def join_message(run_id: str, token: str, node_rank: int | None, hostname: str, local_world_size: int,
                 agent_id: str) -> pb.AgentMessage:
    return pb.AgentMessage(join=pb.Join(
        protocol_version=PROTOCOL_VERSION, run_id=run_id, token=token,
        node_rank=-1 if node_rank is None else node_rank, hostname=hostname, local_world_size=local_world_size,
        agent_id=agent_id,
    ))


def summary_message(generation: int, ranks: list[pb.RankProgress], watching: bool = False) -> pb.AgentMessage:
    """`watching`: the agent waits on the job's store for the next generation's notice (agent/generation_notice.py),
    so the coordinator may publish the next recovery there instead of sending this agent a Recover."""
    return pb.AgentMessage(summary=pb.NodeSummary(generation=generation, ranks=ranks, watching=watching))


def stopped_message(generation: int) -> pb.AgentMessage:
    return pb.AgentMessage(workers_stopped=pb.WorkersStopped(generation=generation))


class SummaryPacer:
    """When to send the node summary: every summary interval (which the coordinator stretches for large jobs), and
    at once when something is urgent or a worker has newly gone silent past the heartbeat timeout, so detection does
    not wait for the interval. Pure: the caller passes the time and what it sees."""

    def __init__(self) -> None:
        defaults = Detection()
        self.heartbeat_interval_s = defaults.heartbeat_interval_s
        self.summary_interval_s = defaults.heartbeat_interval_s
        self.heartbeat_timeout_s = defaults.heartbeat_timeout_s
        self._next_due = 0.0
        self._silent: set[int] = set()
        self._looked_at: float | None = None
        self._running_since = -math.inf

    def configure(self, detection: pb.Detection) -> None:
        """Take the settings the coordinator sent with StartWorkers or Recover (zeros: keep the current ones)."""
        if detection.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = detection.heartbeat_interval_s
        self.summary_interval_s = max(detection.summary_interval_s, self.heartbeat_interval_s)
        if detection.heartbeat_timeout_s > 0:
            self.heartbeat_timeout_s = detection.heartbeat_timeout_s

    def look(self, now: float) -> float:
        """The agent looks at its workers at `now`; returns the moment from which their heartbeat ages count (-inf
        unless the agent itself stalled: after a SIGSTOP its workers' unread beats must not make them look silent)."""
        interval, timeout = self.heartbeat_interval_s, self.heartbeat_timeout_s
        allowed = interval + OWN_STALL_FRACTION * (timeout - interval)
        if self._looked_at is not None and now - self._looked_at > allowed:
            self._running_since = now
        self._looked_at = now
        return self._running_since

    def wait_s(self, now: float) -> float:
        """How long to sleep before looking again: silent workers are looked for every heartbeat interval."""
        return min(self.heartbeat_interval_s, max(0.0, self._next_due - now))

    def due_in_s(self, now: float) -> float:
        """Time until the next regular summary (for an agent whose workers' silence it learns of otherwise)."""
        return max(0.0, self._next_due - now)

    def should_send(self, now: float, urgent: bool, ages: dict[int, float]) -> bool:
        """`ages`: each worker's heartbeat age by PID (negative: never beat). True means send now; the next regular
        summary is then due one interval later."""
        silent = {pid for pid, age in ages.items() if age > self.heartbeat_timeout_s}
        newly_silent = bool(silent - self._silent)
        self._silent = silent
        if urgent or newly_silent or now >= self._next_due:
            self._next_due = now + self.summary_interval_s
            return True
        return False
