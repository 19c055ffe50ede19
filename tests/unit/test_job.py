"""Unit tests for flashrun.coordinator.job: the job lifecycle as a pure state machine.

Time is a plain number passed in; nothing here sleeps, opens sockets or starts processes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest

from flashrun.config import PROTOCOL_VERSION
from flashrun.coordinator.job import (
    Event,
    Job,
    JobSpec,
    JoinRequest,
    MakeSpare,
    Output,
    Phase,
    Reject,
    Shutdown,
    StartGeneration,
    Stop,
    Wait,
    WorkerExit,
)
from flashrun.coordinator.ranks import NodeAssignment
from flashrun.errors import EXIT_JOB_FAILED, EXIT_OK

RUN_ID = "run-42"
TOKEN = "s3cret"


def make_job(
    nnodes: int | tuple[int, int] = 2,
    max_restarts: int = 0,
    stop_ack_s: float = 60.0,
    **spec: Any,
) -> Job:
    """`nnodes` is N or (MIN, MAX), as --nnodes; `spec` sets JobSpec's other fields (max_recoveries, ...)."""
    low, high = (nnodes, nnodes) if isinstance(nnodes, int) else nnodes
    return Job(JobSpec(run_id=RUN_ID, token=TOKEN, min_nodes=low, max_nodes=high, max_restarts=max_restarts,
                       stop_ack_s=stop_ack_s, **spec))


def request(
    agent_id: str,
    hostname: str | None = None,
    *,
    node_rank: int | None = None,
    nproc: int = 2,
    run_id: str = RUN_ID,
    token: str = TOKEN,
    protocol_version: int = PROTOCOL_VERSION,
) -> JoinRequest:
    return JoinRequest(
        agent_id=agent_id,
        hostname=hostname or f"host-{agent_id}",
        run_id=run_id,
        token=token,
        protocol_version=protocol_version,
        requested_node_rank=node_rank,
        local_world_size=nproc,
    )


def commands_of(out: Output, kind: type) -> list:
    return [command for command in out.commands if isinstance(command, kind)]


def event_names(out: Output) -> list[str]:
    return [event.name for event in out.events]


def the_event(out: Output, name: str) -> Event:
    matching = [event for event in out.events if event.name == name]
    assert len(matching) == 1, f"expected one {name!r} event, got {event_names(out)}"
    return matching[0]


def the_start(out: Output) -> StartGeneration:
    starts = commands_of(out, StartGeneration)
    assert len(starts) == 1, f"expected one StartGeneration, got {out.commands}"
    return starts[0]


def running_job(nnodes: int = 2, nproc: int = 2, max_nodes: int | None = None, **spec: Any) -> Job:
    """A job whose rendezvous completed at t=0: agents a0..a{n-1} on host-a0.. with node ranks 0..n-1.

    `max_nodes` (default: nnodes) above nnodes leaves room for that many minus nnodes spares.
    """
    job = make_job((nnodes, nnodes if max_nodes is None else max_nodes), **spec)
    for node in range(nnodes):
        job.join(request(f"a{node}", node_rank=node, nproc=nproc), now=0.0)
    assert job.phase is Phase.RUNNING
    return job


def crash(generation: int = 0, local_rank: int = 0, exit_code: int = 1, **kwargs: str) -> WorkerExit:
    return WorkerExit(generation=generation, local_rank=local_rank, exit_code=exit_code, **kwargs)


def success(generation: int = 0, local_rank: int = 0) -> WorkerExit:
    return WorkerExit(generation=generation, local_rank=local_rank, exit_code=0)


def stop_all(job: Job, generation: int, now: float) -> Output:
    """Every member confirms its workers stopped; returns the output of the last confirmation."""
    out = Output()
    for agent_id in list(job.members):
        out = job.workers_stopped(agent_id, generation, now)
    return out


# Rendezvous ---------------------------------------------------------------------------------------------------


