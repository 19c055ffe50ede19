"""Unit tests for the in-place recovery protocol of flashrun.coordinator.job.

A job whose every rank runs flashrun's step loop (reported `recoverable` in a node summary) recovers from a failure
in place: the faulty ranks are respawned, the healthy ones move to the next generation keeping their process, and
the job runs again once every rank reports that generation. Time is a plain number passed in; nothing here sleeps,
opens sockets or starts processes.
"""

from __future__ import annotations

from typing import Any

import pytest

from flashrun.config import Detection
from flashrun.coordinator.detector import RankReport
from flashrun.coordinator.job import (
    EXIT_UNRECOVERABLE,
    Job,
    Output,
    Phase,
    Publish,
    Recover,
    Shutdown,
    Stop,
    WorkerExit,
)
from flashrun.coordinator.ranks import NodeAssignment
from flashrun.errors import EXIT_JOB_FAILED
from tests.unit.test_job import commands_of, event_names, request, running_job, the_event

CRASH_AT = 5.0
"""When `recovering_job` crashes rank 3: the moment the failure was detected."""


def pid_of(rank: int, generation: int = 0) -> int:
    """The pid of `rank`'s process spawned in `generation` (respawned processes get new pids)."""
    return 1000 * (generation + 1) + rank


def recovery(generation: int = 1, abort_s: float = 0.1, start_s: float = 0.0, rebuild_s: float = 0.2,
             sync_s: float = 0.3, resume_step: int = 17) -> dict[str, float]:
    return {"generation": generation, "abort_s": abort_s, "start_s": start_s, "rebuild_s": rebuild_s,
            "sync_s": sync_s, "resume_step": resume_step}


def summaries(
    job: Job,
    now: float,
    *,
    step: int = 10,
    generation: int | None = None,
    recoverable: bool = True,
    node_generation: int | None = None,
    agents: set[str] | None = None,
    ranks: dict[int, dict[str, Any]] | None = None,
    watching: bool = False,
) -> Output:
    """A node summary from every member agent (or `agents`) at `now`; the outputs are merged.

    Each rank reports `step`, `generation` (default: the job's) and pid_of(rank); `ranks` overrides RankReport
    fields per global rank. `node_generation` is the summary's own generation (default: the job's). `watching`:
    the agents wait on the store for the next generation's notice.
    """
    merged = Output()
    for agent_id, assignment in sorted(job.assignments.items(), key=lambda item: item[1].node_rank):
        if agents is not None and agent_id not in agents:
            continue
        reports = []
        for local_rank in range(assignment.local_world_size):
            rank = assignment.rank_offset + local_rank
            fields: dict[str, Any] = {
                "pid": pid_of(rank), "step": step, "heartbeat_age_s": 0.1,
                "generation": job.generation if generation is None else generation, "recoverable": recoverable,
            }
            fields.update((ranks or {}).get(rank, {}))
            # rank and node_rank are the agent's to leave unset: the job translates local ranks itself.
            reports.append(RankReport(rank=-1, node_rank=-1, local_rank=local_rank, **fields))
        out = job.node_summary(agent_id, job.generation if node_generation is None else node_generation, reports,
                               now, watching)
        merged.commands.extend(out.commands)
        merged.events.extend(out.events)
    return merged


def agent_of(job: Job, rank: int) -> tuple[str, int]:
    for agent_id, a in job.assignments.items():
        if a.rank_offset <= rank < a.rank_offset + a.local_world_size:
            return agent_id, rank - a.rank_offset
    raise AssertionError(f"no agent runs rank {rank}")


def exit_of(job: Job, rank: int, now: float, *, exit_code: int = 1, generation: int | None = None,
            pid: int | None = None) -> Output:
    """Rank `rank`'s worker exits; by default the process spawned at the start (generation 0, pid_of(rank))."""
    agent_id, local_rank = agent_of(job, rank)
    return job.worker_exited(agent_id, WorkerExit(
        generation=0 if generation is None else generation, local_rank=local_rank, exit_code=exit_code,
        pid=pid_of(rank) if pid is None else pid,
    ), now)


def recoverable_job(nnodes: int = 2, nproc: int = 2, **spec: Any) -> Job:
    """A running job (agents a0.., ranks 0..nnodes*nproc-1) whose every rank reported `recoverable` at t=1."""
    job = running_job(nnodes=nnodes, nproc=nproc, **spec)
    assert "recoverable" in event_names(summaries(job, now=1.0))
    return job


