"""A generation's barrier against a real TCPStore server: the store protocol nodes follow (store_barrier), the
agent's side that turns a node's ranks into one arrival (node_barrier.NodeBarrier), and a rank joining a gloo group
through it.

Participants run in threads of this process (each with its own two client connections, as an agent has), so the
test can count every store operation one issues: a thin counting wrapper forwards to the real client.
"""

from __future__ import annotations

import datetime
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist

from flashrun.agent import store_barrier
from flashrun.agent.node_barrier import COMPLETE, ERROR, SUPERSEDED, NodeBarrier, Release
from flashrun.worker import group as group_module
from flashrun.worker.abort import Aborter
from flashrun.worker.group import abandon_group, join_generation
from tests.helpers import CountingStore, free_port, wait_for

STORE_TIMEOUT = datetime.timedelta(seconds=30)
DEADLINE_S = 30.0
"""Generous for a loaded 2-core machine: a barrier that passes does so in milliseconds."""
PROMPT_S = 2.0
"""A superseded participant must be released well within this (typically milliseconds); the deadline is far beyond."""


def client(server: Any) -> CountingStore:
    return CountingStore(dist.TCPStore(server.host, server.port, is_master=False, wait_for_workers=False,
                                       timeout=STORE_TIMEOUT))


class Participant(threading.Thread):
    """One node's agent at the store barrier: arrive, then wait for the release."""

    def __init__(self, server: Any, generation: int, participants: int, deadline_s: float = DEADLINE_S) -> None:
        super().__init__(daemon=True)
        self.store = client(server)
        self.waiter = client(server)
        self.barrier = store_barrier.GenerationBarrier(self.store, self.waiter, generation, participants)
        self.deadline_s = deadline_s
        self.outcome: BaseException | bytes | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            self.barrier.arrive()
            self.outcome = self.barrier.await_release(self.deadline_s)
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self.outcome = err
        self.finished_at = time.monotonic()

    def ops(self) -> dict[str, int]:
        return dict(self.store.ops + self.waiter.ops)


def run_all(participants: list[Participant], timeout_s: float = 60.0) -> None:
    for participant in participants:
        participant.start()
    for participant in participants:
        participant.join(timeout_s)
        assert not participant.is_alive(), "a participant is still blocked in the barrier"


@pytest.mark.parametrize("count", [2, 16, 64])
def test_all_participants_pass_with_a_constant_number_of_store_operations(server: Any, count: int) -> None:
    participants = [Participant(server, generation=1, participants=count) for _ in range(count)]
    run_all(participants)
    assert [p.outcome for p in participants] == [store_barrier.COMPLETE] * count
    per_participant = [p.ops() for p in participants]
    # Each: one add, one blocking get; exactly one (the last to arrive) also releases the barrier.
    assert sorted(ops.get("compare_set", 0) for ops in per_participant) == [0] * (count - 1) + [1]
    for ops in per_participant:
        assert ops["add"] == 1 and ops["get"] == 1 and ops["set_timeout"] == 1, ops
        assert sum(ops.values()) - ops["set_timeout"] <= 3, ops  # set_timeout is local to the client


def test_waiting_longer_costs_no_store_operations(server: Any) -> None:
    early = Participant(server, generation=2, participants=2)
    early.start()
    wait_for(lambda: int(server.add("flashrun/g2/arrived", 0)) == 1, 30, "the first participant to arrive")
    idle_until = time.monotonic() + 1.0
    # The early participant's wait must not poll: its op count stays the same however long it waits.
    wait_for(lambda: time.monotonic() >= idle_until, 5, "a second of waiting")
    assert early.is_alive() and early.ops() == {"add": 1, "set_timeout": 1, "get": 1}
    late = Participant(server, generation=2, participants=2)
    run_all([late])
    early.join(30)
    assert (early.outcome, late.outcome) == (store_barrier.COMPLETE, store_barrier.COMPLETE)
    assert early.ops() == {"add": 1, "set_timeout": 1, "get": 1}


