"""Failure detection from liveness and step counters: a pure component, time passed in.

Inputs are per-node summaries (each rank's last completed step, heartbeat age and whether it is inside a
collective) and the moments they arrived. `check(now)` turns them into typed failures with evidence:

- `unresponsive`: a rank's heartbeats stopped (SIGSTOP, frozen in the kernel, a GIL held forever);
- `stalled`: heartbeats continue but the job's slowest rank has not completed a step for longer than an adaptive
  threshold; the culprits are the ranks that never entered the collective the others wait in;
- `node_lost`: an agent's summaries stopped (a broken stream is reported by the Job directly).

Crashes are not detected here: the agent reports exits the moment the OS wait returns.
Ranks that never beat (scripts without the worker library) are left to the exit-based detection.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from flashrun.config import Detection

RATE_WINDOW_S = 5.0
"""Steps per second are measured over this trailing window."""
STRAGGLER_PERSIST_INTERVALS = 8
"""A lagging rank is a straggler once its lag has lasted this many summary intervals."""
STEP_HISTORY = 16
"""How many recent job-level step durations the adaptive stall threshold looks at."""


class RankReport(NamedTuple):
    """One rank's line of a node summary. A tuple, not a dataclass: the coordinator builds eight per summary,
    thousands of summaries a second."""

    rank: int
    node_rank: int
    local_rank: int
    pid: int
    step: int
    heartbeat_age_s: float
    """Age when the agent sent the summary; < 0 when the rank never beat."""
    in_collective: bool = False
    collective: str = ""
    collective_seq: int = 0
    generation: int = 0
    """The generation whose process group the rank has joined (and synchronised with, after a recovery)."""
    recoverable: bool = False
    recovery: dict[str, float] | None = None
    """The rank's own measurements of its last in-place recovery."""
    finished: bool = False
    """The rank's step loop is over: it may go quiet while it exits (its exit is reported by the agent)."""


@dataclasses.dataclass(frozen=True)
class Detected:
    kind: str
    ranks: tuple[int, ...]
    node_rank: int | None
    evidence: str
    silent_s: float | None = None
    """How long before its detection the failure began: since the node's last summary, the rank's last heartbeat or
    the job's last step (a lower bound: the last sign of life came before the failure)."""


@dataclasses.dataclass
class _RankState:
    report: RankReport
    received_at: float
    history: collections.deque[tuple[float, int]]


@dataclasses.dataclass
class _NodeState:
    """What the latest summary of one node says, folded into the few numbers the job-wide checks need."""

    ranks: list[int]
    seen: float
    min_step: int | None = None
    """Lowest last-completed step among the node's library ranks (None: none of them beat yet)."""
    max_step: int = -1
    oldest_beat_s: float = -1.0
    """Largest heartbeat age the agent reported among its unfinished library ranks (-1: none)."""
    min_generation: int = -1
    all_recoverable: bool = False
    history: collections.deque[tuple[float, int]] = dataclasses.field(default_factory=collections.deque)