def recovering_job(**spec: Any) -> Job:
    """recoverable_job() whose rank 3 (a1, local rank 1) crashed at CRASH_AT: recovering into generation 1."""
    job = recoverable_job(**spec)
    exit_of(job, 3, now=CRASH_AT)
    assert (job.phase, job.generation) == (Phase.RECOVERING, 1)
    return job


def recovered_job(**spec: Any) -> Job:
    """recovering_job() whose every rank reached generation 1 at t=7 (the crashed one respawned), resuming at 17."""
    job = recovering_job(**spec)
    out = summaries(job, now=7.0, step=16, ranks={3: {"pid": pid_of(3, generation=1)}},
                    generation=1)
    assert "recovered" in event_names(out)
    assert job.phase is Phase.RUNNING
    return job


def events_named(out: Output, name: str) -> list[dict[str, Any]]:
    return [event.fields for event in out.events if event.name == name]


# Becoming recoverable ------------------------------------------------------------------------------------------


def test_job_becomes_recoverable_once_every_rank_reported_recoverable() -> None:
    job = running_job(nnodes=2, nproc=2)

    first = summaries(job, now=1.0, agents={"a0"})
    second = summaries(job, now=1.1, agents={"a1"})

    assert "recoverable" not in event_names(first)
    event = the_event(second, "recoverable")
    assert (event.generation, event.fields) == (0, {})


def test_recoverable_event_is_emitted_once() -> None:
    job = recoverable_job()

    out = summaries(job, now=2.0)

    assert "recoverable" not in event_names(out)


def test_job_with_one_rank_not_recoverable_keeps_the_full_restart_path() -> None:
    job = running_job(nnodes=2, nproc=2)
    out = summaries(job, now=1.0, ranks={2: {"recoverable": False}})
    assert "recoverable" not in event_names(out)

    crashed = exit_of(job, 3, now=CRASH_AT)

    assert job.phase is Phase.STOPPING
    assert commands_of(crashed, Recover) == []
    assert crashed.commands == [Stop("a0", 0), Stop("a1", 0, kill_local_ranks=(1,))]


def test_crash_before_every_rank_reported_takes_the_full_restart_path() -> None:
    job = running_job(nnodes=2, nproc=2)
    summaries(job, now=1.0, agents={"a0"})

    out = exit_of(job, 3, now=CRASH_AT)

    assert job.phase is Phase.STOPPING
    assert job.generation == 0
    assert event_names(out) == ["failure", "stopping"]
    assert commands_of(out, Recover) == []
    assert [command.agent_id for command in commands_of(out, Stop)] == ["a0", "a1"]


# Starting a recovery -------------------------------------------------------------------------------------------


def test_crash_in_a_recoverable_job_starts_an_in_place_recovery() -> None:
    job = recoverable_job()

    out = exit_of(job, 3, now=CRASH_AT, exit_code=3)

    assert job.phase is Phase.RECOVERING
    assert job.generation == 1
    assert job.recoveries == 1
    assert job.restarts == 0
    assert commands_of(out, Stop) == []
    assert event_names(out) == ["failure", "recovery_started"]
    assert the_event(out, "failure").generation == 0
    started = the_event(out, "recovery_started")
    assert started.generation == 1
    assert (started.fields["kind"], started.fields["ranks"], started.fields["recoveries"]) == ("crash", [3], 1)
    assert "rank 3 (local rank 1) on node 1 (host-a1) exited with code 3" in started.fields["cause"]


def test_crash_after_another_rank_finished_its_loop_takes_the_full_restart_path() -> None:
    """A rank whose loop is over cannot take part in a rebuild."""
    job = recoverable_job()
    summaries(job, now=2.0, step=11, ranks={0: {"finished": True}})

    out = exit_of(job, 3, now=CRASH_AT)

    assert job.phase is Phase.STOPPING
    assert commands_of(out, Recover) == []


def test_crash_of_a_rank_that_said_finished_on_its_way_out_is_recovered_in_place() -> None:
    job = recoverable_job()
    summaries(job, now=2.0, step=11, ranks={3: {"finished": True}})

    exit_of(job, 3, now=CRASH_AT)

    assert job.phase is Phase.RECOVERING


def test_recovery_sends_one_recover_per_member_respawning_only_the_crashed_rank() -> None:
    job = recoverable_job()  # no agent said it watches the store: each is told directly

    out = exit_of(job, 3, now=CRASH_AT)

    assert out.commands == [
        Publish(generation=1, respawn={1: (1,)}, direct_nodes=(0, 1), acks_expected=0, acks_by_shard=(0,)),
        Recover("a0", generation=1, respawn_local_ranks=(), assignment=NodeAssignment(0, 0, 2), world_size=4,
                nnodes=2),
        Recover("a1", generation=1, respawn_local_ranks=(1,), assignment=NodeAssignment(1, 2, 2), world_size=4,
                nnodes=2),
    ]