def test_a_superseding_release_wakes_every_waiting_participant_promptly(server: Any) -> None:
    participants = [Participant(server, generation=3, participants=4) for _ in range(3)]  # the fourth never comes
    for participant in participants:
        participant.start()
    wait_for(lambda: int(server.add("flashrun/g3/arrived", 0)) == 3, 30, "three participants waiting")
    released_at = time.monotonic()
    participants[0].barrier.release(store_barrier.SUPERSEDED)
    for participant in participants:
        participant.join(PROMPT_S)
        assert participant.outcome == store_barrier.SUPERSEDED
        assert participant.finished_at - released_at < PROMPT_S
    participants[1].barrier.release(store_barrier.COMPLETE)  # the first release wins
    assert server.get("flashrun/g3/released") == b"superseded"


def test_a_missing_participant_meets_the_deadline_with_a_clear_error(server: Any) -> None:
    participants = [Participant(server, generation=7, participants=3, deadline_s=1.0) for _ in range(2)]
    started = time.monotonic()
    run_all(participants)
    for participant in participants:
        assert isinstance(participant.outcome, TimeoutError), participant.outcome
        assert str(participant.outcome) == "only 2 of 3 nodes reached generation 7 within 1.0 s"
        assert participant.finished_at - started >= 1.0


class Node:
    """An agent's NodeBarrier for `local_world_size` workers (fake PIDs), recording what it relays to them."""

    def __init__(self, server: Any, index: int, local_world_size: int, nodes: int, generation: int,
                 port: int | None = None) -> None:
        self.workers = {local: 1000 * (index + 1) + local for local in range(local_world_size)}
        self.releases: queue.SimpleQueue[Release] = queue.SimpleQueue()
        self.barrier = NodeBarrier(local_world_size, self.releases.put, deadline_s=DEADLINE_S)
        self.barrier.place(server.host, server.port if port is None else port, nodes, generation)

    def arrive(self, generation: int, local_ranks: list[int] | None = None) -> None:
        for local in self.workers if local_ranks is None else local_ranks:
            self.barrier.arrive(local, self.workers[local], generation, self.workers)

    def outcomes(self, count: int) -> dict[int, str]:
        """The next `count` releases, as PID -> outcome."""
        got: dict[int, str] = {}
        while len(got) < count:
            release = self.releases.get(timeout=PROMPT_S * 10)
            got.update({pid: release.outcome for pid in release.pids})
        return got


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        node.barrier.close()


def test_a_node_arrives_once_for_its_ranks_and_relays_the_outcome_to_each(server: Any, nodes: list[Node]) -> None:
    nodes += [Node(server, i, local_world_size=4, nodes=2, generation=1) for i in range(2)]
    nodes[0].arrive(1)
    wait_for(lambda: int(server.add("flashrun/g1/arrived", 0)) == 1, 30, "node 0's one arrival")
    nodes[1].arrive(1, [0, 1, 2])
    assert nodes[0].releases.empty() and int(server.add("flashrun/g1/arrived", 0)) == 1  # node 1 is incomplete
    nodes[1].arrive(1, [3])
    for node in nodes:
        assert node.outcomes(4) == dict.fromkeys(node.workers.values(), COMPLETE)
    assert int(server.add("flashrun/g1/arrived", 0)) == 2  # one per node, not one per rank


def test_a_newer_generation_releases_both_arrived_and_unarrived_nodes(server: Any, nodes: list[Node]) -> None:
    nodes += [Node(server, i, local_world_size=2, nodes=3, generation=4) for i in range(2)]
    nodes[0].arrive(4)  # arrived at the store; node 1 half-arrived; node 2 is lost
    nodes[1].arrive(4, [0])
    wait_for(lambda: int(server.add("flashrun/g4/arrived", 0)) == 1, 30, "node 0's arrival")
    nodes[1].barrier.place(server.host, server.port, 3, 5)  # node 1 hears of generation 5 first
    assert nodes[1].outcomes(1) == {nodes[1].workers[0]: SUPERSEDED}
    nodes[1].arrive(4, [1])  # its other rank arrives late: answered at once, and the node never arrives
    assert nodes[1].outcomes(1) == {nodes[1].workers[1]: SUPERSEDED}
    assert nodes[0].releases.empty()
    nodes[0].barrier.place(server.host, server.port, 3, 5)  # node 0 had arrived: the store releases it
    assert nodes[0].outcomes(2) == dict.fromkeys(nodes[0].workers.values(), SUPERSEDED)
    assert server.get("flashrun/g4/released") == b"superseded"
    assert int(server.add("flashrun/g4/arrived", 0)) == 1


