"""The coordinator's bookkeeping at scale: per-summary work bounded by one node, node-level snapshots, the agents'
acknowledgement of a recovery, and the agent-side summary pacing. Pure: time is passed in."""

from __future__ import annotations

import math
from typing import Any

import pytest

from flashrun._proto import flashrun_pb2 as pb
from flashrun.agent.protocol import SummaryPacer, heartbeat_age_s
from flashrun.config import Detection
from flashrun.coordinator import job as job_module
from flashrun.coordinator.detector import FailureDetector, RankReport
from flashrun.coordinator.job import Publish
from tests.unit.test_job import event_names
from tests.unit.test_recovery import CRASH_AT, exit_of, recoverable_job, summaries


def node_reports(step: int, nproc: int = 8, age: float = 0.1) -> list[RankReport]:
    return [RankReport(-1, -1, local, 100 + local, step, age) for local in range(nproc)]


def test_the_job_step_follows_the_slowest_node_without_rescanning_on_every_summary() -> None:
    nodes = 64
    detector = FailureDetector(Detection(), {n: range(8 * n, 8 * n + 8) for n in range(nodes)}, 0.0)
    for step in range(5):
        for node in range(nodes):
            detector.observe(node, node_reports(step), now=step + node / 1000, rank_offset=8 * node)
            # The job's step moves only once the last node at the old minimum reports the new step (before any
            # step it is the minimum over the nodes heard from so far).
            assert detector.job_step == (step if node == nodes - 1 or step == 0 else step - 1)
    detector.observe(7, node_reports(2), now=10.0, rank_offset=56)  # a node going backwards: never lowers it
    assert detector.job_step == 4