def test_rendezvous_waits_until_every_node_joined() -> None:
    job = make_job(nnodes=3)

    first = job.join(request("a"), now=0.0)
    second = job.join(request("b"), now=1.0)

    assert job.phase is Phase.RENDEZVOUS
    assert first.commands == [Wait("a", joined=1, needed=3)]
    assert second.commands == [Wait("b", joined=2, needed=3)]  # only the newcomer: O(1) messages per join
    assert event_names(second) == ["agent_joined"]


def test_rendezvous_completes_when_the_last_node_joins() -> None:
    job = make_job(nnodes=2)
    job.join(request("a"), now=0.0)

    out = job.join(request("b"), now=1.0)

    assert job.phase is Phase.RUNNING
    start = the_start(out)
    assert start.generation == 0
    assert start.nnodes == 2
    assert start.world_size == 4
    assert set(start.assignments) == {"a", "b"}
    assert commands_of(out, Wait) == []
    assert event_names(out) == ["agent_joined", "rendezvous_complete"]
    assert the_event(out, "rendezvous_complete").fields == {"nnodes": 2, "world_size": 4}


def test_rendezvous_assignments_follow_requested_node_ranks() -> None:
    job = make_job(nnodes=2)
    job.join(request("a", node_rank=1, nproc=4), now=0.0)

    start = the_start(job.join(request("b", node_rank=0, nproc=4), now=1.0))

    assert start.assignments == {
        "b": NodeAssignment(node_rank=0, rank_offset=0, local_world_size=4),
        "a": NodeAssignment(node_rank=1, rank_offset=4, local_world_size=4),
    }


def test_rendezvous_assignments_do_not_depend_on_join_order() -> None:
    def start_with(order: list[str]) -> dict[str, NodeAssignment]:
        job = make_job(nnodes=3)
        out = Output()
        for agent_id in order:
            out = job.join(request(agent_id, hostname=f"node-{agent_id}"), now=0.0)
        return the_start(out).assignments

    assert start_with(["x", "y", "z"]) == start_with(["z", "x", "y"]) == {
        "x": NodeAssignment(0, 0, 2),
        "y": NodeAssignment(1, 2, 2),
        "z": NodeAssignment(2, 4, 2),
    }


def test_elastic_rendezvous_waits_for_min_not_max() -> None:
    job = make_job(nnodes=(3, 5))
    job.join(request("a"), now=100.0)

    out = job.join(request("b"), now=105.0)

    assert out.commands == [Wait("b", joined=2, needed=3)]
    assert job.phase is Phase.RENDEZVOUS


def test_elastic_rendezvous_completes_as_soon_as_min_joined() -> None:
    job = make_job(nnodes=(2, 4))
    job.join(request("a"), now=100.0)

    out = job.join(request("b"), now=105.0)

    assert job.phase is Phase.RUNNING
    start = the_start(out)
    assert start.nnodes == 2
    assert start.world_size == 4
    assert set(start.assignments) == {"a", "b"}
    assert commands_of(out, Wait) == []
    assert event_names(out) == ["agent_joined", "rendezvous_complete"]


def test_elastic_rendezvous_has_no_last_call_window() -> None:
    assert "last_call_s" not in {field.name for field in dataclasses.fields(JobSpec)}
    job = make_job(nnodes=(2, 4))
    job.join(request("a"), now=0.0)
    job.join(request("b"), now=0.0)
    job.join(request("c"), now=1.0)  # a spare, however soon after MIN it joins

    assert job.tick(now=5.0).commands == []  # no later regrouping: the job keeps running on MIN nodes
    assert set(job.members) == {"a", "b"}
    assert set(job.spares) == {"c"}
    assert job.world_size == 4


def test_elastic_rendezvous_below_min_never_completes_on_tick() -> None:
    job = make_job(nnodes=(2, 4))
    out = job.join(request("a"), now=0.0)

    assert out.commands == [Wait("a", joined=1, needed=2)]
    assert job.tick(now=10_000.0).commands == []
    assert job.phase is Phase.RENDEZVOUS