def test_recovery_does_not_involve_spares() -> None:
    job = recoverable_job(max_nodes=3)
    job.join(request("spare"), now=2.0)

    out = exit_of(job, 0, now=CRASH_AT)

    assert [command.agent_id for command in commands_of(out, Recover)] == ["a0", "a1"]
    assert set(job.spares) == {"spare"}


# Completing a recovery -----------------------------------------------------------------------------------------


def test_recovery_is_not_complete_while_a_rank_reports_the_old_generation() -> None:
    job = recovering_job()

    out = summaries(job, now=6.0, generation=1, ranks={2: {"generation": 0}})

    assert job.phase is Phase.RECOVERING
    assert "recovered" not in event_names(out)


def test_recovery_completes_when_every_rank_reports_the_new_generation() -> None:
    job = recovering_job()
    summaries(job, now=6.0, generation=1, agents={"a0"})

    out = summaries(job, now=7.5, generation=1, agents={"a1"})

    assert job.phase is Phase.RUNNING
    assert job.generation == 1
    recovered = the_event(out, "recovered")
    assert recovered.generation == 1
    assert recovered.fields["since_detection_s"] == 7.5 - CRASH_AT


def test_recovered_event_takes_each_phase_duration_as_the_max_over_ranks() -> None:
    job = recovering_job()

    out = summaries(job, now=7.0, generation=1, ranks={
        0: {"recovery": recovery(abort_s=0.5, start_s=0.0, rebuild_s=0.2, sync_s=0.1, resume_step=17)},
        1: {"recovery": recovery(abort_s=0.1, start_s=0.0, rebuild_s=0.9, sync_s=0.1, resume_step=17)},
        2: {"recovery": recovery(abort_s=0.1, start_s=0.0, rebuild_s=0.2, sync_s=0.7, resume_step=17)},
        3: {"recovery": recovery(abort_s=0.0, start_s=1.25, rebuild_s=0.3, sync_s=0.2, resume_step=17)},
    })

    assert the_event(out, "recovered").fields == {
        "since_detection_s": 2.0, "resume_step": 17,
        "abort_s": 0.5, "respawn_s": 1.25, "rebuild_s": 0.9, "sync_s": 0.7,
    }


def test_recovery_completion_emits_a_recovery_phase_event_per_phase() -> None:
    job = recovering_job()

    out = summaries(job, now=7.0, generation=1, ranks={
        rank: {"recovery": recovery(abort_s=0.1, start_s=1.5 if rank == 3 else 0.0, rebuild_s=0.2, sync_s=0.3)}
        for rank in range(4)
    })

    assert event_names(out) == ["recovery_phase"] * 5 + ["recovered"]
    assert [(e.generation, e.fields) for e in out.events if e.name == "recovery_phase"] == [
        (1, {"phase": "acknowledged", "since_detection_s": 2.0}),  # every agent's first summary of generation 1
        (1, {"phase": "abort", "duration_s": 0.1}),
        (1, {"phase": "respawn", "duration_s": 1.5}),
        (1, {"phase": "rebuild", "duration_s": 0.2}),
        (1, {"phase": "sync", "duration_s": 0.3}),
    ]


def test_recovery_measurements_of_an_earlier_recovery_are_not_counted() -> None:
    job = recovering_job()

    out = summaries(job, now=7.0, generation=1, ranks={
        0: {"recovery": recovery(generation=0, abort_s=9.0, resume_step=99)},
        1: {"recovery": recovery(abort_s=0.4, resume_step=17)},
    })

    fields = the_event(out, "recovered").fields
    assert fields["abort_s"] == 0.4
    assert fields["resume_step"] == 17


def test_first_step_is_not_reported_before_the_slowest_rank_completes_resume_step() -> None:
    job = recovering_job()
    summaries(job, now=7.0, step=16, generation=1, ranks={r: {"recovery": recovery(resume_step=17)} for r in range(4)})

    out = summaries(job, now=8.0, step=17, generation=1, ranks={2: {"step": 16}})

    assert events_named(out, "recovery_phase") == []


