"""Unit tests of fault drills in flashrun.coordinator.job: `Job.inject` validates a `flashrun inject` request and
says which agent gets which fault, or why nothing is sent.

Time is a plain number passed in; nothing here sleeps, opens sockets or starts processes.
"""

from __future__ import annotations

from typing import Any

import pytest

from flashrun.coordinator.job import Inject, InjectRefused, InjectRequest, Job, Output, Phase, WorkerExit
from tests.unit.test_job import TOKEN, commands_of, make_job, request, running_job, the_event
from tests.unit.test_recovery import exit_of, pid_of, recoverable_job, summaries


def drill_job(**spec: Any) -> Job:
    """recoverable_job() (2 nodes a0/a1 of 2 ranks, every rank at step 10) started with --allow-inject."""
    return recoverable_job(allow_inject=True, **spec)


def inject(job: Job, fault: str = "kill", *, token: str = TOKEN, colocated_agent: str = "", **fields: Any) -> Output:
    return job.inject(InjectRequest(token=token, fault=fault, **fields), colocated_agent)


def sent(out: Output) -> Inject:
    assert not commands_of(out, InjectRefused), commands_of(out, InjectRefused)
    [command] = commands_of(out, Inject)
    return command


def refused(out: Output) -> InjectRefused:
    assert not commands_of(out, Inject) and not out.events, "a refused drill must send and log nothing"
    [refusal] = commands_of(out, InjectRefused)
    return refusal


# What is sent ------------------------------------------------------------------------------------------------


def test_kill_goes_to_the_agent_of_the_rank_with_its_local_rank_and_pid() -> None:
    command = sent(inject(drill_job(), "kill", rank=3))
    assert (command.agent_id, command.local_rank, command.rank, command.pid) == ("a1", 1, 3, pid_of(3))
    assert (command.fault, command.at_step) == ("kill", None)


def test_the_reply_says_what_was_sent_where() -> None:
    command = sent(inject(drill_job(), "kill", rank=1))
    assert command.detail == f"kill sent to rank 1 (pid {pid_of(1)}) on node 0 (host-a0)"


def test_the_reply_names_the_step_of_a_drill_at_a_step() -> None:
    command = sent(inject(drill_job(), "exception", rank=2, at_step=20))
    assert command.at_step == 20
    assert command.detail.startswith("exception at step 20 sent to rank 2 ")


def test_a_drill_is_logged_as_fault_injected() -> None:
    out = inject(drill_job(), "hang", rank=2, at_step=12)
    fields = the_event(out, "fault_injected").fields
    assert fields == {"fault": "hang", "rank": 2, "node": 1, "host": "host-a1", "pid": pid_of(2), "at_step": 12}


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_kill_and_stop_at_once_need_no_report_from_the_rank(fault: str) -> None:
    job = running_job(allow_inject=True)  # no summary yet: the agent signals the process itself
    command = sent(inject(job, fault, rank=0))
    assert (command.agent_id, command.local_rank, command.pid) == ("a0", 0, 0)
    assert command.detail == f"{fault} sent to rank 0 on node 0 (host-a0)"


def test_a_drill_at_once_is_logged_without_a_step() -> None:
    assert "at_step" not in the_event(inject(drill_job(), "kill", rank=2), "fault_injected").fields


def test_kill_node_goes_to_the_nodes_agent_for_all_its_ranks() -> None:
    out = inject(drill_job(), "kill-node", node=1)
    command = sent(out)
    assert (command.agent_id, command.fault, command.local_rank, command.at_step) == ("a1", "kill-node", None, None)
    assert command.detail == "kill-node sent to node 1 (host-a1): its agent and ranks 2..3 go down"
    assert the_event(out, "fault_injected").fields == {"fault": "kill-node", "node": 1, "host": "host-a1"}


def test_a_drill_changes_nothing_in_the_job_by_itself() -> None:
    job = drill_job()
    inject(job, "kill", rank=1)
    assert (job.phase, job.generation, job.failures) == (Phase.RUNNING, 0, [])


# Who may --------------------------------------------------------------------------------------------------------


def test_a_job_started_without_allow_inject_refuses_every_drill() -> None:
    job = recoverable_job()
    for fields in ({"fault": "kill", "rank": 0}, {"fault": "kill-node", "node": 1}):
        refusal = refused(inject(job, **fields))
        assert (refusal.code, refusal.reason) == ("permission_denied", "this job was not started with --allow-inject")


def test_a_wrong_token_is_refused_before_anything_else_is_said() -> None:
    refusal = refused(inject(recoverable_job(), "kill", rank=0, token="guess"))
    assert refusal.code == "permission_denied" and "wrong token" in refusal.reason


