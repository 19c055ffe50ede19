"""Unit tests for flashrun.coordinator.ranks: deterministic node and global rank assignment."""

from __future__ import annotations

import itertools

from flashrun.coordinator.ranks import Member, NodeAssignment, assign_ranks


def member(agent_id: str, hostname: str, join_seq: int, requested: int | None = None, nproc: int = 2) -> Member:
    return Member(agent_id, hostname, requested, nproc, join_seq)


def test_no_members_gives_no_assignments() -> None:
    assert assign_ranks([]) == {}


def test_single_node_gets_rank_zero_and_offset_zero() -> None:
    assert assign_ranks([member("a", "host", 1, nproc=4)]) == {"a": NodeAssignment(0, 0, 4)}


def test_assignment_is_the_same_for_every_input_order() -> None:
    members = [
        member("a", "node-c", 1),
        member("b", "node-a", 2),
        member("c", "node-b", 3, requested=0),
        member("d", "node-a", 4),
    ]
    results = [assign_ranks(list(order)) for order in itertools.permutations(members)]

    assert all(result == results[0] for result in results)


def test_unrequested_nodes_are_ordered_by_hostname() -> None:
    members = [member("a", "zeta", 1), member("b", "alpha", 2), member("c", "mu", 3)]

    assignments = assign_ranks(members)

    assert {agent: a.node_rank for agent, a in assignments.items()} == {"b": 0, "c": 1, "a": 2}


def test_same_hostname_is_ordered_by_join_sequence() -> None:
    members = [member("late", "host", 7), member("early", "host", 3)]

    assignments = assign_ranks(members)

    assert assignments["early"].node_rank == 0
    assert assignments["late"].node_rank == 1


def test_requested_node_ranks_are_honoured() -> None:
    members = [
        member("a", "alpha", 1, requested=2),
        member("b", "beta", 2, requested=0),
        member("c", "gamma", 3, requested=1),
    ]

    assignments = assign_ranks(members)

    assert {agent: a.node_rank for agent, a in assignments.items()} == {"a": 2, "b": 0, "c": 1}


def test_requested_ranks_come_before_unrequested_nodes() -> None:
    members = [member("free", "aaa", 1), member("zero", "zzz", 2, requested=0)]

    assignments = assign_ranks(members)

    assert assignments["zero"].node_rank == 0
    assert assignments["free"].node_rank == 1


def test_node_ranks_are_contiguous_from_zero() -> None:
    members = [member(f"m{i}", f"host{i}", i) for i in range(5)]

    assignments = assign_ranks(members)

    assert sorted(a.node_rank for a in assignments.values()) == [0, 1, 2, 3, 4]


def test_heterogeneous_local_world_sizes_give_cumulative_offsets() -> None:
    members = [
        member("a", "host0", 1, requested=0, nproc=4),
        member("b", "host1", 2, requested=1, nproc=1),
        member("c", "host2", 3, requested=2, nproc=3),
        member("d", "host3", 4, requested=3, nproc=2),
    ]

    assignments = assign_ranks(members)

    assert assignments == {
        "a": NodeAssignment(node_rank=0, rank_offset=0, local_world_size=4),
        "b": NodeAssignment(node_rank=1, rank_offset=4, local_world_size=1),
        "c": NodeAssignment(node_rank=2, rank_offset=5, local_world_size=3),
        "d": NodeAssignment(node_rank=3, rank_offset=8, local_world_size=2),
    }


def test_offsets_follow_node_rank_not_input_order() -> None:
    members = [member("big", "host1", 1, requested=1, nproc=8), member("small", "host0", 2, requested=0, nproc=2)]

    assignments = assign_ranks(members)

    assert assignments["small"] == NodeAssignment(0, 0, 2)
    assert assignments["big"] == NodeAssignment(1, 2, 8)
