"""A sharded generation (agent/store_barrier.py): nodes arrive, wait and acknowledge on their shard's store server,
and only the node that completes a shard touches the root store.

Five nodes in shards of two ([0 1] [2 3] [4]) on three real TCPStore servers, the first of them the root (the
job's store, as the coordinator hosts it). Each node's agent is a thread of this process with its own connections;
a thin wrapper counts what each connection to the root is asked to do.
"""

from __future__ import annotations

import datetime
import queue
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist

from flashrun._proto import flashrun_pb2 as pb
from flashrun.agent import generation_notice, store_barrier
from flashrun.agent.node_barrier import COMPLETE, NodeBarrier, Release
from flashrun.agent.store_barrier import Shard
from flashrun.coordinator.recovery_watch import RecoveryWatch
from tests.helpers import CountingStore, wait_for

STORE_TIMEOUT = datetime.timedelta(seconds=30)
DEADLINE_S = 30.0
"""Generous for a loaded 2-core machine: what passes does so in milliseconds."""
NODES, PER_SHARD = 5, 2
SHARDS = store_barrier.shard_count(NODES, PER_SHARD)


def client(server: Any) -> Any:
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False, timeout=STORE_TIMEOUT)


@pytest.fixture
def servers(server: Any) -> Iterator[list[Any]]:
    """The root (the job's store, also shard 0's) and the other shards' servers."""
    others = [dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
              for _ in range(SHARDS - 1)]
    yield [server, *others]
    del others


class Node(threading.Thread):
    """Node `rank`'s agent at generation `generation`'s sharded barrier: arrive, then wait for the release. A
    shard's leader has two connections to the root of its own, counted."""

    def __init__(self, servers: list[Any], rank: int, generation: int) -> None:
        super().__init__(daemon=True)
        index, arriving = store_barrier.shard_of(rank, NODES, PER_SHARD)
        own = servers[index]
        self.root = CountingStore(client(servers[0]))
        self.root_waiter = CountingStore(client(servers[0]))
        leads = store_barrier.leads_shard(rank, NODES, PER_SHARD)
        self.shard = Shard(index, SHARDS, self.root, self.root_waiter) if leads else Shard(index, SHARDS)
        self.barrier = store_barrier.GenerationBarrier(client(own), client(own), generation, arriving, self.shard)
        self.outcome: bytes | BaseException | None = None

    def arrive(self) -> Node:
        self.barrier.arrive()
        return self

    def run(self) -> None:
        try:
            self.outcome = self.barrier.await_release(DEADLINE_S)
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self.outcome = err

    def root_ops(self) -> int:
        """Operations on the root store (a blocking get's timeout is set on the client: not one)."""
        ops = self.root.ops + self.root_waiter.ops
        return sum(count for name, count in ops.items() if name != "set_timeout")


def passed(nodes: list[Node]) -> list[bytes | BaseException | None]:
    for node in nodes:
        node.start()
    for node in nodes:
        node.join(DEADLINE_S)
    return [node.outcome for node in nodes]


def publish(servers: list[Any], generation: int) -> None:
    """The coordinator publishes `generation` (superseding the one before) on every shard."""
    generation_notice.publish_sharded(servers[0], [(store, pb.GenerationNotice(generation=generation))
                                                   for store in servers])


def test_shards_of_nodes_pass_one_barrier_and_only_their_leaders_touch_the_root(servers: list[Any]) -> None:
    nodes = [Node(servers, rank, 1).arrive() for rank in range(NODES)]

    assert passed(nodes) == [store_barrier.COMPLETE] * NODES
    assert [rank for rank, node in enumerate(nodes) if node.root_ops()] == [0, 2, 4]  # each shard's first node
    assert sum(node.root_ops() for node in nodes) == 2 * SHARDS + 1  # per shard an add and a get; one release
    assert int(servers[0].add(store_barrier.barrier_key(1, "shards_arrived"), 0)) == SHARDS
    assert [int(servers[i].add(store_barrier.shard_key(1, "arrived", i, SHARDS), 0)) for i in range(SHARDS)] \
        == [2, 2, 1]


def test_a_shard_that_never_fills_is_released_by_the_next_generations_notice(servers: list[Any]) -> None:
    nodes = [Node(servers, rank, 1).arrive() for rank in range(NODES - 1)]  # node 4, shard 2's only node, is lost
    waiting = threading.Thread(target=passed, args=(nodes,), daemon=True)
    waiting.start()

    publish(servers, 2)
    waiting.join(DEADLINE_S)

    assert [node.outcome for node in nodes] == [store_barrier.SUPERSEDED] * (NODES - 1)


