"""A sharded generation (agent/store_barrier.py): nodes arrive, wait and acknowledge on their shard's store server,
and only the node that completes a shard touches the root store.

Five nodes in shards of two ([0 1] [2 3] [4]) on three real TCPStore servers, the first of them the root (the
job's store, as the coordinator hosts it). Each node's agent is a thread of this process with its own connections;
a thin wrapper counts what each connection to the root is asked to do.
"""

from __future__ import annotations

import collections
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
from tests.helpers import wait_for

STORE_TIMEOUT = datetime.timedelta(seconds=30)
DEADLINE_S = 30.0
"""Generous for a loaded 2-core machine: what passes does so in milliseconds."""
NODES, PER_SHARD = 5, 2
SHARDS = store_barrier.shard_count(NODES, PER_SHARD)


class CountingStore:
    """Forwards to a real store client, counting the operations issued through it."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.ops: collections.Counter[str] = collections.Counter()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.ops[name] += 1
            return method(*args, **kwargs)

        return counted


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
    """Node `rank`'s agent at generation `generation`'s sharded barrier: arrive, then wait for the release."""

    def __init__(self, servers: list[Any], rank: int, generation: int) -> None:
        super().__init__(daemon=True)
        index, arriving = store_barrier.shard_of(rank, NODES, PER_SHARD)
        own = servers[index]
        self.root = CountingStore(client(servers[0]))
        self.root_waiter = CountingStore(client(servers[0]))
        self.shard = Shard(index, SHARDS, self.root, self.root_waiter)
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


def test_shards_of_nodes_pass_one_barrier_and_only_their_closers_touch_the_root(servers: list[Any]) -> None:
    nodes = [Node(servers, rank, 1).arrive() for rank in range(NODES)]

    assert passed(nodes) == [store_barrier.COMPLETE] * NODES
    closers = [rank for rank, node in enumerate(nodes) if node.root_ops()]
    assert closers == [1, 3, 4]  # the last to arrive in each shard
    assert sum(node.root_ops() for node in nodes) == 2 * SHARDS + 1  # per shard an add and a get; one release
    assert int(servers[0].add(store_barrier.barrier_key(1, "shards_arrived"), 0)) == SHARDS
    assert [int(servers[i].add(store_barrier.shard_key(1, "arrived", i, SHARDS), 0)) for i in range(SHARDS)] \
        == [2, 2, 1]


def test_a_shard_that_never_completes_is_released_by_the_next_generations_notice(servers: list[Any]) -> None:
    nodes = [Node(servers, rank, 1).arrive() for rank in range(NODES - 1)]  # node 4, shard 2's only node, is lost
    waiting = threading.Thread(target=passed, args=(nodes,), daemon=True)
    waiting.start()

    generation_notice.publish_sharded(servers[0], [(store, pb.GenerationNotice(generation=2)) for store in servers])
    waiting.join(DEADLINE_S)

    assert [node.outcome for node in nodes] == [store_barrier.SUPERSEDED] * (NODES - 1)


def test_a_root_release_decided_first_wins_on_every_shard(servers: list[Any]) -> None:
    """Every node arrived (the root is released complete), but no closer copied the release to its shard yet: the
    next generation's notice copies the root's outcome, not its own."""
    nodes = [Node(servers, rank, 1).arrive() for rank in range(NODES)]

    generation_notice.publish_sharded(servers[0], [(store, pb.GenerationNotice(generation=2)) for store in servers])
    others = [node for node in nodes if not node.barrier.closed_shard]

    assert passed(others) == [store_barrier.COMPLETE] * len(others)


def test_an_agents_own_release_decides_at_the_root_and_reaches_its_shard(servers: list[Any]) -> None:
    node, mate = Node(servers, 2, 1).arrive(), Node(servers, 3, 1)
    mate.start()

    node.barrier.release(store_barrier.SUPERSEDED)
    mate.join(DEADLINE_S)

    assert mate.outcome == store_barrier.SUPERSEDED
    assert servers[0].get(store_barrier.barrier_key(1, "released")) == store_barrier.SUPERSEDED


def test_the_coordinator_hears_all_acked_once_every_shard_acknowledged(servers: list[Any]) -> None:
    acks_by_shard = (1, 2, 1)  # node 1 was told directly
    acking = [0, 2, 3, 4]
    all_acked = store_barrier.barrier_key(1, "all_acked")
    for rank in acking[:-1]:
        index, _ = store_barrier.shard_of(rank, NODES, PER_SHARD)
        shard = Shard(index, SHARDS, client(servers[0]), None)
        generation_notice.acknowledge(client(servers[index]), 1, acks_by_shard[index], shard, shards_acking=3)
    before_the_last = servers[0].check([all_acked])
    last = Shard(2, SHARDS, client(servers[0]), None)
    generation_notice.acknowledge(client(servers[2]), 1, acks_by_shard[2], last, shards_acking=3)

    assert not before_the_last
    assert store_barrier.await_value(client(servers[0]), all_acked, DEADLINE_S) == generation_notice.ALL_ACKED


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
