"""Unit tests for telling agents of a recovery through one notice on the store (flashrun.coordinator.job).

An agent that says in its summaries that it watches the store learns of an in-place recovery from one `Publish`
instead of a Recover message each, and acknowledges it on the store; the coordinator counts it acknowledged when the
store says every such agent did (`notice_acknowledged`), and the rendezvous done when the barrier is released
(`barrier_released`). Agents not known to watch, and spares taking over, get a Recover as before; the notice's
acknowledgements late past `notice_fallback_s` make the coordinator tell the agents not yet seen directly.
"""

from __future__ import annotations

from flashrun.coordinator.job import Job, Phase, Publish, Recover
from flashrun.coordinator.ranks import NodeAssignment
from tests.unit.test_job import commands_of, event_names, request
from tests.unit.test_recovery import CRASH_AT, events_named, exit_of, recoverable_job, summaries

FALLBACK_S = 5.0


def watching_job(nnodes: int = 3, watching: set[str] | None = None, **spec: object) -> Job:
    """A recoverable job of `nnodes` nodes (a0.., 2 ranks each) whose agents in `watching` (default: all) said at t=2
    that they watch the store."""
    job = recoverable_job(nnodes=nnodes, notice_fallback_s=FALLBACK_S, **spec)
    summaries(job, now=2.0, agents=watching, watching=True)
    return job


def acknowledged(out: object) -> list[dict[str, object]]:
    return [f for f in events_named(out, "recovery_phase") if f["phase"] == "acknowledged"]  # type: ignore[arg-type]


def test_watching_agents_get_one_notice_and_no_recover_message() -> None:
    job = watching_job()

    out = exit_of(job, 3, now=CRASH_AT)

    assert commands_of(out, Recover) == []
    assert commands_of(out, Publish) == [Publish(generation=1, respawn={1: (1,)}, direct_nodes=(), acks_expected=3,
                                                         acks_by_shard=(3,))]


def test_an_agent_not_known_to_watch_is_told_directly_and_left_out_of_the_count() -> None:
    job = watching_job(watching={"a0", "a2"})

    out = exit_of(job, 3, now=CRASH_AT)

    assert commands_of(out, Publish) == [Publish(generation=1, respawn={1: (1,)}, direct_nodes=(1,), acks_expected=2,
                                                         acks_by_shard=(2,))]
    assert [(c.agent_id, c.respawn_local_ranks) for c in commands_of(out, Recover)] == [("a1", (1,))]


def test_a_sharded_notice_counts_each_shards_acknowledgements_without_the_nodes_told_directly() -> None:
    job = watching_job(nnodes=5, watching={"a0", "a2", "a3", "a4"}, nodes_per_store_shard=2)  # shards [0 1] [2 3] [4]

    out = exit_of(job, 3, now=CRASH_AT)

    (publish,) = commands_of(out, Publish)
    assert (publish.direct_nodes, publish.acks_expected, publish.acks_by_shard) == ((1,), 4, (1, 2, 1))


def test_an_agent_that_stopped_watching_is_told_directly_at_the_next_recovery() -> None:
    job = watching_job()
    summaries(job, now=3.0, agents={"a2"}, watching=False)

    out = exit_of(job, 3, now=CRASH_AT)

    assert commands_of(out, Publish)[0].direct_nodes == (2,)
    assert [c.agent_id for c in commands_of(out, Recover)] == ["a2"]


def test_notice_acknowledged_on_the_store_acknowledges_every_agent_it_told() -> None:
    job = watching_job()
    exit_of(job, 3, now=CRASH_AT)

    out = job.notice_acknowledged(1, now=CRASH_AT + 0.4)

    assert acknowledged(out) == [{"phase": "acknowledged", "since_detection_s": 0.4}]


def test_acknowledged_needs_both_the_store_and_the_agents_told_directly() -> None:
    job = watching_job(watching={"a0", "a2"})
    exit_of(job, 3, now=CRASH_AT)

    on_store = job.notice_acknowledged(1, now=CRASH_AT + 0.2)
    direct = summaries(job, now=CRASH_AT + 0.3, agents={"a1"}, generation=0, watching=True)

    assert acknowledged(on_store) == []
    assert acknowledged(direct) == [{"phase": "acknowledged", "since_detection_s": 0.3}]