def test_elastic_rendezvous_runs_on_min_nodes_even_when_max_could_join() -> None:
    job = make_job(nnodes=(1, 2))

    out = job.join(request("a"), now=0.0)

    assert job.phase is Phase.RUNNING
    assert the_start(out).nnodes == 1
    assert the_start(out).world_size == 2


def spare_reason(out: Output, agent_id: str) -> str:
    assert len(out.commands) == 1, out.commands
    command = out.commands[0]
    assert isinstance(command, MakeSpare)
    assert command.agent_id == agent_id
    return command.reason


def test_agent_joining_a_running_job_with_room_becomes_a_spare() -> None:
    job = running_job(nnodes=2, max_nodes=3)

    out = job.join(request("extra"), now=5.0)

    reason = spare_reason(out, "extra")
    assert reason.startswith("the job already has all the nodes it needs")
    assert "takes over if one is lost" in reason
    assert event_names(out) == ["spare_joined"]
    assert the_event(out, "spare_joined").fields == {"host": "host-extra"}
    assert "extra" in job.spares
    assert "extra" not in job.members
    assert job.world_size == 4


def test_agents_joining_after_elastic_rendezvous_are_spares_up_to_max() -> None:
    job = make_job(nnodes=(1, 3))
    job.join(request("a"), now=0.0)

    first = job.join(request("late1"), now=31.0)
    second = job.join(request("late2"), now=32.0)

    spare_reason(first, "late1")
    spare_reason(second, "late2")
    assert commands_of(first, StartGeneration) == commands_of(second, StartGeneration) == []
    assert set(job.members) == {"a"}
    assert set(job.spares) == {"late1", "late2"}


def test_agent_beyond_max_is_rejected_naming_the_node_counts() -> None:
    job = make_job(nnodes=(1, 3))
    job.join(request("a"), now=0.0)
    job.join(request("late1"), now=1.0)
    job.join(request("late2"), now=2.0)

    reason = reject_reason(job.join(request("late3"), now=3.0), "late3")

    assert "already has 3 nodes" in reason
    assert "--nnodes 1:3" in reason
    assert "1 working" in reason
    assert "late3" not in job.spares
    assert set(job.spares) == {"late1", "late2"}


def test_agent_joining_a_full_fixed_size_job_is_rejected() -> None:
    job = running_job(nnodes=2)

    reason = reject_reason(job.join(request("extra"), now=5.0), "extra")

    assert "already has 2 nodes" in reason
    assert "--nnodes 2:2" in reason
    assert job.spares == {}
    assert set(job.members) == {"a0", "a1"}


def test_a_spare_that_left_frees_its_place_for_another() -> None:
    job = running_job(nnodes=1, max_nodes=2)
    job.join(request("spare"), now=1.0)
    job.disconnect("spare", now=2.0)

    out = job.join(request("spare2"), now=3.0)

    spare_reason(out, "spare2")
    assert set(job.spares) == {"spare2"}


def reject_reason(out: Output, agent_id: str) -> str:
    assert len(out.commands) == 1, out.commands
    command = out.commands[0]
    assert isinstance(command, Reject)
    assert command.agent_id == agent_id
    assert event_names(out) == ["agent_rejected"]
    assert the_event(out, "agent_rejected").fields["reason"] == command.reason
    return command.reason


def test_join_with_other_protocol_version_is_rejected() -> None:
    job = make_job()

    reason = reject_reason(job.join(request("a", protocol_version=PROTOCOL_VERSION + 7), now=0.0), "a")

    assert "protocol version" in reason
    assert str(PROTOCOL_VERSION + 7) in reason
    assert job.members == {}