def test_a_full_restart_moves_the_barrier_to_the_new_store(server: Any, nodes: list[Node]) -> None:
    """A full restart hosts a new store: a half-arrived generation is superseded, the next one uses the new store."""
    nodes.append(Node(server, 0, local_world_size=2, nodes=1, generation=1))
    nodes[0].arrive(1, [0])
    restarted = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    nodes[0].barrier.place(restarted.host, restarted.port, 1, 2)
    assert nodes[0].outcomes(1) == {nodes[0].workers[0]: SUPERSEDED}
    nodes[0].workers = {0: 3000, 1: 3001}  # the restart's new processes
    nodes[0].arrive(2)
    assert nodes[0].outcomes(2) == {3000: COMPLETE, 3001: COMPLETE}
    assert restarted.get("flashrun/g2/released") == b"complete"
    assert int(server.add("flashrun/g2/arrived", 0)) == 0 and int(server.add("flashrun/g1/arrived", 0)) == 0


def test_an_unreachable_store_is_an_error_for_the_waiting_ranks(server: Any, nodes: list[Node],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("flashrun.agent.node_barrier.STORE_CONNECT_TIMEOUT_S", 1.0)
    port = free_port()  # nothing listens there
    nodes.append(Node(server, 0, local_world_size=1, nodes=1, generation=1, port=port))
    nodes[0].arrive(1)
    release = nodes[0].releases.get(timeout=30)
    assert release.outcome == ERROR and f"cannot reach the job's store at {server.host}:{port}" in release.detail


class InProcessAgent:
    """The agent's side for a rank in this process: its link's `await_release`, answered by a real NodeBarrier."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.releases: queue.SimpleQueue[Release] = queue.SimpleQueue()
        self.barrier = NodeBarrier(1, self.releases.put, deadline_s=DEADLINE_S)

    def await_release(self, generation: int, timeout_s: float) -> tuple[str, str] | None:
        self.barrier.place(self.server.host, self.server.port, 1, generation)
        self.barrier.arrive(0, os.getpid(), generation, {0: os.getpid()})
        release = self.releases.get(timeout=timeout_s)
        return release.outcome, release.detail


@pytest.fixture
def agent(server: Any) -> Iterator[InProcessAgent]:
    made = InProcessAgent(server)
    yield made
    made.barrier.close()


def test_join_generation_forms_a_working_gloo_group(server: Any, agent: InProcessAgent) -> None:
    """One rank per process is torch's rule for the default group: the test process is rank 0 of a world of 1."""
    store = dist.TCPStore(server.host, server.port, is_master=False, wait_for_workers=False, timeout=STORE_TIMEOUT)
    join_generation(store, agent, 8, 0, 1, "gloo", Aborter(8), DEADLINE_S)
    try:
        assert dist.get_world_size() == 1
        assert server.get("flashrun/g8/released") == b"complete"
    finally:
        dist.destroy_process_group()


def test_a_rejoining_rank_keeps_one_rank_prefix_on_its_tracebacks(server: Any, agent: InProcessAgent,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """torch prefixes tracebacks on every init_process_group; a survivor rejoins once per recovery."""
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # restored after the test, wrappers and all
    monkeypatch.setattr(group_module, "_excepthook_prefixed", False)
    store = dist.TCPStore(server.host, server.port, is_master=False, wait_for_workers=False, timeout=STORE_TIMEOUT)
    graveyard: list[Any] = []
    for generation in (11, 12, 13):
        abandon_group(graveyard)
        join_generation(store, agent, generation, 0, 1, "gloo", Aborter(generation), DEADLINE_S)
    try:
        try:
            raise ValueError("after three generations")
        except ValueError:
            sys.excepthook(*sys.exc_info())
        printed = capsys.readouterr().err
        assert "[rank0]: ValueError: after three generations" in printed, printed
        assert "[rank0]: [rank0]:" not in printed, printed
    finally:
        dist.destroy_process_group()