def test_first_step_after_recovery_is_reported_when_the_slowest_rank_completes_resume_step() -> None:
    job = recovering_job()
    summaries(job, now=7.0, step=16, generation=1, ranks={r: {"recovery": recovery(resume_step=17)} for r in range(4)})
    summaries(job, now=8.0, step=17, generation=1, ranks={2: {"step": 16}})

    out = summaries(job, now=9.0, step=17, generation=1)

    event = the_event(out, "recovery_phase")
    assert event.generation == 1
    assert event.fields == {"phase": "first_step", "step": 17, "since_detection_s": 9.0 - CRASH_AT}


def test_first_step_after_recovery_is_reported_once() -> None:
    job = recovering_job()
    summaries(job, now=7.0, step=16, generation=1, ranks={r: {"recovery": recovery(resume_step=17)} for r in range(4)})
    summaries(job, now=8.0, step=17, generation=1)

    out = summaries(job, now=9.0, step=18, generation=1)

    assert events_named(out, "recovery_phase") == []


# Stale input ---------------------------------------------------------------------------------------------------


def test_summary_of_an_older_generation_is_ignored() -> None:
    job = recovering_job()

    out = summaries(job, now=7.0, generation=1, node_generation=0)

    assert out == Output()
    assert job.phase is Phase.RECOVERING
    assert [rank["pid"] for rank in job.snapshot(7.0)["ranks"]] == [0, 0, 0, 0]  # nothing was observed


def test_exit_of_an_older_generation_from_the_ranks_current_process_counts_as_a_crash() -> None:
    job = recovered_job()  # rank 0 kept its generation-0 process, pid_of(0), through the recovery

    out = exit_of(job, 0, now=10.0, generation=0, pid=pid_of(0))

    assert job.phase is Phase.RECOVERING
    assert job.generation == 2
    started = the_event(out, "recovery_started")
    assert (started.fields["kind"], started.fields["ranks"]) == ("crash", [0])


def test_exit_of_an_older_generation_from_another_process_is_ignored() -> None:
    job = recovered_job()  # rank 3 runs its respawned process now

    out = exit_of(job, 3, now=10.0, generation=0, pid=pid_of(3))  # its generation-0 process, reported late

    assert out == Output()
    assert job.phase is Phase.RUNNING
    assert job.generation == 1


def test_exit_of_a_kept_process_right_after_a_recovery_began_counts_as_a_crash() -> None:
    # Rank 0's process (spawned in generation 0, last reported with pid_of(0)) is kept through the recovery; it
    # crashes before its agent's next summary. It is still the rank's current process, so this is a crash.
    job = recovering_job()

    out = exit_of(job, 0, now=CRASH_AT + 0.1, generation=0, pid=pid_of(0))

    assert job.generation == 2
    started = the_event(out, "recovery_started")
    assert (started.fields["kind"], started.fields["ranks"]) == ("crash", [0])


# A second failure during a recovery ------------------------------------------------------------------------------


def test_second_failure_during_recovery_starts_the_next_generation_with_the_new_culprit() -> None:
    job = recovering_job()
    summaries(job, now=6.0, generation=0)  # the healthy ranks are still aborting generation 0's collectives

    out = exit_of(job, 1, now=6.5, generation=0, pid=pid_of(1))

    assert job.phase is Phase.RECOVERING
    assert job.generation == 2
    assert job.recoveries == 2
    assert event_names(out) == ["failure", "recovery_started"]
    started = the_event(out, "recovery_started")
    assert started.generation == 2
    assert (started.fields["kind"], started.fields["ranks"], started.fields["recoveries"]) == ("crash", [1], 2)
    assert [(c.agent_id, c.generation, c.respawn_local_ranks) for c in commands_of(out, Recover)] == [
        ("a0", 2, (1,)), ("a1", 2, ()),
    ]


def test_recovery_after_a_second_failure_completes_only_at_the_newest_generation() -> None:
    job = recovering_job()
    summaries(job, now=6.0, generation=0)
    exit_of(job, 1, now=6.5, generation=0, pid=pid_of(1))

    stale = summaries(job, now=7.0, generation=1, node_generation=2)
    done = summaries(job, now=8.0, generation=2)

    assert "recovered" not in event_names(stale)
    assert the_event(done, "recovered").fields["since_detection_s"] == 8.0 - CRASH_AT  # from the first detection
    assert job.phase is Phase.RUNNING


# The recovery deadline ------------------------------------------------------------------------------------------


def late_rank_3(job: Job, now: float) -> Output:
    """Ranks 0..2 reached generation 1; rank 3's respawned process has not beaten yet."""
    return summaries(job, now=now, generation=1, ranks={3: {"generation": 0, "heartbeat_age_s": -1.0, "step": -1}})