class FailureDetector:
    """Costs O(ranks of one node) per summary and O(1) per node per check: job-wide minima and maxima are kept per
    node and reduced with builtins, and a full scan of the ranks happens only once a check has found something."""

    def __init__(self, settings: Detection, ranks_by_node: dict[int, Iterable[int]], now: float,
                 recent_step_s: Iterable[float] = (), generation: int = 0,
                 heard_from: Mapping[int, float] | None = None) -> None:
        """`heard_from`: when the agents that stay on through a recovery last sent a summary (`last_heard`): their
        silence goes on counting. A frozen node whose ranks were the first failure is then lost one node timeout
        after it went silent, not one after the recovery that waits for it began. Other nodes count from `now`."""
        self.settings = settings
        self.generation = generation
        self._started_at = now
        self._nodes: dict[int, _NodeState] = {node: _NodeState(list(ranks), now) for node, ranks in
                                              ranks_by_node.items()}
        self._node_seen: dict[int, float] = {node: now for node in ranks_by_node}
        for node, heard in (heard_from or {}).items():
            if node in self._node_seen:
                self._node_seen[node] = min(heard, now)
        self._node_timeout_s = settings.node_timeout_for(len(ranks_by_node))
        self._summary_interval_s = settings.summary_interval_s(len(ranks_by_node))
        self._node_min: dict[int, int] = {}
        self._node_max: dict[int, int] = {}
        self._node_oldest_beat: dict[int, float] = {}
        self._finished_nodes: set[int] = set()
        self._ready_nodes: set[int] = set()
        """Nodes whose every rank reported this detector's generation."""
        self._recoverable_nodes: set[int] = set()
        self._ranks: dict[int, _RankState] = {}
        self._true_min = -1
        self._at_true_min = 0
        self._job_step = -1
        self._job_step_at = now
        self._job_history: collections.deque[tuple[float, int]] = collections.deque()
        self._step_durations: collections.deque[float] = collections.deque(recent_step_s, maxlen=STEP_HISTORY)
        self._reported: set[tuple[str, int | None, tuple[int, ...]]] = set()
        self.stragglers: set[int] = set()
        self.leader_step = -1
        self._lagging_since: dict[int, float] = {}
        self._stragglers_scanned_at = -math.inf

    # Inputs -----------------------------------------------------------------------------------------------

    def observe(self, node_rank: int, reports: Iterable[RankReport], now: float,
                rank_offset: int | None = None) -> None:
        """One node's summary. Reports carry global ranks, or local ranks when `rank_offset` is given."""
        self._node_seen[node_rank] = now
        node = self._nodes.get(node_rank)
        if node is None:
            node = self._nodes[node_rank] = _NodeState([], now)
        node.seen = now
        for report in reports:
            rank = report.rank if rank_offset is None else rank_offset + report.local_rank
            state = self._ranks.get(rank)
            if state is None:
                state = self._ranks[rank] = _RankState(report, now, collections.deque())
                if rank not in node.ranks:
                    node.ranks.append(rank)
            else:
                state.report = report
                state.received_at = now
            history = state.history
            if report.step >= 0 and (not history or history[-1][1] != report.step):
                history.append((now, report.step))
                _trim(history, now)
        self._fold(node_rank, node, now)

    def _fold(self, node_rank: int, node: _NodeState, now: float) -> None:
        lowest: int | None = None
        highest = -1
        oldest = -1.0
        finished = False
        min_generation: int | None = None
        recoverable = True
        for rank in node.ranks:
            state = self._ranks.get(rank)
            if state is None:
                min_generation, recoverable = -1, False
                continue
            report = state.report
            if min_generation is None or report.generation < min_generation:
                min_generation = report.generation
            recoverable = recoverable and report.recoverable
            if report.heartbeat_age_s < 0:
                continue
            if lowest is None or report.step < lowest:
                lowest = report.step
            highest = max(highest, report.step)
            if report.finished:
                finished = True
            elif report.heartbeat_age_s > oldest:
                oldest = report.heartbeat_age_s
        node.max_step, node.oldest_beat_s = highest, oldest
        node.min_generation = -1 if min_generation is None else min_generation
        _put(self._node_max, node_rank, highest if lowest is not None else None)
        _put(self._node_oldest_beat, node_rank, oldest if oldest >= 0 else None)
        _mark(self._finished_nodes, node_rank, finished)
        _mark(self._ready_nodes, node_rank, min_generation is not None and min_generation >= self.generation)
        _mark(self._recoverable_nodes, node_rank, recoverable and bool(node.ranks))
        if lowest is not None and node.min_step != lowest:
            node.history.append((now, lowest))
            _trim(node.history, now)
        self._move_node_min(node_rank, node.min_step, lowest, now)
        node.min_step = lowest

    def _move_node_min(self, node_rank: int, old: int | None, new: int | None, now: float) -> None:
        """Keep the job's step (the slowest library rank's) without scanning every node on every summary: count the
        nodes sitting at the minimum, and rescan only when the last of them moves on."""
        if old == new:
            return
        if new is None:
            del self._node_min[node_rank]
        else:
            self._node_min[node_rank] = new
        if old is not None and old == self._true_min:
            self._at_true_min -= 1
        if new is not None and new == self._true_min:
            self._at_true_min += 1
        if self._at_true_min <= 0 or (new is not None and new < self._true_min):
            values = list(self._node_min.values())
            if not values:
                self._true_min, self._at_true_min = -1, 0
                return
            self._true_min = min(values)
            self._at_true_min = values.count(self._true_min)
        if self._true_min > self._job_step:
            if self._job_step >= 0:
                self._step_durations.append((now - self._job_step_at) / (self._true_min - self._job_step))
            self._job_step = self._true_min
            self._job_step_at = now
            self._job_history.append((now, self._job_step))
            _trim(self._job_history, now)

    def resume(self, now: float) -> None:
        """The job steps again after a recovery: time it from now, not from when the failure stopped it."""
        self._job_step_at = now
        self._lagging_since.clear()
        self.stragglers = set()

    def last_heard(self) -> dict[int, float]:
        """When each node's agent last sent a summary (or this detector started, if it has not)."""
        return dict(self._node_seen)

    @property
    def recent_step_s(self) -> tuple[float, ...]:
        """Recent step durations, handed to the next generation's detector: the job's pace outlives a failure."""
        return tuple(self._step_durations)

    # Queries ----------------------------------------------------------------------------------------------

    def stall_threshold_s(self) -> float:
        s = self.settings
        if self._job_step < 0 or not self._step_durations:
            return s.stall_ceiling_s  # the first step includes start-up: only the ceiling applies
        adaptive = s.stall_multiplier * statistics.median(self._step_durations)
        return min(s.stall_ceiling_s, max(s.stall_floor_s, adaptive))

    def steps_per_s(self, rank: int) -> float:
        state = self._ranks.get(rank)
        return _rate(state.history) if state else 0.0

    def node_steps_per_s(self, node_rank: int) -> float:
        node = self._nodes.get(node_rank)
        return _rate(node.history) if node else 0.0

    @property
    def job_steps_per_s(self) -> float:
        return _rate(self._job_history)

    def heartbeat_age_s(self, rank: int, now: float) -> float:
        state = self._ranks.get(rank)
        if state is None or state.report.heartbeat_age_s < 0:
            return -1.0
        return state.report.heartbeat_age_s + (now - state.received_at)

    def node_view(self, node_rank: int) -> _NodeState | None:
        return self._nodes.get(node_rank)

    def reports(self) -> dict[int, RankReport]:
        """Every rank's latest report: O(world), for decisions taken once per failure, not per summary."""
        return {rank: state.report for rank, state in self._ranks.items()}

    def finished_ranks(self) -> set[int]:
        """The ranks that said their step loop is over: O(ranks of the nodes that have one), none in most jobs."""
        return {rank for node_rank in self._finished_nodes for rank in self._nodes[node_rank].ranks
                if (state := self._ranks.get(rank)) is not None and state.report.finished}

    def last_report(self, rank: int) -> RankReport | None:
        state = self._ranks.get(rank)
        return state.report if state else None

    @property
    def job_step(self) -> int:
        return self._job_step

    @property
    def all_ready(self) -> bool:
        """Every node reported every one of its ranks in this detector's generation."""
        return len(self._ready_nodes) == len(self._nodes)

    @property
    def all_recoverable(self) -> bool:
        return len(self._recoverable_nodes) == len(self._nodes)

    @property
    def any_finished(self) -> bool:
        return bool(self._finished_nodes)

    # Decisions --------------------------------------------------------------------------------------------

    def check(self, now: float, stalls: bool = True) -> list[Detected]:
        """Failures newly seen at `now`; each is reported once. `stalls=False` while a recovery is under way."""
        found = self._lost_nodes(now) or self._unresponsive(now) or (self._stalled(now) if stalls else [])
        self._update_stragglers(now)
        fresh = []
        for failure in found:
            key = (failure.kind, failure.node_rank, failure.ranks)
            if key not in self._reported:
                self._reported.add(key)
                fresh.append(failure)
        return fresh

    def after_own_pause(self, now: float) -> None:
        """The coordinator itself did not run until `now`: what the agents sent meanwhile is still unread, so nodes'
        silence and the job's idleness count from `now`, and nobody is blamed for the gap. O(nodes), once a pause."""
        self._node_seen = dict.fromkeys(self._node_seen, now)
        self._job_step_at = max(self._job_step_at, now)

    def _lost_nodes(self, now: float) -> list[Detected]:
        timeout = self._node_timeout_s
        if not self._node_seen or now - min(self._node_seen.values()) <= timeout:
            return []
        return [
            Detected("node_lost", tuple(sorted(self._nodes[node].ranks)), node,
                     f"no summary from node {node} for {now - seen:.2f} s (timeout {timeout:g} s)", now - seen)
            for node, seen in sorted(self._node_seen.items()) if now - seen > timeout
        ]

    def _unresponsive(self, now: float) -> list[Detected]:
        # Judged on the age the agent measured, not extrapolated: if the agent's summaries are late, the node is
        # suspect (node_lost, after its own timeout), not each of its workers.
        timeout = self.settings.heartbeat_timeout_s
        if not self._node_oldest_beat or max(self._node_oldest_beat.values()) <= timeout:
            return []
        found = []
        for node_rank in sorted(n for n, age in self._node_oldest_beat.items() if age > timeout):
            for rank in sorted(self._nodes[node_rank].ranks):
                state = self._ranks[rank]
                report = state.report
                age = report.heartbeat_age_s
                limit = timeout if report.step >= 0 else max(timeout, self.settings.startup_heartbeat_timeout_s)
                if age > limit and not report.finished:
                    found.append(Detected("unresponsive", (rank,), node_rank,
                                          f"no heartbeat from rank {rank} (pid {report.pid}) for {age:.2f} s "
                                          f"(timeout {limit:g} s); last completed step {report.step}",
                                          age + now - state.received_at))
        return found

    def _stalled(self, now: float) -> list[Detected]:
        if not self._node_min or self._finished_nodes:
            return []  # nobody beats, or the loop is over somewhere: the others are finishing too, not stalled
        idle = now - self._job_step_at
        threshold = self.stall_threshold_s()
        if idle <= threshold:
            return []
        tracked = {rank: s.report for rank, s in self._ranks.items() if s.report.heartbeat_age_s >= 0}
        node_of = {rank: node_rank for node_rank, node in self._nodes.items() for rank in node.ranks}
        waiting = {r: rep for r, rep in tracked.items() if rep.in_collective}
        base = f"no step completed for {idle:.2f} s (threshold {threshold:.2f} s) after step {self._job_step}"
        if waiting:
            seq = max(rep.collective_seq for rep in waiting.values())
            blocked = {r for r, rep in waiting.items() if rep.collective_seq == seq}
            name = next(rep.collective for rep in waiting.values() if rep.collective_seq == seq)
            culprits = tuple(sorted(set(tracked) - blocked))
            if culprits:
                nodes = {node_of.get(r) for r in culprits}
                return [Detected("stalled", culprits, nodes.pop() if len(nodes) == 1 else None,
                                 f"{base}; ranks {_ranks_text(blocked)} wait in {name} #{seq}, ranks "
                                 f"{_ranks_text(culprits)} never entered it", idle)]
            return [Detected("stalled", (), None, f"{base}; every rank waits in {name} #{seq}: no single culprit "
                                                  "(a lost peer connection or a hang below the collective)", idle)]
        return [Detected("stalled", (), None, f"{base}; no rank is inside a collective: no single culprit", idle)]

    def _straggler_lag(self) -> int:
        """Steps behind the leader that make a straggler. A rank's counter is sampled by its heartbeat and reaches
        us with its node's summary, so two ranks' readings can be a heartbeat interval plus a summary interval apart;
        with fast steps a healthy rank can read several steps behind: that much is noise."""
        if not self._step_durations:
            return self.settings.straggler_lag_steps
        window = self.settings.heartbeat_interval_s + self._summary_interval_s
        sampling = window / max(statistics.median(self._step_durations), 1e-6)
        return max(self.settings.straggler_lag_steps, math.ceil(sampling) + 1)

    def _update_stragglers(self, now: float) -> None:
        # Heartbeats sample steps at different moments on different ranks, so a short lag is noise: only a lag
        # that persists for STRAGGLER_PERSIST_INTERVALS summary intervals makes a straggler.
        if not self._node_max:
            return
        leader = self.leader_step = max(self._node_max.values())
        if now - self._stragglers_scanned_at < self.settings.heartbeat_interval_s:
            return  # step samples are no finer than a heartbeat; lagging nodes would be rescanned on every check
        self._stragglers_scanned_at = now
        lag = self._straggler_lag()
        lagging: set[int] = set()
        if leader - self._true_min >= lag:
            for node_rank in [n for n, low in self._node_min.items() if leader - low >= lag]:
                for rank in self._nodes[node_rank].ranks:
                    report = self._ranks[rank].report if rank in self._ranks else None
                    if report and report.heartbeat_age_s >= 0 and leader - report.step >= lag and not report.finished:
                        lagging.add(rank)
        self._lagging_since = {rank: self._lagging_since.get(rank, now) for rank in lagging}
        persist = STRAGGLER_PERSIST_INTERVALS * self._summary_interval_s
        self.stragglers = {rank for rank, since in self._lagging_since.items() if now - since >= persist}


def _trim(history: collections.deque[tuple[float, int]], now: float) -> None:
    while len(history) > 1 and history[0][0] < now - RATE_WINDOW_S:
        history.popleft()


def _rate(history: collections.deque[tuple[float, int]]) -> float:
    if len(history) < 2:
        return 0.0
    (t0, s0), (t1, s1) = history[0], history[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


def _put(values: dict[int, float], key: int, value: float | None) -> None:
    if value is None:
        values.pop(key, None)
    else:
        values[key] = value


def _mark(members: set[int], key: int, present: bool) -> None:
    if present:
        members.add(key)
    else:
        members.discard(key)


def _ranks_text(ranks: Iterable[int], shown: int = 16) -> str:
    """A rank list for evidence: in full when short, else its first ranks and a count (32,768 ranks can stall)."""
    ordered = sorted(ranks)
    if len(ordered) <= shown:
        return str(ordered)
    return f"[{', '.join(map(str, ordered[:shown]))}, ... {len(ordered) - shown} more]"
