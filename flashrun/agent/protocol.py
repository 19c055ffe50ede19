"""The agent's half of the coordinator protocol, shared by the real agent and the simulated ones of the scale
benchmark (scripts/sim_agents.py): the messages an agent sends, and when it sends its node summary."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from flashrun._proto import flashrun_pb2 as pb
from flashrun.config import PROTOCOL_VERSION, Detection


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
    not wait for the interval. Pure: the caller passes the time and what it sees, and the phase is drawn from
    `phase` (a number in (0, 1]).

    The regular summaries keep one phase, drawn at random when the first summary goes: an urgent summary does not
    move them. Thousands of agents start together (StartWorkers) and send an urgent summary together at the end of
    every recovery; had each restarted its interval from then, the coordinator would take their regular summaries
    in one burst per interval, far above its budget for that moment, and a node-loss timeout (counted from such a
    summary) would fire inside the next burst."""

    def __init__(self, phase: Callable[[], float] = lambda: 1.0 - random.random()) -> None:
        defaults = Detection()
        self.heartbeat_interval_s = defaults.heartbeat_interval_s
        self.summary_interval_s = defaults.heartbeat_interval_s
        self.heartbeat_timeout_s = defaults.heartbeat_timeout_s
        self._phase = phase
        self._next_due: float | None = None
        self._silent: set[int] = set()

    def configure(self, detection: pb.Detection) -> None:
        """Take the settings the coordinator sent with StartWorkers or Recover (zeros: keep the current ones)."""
        if detection.heartbeat_interval_s > 0:
            self.heartbeat_interval_s = detection.heartbeat_interval_s
        self.summary_interval_s = max(detection.summary_interval_s, self.heartbeat_interval_s)
        if detection.heartbeat_timeout_s > 0:
            self.heartbeat_timeout_s = detection.heartbeat_timeout_s

    def wait_s(self, now: float) -> float:
        """How long to sleep before looking again: silent workers are looked for every heartbeat interval."""
        return min(self.heartbeat_interval_s, self.due_in_s(now))

    def due_in_s(self, now: float) -> float:
        """Time until the next regular summary (for an agent whose workers' silence it learns of otherwise)."""
        return 0.0 if self._next_due is None else max(0.0, self._next_due - now)

    def should_send(self, now: float, urgent: bool, ages: dict[int, float]) -> bool:
        """`ages`: each worker's heartbeat age by PID (negative: never beat). True means send now; the regular
        summaries stay on their phase whatever is sent in between."""
        silent = {pid for pid, age in ages.items() if age > self.heartbeat_timeout_s}
        newly_silent = bool(silent - self._silent)
        self._silent = silent
        if self._next_due is None:  # the first summary goes at once; the regular ones from a random phase on
            self._next_due = now + self._phase() * self.summary_interval_s
            return True
        if now >= self._next_due:  # on the phase, however late this look came
            missed = math.floor((now - self._next_due) / self.summary_interval_s)
            self._next_due += (missed + 1) * self.summary_interval_s
            return True
        return urgent or newly_silent