def test_no_escalation_before_the_recovery_deadline() -> None:
    job = recovering_job(recovery_deadline_s=30.0)
    late_rank_3(job, now=6.0)
    late_rank_3(job, now=15.0)
    late_rank_3(job, now=25.0)
    late_rank_3(job, now=34.9)

    out = job.tick(now=34.9)

    assert out == Output()
    assert (job.phase, job.generation) == (Phase.RECOVERING, 1)


def test_ranks_late_at_the_recovery_deadline_are_escalated() -> None:
    job = recovering_job(recovery_deadline_s=30.0)
    for now in (6.0, 15.0, 25.0, 35.0):
        late_rank_3(job, now=now)

    out = job.tick(now=CRASH_AT + 30.0)

    assert event_names(out) == ["failure", "recovery_started"]
    failure = the_event(out, "failure")
    assert failure.generation == 1
    assert (failure.fields["kind"], failure.fields["ranks"], failure.fields["rank"]) == ("escalated", [3], 3)
    assert "generation 1" in failure.fields["evidence"]
    assert "30 s" in failure.fields["evidence"]
    started = the_event(out, "recovery_started")
    assert (started.generation, started.fields["kind"], started.fields["ranks"]) == (2, "escalated", [3])


def test_escalated_ranks_are_respawned_by_the_next_recovery() -> None:
    job = recovering_job(recovery_deadline_s=30.0)
    for now in (6.0, 15.0, 25.0, 35.0):
        late_rank_3(job, now=now)

    out = job.tick(now=CRASH_AT + 30.0)

    assert job.generation == 2
    assert [(c.agent_id, c.generation, c.respawn_local_ranks) for c in commands_of(out, Recover)] == [
        ("a0", 2, ()), ("a1", 2, (1,)),
    ]


def test_escalation_with_no_recoveries_left_falls_back_to_a_full_restart() -> None:
    job = recovering_job(recovery_deadline_s=30.0, max_recoveries=1)
    for now in (6.0, 15.0, 25.0, 35.0):
        late_rank_3(job, now=now)

    out = job.tick(now=CRASH_AT + 30.0)

    assert job.phase is Phase.STOPPING
    assert job.recoveries == 1
    assert commands_of(out, Recover) == []
    assert {command.agent_id for command in commands_of(out, Stop)} == {"a0", "a1"}


# Detection during a recovery -------------------------------------------------------------------------------------


def test_unresponsive_rank_during_recovery_starts_another_recovery() -> None:
    job = recovering_job()
    summaries(job, now=6.0, generation=0, ranks={1: {"heartbeat_age_s": 2.5}})  # > heartbeat_timeout_s 2.0

    out = job.tick(now=6.0)

    failure = the_event(out, "failure")
    assert (failure.fields["kind"], failure.fields["ranks"], failure.fields["node"]) == ("unresponsive", [1], 0)
    assert "exit_code" not in failure.fields
    started = the_event(out, "recovery_started")
    assert (started.generation, started.fields["kind"], started.fields["ranks"]) == (2, "unresponsive", [1])
    assert [c.respawn_local_ranks for c in commands_of(out, Recover)] == [(1,), ()]


SHORT_STALLS = Detection(stall_floor_s=3.0, stall_ceiling_s=5.0)
"""A stall ceiling short enough that a job whose steps stop for 10 s would be `stalled`."""


def test_stall_is_detected_while_running() -> None:
    # The control for the next test: the same inputs while RUNNING are a stall.
    job = recoverable_job(detection=SHORT_STALLS)
    for now in (2.0, 4.0, 6.0, 8.0, 10.0):
        summaries(job, now=now, step=10)

    out = job.tick(now=10.0)

    assert the_event(out, "failure").fields["kind"] == "stalled"


def test_stall_is_not_detected_while_recovering() -> None:
    job = recovering_job(detection=SHORT_STALLS)
    for now in (6.0, 8.0, 10.0, 12.0, 14.0, 16.0):
        summaries(job, now=now, step=10, generation=0)  # no step completes during a recovery

    out = job.tick(now=16.0)

    assert out == Output()
    assert (job.phase, job.generation) == (Phase.RECOVERING, 1)