def test_join_with_other_run_id_is_rejected() -> None:
    job = make_job()

    reason = reject_reason(job.join(request("a", run_id="other-run"), now=0.0), "a")

    assert "run id" in reason
    assert "'other-run'" in reason
    assert repr(RUN_ID) in reason


def test_join_with_wrong_token_is_rejected() -> None:
    job = make_job()

    reason = reject_reason(job.join(request("a", token="guess"), now=0.0), "a")

    assert "token" in reason
    assert "guess" not in reason  # never echo a secret


def test_join_with_node_rank_out_of_range_is_rejected() -> None:
    job = make_job(nnodes=2)

    reason = reject_reason(job.join(request("a", node_rank=2), now=0.0), "a")

    assert "--node-rank 2" in reason
    assert "0..1" in reason


def test_elastic_join_with_node_rank_not_below_min_is_rejected() -> None:
    job = make_job(nnodes=(2, 4))

    reason = reject_reason(job.join(request("a", node_rank=2), now=0.0), "a")

    assert "--node-rank 2" in reason
    assert "0..1" in reason
    assert "runs on 2 nodes" in reason
    assert job.members == {}


def test_elastic_join_with_the_last_node_rank_below_min_is_accepted() -> None:
    job = make_job(nnodes=(2, 4))

    out = job.join(request("a", node_rank=1), now=0.0)

    assert commands_of(out, Reject) == []
    assert set(job.members) == {"a"}


def test_join_with_node_rank_already_taken_is_rejected() -> None:
    job = make_job(nnodes=3)
    job.join(request("a", hostname="alpha", node_rank=1), now=0.0)

    reason = reject_reason(job.join(request("b", hostname="beta", node_rank=1), now=1.0), "b")

    assert "node rank 1 is already taken" in reason
    assert "alpha" in reason
    assert set(job.members) == {"a"}


def test_join_with_an_agent_id_already_joined_is_rejected() -> None:
    job = make_job(nnodes=3)
    job.join(request("a"), now=0.0)

    reason = reject_reason(job.join(request("a"), now=1.0), "a")

    assert "already joined" in reason


def test_rejected_join_does_not_count_towards_the_rendezvous() -> None:
    job = make_job(nnodes=2)
    job.join(request("a"), now=0.0)
    job.join(request("bad", token="nope"), now=1.0)

    assert job.phase is Phase.RENDEZVOUS
    assert set(job.members) == {"a"}


def test_agent_leaving_during_rendezvous_is_forgotten() -> None:
    job = make_job(nnodes=2)
    job.join(request("a", node_rank=0), now=0.0)

    out = job.disconnect("a", now=1.0)

    assert event_names(out) == ["agent_left"]
    assert out.commands == []
    assert job.members == {}
    assert job.phase is Phase.RENDEZVOUS


def test_node_rank_of_an_agent_that_left_can_be_taken_again() -> None:
    job = make_job(nnodes=2)
    job.join(request("a", node_rank=0), now=0.0)
    job.disconnect("a", now=1.0)

    out = job.join(request("b", node_rank=0), now=2.0)

    assert commands_of(out, Reject) == []
    assert set(job.members) == {"b"}


def test_agent_leaving_elastic_rendezvous_no_longer_counts_towards_min() -> None:
    job = make_job(nnodes=(3, 4))
    job.join(request("a"), now=0.0)
    job.join(request("b"), now=1.0)
    job.disconnect("b", now=2.0)

    waiting = job.join(request("c"), now=3.0)
    assert waiting.commands == [Wait("c", joined=2, needed=3)]
    assert job.phase is Phase.RENDEZVOUS

    start = the_start(job.join(request("d"), now=4.0))
    assert set(start.assignments) == {"a", "c", "d"}


# Running: success ----------------------------------------------------------------------------------------------


