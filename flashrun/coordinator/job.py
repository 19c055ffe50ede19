"""The job's lifecycle as a pure state machine: (state, input, now) -> commands + events.

No sockets, threads or clocks here: the gRPC server feeds it agent messages and ticks with the time, and
carries out the commands it returns. Lifecycle:

    RENDEZVOUS --(MIN agents joined)--> RUNNING(g)                 later agents, up to MAX, are spares
    RUNNING(g) --(every rank exited 0)--> SUCCEEDED
    In-place recovery, when every rank runs flashrun's step loop:
    RUNNING(g) --(failure)--> RECOVERING(g+1): faulty ranks respawned, healthy ones move to g+1 in place
    RECOVERING(g+1) --(every rank reports g+1)--> RUNNING(g+1)
    RECOVERING(g+1) --(another failure, or ranks late past the deadline)--> RECOVERING(g+2)
    (agents that watch the job's store hear of g+1 from one notice published there; the rest get a Recover)
    Full restart, for scripts without the step loop (torchrun's semantics):
    RUNNING(g) --(failure)--> STOPPING(g) --(all agents stopped, restarts left)--> RUNNING(g+1)
    STOPPING(g) --(no restarts left, or stop not confirmed in time)--> FAILED
    a member agent lost with no spare to take its place --> FAILED
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import hmac
import signal
from collections.abc import Callable, Iterable
from typing import Any

from flashrun.agent.store_barrier import shard_count, shard_of
from flashrun.config import NODES_PER_STORE_SHARD, PROTOCOL_VERSION, Detection
from flashrun.coordinator.detector import Detected, FailureDetector, RankReport
from flashrun.coordinator.ranks import Member, NodeAssignment, assign_ranks
from flashrun.errors import EXIT_JOB_FAILED, EXIT_OK, EXIT_UNRECOVERABLE
from flashrun.inject import NODE_FAULT, RANK_FAULTS, STEP_LOOP_FAULTS

STATE_SEVERITY = {
    "lost": 0, "crash": 1, "unresponsive": 1, "stalled": 1, "escalated": 1, "failed": 1, "stopping": 2,
    "recovering": 3, "straggler": 4, "ready": 5, "rendezvous": 6, "running": 6, "succeeded": 7,
}
"""How bad a rank's state is: a node shows its worst rank's."""
NODES_LISTED = 20
"""Node ranks an event lists at most (the count is always given)."""


class Phase(enum.Enum):
    RENDEZVOUS = "rendezvous"
    RUNNING = "running"
    RECOVERING = "recovering"
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
    stop_ack_s: float
    detection: Detection = Detection()
    max_recoveries: int = 100
    """In-place recoveries allowed before the job fails (full restarts count against max_restarts)."""
    recovery_deadline_s: float = 30.0
    """A rank that has not reached the new generation this long after a recovery began is replaced."""
    notice_fallback_s: float = 5.0
    """A recovery's notice on the store (agent/generation_notice.py) not acknowledged by every agent this long after
    it was published: the agents not yet seen in the new generation are sent a Recover message as well. Longer than
    two summary intervals at 4,096 nodes (2.4 s each), so that most agents have been seen by then."""
    allow_inject: bool = False
    """`flashrun inject` may inject faults (--allow-inject): without it no one can kill this job's workers."""
    nodes_per_store_shard: int = NODES_PER_STORE_SHARD
    """Nodes per shard of the store's recovery work (config.NODES_PER_STORE_SHARD; 0: one shard)."""


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
    pid: int = 0


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
    kill_local_ranks: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Shutdown:
    agent_id: str
    exit_code: int
    summary: str


@dataclasses.dataclass(frozen=True)
class Recover:
    agent_id: str
    generation: int
    respawn_local_ranks: tuple[int, ...]
    assignment: NodeAssignment
    world_size: int
    nnodes: int


@dataclasses.dataclass(frozen=True)
class Publish:
    """Publish a new in-place generation on the job's store, for every agent that watches it."""

    generation: int
    respawn: dict[int, tuple[int, ...]]
    """node rank -> local ranks to replace (only the nodes with any)."""
    direct_nodes: tuple[int, ...]
    """Nodes told by a Recover message instead (or lost): they ignore the notice."""
    acks_expected: int
    acks_by_shard: tuple[int, ...] = ()
    """Of `acks_expected`, how many on each store shard (agent/store_barrier.py), in shard order."""


@dataclasses.dataclass(frozen=True)
class InjectRequest:
    """`flashrun inject`: `fault` on global `rank`, or on node `node` (kill-node), when `at_step` is about to run."""

    token: str
    fault: str
    rank: int | None = None
    node: int | None = None
    at_step: int | None = None
    """None: at once (hang and exception: at the next step)."""


@dataclasses.dataclass(frozen=True)
class Inject:
    """Relay a fault drill to one agent: for its worker of `local_rank`, or (None) for the whole node."""

    agent_id: str
    fault: str
    local_rank: int | None
    at_step: int | None
    rank: int | None = None
    pid: int = 0
    """The process the drill is for (0: not known yet); the agent leaves a newer one alone."""
    detail: str = ""
    """What `flashrun inject` prints, e.g. "kill sent to rank 1 (pid 1234) on node 0 (host)"."""


@dataclasses.dataclass(frozen=True)
class InjectRefused:
    """The drill was not sent: `code` is the gRPC status name the shell answers with, `reason` says why."""

    code: str
    reason: str


Command = Reject | Wait | MakeSpare | StartGeneration | Stop | Shutdown | Recover | Publish | Inject | InjectRefused