def test_a_node_lagging_far_behind_makes_stragglers_of_its_ranks_only() -> None:
    settings = Detection()
    detector = FailureDetector(settings, {n: range(8 * n, 8 * n + 8) for n in range(16)}, 0.0)
    now = 0.0
    for tick in range(40):
        now = tick * 0.25
        for node in range(16):
            detector.observe(node, node_reports(tick // 4 if node == 5 else tick), now, rank_offset=8 * node)
        assert detector.check(now) == []
    assert detector.stragglers == set(range(40, 48))


def test_lagging_nodes_are_rescanned_once_per_heartbeat_interval_not_on_every_check() -> None:
    settings = Detection()
    detector = FailureDetector(settings, {n: range(8 * n, 8 * n + 8) for n in range(16)}, 0.0)
    scans = 0
    lag_of = detector._straggler_lag  # called once per scan of the lagging nodes

    def counted() -> int:
        nonlocal scans
        scans += 1
        return lag_of()

    detector._straggler_lag = counted  # type: ignore[method-assign]
    checks_per_summary = round(settings.heartbeat_interval_s / 0.05)  # the coordinator checks at 20 Hz
    summaries = 40
    now = 0.0
    for check in range(summaries * checks_per_summary):
        now = check * 0.05
        if check % checks_per_summary == 0:
            summary = check // checks_per_summary
            for node in range(16):
                detector.observe(node, node_reports(summary // 4 if node == 5 else summary), now,
                                 rank_offset=8 * node)
        assert detector.check(now) == []

    assert detector.stragglers == set(range(40, 48))
    assert summaries - 1 <= scans <= summaries + 1  # not once per check (200)
    caught_up = now + settings.heartbeat_interval_s
    for node in range(16):
        detector.observe(node, node_reports(summaries), caught_up, rank_offset=8 * node)
    assert detector.check(caught_up) == [] and detector.stragglers == set()


def test_the_last_agent_to_summarise_the_new_generation_completes_the_acknowledgement() -> None:
    job = recoverable_job(nnodes=3, nproc=2)
    exit_of(job, 3, now=CRASH_AT)

    first = summaries(job, now=5.5, generation=0, node_generation=1, agents={"a0", "a1"})
    last = summaries(job, now=5.75, generation=0, node_generation=1, agents={"a2"})

    assert "recovery_phase" not in event_names(first)
    [acknowledged] = [e for e in last.events if e.name == "recovery_phase"]
    assert acknowledged.fields == {"phase": "acknowledged", "since_detection_s": 0.75}


def test_a_large_snapshot_lists_every_node_but_only_the_ranks_worth_a_look() -> None:
    job = recoverable_job(nnodes=8, nproc=4)
    exit_of(job, 9, now=CRASH_AT)
    summaries(job, now=6.0, generation=1, agents={f"a{n}" for n in range(8) if n != 2})

    snapshot = job.snapshot(6.0, max_ranks=8)

    assert snapshot["ranks_complete"] is False
    assert [n["node"] for n in snapshot["nodes"]] == list(range(8))
    assert [n["state"] for n in snapshot["nodes"]] == ["ready"] * 2 + ["recovering"] + ["ready"] * 5
    assert snapshot["nodes"][2]["restarts"] == 1  # rank 9 was replaced
    assert [r["rank"] for r in snapshot["ranks"]] == [8, 9, 10, 11]  # node 2's ranks are still recovering
    assert [r["restarts"] for r in snapshot["ranks"]] == [0, 1, 0, 0]
    assert len(job.snapshot(6.0)["ranks"]) == 32  # without a limit: every rank


def test_summaries_are_paced_by_the_interval_unless_a_worker_falls_silent() -> None:
    pacer = SummaryPacer()
    pacer.configure(pb.Detection(heartbeat_interval_s=0.25, summary_interval_s=2.0, heartbeat_timeout_s=2.0))
    healthy = {1: 0.1, 2: 0.2}

    assert pacer.should_send(0.0, urgent=False, ages=healthy)  # the first one goes at once
    assert pacer.wait_s(0.0) == 0.25  # silent workers are looked for every heartbeat interval
    assert not pacer.should_send(1.0, urgent=False, ages=healthy)
    assert pacer.should_send(1.1, urgent=False, ages={1: 2.1, 2: 0.2})  # worker 1 newly silent: at once
    assert not pacer.should_send(1.35, urgent=False, ages={1: 2.35, 2: 0.2})  # already reported
    assert pacer.should_send(1.5, urgent=True, ages=healthy)
    assert pacer.should_send(3.5, urgent=False, ages=healthy)  # the interval elapsed


def test_an_agent_that_did_not_run_counts_its_workers_silence_only_from_when_it_runs_again() -> None:
    """An agent resumed after a SIGSTOP has not yet read the beats its workers sent meanwhile: reporting their ages
    then made a healthy worker look unresponsive (seen in CI). A worker really silent is still found, a timeout
    after the agent runs again."""
    pacer = SummaryPacer()
    pacer.configure(pb.Detection(heartbeat_interval_s=0.25, summary_interval_s=10.0, heartbeat_timeout_s=2.0))
    last_beat = 10.0

    def ages(now: float, counted_from: float) -> dict[int, float]:  # as the agent's HeartbeatBoard reports them
        return {1: heartbeat_age_s(now, last_beat, counted_from)}

    assert pacer.should_send(10.0, urgent=False, ages=ages(10.0, pacer.look(10.0)))  # the first one; next at 20 s
    assert pacer.look(10.25) == pacer.look(11.0) == -math.inf  # on time, or late by less than 1.125 s
    resumed = pacer.look(16.0)  # the agent was stopped for 5 s
    assert resumed == 16.0
    assert ages(16.0, -math.inf)[1] > 2.0  # what it reported before
    assert not pacer.should_send(16.0, urgent=False, ages=ages(16.0, resumed))
    assert [pacer.look(16.0 + 0.25 * n) for n in range(1, 7)] == [resumed] * 6  # looking again every interval
    assert not pacer.should_send(17.5, urgent=False, ages=ages(17.5, resumed))
    assert pacer.look(17.75) == pacer.look(18.0) == pacer.look(18.1) == resumed
    assert pacer.should_send(18.1, urgent=False, ages=ages(18.1, resumed))  # silent 2.1 s since the agent resumed


def test_large_jobs_space_their_summaries_to_fit_the_coordinators_budget() -> None:
    detection = Detection()
    assert detection.summary_interval_s(8) == detection.heartbeat_interval_s
    assert detection.summary_interval_s(4096) == 4096 / detection.summary_budget_per_s
    assert detection.node_timeout_for(4096) == detection.node_timeout_s  # 4 intervals still fit in 10 s
    assert detection.node_timeout_for(100_000) == 4 * 100_000 / detection.summary_budget_per_s


def test_a_recovery_hands_the_previous_detector_back_to_be_freed_after_its_commands() -> None:
    """Freeing an object or more per rank takes milliseconds at scale: not before the notice is published."""
    job = recoverable_job()
    previous = job.detector

    out = exit_of(job, 3, now=CRASH_AT)

    assert out.retired is previous
    assert job.detector is not previous and job.detector is not None


def test_the_new_generations_detector_is_built_after_the_notice_on_the_failures_clock(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Building it is O(ranks): 5-10 ms at 4,096 nodes that no agent should wait for. Built later, it must still
    count every node's silence from the moment the recovery began, not from when it was built."""
    built: list[FailureDetector] = []

    class Recorded(FailureDetector):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            built.append(self)

    job = recoverable_job()
    monkeypatch.setattr(job_module, "FailureDetector", Recorded)

    out = exit_of(job, 3, now=CRASH_AT)

    assert any(isinstance(command, Publish) for command in out.commands)
    assert built == []
    job.settle()
    job.settle()
    assert len(built) == 1 and job.detector is built[0]
    assert job.detector.generation == job.generation == 1
    view = job.detector.node_view(0)
    assert view is not None and view.seen == CRASH_AT