def test_all_ranks_exiting_zero_succeeds_the_job() -> None:
    job = running_job(nnodes=2, nproc=2)
    for agent_id, local_rank in [("a0", 0), ("a0", 1), ("a1", 0)]:
        out = job.worker_exited(agent_id, success(local_rank=local_rank), now=5.0)
        assert job.phase is Phase.RUNNING
        assert out.commands == []

    out = job.worker_exited("a1", success(local_rank=1), now=6.0)

    assert job.phase is Phase.SUCCEEDED
    assert job.finished
    assert job.exit_code == EXIT_OK
    assert event_names(out) == ["worker_succeeded", "job_succeeded"]


def test_success_shuts_down_every_agent_including_spares() -> None:
    job = running_job(nnodes=2, nproc=1, max_nodes=3)
    job.join(request("spare"), now=1.0)
    assert set(job.spares) == {"spare"}
    job.worker_exited("a0", success(), now=5.0)

    out = job.worker_exited("a1", success(), now=6.0)

    shutdowns = commands_of(out, Shutdown)
    assert {command.agent_id for command in shutdowns} == {"a0", "a1", "spare"}
    assert all(command.exit_code == EXIT_OK for command in shutdowns)


def test_worker_succeeded_event_names_rank_and_node() -> None:
    job = running_job(nnodes=2, nproc=2)

    out = job.worker_exited("a1", success(local_rank=1), now=5.0)

    assert the_event(out, "worker_succeeded").fields == {"rank": 3, "node": 1, "exit_code": 0}


def test_duplicate_success_report_is_counted_once() -> None:
    job = running_job(nnodes=1, nproc=2)
    job.worker_exited("a0", success(local_rank=0), now=5.0)
    job.worker_exited("a0", success(local_rank=0), now=5.0)

    assert job.phase is Phase.RUNNING


# Running: failure and restart ----------------------------------------------------------------------------------


def test_worker_failure_stops_every_member() -> None:
    job = running_job(nnodes=2)

    out = job.worker_exited("a1", crash(exit_code=3), now=5.0)

    assert job.phase is Phase.STOPPING
    # The crashed rank's own agent is told to SIGKILL it at once; the others stop gracefully.
    assert out.commands == [Stop("a0", 0), Stop("a1", 0, kill_local_ranks=(0,))]


def test_worker_failure_emits_a_crash_event_then_stopping() -> None:
    job = running_job(nnodes=2, nproc=2)

    out = job.worker_exited("a1", crash(local_rank=1, exit_code=3), now=5.0)

    assert event_names(out) == ["failure", "stopping"]
    failed = the_event(out, "failure")
    assert failed.generation == 0
    assert set(failed.fields) == {"kind", "ranks", "evidence", "rank", "node", "exit_code", "job_step", "leader_step"}
    assert failed.fields["kind"] == "crash"
    assert failed.fields["ranks"] == [3]
    assert failed.fields["rank"] == 3
    assert failed.fields["node"] == 1
    assert failed.fields["exit_code"] == 3
    assert "host-a1" in failed.fields["evidence"]
    assert "exited with code 3" in failed.fields["evidence"]


def test_worker_failure_does_not_stop_spares() -> None:
    job = running_job(nnodes=1, max_nodes=2)
    job.join(request("spare"), now=1.0)
    assert set(job.spares) == {"spare"}

    out = job.worker_exited("a0", crash(), now=5.0)

    assert [command.agent_id for command in commands_of(out, Stop)] == ["a0"]


def test_restart_waits_for_every_member_to_confirm_the_stop() -> None:
    job = running_job(nnodes=2, max_restarts=1)
    job.worker_exited("a0", crash(), now=5.0)

    out = job.workers_stopped("a0", 0, now=6.0)

    assert out.commands == []
    assert job.phase is Phase.STOPPING