@dataclasses.dataclass(frozen=True)
class Event:
    """A state change worth logging; `fields` are JSON-serialisable."""

    name: str
    generation: int
    fields: dict[str, Any] = dataclasses.field(default_factory=dict)

    def record(self, ts: float) -> dict[str, Any]:
        """The event as one line of events.jsonl (and of the status snapshot's recent events)."""
        return {"ts": ts, "event": self.name, "generation": self.generation, **self.fields}


@dataclasses.dataclass
class Output:
    commands: list[Command] = dataclasses.field(default_factory=list)
    events: list[Event] = dataclasses.field(default_factory=list)
    retired: object = None
    """State the job let go of, freed with the Output once the shell has carried out its commands: a recovery's
    previous failure detector holds an object or more per rank, and freeing them (about 12 ms at 4,096 nodes)
    before the notice went out would delay every agent by as much."""


@dataclasses.dataclass(frozen=True)
class Failure:
    """One detected fault: `crash`, `unresponsive`, `stalled` or `node_lost`, with who and why."""

    kind: str
    ranks: tuple[int, ...]
    node_rank: int | None
    hostname: str
    evidence: str
    generation: int
    local_rank: int | None = None
    exit_code: int | None = None
    error_message: str = ""
    traceback: str = ""
    exited_at: float | None = None
    """A crash's exit, Unix time as its agent saw it: the failure's onset, for detection latency."""
    silent_s: float | None = None
    """For a failure the detector found: how long before detection its last sign of life came (Detected.silent_s)."""

    def describe(self) -> str:
        if self.kind != "crash":
            return f"{self.kind} in generation {self.generation}: {self.evidence}"
        assert self.exit_code is not None
        if self.exit_code < 0:
            try:
                name = signal.Signals(-self.exit_code).name
            except ValueError:
                name = f"signal {-self.exit_code}"
            how = f"was killed by {name}"
        else:
            how = f"exited with code {self.exit_code}"
        return (
            f"rank {self.ranks[0]} (local rank {self.local_rank}) on node {self.node_rank} ({self.hostname}) {how}"
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
        self._succeeded: set[tuple[str, int]] = set()
        self._stopped: set[str] = set()
        self._stop_deadline: float | None = None
        self._failed_ranks: set[int] = set()
        self._lost_nodes: set[int] = set()
        self._stragglers: set[int] = set()
        self._detector: FailureDetector | None = None
        self._next_detector: Callable[[], FailureDetector] | None = None
        """A recovery's new detector, built once the notice is out (`settle`) or when first needed."""
        self.recoveries = 0
        self._pids: dict[int, int] = {}
        """Each rank's current process, across generations (a recovery keeps most of them)."""
        self._recoverable_job = False
        """Every rank has run flashrun's step loop: failures are recovered in place from then on."""
        self._recovery_deadline: float | None = None
        self._recovery_began: float | None = None
        self._awaiting_step: tuple[int, float] | None = None
        """After a recovery: (the step to complete, when the failure was detected), for the timeline."""
        self._replacements: dict[int, int] = {}
        """How often each rank's process was replaced by an in-place recovery."""
        self._world_size = 0
        self._world_size_of: dict[str, NodeAssignment] | None = None
        self._unacknowledged: set[str] = set()
        """Agents that have not yet acknowledged the generation a recovery moved them to."""
        self._watching: set[str] = set()
        """Agents that said (in their last summary) that they wait on the store for the next generation's notice."""
        self._noticed: set[str] = set()
        """The agents the current recovery told through its notice only (they acknowledge it on the store)."""
        self._notice_fallback_at: float | None = None
        self._respawn: dict[str, tuple[int, ...]] = {}
        """The current recovery's local ranks to replace, by agent (for a Recover sent after the notice)."""
        self._rendezvous_pending: float | None = None
        """When the failure the current generation recovers from was detected, until its barrier was released (the
        coordinator may hear of the release after the ranks' reports, so this outlives the RECOVERING phase)."""

    @property
    def detector(self) -> FailureDetector | None:
        if self._next_detector is not None:
            build, self._next_detector = self._next_detector, None
            self._detector = build()
        return self._detector

    @detector.setter
    def detector(self, detector: FailureDetector | None) -> None:
        self._next_detector = None
        self._detector = detector

    def settle(self) -> None:
        """Build what a recovery left for after its notice: the new generation's detector, O(ranks). The shell calls
        this once it has published; any input that needs the detector first builds it itself."""
        _ = self.detector

    @property
    def world_size(self) -> int:
        # Kept, not summed: asked on every worker exit, and a spare that takes over has the same size.
        if self._world_size_of is not self.assignments:
            self._world_size = sum(a.local_world_size for a in self.assignments.values())
            self._world_size_of = self.assignments
        return self._world_size

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
        if self.phase is not Phase.RENDEZVOUS:
            self.spares[member.agent_id] = member
            out.commands.append(MakeSpare(member.agent_id, "the job already has all the nodes it needs; this node "
                                                           "takes over if one is lost"))
            out.events.append(Event("spare_joined", self.generation, {"host": member.hostname}))
            return out
        self.members[member.agent_id] = member
        out.events.append(Event("agent_joined", self.generation, {"host": member.hostname, "agent": member.agent_id}))
        if len(self.members) == self.spec.min_nodes:
            self._start_first_generation(out, now)
        else:
            # Only the newcomer hears the count: telling every member of every join is quadratic in the nodes.
            out.commands.append(Wait(member.agent_id, len(self.members), self.spec.min_nodes))
        return out

    def disconnect(self, agent_id: str, now: float) -> Output:
        out = Output()
        self._watching.discard(agent_id)
        if agent_id in self.spares:
            del self.spares[agent_id]
            return out
        member = self.members.get(agent_id)
        if member is None or self.finished:
            return out
        if self.phase is Phase.RENDEZVOUS:
            del self.members[agent_id]
            out.events.append(Event("agent_left", self.generation, {"host": member.hostname}))
            return out
        assignment = self.assignments[agent_id]
        ranks = tuple(range(assignment.rank_offset, assignment.rank_offset + assignment.local_world_size))
        failure = Failure("node_lost", ranks, assignment.node_rank, member.hostname,
                          f"the agent's connection on node {assignment.node_rank} ({member.hostname}) broke",
                          self.generation)
        self._lost_nodes.add(assignment.node_rank)
        self._record_failure(out, failure)
        if self.phase in (Phase.RUNNING, Phase.RECOVERING) and self._can_recover(set(failure.ranks)):
            self._begin_recovery(out, now, set(failure.ranks), failure)
            return out
        del self.members[agent_id]
        self._fail_for_lost_nodes(out, {assignment.node_rank: member.hostname})
        return out

    def worker_exited(self, agent_id: str, exit: WorkerExit, now: float) -> Output:
        out = Output()
        assignment = self.assignments.get(agent_id)
        if assignment is None or self.finished:
            return out
        rank = assignment.rank_offset + exit.local_rank
        # A worker spawned in an earlier generation still counts if it is the rank's current process.
        if exit.generation != self.generation and not (exit.pid and self._pids.get(rank) == exit.pid):
            return out
        member = self.members[agent_id]
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
        if self.phase not in (Phase.RUNNING, Phase.RECOVERING):
            return out  # exits after our own stop command are expected, not failures
        failure = Failure(
            "crash", (rank,), assignment.node_rank, member.hostname, "", self.generation, local_rank=exit.local_rank,
            exit_code=exit.exit_code, error_message=exit.error_message, traceback=exit.traceback,
            exited_at=exit.timestamp or None,
        )
        failure = dataclasses.replace(failure, evidence=failure.describe())
        self._record_failure(out, failure)
        if exit.exit_code == EXIT_UNRECOVERABLE:
            self._fail(out, f"rank {rank} found no replica holding the lost state and no checkpoint")
        else:
            self._handle_failure(out, now, set(failure.ranks), failure)
        return out

    def note(self, agent_id: str, event: str, detail: str) -> Output:
        """An agent's own observation, logged as is."""
        assignment = self.assignments.get(agent_id)
        node = assignment.node_rank if assignment else None
        return Output(events=[Event(event, self.generation, {"node": node, "detail": detail})])

    def node_summary(self, agent_id: str, generation: int, reports: list[RankReport], now: float,
                     watching: bool = False) -> Output:
        """A node's per-interval summary; `reports` carry local ranks, translated here to global ranks. `watching`:
        the agent waits on the store for the next generation's notice."""
        assignment = self.assignments.get(agent_id)
        if assignment is None:
            return Output()
        if watching:
            self._watching.add(agent_id)
        else:
            self._watching.discard(agent_id)
        if generation != self.generation or self.detector is None:
            return Output()
        # O(ranks of this node): a job of thousands of nodes sends thousands of these per second.
        offset = assignment.rank_offset
        self.detector.observe(assignment.node_rank, reports, now, rank_offset=offset)
        for report in reports:
            self._pids[offset + report.local_rank] = report.pid
        out = Output()
        if self.phase is Phase.RECOVERING and self._unacknowledged:
            self._acknowledged(out, now, (agent_id,))
        if self.phase is Phase.RUNNING and not self._recoverable_job and self.detector.all_recoverable:
            self._recoverable_job = True
            out.events.append(Event("recoverable", self.generation, {}))
        if self.phase is Phase.RECOVERING and self.detector.all_ready:
            self._complete_recovery(out, now, self.detector.reports())
        elif self._awaiting_step is not None and self.detector.job_step >= self._awaiting_step[0]:
            step, detected_at = self._awaiting_step
            self._awaiting_step = None
            out.events.append(Event("recovery_phase", self.generation, {
                "phase": "first_step", "step": step, "since_detection_s": round(now - detected_at, 4)}))
        return out

    def notice_acknowledged(self, generation: int, now: float) -> Output:
        """Every agent told by `generation`'s notice acknowledged it on the store."""
        out = Output()
        if self.phase is Phase.RECOVERING and generation == self.generation and self._unacknowledged:
            self._acknowledged(out, now, self._noticed)
        return out

    def barrier_released(self, generation: int, outcome: str, now: float) -> Output:
        """`generation`'s barrier on the store was released: with "complete", every rank's new-generation store
        rendezvous is done (each node arrived once all its ranks had left the old group)."""
        out = Output()
        if generation == self.generation and outcome == "complete" and self._rendezvous_pending is not None:
            out.events.append(Event("recovery_phase", self.generation, {
                "phase": "rendezvous", "since_detection_s": round(now - self._rendezvous_pending, 4)}))
            self._rendezvous_pending = None
        return out

    def _acknowledged(self, out: Output, now: float, agents: Iterable[str]) -> None:
        self._unacknowledged.difference_update(agents)
        if not self._unacknowledged and self._recovery_began is not None:
            # Every agent acted on the new generation: the control plane's own share of the recovery is over.
            self._notice_fallback_at = None
            out.events.append(Event("recovery_phase", self.generation, {
                "phase": "acknowledged", "since_detection_s": round(now - self._recovery_began, 4)}))

    def workers_stopped(self, agent_id: str, generation: int, now: float) -> Output:
        out = Output()
        if self.phase is not Phase.STOPPING or generation != self.generation or agent_id not in self.members:
            return out
        self._stopped.add(agent_id)
        if self._stopped != set(self.members):
            return out
        self._stop_deadline = None
        if self.restarts >= self.spec.max_restarts:
            recoveries = (f"no in-place recoveries (max {self.spec.max_recoveries}) and "
                          if self._recoverable_job else "")
            self._fail(out, f"a worker failed and {recoveries}no restarts are left "
                            f"(--max-restarts {self.spec.max_restarts})")
            return out
        self.restarts += 1
        self.generation += 1
        self._succeeded.clear()
        self._failed_ranks.clear()
        self._stragglers.clear()
        self.phase = Phase.RUNNING
        out.events.append(Event("restarting", self.generation, {"restarts": self.restarts}))
        out.commands.append(self._start_command(now))
        return out

    def paused(self, paused_s: float, now: float) -> Output:
        """The coordinator itself did not run for `paused_s` until `now` (stopped, starved, its machine paused). What
        its agents sent meanwhile is still unread: nodes' silence, the job's idleness and the job's own deadlines
        count from now, not from before the pause."""
        if self.detector is not None:
            self.detector.after_own_pause(now)
        if self._recovery_deadline is not None:
            self._recovery_deadline += paused_s
        if self._notice_fallback_at is not None:
            self._notice_fallback_at += paused_s
        if self._stop_deadline is not None:
            self._stop_deadline += paused_s
        return Output(events=[Event("coordinator_paused", self.generation, {"paused_s": round(paused_s, 3)})])

    def tick(self, now: float) -> Output:
        out = Output()
        if self.phase in (Phase.RUNNING, Phase.RECOVERING) and self.detector is not None:
            detected = self.detector.check(now, stalls=self.phase is Phase.RUNNING)
            if self.phase is Phase.RUNNING:
                self._note_stragglers(out)
            ranks: set[int] = set()
            for found in detected:
                if found.kind == "node_lost" and found.node_rank is not None:
                    self._lost_nodes.add(found.node_rank)
                failure = self._from_detected(found)
                self._record_failure(out, failure)
                ranks.update(failure.ranks)
            if detected:
                self._handle_failure(out, now, ranks, self.failures[-1])
            elif self.phase is Phase.RECOVERING and self._notice_fallback_at is not None \
                    and now >= self._notice_fallback_at:
                self._fall_back_from_notice(out)
            elif self.phase is Phase.RECOVERING and self._recovery_deadline is not None \
                    and now >= self._recovery_deadline:
                reports = self.detector.reports()
                late = {r for r in range(self.world_size)
                        if r not in reports or reports[r].generation != self.generation}
                failure = Failure("escalated", tuple(sorted(late)), None, "",
                                  f"ranks {sorted(late)} did not reach generation {self.generation} within "
                                  f"{self.spec.recovery_deadline_s:g} s: replacing them", self.generation)
                self._record_failure(out, failure)
                self._handle_failure(out, now, late, failure)
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

    def inject(self, request: InjectRequest, colocated_agent: str = "") -> Output:
        """A fault drill: an `Inject` for the agent that owns the target, or an `InjectRefused` saying why not.

        `colocated_agent` is the agent in the coordinator's own process: losing its node would end the job.
        """
        out = Output()
        refused = self._inject_refusal(request, colocated_agent)
        if refused is not None:
            out.commands.append(refused)
            return out
        if request.fault == NODE_FAULT:
            agent_id = next(a for a, asg in self.assignments.items() if asg.node_rank == request.node)
            a = self.assignments[agent_id]
            host = self.members[agent_id].hostname
            ranks = f"rank {a.rank_offset}" if a.local_world_size == 1 else \
                f"ranks {a.rank_offset}..{a.rank_offset + a.local_world_size - 1}"
            detail = f"{NODE_FAULT} sent to node {a.node_rank} ({host}): its agent and {ranks} go down"
            command = Inject(agent_id, NODE_FAULT, None, None, detail=detail)
            fields: dict[str, Any] = {"fault": NODE_FAULT, "node": a.node_rank, "host": host}
        else:
            assert request.rank is not None
            agent_id, a = self._owner(request.rank)
            host = self.members[agent_id].hostname
            report = self.detector.last_report(request.rank) if self.detector else None
            pid = report.pid if report else self._pids.get(request.rank, 0)
            what = request.fault if request.at_step is None else f"{request.fault} at step {request.at_step}"
            process = f" (pid {pid})" if pid else ""
            detail = f"{what} sent to rank {request.rank}{process} on node {a.node_rank} ({host})"
            command = Inject(agent_id, request.fault, request.rank - a.rank_offset, request.at_step, request.rank,
                             pid, detail)
            fields = {"fault": request.fault, "rank": request.rank, "node": a.node_rank, "host": host, "pid": pid}
            if request.at_step is not None:
                fields["at_step"] = request.at_step
        out.commands.append(command)
        out.events.append(Event("fault_injected", self.generation, fields))
        return out

    def _inject_refusal(self, request: InjectRequest, colocated_agent: str) -> InjectRefused | None:
        if not hmac.compare_digest(request.token.encode(), self.spec.token.encode()):
            return InjectRefused("permission_denied", "wrong token: give the job's --token-file or FLASHRUN_TOKEN")
        if not self.spec.allow_inject:
            return InjectRefused("permission_denied", "this job was not started with --allow-inject")
        if request.fault not in (*RANK_FAULTS, NODE_FAULT):
            return InjectRefused("invalid_argument", f"unknown fault {request.fault!r}: use one of "
                                                     f"{', '.join((*RANK_FAULTS, NODE_FAULT))}")
        if self.phase is not Phase.RUNNING:
            why = {Phase.RENDEZVOUS: "has not started yet (the rendezvous is not complete)",
                   Phase.RECOVERING: f"is recovering (generation {self.generation}); retry once it runs again",
                   Phase.STOPPING: f"is stopping its workers (generation {self.generation}); retry once it runs"
                   }.get(self.phase, f"has {self.phase.value}")
            return InjectRefused("failed_precondition", f"the job {why}")
        if request.fault == NODE_FAULT:
            return self._node_fault_refusal(request, colocated_agent)
        rank = request.rank
        if rank is None or not 0 <= rank < self.world_size:
            return InjectRefused("invalid_argument", f"rank {rank} does not exist: the job's ranks are "
                                                     f"0..{self.world_size - 1}")
        if request.at_step is None and request.fault not in STEP_LOOP_FAULTS:
            return None  # the agent signals the process itself: no library needed
        report = self.detector.last_report(rank) if self.detector else None
        if report is None:
            return InjectRefused("failed_precondition", f"rank {rank} has not reported its progress yet; retry in "
                                                        "a moment")
        if not report.recoverable:
            what = request.fault if request.at_step is None else f"{request.fault} with --at-step"
            return InjectRefused("failed_precondition", f"rank {rank} does not run flashrun's step loop "
                                 f"(run.steps()): {what} needs it; kill or stop without --at-step work on any worker")
        if request.at_step is not None and request.at_step <= report.step:
            return InjectRefused("invalid_argument", f"rank {rank} already completed step {request.at_step} (it "
                                                     f"is past step {report.step}): give a later --at-step")
        return None

    def _node_fault_refusal(self, request: InjectRequest, colocated_agent: str) -> InjectRefused | None:
        nodes = sorted(a.node_rank for a in self.assignments.values())
        if request.node not in nodes:
            return InjectRefused("invalid_argument", f"node {request.node} does not exist: the job's nodes are "
                                                     f"{nodes[0]}..{nodes[-1]}")
        if request.at_step is not None:
            return InjectRefused("invalid_argument", f"{NODE_FAULT} happens at once: drop --at-step")
        agent_id = next(a for a, asg in self.assignments.items() if asg.node_rank == request.node)
        if agent_id == colocated_agent:
            return InjectRefused("failed_precondition", f"node {request.node}'s launcher also hosts the coordinator: "
                                 "killing it would end the job, not drill a node loss; kill another node, or run "
                                 "the coordinator on its own (flashrun coordinator)")
        return None

    def _owner(self, rank: int) -> tuple[str, NodeAssignment]:
        return next((agent_id, a) for agent_id, a in self.assignments.items()
                    if a.rank_offset <= rank < a.rank_offset + a.local_world_size)

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
        if len(self.members) + len(self.spares) >= self.spec.max_nodes:
            return (f"the job already has {self.spec.max_nodes} nodes (--nnodes {self.spec.min_nodes}:"
                    f"{self.spec.max_nodes}: {self.spec.min_nodes} working, the rest spares); raise MAX to add spares")
        requested = request.requested_node_rank
        if requested is not None and self.phase is Phase.RENDEZVOUS:
            if requested >= self.spec.min_nodes:
                last = self.spec.min_nodes - 1
                return f"--node-rank {requested} is outside 0..{last}: the job runs on {self.spec.min_nodes} nodes"
            for other in self.members.values():
                if other.requested_node_rank == requested:
                    return (f"node rank {requested} is already taken by {other.hostname} "
                            f"({other.agent_id}); give each node a distinct --node-rank")
        return ""

    def _start_first_generation(self, out: Output, now: float) -> None:
        self.assignments = assign_ranks(list(self.members.values()))
        self.phase = Phase.RUNNING
        out.events.append(Event("rendezvous_complete", self.generation, {
            "nnodes": len(self.members), "world_size": self.world_size,
        }))
        out.commands.append(self._start_command(now))

    def _start_command(self, now: float) -> StartGeneration:
        self._pids.clear()  # every process is new: a late exit of the old ones must not count
        self.detector = FailureDetector(self.spec.detection, _ranks_by_node(self.assignments.values()), now,
                                        generation=self.generation)
        return StartGeneration(self.generation, self.world_size, len(self.assignments), dict(self.assignments))

    def _can_recover(self, failed: set[int]) -> bool:
        # Healthy ranks whose loop is over cannot take part in a rebuild: a failure that late is not recovered in
        # place. (The failed ranks themselves may have said "finished" on their way out.)
        done = bool(self._succeeded) or (self.detector is not None and bool(self.detector.finished_ranks() - failed))
        return self._recoverable_job and self.recoveries < self.spec.max_recoveries and not done

    def _handle_failure(self, out: Output, now: float, ranks: set[int], cause: Failure) -> None:
        """In place when the job can recover; otherwise (or with no recoveries left) torchrun's full restart."""
        if self._can_recover(ranks):  # with no culprit (a stall nobody can be blamed for) nothing is respawned
            self._begin_recovery(out, now, ranks, cause)
        elif self._lost_nodes:
            # A node found silent is as gone as one whose connection broke (`disconnect`): it will confirm no stop,
            # so waiting for every member's confirmation would only fail the job a stop deadline later, blaming that.
            self._fail_for_lost_nodes(out, {self.assignments[a].node_rank: m.hostname for a, m in self.members.items()
                                            if self.assignments[a].node_rank in self._lost_nodes})
        else:
            self._stop_all(out, now, cause)

    def _fail_for_lost_nodes(self, out: Output, hosts: dict[int, str]) -> None:
        """Lost nodes (by node rank, with their hosts) that no recovery in place can replace end the job."""
        nodes, several = sorted(hosts), len(hosts) > 1
        self._fail(out, f"node{'s' if several else ''} {', '.join(map(str, nodes))} "
                        f"({', '.join(sorted(set(hosts.values())))}) {'were' if several else 'was'} lost; the job "
                        f"cannot continue without {'them' if several else 'it'}")

    def _begin_recovery(self, out: Output, now: float, ranks: set[int], cause: Failure) -> None:
        """Replace `ranks` and move every healthy rank to a new generation, keeping its process."""
        spares_placed: set[str] = set()
        lost_nodes = set(self._lost_nodes)
        for node_rank in sorted(self._lost_nodes):
            lost = next((a for a, asg in self.assignments.items() if asg.node_rank == node_rank), None)
            if lost is None:
                continue
            host = self.members[lost].hostname
            spare = next((a for a, m in self.spares.items()
                          if m.local_world_size == self.assignments[lost].local_world_size), None)
            if spare is None:
                self._fail(out, f"node {node_rank} ({host}) was lost and no spare agent can take its place; start "
                                "the job with --nnodes MIN:MAX and more agents than MIN")
                return
            self.members[spare] = self.spares.pop(spare)
            self.assignments[spare] = self.assignments.pop(lost)
            spares_placed.add(spare)
            del self.members[lost]
            self._watching.discard(lost)
            out.commands.append(Shutdown(lost, EXIT_JOB_FAILED, f"node {node_rank} was replaced by a spare"))
            out.events.append(Event("spare_takes_over", self.generation + 1, {
                "node": node_rank, "host": self.members[spare].hostname, "lost_host": host}))
        self._lost_nodes.clear()
        self.generation += 1
        self.recoveries += 1
        self.phase = Phase.RECOVERING
        self._recovery_deadline = now + self.spec.recovery_deadline_s
        if self._recovery_began is None:
            self._recovery_began = now
        self._unacknowledged = set(self.assignments)
        self._awaiting_step = None
        self._succeeded.clear()
        self._failed_ranks.clear()
        self._stragglers.clear()
        out.events.append(Event("recovery_started", self.generation, {
            "kind": cause.kind, "ranks": sorted(ranks), "cause": cause.describe(), "recoveries": self.recoveries}))
        old = self.detector
        previous = old.recent_step_s if old else ()
        out.retired = old
        # Building the new detector is O(ranks) (5-10 ms at 4,096 nodes), and nothing an agent does needs it before
        # the notice is out: it is built then, from this moment's state (`settle`). The old one hears nothing more.
        assignments, generation = tuple(self.assignments.values()), self.generation
        taken_over = {self.assignments[a].node_rank for a in spares_placed}

        def heard_from() -> dict[int, float]:
            return {n: t for n, t in (old.last_heard() if old else {}).items() if n not in taken_over}

        self._detector, self._next_detector = None, lambda: FailureDetector(
            self.spec.detection, _ranks_by_node(assignments), now, previous, generation=generation,
            heard_from=heard_from())
        for rank in ranks:
            self._replacements[rank] = self._replacements.get(rank, 0) + 1
        # One Recover per agent, built in O(nodes + failed ranks): this runs for thousands of nodes at once.
        world_size, nnodes = self.world_size, len(self.assignments)
        by_offset = sorted((a.rank_offset, agent_id) for agent_id, a in self.assignments.items())
        offsets = [offset for offset, _ in by_offset]
        respawn: dict[str, list[int]] = {}
        for rank in sorted(ranks):
            offset, agent_id = by_offset[bisect.bisect_right(offsets, rank) - 1]
            respawn.setdefault(agent_id, []).append(rank - offset)
        self._respawn = {agent_id: tuple(local_ranks) for agent_id, local_ranks in respawn.items()}
        # The agents that watch the store learn the generation from one notice there (agent/generation_notice.py);
        # a spare taking over needs its placement, and an agent not known to watch needs a message.
        direct = {a for a in self.assignments if a not in self._watching or a in spares_placed}
        self._noticed = set(self.assignments) - direct
        self._notice_fallback_at = now + self.spec.notice_fallback_s if self._noticed else None
        self._rendezvous_pending = self._recovery_began
        direct_nodes = {self.assignments[a].node_rank for a in direct} | lost_nodes
        out.commands.append(Publish(
            self.generation, {self.assignments[a].node_rank: r for a, r in self._respawn.items()},
            tuple(sorted(direct_nodes)), len(self._noticed),
            _acks_by_shard(nnodes, self.spec.nodes_per_store_shard, [self.assignments[a].node_rank for a in direct])))
        for agent_id in sorted(direct):
            out.commands.append(Recover(agent_id, self.generation, self._respawn.get(agent_id, ()),
                                        self.assignments[agent_id], world_size, nnodes))

    def _fall_back_from_notice(self, out: Output) -> None:
        """The notice was not acknowledged by all in time: tell the agents not yet seen in the generation directly
        (an agent that acted on the notice already ignores the duplicate)."""
        self._notice_fallback_at = None
        late = sorted(self._unacknowledged & self._noticed)
        if not late:
            return
        out.events.append(Event("notice_fallback", self.generation, {
            "agents": len(late), "nodes": sorted(self.assignments[a].node_rank for a in late)[:NODES_LISTED]}))
        world_size, nnodes = self.world_size, len(self.assignments)
        for agent_id in late:
            out.commands.append(Recover(agent_id, self.generation, self._respawn.get(agent_id, ()),
                                        self.assignments[agent_id], world_size, nnodes))

    def _complete_recovery(self, out: Output, now: float, reports: dict[int, RankReport]) -> None:
        assert self._recovery_began is not None
        done = [r.recovery for r in reports.values() if r.recovery and r.recovery.get("generation") == self.generation]

        def longest(field: str) -> float:
            return round(max((d.get(field, 0.0) for d in done), default=0.0), 4)

        resume = int(max((d.get("resume_step", -1) for d in done), default=-1))
        phases = {"abort_s": longest("abort_s"), "respawn_s": longest("start_s"), "rebuild_s": longest("rebuild_s"),
                  "sync_s": longest("sync_s")}
        for phase, duration in phases.items():
            out.events.append(Event("recovery_phase", self.generation, {"phase": phase[:-2], "duration_s": duration}))
        out.events.append(Event("recovered", self.generation, {
            "since_detection_s": round(now - self._recovery_began, 4), "resume_step": resume, **phases}))
        self.phase = Phase.RUNNING
        assert self.detector is not None
        self.detector.resume(now)
        self._recovery_deadline = None
        self._awaiting_step = (resume, self._recovery_began)
        self._recovery_began = None

    def _record_failure(self, out: Output, failure: Failure) -> None:
        self.failures.append(failure)
        self._failed_ranks.update(failure.ranks)
        fields: dict[str, Any] = {"kind": failure.kind, "ranks": list(failure.ranks), "evidence": failure.evidence}
        if len(failure.ranks) == 1:
            fields["rank"] = failure.ranks[0]
        if failure.node_rank is not None:
            fields["node"] = failure.node_rank
        if failure.exit_code is not None:
            fields["exit_code"] = failure.exit_code
        if failure.exited_at is not None:
            fields["exited_at"] = failure.exited_at
        if failure.silent_s is not None:
            fields["silent_s"] = round(failure.silent_s, 4)
        if self.detector is not None:
            # What the failure interrupted: steps redone after a recovery are counted from these.
            fields["job_step"] = self.detector.job_step
            fields["leader_step"] = self.detector.leader_step
        out.events.append(Event("failure", self.generation, fields))

    def _from_detected(self, found: Detected) -> Failure:
        hosts = {m.hostname for a, m in self.members.items() if self.assignments[a].node_rank == found.node_rank}
        return Failure(found.kind, found.ranks, found.node_rank, hosts.pop() if hosts else "", found.evidence,
                       self.generation, silent_s=found.silent_s)

    def _stop_all(self, out: Output, now: float, cause: Failure) -> None:
        """Stop every member's workers; the faulty ones are killed at once (they may not heed SIGTERM)."""
        self.phase = Phase.STOPPING
        self._stopped.clear()
        self._stop_deadline = now + self.spec.stop_ack_s
        for agent_id in self.members:
            a = self.assignments[agent_id]
            kill = tuple(r - a.rank_offset for r in sorted(self._failed_ranks)
                         if a.rank_offset <= r < a.rank_offset + a.local_world_size)
            out.commands.append(Stop(agent_id, self.generation, kill))
        out.events.append(Event("stopping", self.generation, {"reason": cause.describe()}))

    def _note_stragglers(self, out: Output) -> None:
        assert self.detector is not None
        current = self.detector.stragglers
        for rank in sorted(current - self._stragglers):
            report = self.detector.last_report(rank)
            out.events.append(Event("straggler", self.generation, {
                "rank": rank, "step": report.step if report else -1, "leader_step": self.detector.leader_step,
            }))
        self._stragglers = set(current)

    # Status -------------------------------------------------------------------------------------------------

    def snapshot(self, now: float, max_ranks: int = 0) -> dict[str, Any]:
        """The job as `flashrun status --json` and the live view show it: plain data, no references into the state
        machine. With `max_ranks` > 0 and a larger world, only ranks that are not plainly running are listed (at
        most `max_ranks`); node rows always cover every node, so the cost follows the node count."""
        complete = max_ranks <= 0 or self.world_size <= max_ranks
        failed_kind = {r: f.kind for f in self.failures if f.generation == self.generation for r in f.ranks}
        succeeded = {self.assignments[a].rank_offset + lr for a, lr in self._succeeded if a in self.assignments}
        by_node = sorted(self.assignments.items(), key=lambda item: item[1].node_rank)
        offsets = [a.rank_offset for _, a in by_node]
        notable: dict[int, set[int]] = {}
        for rank in {*failed_kind, *self._stragglers, *self._replacements}:
            notable.setdefault(bisect.bisect_right(offsets, rank) - 1, set()).add(rank)
        nodes: list[dict[str, Any]] = []
        ranks: list[dict[str, Any]] = []
        for index, (agent_id, a) in enumerate(by_node):
            member = self.members.get(agent_id)
            host = member.hostname if member else ""
            view = self.detector.node_view(a.node_rank) if self.detector else None
            default = self._default_state(view)
            node_ranks = range(a.rank_offset, a.rank_offset + a.local_world_size)
            states = {r: self._rank_state(r, failed_kind, succeeded, default) for r in notable.get(index, ())}
            if all(r in succeeded for r in node_ranks):
                default = "succeeded"
            if complete:
                listed: Iterable[int] = node_ranks
            elif default in ("recovering", "stopping"):
                listed = node_ranks
            else:
                listed = sorted(r for r, state in states.items() if state not in ("running", "succeeded"))
            for rank in listed:
                if complete or len(ranks) < max_ranks:
                    ranks.append(self._rank_row(rank, a.node_rank, host, states.get(rank) or self._rank_state(
                        rank, failed_kind, succeeded, default), now))
            oldest = view.oldest_beat_s + (now - view.seen) if view and view.oldest_beat_s >= 0 else -1.0
            nodes.append({
                "node": a.node_rank, "host": host,
                "state": min([default, *states.values()], key=lambda state: STATE_SEVERITY.get(state, 99)),
                "ranks": a.local_world_size,
                "min_step": view.min_step if view and view.min_step is not None else -1,
                "max_step": view.max_step if view else -1,
                "steps_per_s": round(self.detector.node_steps_per_s(a.node_rank), 3) if self.detector else 0.0,
                "heartbeat_age_s": round(oldest, 3),
                "restarts": sum(self._replacements.get(r, 0) for r in notable.get(index, ())),
            })
        return {
            "run_id": self.spec.run_id, "phase": self.phase.value, "generation": self.generation,
            "restarts": self.restarts, "recoveries": self.recoveries, "world_size": self.world_size,
            "nnodes": len(self.assignments), "spares": len(self.spares),
            "watching_nodes": len(self._watching.intersection(self.assignments)),
            "job_step": self.detector.job_step if self.detector else -1,
            "steps_per_s": round(self.detector.job_steps_per_s, 3) if self.detector else 0.0,
            "nodes": nodes, "ranks": ranks, "ranks_complete": complete,
        }

    def _default_state(self, view: Any) -> str:
        """A rank's state when nothing particular happened to it: what the job's phase says."""
        if self.phase is Phase.STOPPING:
            return "stopping"
        if self.phase is Phase.RECOVERING:
            ready = view is not None and self.detector is not None and view.min_generation >= self.generation
            return "ready" if ready else "recovering"
        return self.phase.value

    def _rank_state(self, rank: int, failed_kind: dict[int, str], succeeded: set[int], default: str) -> str:
        if rank in failed_kind:
            return "lost" if failed_kind[rank] == "node_lost" else failed_kind[rank]
        if rank in succeeded:
            return "succeeded"
        if self.phase is Phase.RECOVERING and self.detector is not None:
            report = self.detector.last_report(rank)
            return "ready" if report and report.generation == self.generation else "recovering"
        if self.phase is Phase.RUNNING and rank in self._stragglers:
            return "straggler"
        return default

    def _rank_row(self, rank: int, node_rank: int, host: str, state: str, now: float) -> dict[str, Any]:
        report = self.detector.last_report(rank) if self.detector else None
        return {
            "rank": rank, "node": node_rank, "host": host, "pid": report.pid if report else 0, "state": state,
            "step": report.step if report else -1,
            "steps_per_s": round(self.detector.steps_per_s(rank), 3) if self.detector else 0.0,
            "heartbeat_age_s": round(self.detector.heartbeat_age_s(rank, now), 3) if self.detector else -1.0,
            "restarts": self._replacements.get(rank, 0),
        }

    def _fail(self, out: Output, reason: str) -> None:
        self.phase = Phase.FAILED
        self.exit_code = EXIT_JOB_FAILED
        lines = [f"job failed: {reason}"]
        if self.failures:
            # As torchrun does, the root cause is the first failure of the last attempt that failed.
            last_generation = self.failures[-1].generation
            root = next(f for f in self.failures if f.generation == last_generation)
            lines.append(f"root cause (first failure): {root.describe()}")
            if root.error_message:
                lines.append(f"  error: {root.error_message}")
            if root.traceback:
                lines.append("  traceback:")
                lines.extend("    " + line for line in root.traceback.rstrip().splitlines())
            for other in self.failures:
                if other is not root:
                    when = "earlier generation" if other.generation < last_generation else "also"
                    lines.append(f"{when} failure: {other.describe()}")
        self.summary = "\n".join(lines)
        out.events.append(Event("job_failed", self.generation, {"reason": reason, "restarts": self.restarts}))
        self._shutdown_all(out)

    def _shutdown_all(self, out: Output) -> None:
        assert self.exit_code is not None
        for agent_id in [*self.members, *self.spares]:
            out.commands.append(Shutdown(agent_id, self.exit_code, self.summary))


def _acks_by_shard(nnodes: int, nodes_per_shard: int, direct: Iterable[int]) -> tuple[int, ...]:
    """The agents that acknowledge a notice on each shard: every node of the shard but those told directly.
    O(shards + direct nodes), not O(nodes): it runs before the notice goes out."""
    counts = [shard_of(index * nodes_per_shard, nnodes, nodes_per_shard)[1]
              for index in range(shard_count(nnodes, nodes_per_shard))]
    for node_rank in direct:
        counts[shard_of(node_rank, nnodes, nodes_per_shard)[0]] -= 1
    return tuple(counts)


def _ranks_by_node(assignments: Iterable[NodeAssignment]) -> dict[int, range]:
    return {a.node_rank: range(a.rank_offset, a.rank_offset + a.local_world_size) for a in assignments}
