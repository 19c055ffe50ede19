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
from collections.abc import Iterable

from flashrun.config import Detection

RATE_WINDOW_S = 5.0
"""Steps per second are measured over this trailing window."""
STRAGGLER_PERSIST_INTERVALS = 8
"""A lagging rank is a straggler once its lag has lasted this many heartbeat intervals."""
STEP_HISTORY = 16
"""How many recent job-level step durations the adaptive stall threshold looks at."""


@dataclasses.dataclass(frozen=True)
class RankReport:
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


@dataclasses.dataclass
class _RankState:
    report: RankReport
    received_at: float
    history: collections.deque[tuple[float, int]]


class FailureDetector:
    def __init__(self, settings: Detection, ranks_by_node: dict[int, Iterable[int]], now: float,
                 recent_step_s: Iterable[float] = ()) -> None:
        self.settings = settings
        self._started_at = now
        self._node_seen: dict[int, float] = {node: now for node in ranks_by_node}
        self._node_ranks = {node: tuple(ranks) for node, ranks in ranks_by_node.items()}
        self._ranks: dict[int, _RankState] = {}
        self._job_step = -1
        self._job_step_at = now
        self._step_durations: collections.deque[float] = collections.deque(recent_step_s, maxlen=STEP_HISTORY)
        self._reported: set[tuple[str, int | None, tuple[int, ...]]] = set()
        self.stragglers: set[int] = set()
        self.leader_step = -1
        self._lagging_since: dict[int, float] = {}

    # Inputs -----------------------------------------------------------------------------------------------

    def observe(self, node_rank: int, reports: Iterable[RankReport], now: float) -> None:
        self._node_seen[node_rank] = now
        for report in reports:
            state = self._ranks.get(report.rank)
            if state is None:
                state = _RankState(report, now, collections.deque())
                self._ranks[report.rank] = state
            state.report = report
            state.received_at = now
            if report.step >= 0 and (not state.history or state.history[-1][1] != report.step):
                state.history.append((now, report.step))
            while state.history and state.history[0][0] < now - RATE_WINDOW_S and len(state.history) > 1:
                state.history.popleft()
        self._update_job_step(now)

    def _update_job_step(self, now: float) -> None:
        tracked = [s.report.step for s in self._ranks.values() if s.report.heartbeat_age_s >= 0]
        if not tracked:
            return
        job_step = min(tracked)
        if job_step > self._job_step:
            if self._job_step >= 0:
                self._step_durations.append((now - self._job_step_at) / (job_step - self._job_step))
            self._job_step = job_step
            self._job_step_at = now

    def resume(self, now: float) -> None:
        """The job steps again after a recovery: time it from now, not from when the failure stopped it."""
        self._job_step_at = now
        self._lagging_since.clear()
        self.stragglers = set()

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
        if state is None or len(state.history) < 2:
            return 0.0
        (t0, s0), (t1, s1) = state.history[0], state.history[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0

    def heartbeat_age_s(self, rank: int, now: float) -> float:
        state = self._ranks.get(rank)
        if state is None or state.report.heartbeat_age_s < 0:
            return -1.0
        return state.report.heartbeat_age_s + (now - state.received_at)

    def reports(self) -> dict[int, RankReport]:
        return {rank: state.report for rank, state in self._ranks.items()}

    def last_report(self, rank: int) -> RankReport | None:
        state = self._ranks.get(rank)
        return state.report if state else None

    @property
    def job_step(self) -> int:
        return self._job_step

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

    def _lost_nodes(self, now: float) -> list[Detected]:
        timeout = self.settings.node_timeout_s
        return [
            Detected("node_lost", self._node_ranks[node], node,
                     f"no summary from node {node} for {now - seen:.2f} s (timeout {timeout:g} s)")
            for node, seen in sorted(self._node_seen.items()) if now - seen > timeout
        ]

    def _unresponsive(self, now: float) -> list[Detected]:
        # Judged on the age the agent measured, not extrapolated: if the agent's summaries are late, the node is
        # suspect (node_lost, after its own timeout), not each of its workers.
        timeout = self.settings.heartbeat_timeout_s
        found = []
        for rank, state in sorted(self._ranks.items()):
            age = state.report.heartbeat_age_s
            if age > timeout and not state.report.finished:
                found.append(Detected("unresponsive", (rank,), state.report.node_rank,
                                      f"no heartbeat from rank {rank} (pid {state.report.pid}) for {age:.2f} s "
                                      f"(timeout {timeout:g} s); last completed step {state.report.step}"))
        return found

    def _stalled(self, now: float) -> list[Detected]:
        tracked = {rank: s.report for rank, s in self._ranks.items() if s.report.heartbeat_age_s >= 0}
        if not tracked or any(report.finished for report in tracked.values()):
            return []  # the loop is over somewhere: the others are finishing too, not stalled
        idle = now - self._job_step_at
        threshold = self.stall_threshold_s()
        if idle <= threshold:
            return []
        waiting = {r: rep for r, rep in tracked.items() if rep.in_collective}
        base = f"no step completed for {idle:.2f} s (threshold {threshold:.2f} s) after step {self._job_step}"
        if waiting:
            seq = max(rep.collective_seq for rep in waiting.values())
            blocked = {r for r, rep in waiting.items() if rep.collective_seq == seq}
            name = next(rep.collective for rep in waiting.values() if rep.collective_seq == seq)
            culprits = tuple(sorted(set(tracked) - blocked))
            if culprits:
                nodes = {tracked[r].node_rank for r in culprits}
                return [Detected("stalled", culprits, nodes.pop() if len(nodes) == 1 else None,
                                 f"{base}; ranks {sorted(blocked)} wait in {name} #{seq}, ranks {list(culprits)} "
                                 "never entered it")]
            return [Detected("stalled", (), None, f"{base}; every rank waits in {name} #{seq}: no single culprit "
                                                  "(a lost peer connection or a hang below the collective)")]
        return [Detected("stalled", (), None, f"{base}; no rank is inside a collective: no single culprit")]

    def _straggler_lag(self) -> int:
        """Steps behind the leader that make a straggler. Ranks' heartbeats sample their counters up to two
        intervals apart, so with fast steps a healthy rank can read several steps behind: that much is noise."""
        if not self._step_durations:
            return self.settings.straggler_lag_steps
        sampling = 2 * self.settings.heartbeat_interval_s / max(statistics.median(self._step_durations), 1e-6)
        return max(self.settings.straggler_lag_steps, math.ceil(sampling) + 1)

    def _update_stragglers(self, now: float) -> None:
        # Heartbeats sample steps at different moments on different ranks, so a short lag is noise: only a lag
        # that persists for STRAGGLER_PERSIST_INTERVALS heartbeat intervals makes a straggler.
        tracked = [s.report for s in self._ranks.values() if s.report.heartbeat_age_s >= 0]
        if not tracked:
            return
        leader = self.leader_step = max(rep.step for rep in tracked)
        lagging = {rep.rank for rep in tracked if leader - rep.step >= self._straggler_lag() and not rep.finished}
        self._lagging_since = {rank: self._lagging_since.get(rank, now) for rank in lagging}
        persist = STRAGGLER_PERSIST_INTERVALS * self.settings.heartbeat_interval_s
        self.stragglers = {rank for rank, since in self._lagging_since.items() if now - since >= persist}