def test_all_stops_confirmed_restart_the_next_generation() -> None:
    job = running_job(nnodes=2, max_restarts=1)
    job.worker_exited("a0", crash(), now=5.0)
    job.workers_stopped("a0", 0, now=6.0)

    out = job.workers_stopped("a1", 0, now=7.0)

    assert job.phase is Phase.RUNNING
    assert job.generation == 1
    assert job.restarts == 1
    start = the_start(out)
    assert start.generation == 1
    assert start.world_size == 4
    assert start.assignments == job.assignments
    assert event_names(out) == ["restarting"]
    assert the_event(out, "restarting").generation == 1
    assert the_event(out, "restarting").fields == {"restarts": 1}


def test_restarted_generation_can_succeed() -> None:
    job = running_job(nnodes=1, nproc=2, max_restarts=1)
    job.worker_exited("a0", success(generation=0, local_rank=1), now=5.0)
    job.worker_exited("a0", crash(generation=0, local_rank=0), now=6.0)
    stop_all(job, 0, now=7.0)

    job.worker_exited("a0", success(generation=1, local_rank=0), now=8.0)
    assert job.phase is Phase.RUNNING  # generation 0's success of local rank 1 does not carry over
    job.worker_exited("a0", success(generation=1, local_rank=1), now=9.0)

    assert job.phase is Phase.SUCCEEDED
    assert job.exit_code == EXIT_OK


def test_failure_without_restarts_left_fails_the_job() -> None:
    job = running_job(nnodes=2, max_restarts=0)
    job.worker_exited("a1", crash(exit_code=3), now=5.0)

    out = stop_all(job, 0, now=6.0)

    assert job.phase is Phase.FAILED
    assert job.exit_code == EXIT_JOB_FAILED
    assert commands_of(out, StartGeneration) == []
    assert event_names(out) == ["job_failed"]
    assert "--max-restarts 0" in the_event(out, "job_failed").fields["reason"]


def test_failure_after_last_restart_fails_the_job() -> None:
    job = running_job(nnodes=1, max_restarts=1)
    job.worker_exited("a0", crash(generation=0), now=5.0)
    stop_all(job, 0, now=6.0)
    job.worker_exited("a0", crash(generation=1), now=7.0)

    stop_all(job, 1, now=8.0)

    assert job.phase is Phase.FAILED
    assert job.restarts == 1
    assert job.generation == 1


def test_job_failure_shuts_down_every_agent_including_spares() -> None:
    job = running_job(nnodes=2, max_nodes=3)
    job.join(request("spare"), now=1.0)
    assert set(job.spares) == {"spare"}
    job.worker_exited("a1", crash(), now=5.0)

    out = stop_all(job, 0, now=6.0)

    shutdowns = commands_of(out, Shutdown)
    assert {command.agent_id for command in shutdowns} == {"a0", "a1", "spare"}
    assert all(command.exit_code == EXIT_JOB_FAILED for command in shutdowns)
    assert all(command.summary == job.summary for command in shutdowns)


def test_failure_summary_names_rank_node_host_exit_code_error_and_traceback() -> None:
    job = running_job(nnodes=2, nproc=2)
    traceback = 'Traceback (most recent call last):\n  File "train.py", line 7\nRuntimeError: boom\n'
    job.worker_exited("a1", crash(local_rank=1, exit_code=3, error_message="RuntimeError: boom",
                                  traceback=traceback), now=5.0)

    stop_all(job, 0, now=6.0)

    summary = job.summary
    assert summary.startswith("job failed: ")
    assert "rank 3 (local rank 1) on node 1 (host-a1) exited with code 3 in generation 0" in summary
    assert "error: RuntimeError: boom" in summary
    assert '    File "train.py", line 7' in summary
    assert "RuntimeError: boom" in summary.split("traceback:")[1]


def test_failure_summary_names_the_signal_that_killed_the_worker() -> None:
    job = running_job(nnodes=1, nproc=1)
    job.worker_exited("a0", crash(exit_code=-9), now=5.0)

    stop_all(job, 0, now=6.0)

    assert "rank 0 (local rank 0) on node 0 (host-a0) was killed by SIGKILL" in job.summary