def test_node_silent_since_a_recovery_began_is_replaced_by_a_spare() -> None:
    # a1 froze as the recovery began: its agent sent no summary of generation 1 before node_timeout_s (10 s).
    job = recoverable_job(max_nodes=3)
    job.join(request("spare"), now=2.0)
    exit_of(job, 0, now=CRASH_AT)
    for now in (6.0, 10.0, 14.0):
        summaries(job, now=now, generation=1, agents={"a0"})

    out = job.tick(now=CRASH_AT + 10.5)

    failure = the_event(out, "failure")
    assert (failure.fields["kind"], failure.fields["node"], failure.fields["ranks"]) == ("node_lost", 1, [2, 3])
    assert job.phase is Phase.RECOVERING
    assert "spare_takes_over" in event_names(out)
    assert job.assignments["spare"] == NodeAssignment(1, 2, 2)


def test_a_node_silent_before_a_recovery_began_is_lost_one_timeout_after_it_went_silent() -> None:
    """a1's last summary came at t=1; a crash on a0 at t=5 starts a recovery that a1 never joins (a frozen machine).
    Its silence counts from t=1 through the new generation: lost at 11, not at 15. The spare that takes its place
    then has a node timeout of its own."""
    job = recoverable_job(max_nodes=3)
    job.join(request("spare"), now=2.0)
    exit_of(job, 0, now=CRASH_AT)
    job.settle()
    for now in (6.0, 10.0):
        summaries(job, now=now, generation=1, agents={"a0"})

    assert "failure" not in event_names(job.tick(now=10.9))
    out = job.tick(now=11.1)

    failure = the_event(out, "failure")
    assert (failure.fields["kind"], failure.fields["node"]) == ("node_lost", 1)
    assert failure.fields["silent_s"] == pytest.approx(10.1)
    assert "spare_takes_over" in event_names(out)
    job.settle()
    summaries(job, now=11.5, generation=2, agents={"a0"})
    assert "failure" not in event_names(job.tick(now=12.0))


# Limits -------------------------------------------------------------------------------------------------------------


def test_failure_during_a_recovery_with_no_recoveries_left_takes_the_full_restart_path() -> None:
    job = recovering_job(max_recoveries=1, max_nodes=3)
    job.join(request("spare"), now=5.5)

    out = exit_of(job, 3, now=6.0, generation=1, pid=pid_of(3, generation=1))  # the respawned rank crashes too

    assert job.phase is Phase.STOPPING
    assert job.recoveries == 1
    assert commands_of(out, Recover) == []
    assert {command.agent_id for command in commands_of(out, Stop)} == {"a0", "a1"}  # not the spare


def test_failure_after_the_last_recovery_fails_once_no_restarts_are_left() -> None:
    job = recovered_job(max_recoveries=1)

    exit_of(job, 3, now=10.0, generation=1, pid=pid_of(3, generation=1))
    job.workers_stopped("a0", job.generation, now=10.5)
    out = job.workers_stopped("a1", job.generation, now=10.6)

    assert job.phase is Phase.FAILED
    assert {command.agent_id for command in commands_of(out, Shutdown)} == {"a0", "a1"}
    assert "no in-place recoveries (max 1) and no restarts are left (--max-restarts 0)" in job.summary


def test_unrecoverable_exit_fails_the_job_saying_no_replica_or_checkpoint() -> None:
    job = recoverable_job(max_nodes=3)
    job.join(request("spare"), now=2.0)

    out = exit_of(job, 2, now=CRASH_AT, exit_code=EXIT_UNRECOVERABLE)

    assert job.phase is Phase.FAILED
    assert job.exit_code == EXIT_JOB_FAILED
    assert job.recoveries == 0
    assert event_names(out) == ["failure", "job_failed"]
    assert the_event(out, "failure").fields["exit_code"] == EXIT_UNRECOVERABLE
    reason = the_event(out, "job_failed").fields["reason"]
    assert "rank 2" in reason
    assert "no replica" in reason
    assert "no checkpoint" in reason
    assert job.summary.startswith(f"job failed: {reason}")
    assert {command.agent_id for command in commands_of(out, Shutdown)} == {"a0", "a1", "spare"}


def test_unrecoverable_exit_of_a_respawned_rank_during_recovery_fails_the_job() -> None:
    job = recovering_job()

    out = exit_of(job, 3, now=6.0, generation=1, pid=pid_of(3, generation=1), exit_code=EXIT_UNRECOVERABLE)

    assert job.phase is Phase.FAILED
    assert "recovery_started" not in event_names(out)
    assert "no replica" in job.summary


# Node loss ----------------------------------------------------------------------------------------------------------


def job_with_spare(spare_nproc: int = 2) -> Job:
    """recoverable_job() on a0, a1 (2 ranks each) with one spare agent, `spare`, of `spare_nproc` ranks."""
    job = recoverable_job(max_nodes=3)
    job.join(request("spare", nproc=spare_nproc), now=2.0)
    assert set(job.spares) == {"spare"}
    return job


