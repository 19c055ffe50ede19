"""The job's lifecycle as a pure state machine: (state, input, now) -> commands + events.

No sockets, threads or clocks here: the gRPC server feeds it agent messages and ticks with the time, and
carries out the commands it returns. Lifecycle:

    RENDEZVOUS --(nnodes agents joined)--> RUNNING(g) --(a worker failed)--> STOPPING(g)
    STOPPING(g) --(all agents stopped, restarts left)--> RUNNING(g+1)
    STOPPING(g) --(no restarts left, or stop not confirmed in time)--> FAILED
    RUNNING(g) --(every rank exited 0)--> SUCCEEDED
    RUNNING/STOPPING --(a member agent disconnected)--> FAILED
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
import signal
from typing import Any

from flashrun.config import PROTOCOL_VERSION
from flashrun.coordinator.ranks import Member, NodeAssignment, assign_ranks
from flashrun.errors import EXIT_JOB_FAILED, EXIT_OK


class Phase(enum.Enum):
    RENDEZVOUS = "rendezvous"
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclasses.dataclass(frozen=True)
class JobSpec:
    run_id: str
    token: str
    min_nodes: int
    max_nodes: int
    max_restarts: int
    last_call_s: float
    stop_ack_s: float


@dataclasses.dataclass(frozen=True)
class JoinRequest:
    agent_id: str
    hostname: str
    run_id: str
    token: str
    protocol_version: int
    requested_node_rank: int | None
    local_world_size: int


@dataclasses.dataclass(frozen=True)
class WorkerExit:
    generation: int
    local_rank: int
    exit_code: int
    """>= 0: exit status; < 0: killed by signal -exit_code (subprocess's convention)."""
    error_message: str = ""
    traceback: str = ""
    timestamp: float = 0.0


# Commands the shell carries out.
@dataclasses.dataclass(frozen=True)
class Reject:
    agent_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Wait:
    agent_id: str
    joined: int
    needed: int


@dataclasses.dataclass(frozen=True)
class MakeSpare:
    agent_id: str
    reason: str


@dataclasses.dataclass(frozen=True)
class StartGeneration:
    generation: int
    world_size: int
    nnodes: int
    assignments: dict[str, NodeAssignment]


@dataclasses.dataclass(frozen=True)
class Stop:
    agent_id: str
    generation: int


@dataclasses.dataclass(frozen=True)
class Shutdown:
    agent_id: str
    exit_code: int
    summary: str


Command = Reject | Wait | MakeSpare | StartGeneration | Stop | Shutdown


@dataclasses.dataclass(frozen=True)
class Event:
    """A state change worth logging; `fields` are JSON-serialisable."""

    name: str
    generation: int
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Output:
    commands: list[Command] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Failure:
    rank: int
    local_rank: int
    node_rank: int
    hostname: str
    exit_code: int
    error_message: str
    traceback: str
    generation: int

    def describe(self) -> str:
        if self.exit_code < 0:
            try:
                name = signal.Signals(-self.exit_code).name
            except ValueError:
                name = f"signal {-self.exit_code}"
            how = f"was killed by {name}"
        else:
            how = f"exited with code {self.exit_code}"
        return (
            f"rank {self.rank} (local rank {self.local_rank}) on node {self.node_rank} ({self.hostname}) {how}"
            f" in generation {self.generation}"
        )


class Job:
    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.phase = Phase.RENDEZVOUS
        self.generation = 0
        self.restarts = 0
        self.members: dict[str, Member] = {}
        self.spares: dict[str, Member] = {}
        self.assignments: dict[str, NodeAssignment] = {}
        self.exit_code: int | None = None
        self.summary = ""
        self.failures: list[Failure] = []
        self._join_seq = 0
        self._min_reached_at: float | None = None
        self._succeeded: set[tuple[str, int]] = set()
        self._stopped: set[str] = set()
        self._stop_deadline: float | None = None

    @property
    def world_size(self) -> int:
        return sum(a.local_world_size for a in self.assignments.values())

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.SUCCEEDED, Phase.FAILED)

    # Inputs -----------------------------------------------------------------------------------------------

    def join(self, request: JoinRequest, now: float) -> Output:
        out = Output()
        reason = self._admission_error(request)
        if reason:
            out.commands.append(Reject(request.agent_id, reason))
            out.events.append(Event("agent_rejected", self.generation, {"host": request.hostname, "reason": reason}))
            return out
        self._join_seq += 1
        member = Member(
            request.agent_id, request.hostname, request.requested_node_rank, request.local_world_size, self._join_seq
        )
        if self.phase is not Phase.RENDEZVOUS or len(self.members) >= self.spec.max_nodes:
            self.spares[member.agent_id] = member
            out.commands.append(MakeSpare(member.agent_id, "the job already has all the nodes it needs"))
            out.events.append(Event("spare_joined", self.generation, {"host": member.hostname}))
            return out
        self.members[member.agent_id] = member
        out.events.append(Event("agent_joined", self.generation, {"host": member.hostname, "agent": member.agent_id}))
        if len(self.members) >= self.spec.min_nodes and self._min_reached_at is None:
            self._min_reached_at = now
        if len(self.members) == self.spec.max_nodes:
            self._start_first_generation(out)
        else:
            needed = self.spec.min_nodes if len(self.members) < self.spec.min_nodes else self.spec.max_nodes
            out.commands.extend(Wait(agent_id, len(self.members), needed) for agent_id in self.members)
        return out

    def disconnect(self, agent_id: str, now: float) -> Output:
        out = Output()
        if agent_id in self.spares:
            del self.spares[agent_id]
            return out
        member = self.members.get(agent_id)
        if member is None or self.finished:
            return out
        if self.phase is Phase.RENDEZVOUS:
            del self.members[agent_id]
            if len(self.members) < self.spec.min_nodes:
                self._min_reached_at = None
            out.events.append(Event("agent_left", self.generation, {"host": member.hostname}))
            return out
        node_rank = self.assignments[agent_id].node_rank
        out.events.append(Event("node_lost", self.generation, {"node": node_rank, "host": member.hostname}))
        del self.members[agent_id]
        self._fail(out, f"node {node_rank} ({member.hostname}) lost its agent; the job cannot continue without it")
        return out

    def worker_exited(self, agent_id: str, exit: WorkerExit, now: float) -> Output:
        out = Output()
        assignment = self.assignments.get(agent_id)
        if assignment is None or exit.generation != self.generation or self.finished:
            return out
        member = self.members[agent_id]
        rank = assignment.rank_offset + exit.local_rank
        fields = {"rank": rank, "node": assignment.node_rank, "exit_code": exit.exit_code}
        if exit.exit_code == 0:
            self._succeeded.add((agent_id, exit.local_rank))
            out.events.append(Event("worker_succeeded", self.generation, fields))
            if self.phase is Phase.RUNNING and len(self._succeeded) == self.world_size:
                self.phase = Phase.SUCCEEDED
                self.exit_code = EXIT_OK
                self.summary = f"all {self.world_size} ranks finished"
                out.events.append(Event("job_succeeded", self.generation, {"restarts": self.restarts}))
                self._shutdown_all(out)
            return out
        if self.phase is not Phase.RUNNING:
            return out  # exits after our own stop command are expected, not failures
        failure = Failure(
            rank, exit.local_rank, assignment.node_rank, member.hostname, exit.exit_code,
            exit.error_message, exit.traceback, self.generation,
        )
        self.failures.append(failure)
        out.events.append(Event("worker_failed", self.generation, {**fields, "kind": "crash",
                                                                    "evidence": failure.describe()}))
        self.phase = Phase.STOPPING
        self._stopped.clear()
        self._stop_deadline = now + self.spec.stop_ack_s
        out.commands.extend(Stop(agent_id, self.generation) for agent_id in self.members)
        out.events.append(Event("stopping", self.generation, {"reason": failure.describe()}))
        return out

    def workers_stopped(self, agent_id: str, generation: int, now: float) -> Output:
        out = Output()
        if self.phase is not Phase.STOPPING or generation != self.generation or agent_id not in self.members:
            return out
        self._stopped.add(agent_id)
        if self._stopped != set(self.members):
            return out
        self._stop_deadline = None
        if self.restarts >= self.spec.max_restarts:
            self._fail(out, f"a worker failed and no restarts are left (--max-restarts {self.spec.max_restarts})")
            return out
        self.restarts += 1
        self.generation += 1
        self._succeeded.clear()
        self.phase = Phase.RUNNING
        out.events.append(Event("restarting", self.generation, {"restarts": self.restarts}))
        out.commands.append(self._start_command())
        return out

    def tick(self, now: float) -> Output:
        out = Output()
        if (
            self.phase is Phase.RENDEZVOUS
            and self._min_reached_at is not None
            and now - self._min_reached_at >= self.spec.last_call_s
        ):
            self._start_first_generation(out)
        elif self.phase is Phase.STOPPING and self._stop_deadline is not None and now >= self._stop_deadline:
            missing = sorted(self.members[a].hostname for a in set(self.members) - self._stopped)
            self._fail(out, f"agents on {', '.join(missing)} did not confirm their workers stopped "
                            f"within {self.spec.stop_ack_s:g} s")
        return out

    def abort(self, reason: str) -> Output:
        """The coordinator itself is going away (signal): stop every agent."""
        out = Output()
        if not self.finished:
            self._fail(out, reason)
        return out

    # Internals ----------------------------------------------------------------------------------------------

    def _admission_error(self, request: JoinRequest) -> str:
        if request.protocol_version != PROTOCOL_VERSION:
            return (f"protocol version mismatch: agent speaks {request.protocol_version}, coordinator "
                    f"{PROTOCOL_VERSION}; run the same flashrun version on every node")
        if request.run_id != self.spec.run_id:
            return (f"run id mismatch: agent has --rdzv-id {request.run_id!r}, coordinator "
                    f"{self.spec.run_id!r}; give every node the same --rdzv-id")
        if not hmac.compare_digest(request.token.encode(), self.spec.token.encode()):
            return "wrong token: give every node the same --token-file or FLASHRUN_TOKEN"
        if request.agent_id in self.members or request.agent_id in self.spares:
            return f"agent {request.agent_id} already joined"
        requested = request.requested_node_rank
        if requested is not None and self.phase is Phase.RENDEZVOUS:
            if requested >= self.spec.max_nodes:
                last = self.spec.max_nodes - 1
                return f"--node-rank {requested} is outside 0..{last} for --nnodes {self.spec.max_nodes}"
            for other in self.members.values():
                if other.requested_node_rank == requested:
                    return (f"node rank {requested} is already taken by {other.hostname} "
                            f"({other.agent_id}); give each node a distinct --node-rank")
        return ""

    def _start_first_generation(self, out: Output) -> None:
        self.assignments = assign_ranks(list(self.members.values()))
        self.phase = Phase.RUNNING
        out.events.append(Event("rendezvous_complete", self.generation, {
            "nnodes": len(self.members), "world_size": self.world_size,
        }))
        out.commands.append(self._start_command())

    def _start_command(self) -> StartGeneration:
        return StartGeneration(self.generation, self.world_size, len(self.assignments), dict(self.assignments))

    def _fail(self, out: Output, reason: str) -> None:
        self.phase = Phase.FAILED
        self.exit_code = EXIT_JOB_FAILED
        lines = [f"job failed: {reason}"]
        if self.failures:
            root = self.failures[0]
            lines.append(f"root cause (first failure): {root.describe()}")
            if root.error_message:
                lines.append(f"  error: {root.error_message}")
            if root.traceback:
                lines.append("  traceback:")
                lines.extend("    " + line for line in root.traceback.rstrip().splitlines())
            for other in self.failures[1:]:
                lines.append(f"earlier generation failure: {other.describe()}")
        self.summary = "\n".join(lines)
        out.events.append(Event("job_failed", self.generation, {"reason": reason, "restarts": self.restarts}))
        self._shutdown_all(out)

    def _shutdown_all(self, out: Output) -> None:
        assert self.exit_code is not None
        for agent_id in [*self.members, *self.spares]:
            out.commands.append(Shutdown(agent_id, self.exit_code, self.summary))
