"""The node's side of a generation's barrier (flashrun/agent/node_barrier.py: NodeArrivals), as pure decisions."""

from __future__ import annotations

from flashrun.agent.node_barrier import COMPLETE, ERROR, OUTCOMES_KEPT, SUPERSEDED, Decision, NodeArrivals, Release

WORKERS = {0: 100, 1: 101, 2: 102, 3: 103}
"""The node's live workers: local rank -> PID."""


def arrive_all(state: NodeArrivals, generation: int, workers: dict[int, int] = WORKERS) -> list[Decision]:
    return [state.arrive(local_rank, pid, generation, workers) for local_rank, pid in workers.items()]


def test_the_node_arrives_once_when_its_last_rank_does() -> None:
    state = NodeArrivals(4)
    decisions = arrive_all(state, 1)
    assert [d.arrive for d in decisions] == [None, None, None, 1]
    assert all(not d.releases for d in decisions)
    assert state.arrive(3, 103, 1, WORKERS) == Decision()  # a worker saying it again changes nothing


def test_the_store_outcome_reaches_every_waiting_worker_and_later_askers() -> None:
    state = NodeArrivals(4)
    arrive_all(state, 1)
    assert state.resolved(1, COMPLETE).releases == [Release((100, 101, 102, 103), 1, COMPLETE)]
    assert state.arrive(2, 102, 1, WORKERS).releases == [Release((102,), 1, COMPLETE)]


def test_a_rank_being_replaced_holds_the_node_back_until_its_replacement_arrives() -> None:
    state = NodeArrivals(4)
    without_rank_3 = {0: 100, 1: 101, 2: 102}  # retired, its replacement not spawned yet
    assert [d.arrive for d in arrive_all(state, 2, without_rank_3)] == [None, None, None]
    replaced = {**without_rank_3, 3: 203}
    assert state.arrive(3, 103, 2, replaced).arrive is None  # the old process's arrival does not count
    assert state.arrive(3, 203, 2, replaced).arrive == 2


def test_a_newer_generation_supersedes_an_unarrived_node_locally_and_forever() -> None:
    state = NodeArrivals(4)
    early = [state.arrive(r, WORKERS[r], 1, WORKERS) for r in (0, 1)]
    assert all(d.arrive is None for d in early)
    decision = state.supersede_below(2)
    assert decision.releases == [Release((100, 101), 1, SUPERSEDED)] and decision.supersede == []
    late = state.arrive(2, 102, 1, WORKERS)  # the node never arrives at the store for generation 1 now
    assert late.arrive is None and late.releases == [Release((102,), 1, SUPERSEDED)]


def test_a_newer_generation_leaves_an_arrived_node_to_the_stores_outcome() -> None:
    """Once the node arrived, the store decides: the barrier may have completed on every other node already."""
    state = NodeArrivals(4)
    arrive_all(state, 1)
    decision = state.supersede_below(2)
    assert decision.supersede == [1] and decision.releases == []
    assert state.resolved(1, COMPLETE).releases == [Release((100, 101, 102, 103), 1, COMPLETE)]


def test_a_worker_that_arrives_after_the_node_was_superseded_is_answered_at_once() -> None:
    state = NodeArrivals(4)
    state.supersede_below(5)
    assert state.arrive(0, 100, 4, WORKERS).releases == [Release((100,), 4, SUPERSEDED)]
    assert state.arrive(0, 100, 5, WORKERS).releases == []  # the current generation waits as usual


def test_failures_are_relayed_with_their_detail() -> None:
    state = NodeArrivals(4)
    arrive_all(state, 1)
    assert state.resolved(1, ERROR, "store gone").releases == [Release((100, 101, 102, 103), 1, ERROR, "store gone")]


def test_only_the_latest_outcomes_are_kept() -> None:
    state = NodeArrivals(1)
    for generation in range(OUTCOMES_KEPT + 5):
        state.arrive(0, 100, generation, {0: 100})
        state.resolved(generation, COMPLETE)
    assert state.arrive(0, 100, OUTCOMES_KEPT + 4, {0: 100}).releases  # kept: answered
    assert not state.arrive(0, 100, 0, {0: 100}).releases  # forgotten: waits (no live worker asks for it)
