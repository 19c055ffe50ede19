"""Deterministic node-rank and global-rank assignment, a pure function of who joined."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class Member:
    agent_id: str
    hostname: str
    requested_node_rank: int | None
    local_world_size: int
    join_seq: int


@dataclasses.dataclass(frozen=True)
class NodeAssignment:
    node_rank: int
    rank_offset: int
    local_world_size: int


def assign_ranks(members: Sequence[Member]) -> dict[str, NodeAssignment]:
    """Node ranks 0..n-1: requested ranks first, in their order, then the rest by (hostname, join order).

    A requested rank is kept exactly whenever the requested ranks are 0..k-1 (the usual static launch);
    global ranks are contiguous per node, so node r's ranks start after all ranks of nodes < r.
    """

    def key(member: Member) -> tuple[float, str, int]:
        requested = math.inf if member.requested_node_rank is None else member.requested_node_rank
        return (requested, member.hostname, member.join_seq)

    assignments: dict[str, NodeAssignment] = {}
    offset = 0
    for node_rank, member in enumerate(sorted(members, key=key)):
        assignments[member.agent_id] = NodeAssignment(node_rank, offset, member.local_world_size)
        offset += member.local_world_size
    return assignments
