"""A new generation published once on a real TCPStore (agent/generation_notice.py): the agent's watch for it
(NodeBarrier with `on_notice`), the acknowledgements, and the coordinator's watch of them (RecoveryWatch).

Agents and the coordinator's watch run in threads of this process, each on its own client connections, against a
real store server.
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
from flashrun.agent.node_barrier import SUPERSEDED, NodeBarrier, Release
from flashrun.coordinator.recovery_watch import RecoveryWatch
from tests.helpers import wait_for

STORE_TIMEOUT = datetime.timedelta(seconds=30)
WATCH_THREAD = "flashrun-notice-watch"
DEADLINE_S = 30.0
"""Generous for a loaded 2-core machine: what passes does so in milliseconds."""


def client(server: Any) -> Any:
    return dist.TCPStore(server.host, server.port, is_master=False, wait_for_workers=False, timeout=STORE_TIMEOUT)


def notice(generation: int, respawn: dict[int, list[int]] | None = None, direct: tuple[int, ...] = (),
           acks: int = 1) -> pb.GenerationNotice:
    return pb.GenerationNotice(generation=generation, direct_nodes=direct, acks_expected=acks,
                               respawn=[pb.NodeRespawn(node_rank=n, local_ranks=r) for n, r in (respawn or {}).items()])


class Agent:
    """An agent's NodeBarrier (2 local ranks) watching `server` from `generation`; what it hears, in queues."""

    def __init__(self, server: Any, nodes: int = 2, generation: int = 0) -> None:
        self.notices: queue.Queue[pb.GenerationNotice] = queue.Queue()
        self.releases: queue.Queue[Release] = queue.Queue()
        self.barrier = NodeBarrier(2, self.releases.put, DEADLINE_S, on_notice=self.notices.put)
        self.barrier.place(server.host, server.port, nodes, generation)
        self.barrier.prepare()
        wait_for(lambda: self.barrier.watching, DEADLINE_S, "the agent's watch")

    def next_notice(self) -> pb.GenerationNotice:
        return self.notices.get(timeout=DEADLINE_S)


@pytest.fixture
def agents() -> Iterator[list[Agent]]:
    made: list[Agent] = []
    yield made
    for agent in made:
        agent.barrier.close()


def test_a_published_notice_reaches_the_watch_with_each_nodes_share(server: Any, agents: list[Agent]) -> None:
    agents.append(Agent(server))

    generation_notice.publish(server, notice(1, respawn={1: [0]}, direct=(2,)))
    got = agents[0].next_notice()

    assert got.generation == 1
    assert [generation_notice.respawn_for(got, node) for node in (0, 1, 2)] == [[], [0], None]


def test_the_last_expected_acknowledgement_tells_the_coordinator(server: Any, agents: list[Agent]) -> None:
    agents.extend([Agent(server), Agent(server)])
    generation_notice.publish(server, notice(1, acks=2))
    all_acked = store_barrier.barrier_key(1, "all_acked")
    for agent in agents:
        agent.next_notice()

    agents[0].barrier.acknowledge(1, 2)
    wait_for(lambda: int(server.add(store_barrier.barrier_key(1, "acked"), 0)) == 1, DEADLINE_S, "one ack")
    after_one = server.check([all_acked])
    agents[1].barrier.acknowledge(1, 2)

    assert not after_one
    assert store_barrier.await_value(client(server), all_acked, DEADLINE_S) == generation_notice.ALL_ACKED


def test_the_watch_follows_generations_and_skips_those_the_agent_was_told_directly(server: Any,
                                                                                    agents: list[Agent]) -> None:
    agent = Agent(server)
    agents.append(agent)
    generation_notice.publish(server, notice(1))
    assert agent.next_notice().generation == 1

    agent.barrier.place(server.host, server.port, 2, 3)  # generations 2 and 3 came as Recover messages
    for generation in (2, 3, 4):
        generation_notice.publish(server, notice(generation))

    heard = [agent.next_notice().generation, agent.next_notice().generation]
    assert heard == [2, 4]  # it was waiting on 2 already; 3 it is in