def test_a_leader_waiting_for_a_shard_that_never_fills_moves_on_when_it_is_superseded(servers: list[Any]) -> None:
    leader = Node(servers, 2, 1).arrive()  # node 3, the rest of shard 1, never arrives
    leader.start()

    publish(servers, 2)
    leader.join(DEADLINE_S)

    assert leader.outcome == store_barrier.SUPERSEDED
    assert int(servers[0].add(store_barrier.barrier_key(1, "shards_arrived"), 0)) == 0  # it never went up


def test_a_root_release_decided_first_wins_on_every_shard(servers: list[Any]) -> None:
    """Every node arrived and every leader passed its shard up (the root is released complete), but no leader copied
    the release to its shard yet: the next generation's notice copies the root's outcome, not its own."""
    nodes = [Node(servers, rank, 1).arrive() for rank in range(NODES)]
    for node in nodes:
        node.barrier.pass_up(DEADLINE_S)  # nothing for the nodes that do not lead

    publish(servers, 2)
    others = [node for node in nodes if not node.shard.leads]

    assert passed(others) == [store_barrier.COMPLETE] * len(others)


def test_the_coordinator_hears_acknowledged_once_every_shard_acknowledged(servers: list[Any]) -> None:
    heard: queue.Queue[Any] = queue.Queue()
    watch = RecoveryWatch("127.0.0.1", DEADLINE_S, lambda g, _t: heard.put(("acknowledged", g)),
                          lambda g, outcome, _t: heard.put(("released", g, outcome)))
    try:
        watch.use_store(servers[0].port, [store.port for store in servers])
        expected = (1, 2, 1)  # node 1 was told directly
        watch.follow(servers[0].port, 1, [(store.port, index) for index, store in enumerate(servers)], SHARDS)
        for rank in (0, 2, 3):
            index, _ = store_barrier.shard_of(rank, NODES, PER_SHARD)
            generation_notice.acknowledge(client(servers[index]), 1, expected[index], index, SHARDS)
        acked = [servers[i].check([store_barrier.shard_key(1, "all_acked", i, SHARDS)]) for i in range(SHARDS)]
        generation_notice.acknowledge(client(servers[2]), 1, expected[2], 2, SHARDS)

        assert acked == [True, True, False]  # the watch cannot have heard: shard 2's key is missing
        assert heard.get(timeout=DEADLINE_S) == ("acknowledged", 1)
    finally:
        publish(servers, 2)  # ends the watch's wait for generation 1's release
        watch.close()


class Agent:
    """Node `rank`'s real NodeBarrier (one local rank), placed in the sharded job and watching its shard."""

    def __init__(self, servers: list[Any], rank: int, generation: int) -> None:
        self.notices: queue.Queue[pb.GenerationNotice] = queue.Queue()
        self.releases: queue.Queue[Release] = queue.Queue()
        self.barrier = NodeBarrier(1, self.releases.put, DEADLINE_S, on_notice=self.notices.put)
        index, _ = store_barrier.shard_of(rank, NODES, PER_SHARD)
        self.barrier.place("127.0.0.1", servers[0].port, NODES, generation, rank, PER_SHARD, servers[index].port)
        self.barrier.prepare()
        wait_for(lambda: self.barrier.watching, DEADLINE_S, f"node {rank}'s watch")


def test_agents_hear_their_shards_notice_and_pass_the_barrier(servers: list[Any]) -> None:
    agents = [Agent(servers, rank, 0) for rank in range(NODES)]
    try:
        notices = [pb.GenerationNotice(generation=1, acks_expected=count) for count in (2, 2, 1)]
        generation_notice.publish_sharded(servers[0], list(zip(servers, notices, strict=True)))
        heard = [agent.notices.get(timeout=DEADLINE_S).acks_expected for agent in agents]
        for pid, agent in enumerate(agents):
            agent.barrier.arrive(0, pid, 1, {0: pid})

        assert heard == [2, 2, 2, 2, 1]  # each its own shard's
        assert [agent.releases.get(timeout=DEADLINE_S) for agent in agents] \
            == [Release((pid,), 1, COMPLETE) for pid in range(NODES)]
    finally:
        for agent in agents:
            agent.barrier.close()