def test_failure_summary_names_an_unknown_signal_by_number() -> None:
    job = running_job(nnodes=1, nproc=1)
    job.worker_exited("a0", crash(exit_code=-200), now=5.0)

    stop_all(job, 0, now=6.0)

    assert "was killed by signal 200" in job.summary


def test_failure_summary_never_calls_a_later_failure_earlier() -> None:
    job = running_job(nnodes=1, nproc=1, max_restarts=1)
    job.worker_exited("a0", crash(generation=0, exit_code=3, error_message="first"), now=5.0)
    stop_all(job, 0, now=6.0)
    job.worker_exited("a0", crash(generation=1, exit_code=4, error_message="second"), now=7.0)

    stop_all(job, 1, now=8.0)

    root = re.search(r"root cause \(first failure\): .* in generation (\d+)", job.summary)
    assert root, job.summary
    earlier = [int(g) for g in re.findall(r"earlier generation failure: .* in generation (\d+)", job.summary)]
    assert all(generation < int(root.group(1)) for generation in earlier), job.summary


def test_exits_after_the_stop_are_not_counted_as_failures() -> None:
    job = running_job(nnodes=2, max_restarts=1)
    job.worker_exited("a0", crash(exit_code=1), now=5.0)

    out = job.worker_exited("a1", crash(exit_code=-15), now=5.5)  # SIGTERM from our own Stop

    assert out.commands == []
    assert "failure" not in event_names(out)
    assert len(job.failures) == 1
    assert job.phase is Phase.STOPPING


def test_success_reported_while_stopping_does_not_succeed_the_job() -> None:
    job = running_job(nnodes=1, nproc=2)
    job.worker_exited("a0", crash(local_rank=0), now=5.0)

    job.worker_exited("a0", success(local_rank=1), now=5.5)

    assert job.phase is Phase.STOPPING


def test_worker_exit_from_a_stale_generation_is_ignored() -> None:
    job = running_job(nnodes=1, max_restarts=2)
    job.worker_exited("a0", crash(generation=0), now=5.0)
    stop_all(job, 0, now=6.0)

    out = job.worker_exited("a0", crash(generation=0), now=7.0)

    assert out == Output()
    assert job.phase is Phase.RUNNING
    assert job.generation == 1


def test_stop_confirmation_from_a_stale_generation_is_ignored() -> None:
    job = running_job(nnodes=1, max_restarts=2)
    job.worker_exited("a0", crash(generation=0), now=5.0)
    stop_all(job, 0, now=6.0)
    job.worker_exited("a0", crash(generation=1), now=7.0)

    out = job.workers_stopped("a0", 0, now=8.0)

    assert out == Output()
    assert job.phase is Phase.STOPPING
    assert job.generation == 1


def test_stop_confirmation_while_running_is_ignored() -> None:
    job = running_job(nnodes=1)

    out = job.workers_stopped("a0", 0, now=5.0)

    assert out == Output()
    assert job.phase is Phase.RUNNING


def test_worker_exit_from_a_spare_is_ignored() -> None:
    job = running_job(nnodes=1, max_nodes=2)
    job.join(request("spare"), now=1.0)
    assert set(job.spares) == {"spare"}

    out = job.worker_exited("spare", crash(), now=5.0)

    assert out == Output()
    assert job.phase is Phase.RUNNING


def test_missing_stop_confirmation_fails_the_job_at_stop_ack_deadline() -> None:
    job = running_job(nnodes=2, stop_ack_s=60.0)
    job.worker_exited("a0", crash(), now=100.0)
    job.workers_stopped("a0", 0, now=101.0)

    assert job.tick(now=159.9).commands == []
    assert job.phase is Phase.STOPPING

    out = job.tick(now=160.0)

    assert job.phase is Phase.FAILED
    assert event_names(out) == ["job_failed"]
    reason = the_event(out, "job_failed").fields["reason"]
    assert "host-a1" in reason
    assert "host-a0" not in reason
    assert "60 s" in reason
    assert {command.agent_id for command in commands_of(out, Shutdown)} == {"a0", "a1"}