def test_a_wrong_token_is_refused_by_a_job_that_allows_drills() -> None:
    refusal = refused(inject(drill_job(), "kill", rank=0, token=""))
    assert refusal.code == "permission_denied" and "wrong token" in refusal.reason


# What is refused ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [4, -1, None])
def test_unknown_rank_is_refused_with_the_ranks_there_are(rank: int | None) -> None:
    refusal = refused(inject(drill_job(), "kill", rank=rank))
    assert refusal.code == "invalid_argument"
    assert f"rank {rank} does not exist" in refusal.reason and "0..3" in refusal.reason


def test_unknown_node_is_refused_with_the_nodes_there_are() -> None:
    refusal = refused(inject(drill_job(), "kill-node", node=2))
    assert refusal.code == "invalid_argument"
    assert "node 2 does not exist" in refusal.reason and "0..1" in refusal.reason


def test_unknown_fault_is_refused() -> None:
    refusal = refused(inject(drill_job(), "explode", rank=0))
    assert refusal.code == "invalid_argument" and "'explode'" in refusal.reason


def test_kill_node_at_a_step_is_refused() -> None:
    refusal = refused(inject(drill_job(), "kill-node", node=1, at_step=20))
    assert refusal.code == "invalid_argument" and "--at-step" in refusal.reason


def test_the_node_of_the_coordinators_own_launcher_cannot_be_killed() -> None:
    refusal = refused(inject(drill_job(), "kill-node", node=0, colocated_agent="a0"))
    assert refusal.code == "failed_precondition" and "hosts the coordinator" in refusal.reason


def test_another_node_of_a_job_whose_coordinator_shares_a_launcher_can_be_killed() -> None:
    assert sent(inject(drill_job(), "kill-node", node=1, colocated_agent="a0")).agent_id == "a1"


@pytest.mark.parametrize(("fault", "at_step"), [("hang", None), ("exception", None), ("kill", 20), ("stop", 20)])
def test_step_loop_drills_on_a_rank_without_the_step_loop_are_refused(fault: str, at_step: int | None) -> None:
    job = running_job(allow_inject=True)
    summaries(job, now=1.0, recoverable=False, ranks={0: {"heartbeat_age_s": -1.0}})
    refusal = refused(inject(job, fault, rank=0, at_step=at_step))
    assert refusal.code == "failed_precondition"
    assert "does not run flashrun's step loop (run.steps())" in refusal.reason


def test_step_loop_drills_wait_for_the_ranks_first_report() -> None:
    refusal = refused(inject(running_job(allow_inject=True), "hang", rank=1))
    assert refusal.code == "failed_precondition" and "not reported" in refusal.reason


@pytest.mark.parametrize("at_step", [5, 10])
def test_a_step_the_rank_already_completed_is_refused(at_step: int) -> None:
    refusal = refused(inject(drill_job(), "exception", rank=1, at_step=at_step))  # every rank completed step 10
    assert refusal.code == "invalid_argument"
    assert f"already completed step {at_step}" in refusal.reason


def test_the_next_step_is_accepted() -> None:
    assert sent(inject(drill_job(), "exception", rank=1, at_step=11)).at_step == 11


def test_a_job_still_in_its_rendezvous_refuses_drills() -> None:
    job = make_job(2, allow_inject=True)
    job.join(request("a0", node_rank=0), now=0.0)
    refusal = refused(inject(job, "kill", rank=0))
    assert refusal.code == "failed_precondition" and "has not started" in refusal.reason


def test_a_recovering_job_refuses_drills_until_it_runs_again() -> None:
    job = drill_job()
    exit_of(job, 3, now=5.0)
    assert job.phase is Phase.RECOVERING
    refusal = refused(inject(job, "kill", rank=0))
    assert refusal.code == "failed_precondition" and "recovering" in refusal.reason
    summaries(job, now=7.0, step=10, generation=1, ranks={3: {"pid": pid_of(3, generation=1)}})
    assert job.phase is Phase.RUNNING
    assert sent(inject(job, "kill", rank=0)).agent_id == "a0"


def test_a_finished_job_refuses_drills() -> None:
    job = running_job(nnodes=1, nproc=1, allow_inject=True)
    job.worker_exited("a0", WorkerExit(generation=0, local_rank=0, exit_code=0), now=1.0)
    assert job.phase is Phase.SUCCEEDED
    refusal = refused(inject(job, "kill", rank=0))
    assert refusal.code == "failed_precondition" and "succeeded" in refusal.reason