def test_publishing_a_generation_supersedes_the_previous_ones_barrier(server: Any, agents: list[Agent]) -> None:
    agent = Agent(server, nodes=2)
    agents.append(agent)
    current = {0: 100, 1: 101}
    for local_rank, pid in current.items():
        agent.barrier.arrive(local_rank, pid, 1, current)  # the other node never arrives

    generation_notice.publish(server, notice(2))

    assert agent.releases.get(timeout=DEADLINE_S) == Release((100, 101), 1, SUPERSEDED)


def watch_threads() -> set[threading.Thread]:
    return {thread for thread in threading.enumerate() if thread.name == WATCH_THREAD}


def test_after_a_store_move_only_the_new_stores_notices_are_heard(server: Any, agents: list[Agent]) -> None:
    earlier = watch_threads()  # other tests' watches may still be ending
    agent = Agent(server)
    agents.append(agent)
    (old_watch,) = watch_threads() - earlier
    moved = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    agent.barrier.place(moved.host, moved.port, 2, 5)  # a full restart into generation 5
    # The move is carried out on the agent's ops thread: until then `watching` still describes the old watch.
    new_watch = wait_for(lambda: next(iter(watch_threads() - earlier - {old_watch}), None), DEADLINE_S,
                         "the watch on the new store to start")
    wait_for(lambda: agent.barrier.watching, DEADLINE_S, "the watch on the new store")

    generation_notice.publish(server, notice(1))  # wakes the old store's watch, which must drop it and end
    wait_for(lambda: not old_watch.is_alive(), DEADLINE_S, "the old store's watch to end")
    generation_notice.publish(moved, notice(6))

    assert agent.next_notice().generation == 6
    assert agent.notices.empty()
    agent.barrier.close()
    generation_notice.publish(moved, notice(7))  # the closed watch wakes and ends before its store goes
    wait_for(lambda: not new_watch.is_alive(), DEADLINE_S, "the closed watch to end")
    del moved


@pytest.fixture
def watch(server: Any) -> Iterator[tuple[RecoveryWatch, queue.Queue[Any]]]:
    heard: queue.Queue[Any] = queue.Queue()
    recovery_watch = RecoveryWatch("127.0.0.1", DEADLINE_S, lambda g, _t: heard.put(("acknowledged", g)),
                                   lambda g, outcome, _t: heard.put(("released", g, outcome)))
    recovery_watch.use_store(server.port)
    yield recovery_watch, heard
    recovery_watch.close()


def test_the_coordinators_watch_hears_the_acknowledgements_then_the_release(server: Any, watch: Any) -> None:
    recovery_watch, heard = watch
    generation_notice.publish(server, notice(1, acks=1))
    recovery_watch.follow(server.port, 1)

    generation_notice.acknowledge(client(server), 1, 1)
    acknowledged = heard.get(timeout=DEADLINE_S)
    store_barrier.GenerationBarrier(client(server), client(server), 1, 1).arrive()

    assert acknowledged == ("acknowledged", 1)
    assert heard.get(timeout=DEADLINE_S) == ("released", 1, "complete")


def test_a_newer_generation_ends_the_coordinators_watch_of_the_older_one(server: Any, watch: Any) -> None:
    recovery_watch, heard = watch
    generation_notice.publish(server, notice(1, acks=3))
    recovery_watch.follow(server.port, 1)  # nobody acknowledges generation 1

    generation_notice.publish(server, notice(2, acks=0))
    recovery_watch.follow(server.port, 2, acknowledging=())
    store_barrier.GenerationBarrier(client(server), client(server), 2, 1).arrive()

    assert heard.get(timeout=DEADLINE_S) == ("released", 1, "superseded")
    assert heard.get(timeout=DEADLINE_S) == ("released", 2, "complete")


def test_a_release_is_heard_while_acknowledgements_are_still_missing(server: Any, watch: Any) -> None:
    recovery_watch, heard = watch
    generation_notice.publish(server, notice(1, acks=2))
    recovery_watch.follow(server.port, 1)

    store_barrier.GenerationBarrier(client(server), client(server), 1, 1).arrive()  # one agent never acknowledges
    assert heard.get(timeout=DEADLINE_S) == ("released", 1, "complete")
    generation_notice.publish(server, notice(2, acks=0))  # ends the wait for the acknowledgements before the store goes