# Node loss and abort --------------------------------------------------------------------------------------------


def test_member_disconnect_while_running_fails_the_job() -> None:
    job = running_job(nnodes=2)

    out = job.disconnect("a1", now=5.0)

    assert job.phase is Phase.FAILED
    assert job.exit_code == EXIT_JOB_FAILED
    assert event_names(out) == ["failure", "job_failed"]
    lost = the_event(out, "failure").fields
    # several ranks: no single "rank", no exit code
    assert set(lost) == {"kind", "ranks", "evidence", "node", "job_step", "leader_step"}
    assert (lost["kind"], lost["node"], lost["ranks"]) == ("node_lost", 1, [2, 3])
    assert "host-a1" in lost["evidence"]
    assert "host-a1" in job.summary
    assert [command.agent_id for command in commands_of(out, Shutdown)] == ["a0"]


def test_member_disconnect_while_stopping_fails_the_job() -> None:
    job = running_job(nnodes=2, max_restarts=3)
    job.worker_exited("a0", crash(), now=5.0)

    out = job.disconnect("a1", now=6.0)

    assert job.phase is Phase.FAILED
    assert event_names(out) == ["failure", "job_failed"]


def test_spare_disconnect_is_harmless() -> None:
    job = running_job(nnodes=1, max_nodes=2)
    job.join(request("spare"), now=1.0)
    assert set(job.spares) == {"spare"}

    out = job.disconnect("spare", now=5.0)

    assert out == Output()
    assert job.phase is Phase.RUNNING
    assert job.spares == {}


def test_disconnect_after_the_job_finished_is_ignored() -> None:
    job = running_job(nnodes=1, nproc=1)
    job.worker_exited("a0", success(), now=5.0)

    out = job.disconnect("a0", now=6.0)

    assert out == Output()
    assert job.phase is Phase.SUCCEEDED


def test_abort_fails_the_job_and_shuts_down_every_agent() -> None:
    job = running_job(nnodes=2, max_nodes=3)
    job.join(request("spare"), now=1.0)
    assert set(job.spares) == {"spare"}

    out = job.abort("coordinator received SIGTERM")

    assert job.phase is Phase.FAILED
    assert job.exit_code == EXIT_JOB_FAILED
    assert "coordinator received SIGTERM" in job.summary
    assert event_names(out) == ["job_failed"]
    assert {command.agent_id for command in commands_of(out, Shutdown)} == {"a0", "a1", "spare"}


def test_abort_during_rendezvous_shuts_down_the_waiting_agents() -> None:
    job = make_job(nnodes=3)
    job.join(request("a"), now=0.0)

    out = job.abort("interrupted")

    assert job.phase is Phase.FAILED
    assert [command.agent_id for command in commands_of(out, Shutdown)] == ["a"]


def test_abort_after_the_job_finished_does_nothing() -> None:
    job = running_job(nnodes=1, nproc=1)
    job.worker_exited("a0", success(), now=5.0)

    out = job.abort("late signal")

    assert out == Output()
    assert job.phase is Phase.SUCCEEDED
    assert job.exit_code == EXIT_OK


@pytest.mark.parametrize("late_input", ["worker_exited", "workers_stopped", "tick"])
def test_failed_job_ignores_further_input(late_input: str) -> None:
    job = running_job(nnodes=2, nproc=1)
    job.worker_exited("a0", crash(), now=5.0)
    job.disconnect("a1", now=6.0)
    assert job.phase is Phase.FAILED

    if late_input == "worker_exited":
        out = job.worker_exited("a0", crash(), now=7.0)
    elif late_input == "workers_stopped":
        out = job.workers_stopped("a0", 0, now=7.0)
    else:
        out = job.tick(now=10_000.0)

    assert out == Output()
    assert job.phase is Phase.FAILED