def test_node_loss_in_a_recoverable_job_is_taken_over_by_a_spare() -> None:
    job = job_with_spare()

    out = job.disconnect("a1", now=CRASH_AT)

    assert event_names(out) == ["failure", "spare_takes_over", "recovery_started"]
    assert the_event(out, "spare_takes_over").fields == {"node": 1, "host": "host-spare", "lost_host": "host-a1"}
    started = the_event(out, "recovery_started")
    assert (started.generation, started.fields["kind"], started.fields["ranks"]) == (1, "node_lost", [2, 3])
    assert (job.phase, job.generation, job.recoveries) == (Phase.RECOVERING, 1, 1)
    assert set(job.members) == {"a0", "spare"}
    assert job.spares == {}
    assert job.assignments == {"a0": NodeAssignment(0, 0, 2), "spare": NodeAssignment(1, 2, 2)}


def test_spare_taking_over_is_told_to_respawn_every_local_rank_of_the_lost_node() -> None:
    job = job_with_spare()

    out = job.disconnect("a1", now=CRASH_AT)

    assert commands_of(out, Recover) == [
        Recover("a0", generation=1, respawn_local_ranks=(), assignment=NodeAssignment(0, 0, 2), world_size=4,
                nnodes=2),
        Recover("spare", generation=1, respawn_local_ranks=(0, 1), assignment=NodeAssignment(1, 2, 2),
                world_size=4, nnodes=2),
    ]


def test_lost_agent_is_shut_down_when_a_spare_replaces_it() -> None:
    job = job_with_spare()

    out = job.disconnect("a1", now=CRASH_AT)

    shutdowns = commands_of(out, Shutdown)
    assert [(command.agent_id, command.exit_code) for command in shutdowns] == [("a1", EXIT_JOB_FAILED)]
    assert "replaced by a spare" in shutdowns[0].summary


def test_recovery_onto_a_spare_completes_when_its_ranks_report_the_new_generation() -> None:
    job = job_with_spare()
    job.disconnect("a1", now=CRASH_AT)

    out = summaries(job, now=8.0, generation=1, ranks={2: {"pid": 5002}, 3: {"pid": 5003}})

    assert "recovered" in event_names(out)
    assert job.phase is Phase.RUNNING
    assert [(r["rank"], r["host"], r["pid"]) for r in job.snapshot(8.0)["ranks"]][2:] == [
        (2, "host-spare", 5002), (3, "host-spare", 5003),
    ]


def test_node_loss_without_a_spare_fails_the_recoverable_job_mentioning_spare() -> None:
    job = recoverable_job()

    out = job.disconnect("a1", now=CRASH_AT)

    assert job.phase is Phase.FAILED
    assert job.exit_code == EXIT_JOB_FAILED
    assert commands_of(out, Recover) == []
    reason = the_event(out, "job_failed").fields["reason"]
    assert "node 1 (host-a1)" in reason
    assert "spare" in reason
    assert "a0" in {command.agent_id for command in commands_of(out, Shutdown)}


def test_spare_of_another_local_world_size_cannot_take_over() -> None:
    job = job_with_spare(spare_nproc=4)

    out = job.disconnect("a1", now=CRASH_AT)

    assert job.phase is Phase.FAILED
    assert "spare_takes_over" not in event_names(out)
    assert "spare" in the_event(out, "job_failed").fields["reason"]
    assert "spare" in {command.agent_id for command in commands_of(out, Shutdown)}


def test_silent_node_detected_lost_is_taken_over_by_a_spare() -> None:
    job = job_with_spare()
    for now in (4.0, 8.0, 11.0):
        summaries(job, now=now, agents={"a0"})  # a1's agent froze after t=1

    out = job.tick(now=11.5)

    failure = the_event(out, "failure")
    assert (failure.fields["kind"], failure.fields["node"], failure.fields["ranks"]) == ("node_lost", 1, [2, 3])
    assert the_event(out, "spare_takes_over").fields["lost_host"] == "host-a1"
    assert ("a1", EXIT_JOB_FAILED) in [(c.agent_id, c.exit_code) for c in commands_of(out, Shutdown)]
    assert job.assignments["spare"] == NodeAssignment(1, 2, 2)