def test_an_older_generations_acknowledgement_counts_for_nothing() -> None:
    job = watching_job()
    exit_of(job, 3, now=CRASH_AT)
    exit_of(job, 1, now=CRASH_AT + 0.1)  # a second failure: generation 2 supersedes 1
    assert job.generation == 2

    out = job.notice_acknowledged(1, now=CRASH_AT + 0.5)

    assert acknowledged(out) == []


def test_without_every_acknowledgement_the_agents_not_seen_are_told_directly() -> None:
    job = watching_job()
    exit_of(job, 3, now=CRASH_AT)
    summaries(job, now=CRASH_AT + 1.0, agents={"a0"}, generation=0, watching=True)  # a0 is in generation 1

    before = job.tick(CRASH_AT + FALLBACK_S - 0.01)
    out = job.tick(CRASH_AT + FALLBACK_S)
    again = job.tick(CRASH_AT + FALLBACK_S + 1.0)

    assert commands_of(before, Recover) == []
    assert [(c.agent_id, c.generation, c.respawn_local_ranks) for c in commands_of(out, Recover)] == [
        ("a1", 1, (1,)), ("a2", 1, ())]
    assert events_named(out, "notice_fallback") == [{"agents": 2, "nodes": [1, 2]}]
    assert commands_of(again, Recover) == []


def test_no_fallback_once_the_store_acknowledged() -> None:
    job = watching_job()
    exit_of(job, 3, now=CRASH_AT)
    job.notice_acknowledged(1, now=CRASH_AT + 0.3)

    out = job.tick(CRASH_AT + FALLBACK_S + 0.1)

    assert commands_of(out, Recover) == []
    assert "notice_fallback" not in event_names(out)


def test_barrier_released_complete_marks_the_rendezvous_once() -> None:
    job = watching_job()
    exit_of(job, 3, now=CRASH_AT)

    first = job.barrier_released(1, "complete", now=CRASH_AT + 0.7)
    second = job.barrier_released(1, "complete", now=CRASH_AT + 0.8)

    assert events_named(first, "recovery_phase") == [{"phase": "rendezvous", "since_detection_s": 0.7}]
    assert second.events == []
    assert job.phase is Phase.RECOVERING  # still waiting for every rank's report of the new generation


def test_a_superseded_or_older_barrier_is_not_the_rendezvous() -> None:
    job = watching_job()
    exit_of(job, 3, now=CRASH_AT)

    superseded = job.barrier_released(1, "superseded", now=CRASH_AT + 0.5)
    older = job.barrier_released(0, "complete", now=CRASH_AT + 0.6)

    assert superseded.events == older.events == []


def test_a_spare_taking_over_is_told_directly_and_the_lost_node_ignores_the_notice() -> None:
    job = watching_job(nnodes=2, max_nodes=3)
    job.join(request("spare", nproc=2), now=3.0)

    out = job.disconnect("a1", now=CRASH_AT)

    assert commands_of(out, Publish) == [Publish(generation=1, respawn={1: (0, 1)}, direct_nodes=(1,),
                                                 acks_expected=1, acks_by_shard=(1,))]
    assert commands_of(out, Recover) == [Recover("spare", generation=1, respawn_local_ranks=(0, 1),
                                                 assignment=NodeAssignment(1, 2, 2), world_size=4, nnodes=2)]


def test_a_release_heard_after_every_rank_reported_still_marks_the_rendezvous() -> None:
    job = watching_job()
    exit_of(job, 3, now=CRASH_AT)
    summaries(job, now=CRASH_AT + 0.5, generation=1, watching=True)
    assert job.phase is Phase.RUNNING

    out = job.barrier_released(1, "complete", now=CRASH_AT + 0.6)

    assert events_named(out, "recovery_phase") == [{"phase": "rendezvous", "since_detection_s": 0.6}]