def test_a_pause_of_the_coordinator_itself_loses_no_node() -> None:
    """Stopped for 20 s (SIGSTOP, starvation, a paused VM), the coordinator has not read what its agents sent
    meanwhile: without being told, its first check took every node for lost. A node really gone is still found,
    one node timeout after the coordinator runs again."""
    job = job_with_spare()
    summaries(job, now=4.0)
    paused_until = 24.0

    out = job.paused(paused_s=20.0, now=paused_until)
    out.events.extend(job.tick(now=paused_until).events)

    assert event_names(out) == ["coordinator_paused"] and job.phase is Phase.RUNNING
    summaries(job, now=paused_until + 0.5, agents={"a0"})  # a1 stays silent
    assert "failure" not in event_names(job.tick(now=paused_until + 9.9))
    failure = the_event(job.tick(now=paused_until + 10.1), "failure")
    assert (failure.fields["kind"], failure.fields["node"]) == ("node_lost", 1)


def test_a_pause_of_the_coordinator_moves_a_recoverys_deadline_with_it() -> None:
    job = recovering_job()  # detected at CRASH_AT: its ranks must reach generation 1 within 30 s
    job.paused(paused_s=40.0, now=CRASH_AT + 41.0)

    for now in (CRASH_AT + 41.0, CRASH_AT + 50.0, CRASH_AT + 60.0, CRASH_AT + 69.9):
        summaries(job, now=now, generation=0)  # the agents are in generation 1, their ranks not yet
        assert "failure" not in event_names(job.tick(now=now))
    assert the_event(job.tick(now=CRASH_AT + 70.1), "failure").fields["kind"] == "escalated"


# Status ---------------------------------------------------------------------------------------------------------------


def test_snapshot_during_recovery_shows_recovering_and_ready_ranks() -> None:
    job = recovering_job()
    summaries(job, now=6.0, generation=1, ranks={2: {"generation": 0}, 3: {"generation": 0}})

    snapshot = job.snapshot(6.0)

    assert (snapshot["phase"], snapshot["generation"], snapshot["recoveries"]) == ("recovering", 1, 1)
    assert [rank["state"] for rank in snapshot["ranks"]] == ["ready", "ready", "recovering", "recovering"]


def test_snapshot_shows_every_rank_recovering_before_any_summary_of_the_new_generation() -> None:
    job = recovering_job()

    snapshot = job.snapshot(CRASH_AT)

    assert [rank["state"] for rank in snapshot["ranks"]] == ["recovering"] * 4


def test_snapshot_after_a_recovery_shows_running_ranks_and_the_recoveries_count() -> None:
    job = recovered_job()

    snapshot = job.snapshot(7.0)

    assert (snapshot["phase"], snapshot["generation"], snapshot["recoveries"], snapshot["restarts"]) == (
        "running", 1, 1, 0)
    assert [rank["state"] for rank in snapshot["ranks"]] == ["running"] * 4
    assert snapshot["ranks"][3]["pid"] == pid_of(3, generation=1)


def test_late_exit_of_a_stopped_worker_after_a_full_restart_is_not_a_failure() -> None:
    job = running_job(nnodes=2, nproc=2, max_restarts=1)
    summaries(job, now=1.0, recoverable=False)  # the old processes' pids are known; no in-place recovery
    exit_of(job, 1, now=5.0)
    job.workers_stopped("a0", 0, now=5.5)
    job.workers_stopped("a1", 0, now=5.6)
    assert (job.phase, job.generation) == (Phase.RUNNING, 1)

    # Rank 0's old process, SIGTERMed by the stop, is reported only now, with its old generation.
    out = exit_of(job, 0, now=5.7, exit_code=-15, generation=0, pid=pid_of(0))

    assert out.commands == [] and "failure" not in event_names(out)
    assert job.phase is Phase.RUNNING


def test_a_node_found_silent_in_a_job_without_the_step_loop_fails_it_at_once() -> None:
    """Not recoverable in place (the script does not use flashrun's step loop), so torchrun's path; but a lost node
    confirms no stop: the job fails now, saying which node, instead of a stop deadline later."""
    job = running_job(nnodes=2)
    for now in (1.0, 5.0, 9.0, 11.0):
        summaries(job, now, recoverable=False, agents={"a0"})
    out = job.tick(now=11.0)

    assert job.phase is Phase.FAILED
    assert event_names(out) == ["failure", "job_failed"]
    assert the_event(out, "failure").fields["kind"] == "node_lost"
    assert the_event(out, "job_failed").fields["reason"] == \
        "node 1 (host-a1) was lost; the job cannot continue without it"
    assert {command.agent_id for command in commands_of(out, Shutdown)} == {"a0", "a1"}
