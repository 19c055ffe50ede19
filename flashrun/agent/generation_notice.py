"""A new in-place generation, published once on the job's TCPStore instead of sent to every agent.

The coordinator's own work per recovery must not grow with the nodes. A Recover message per agent costs it a gRPC
write in Python each (100-300 µs), and an acknowledgement per agent a read: seconds at thousands of nodes. Every agent
of a recoverable job already holds connections to the job's store (for the generation barrier), and the store server
pushes a key to everyone blocked on it from C++. So:

- notice:    the coordinator sets `flashrun/g{G}/notice` to a serialized `GenerationNotice` (one operation). Each
             watching agent holds a blocking get on the next generation's notice on a connection of its own.
- acked:     each agent told by the notice adds 1 once it acted on it; the one whose add returns
             `notice.acks_expected` sets `all_acked`, which the coordinator waits on (one operation for it).
- direct:    the nodes in `notice.direct_nodes` ignore the notice: a spare taking over a lost node, an agent the
             coordinator does not know to be watching (told by a Recover message), or a lost node's old agent.

Having published G, the coordinator also releases generation G-1's barrier and acknowledgement as superseded (the
first release wins, so a barrier that completed stays complete): whoever still waits on them moves on at once.

Sharded (agent/store_barrier.py), each shard's store gets a notice of its own, whose `acks_expected` counts that
shard's agents, and the acknowledgements are counted there: the last sets its shard's `all_acked`, and the
coordinator waits for every shard's (coordinator/recovery_watch.py). The notices go out before anything else.

Imports torch.distributed only when a store connection is opened, so that importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flashrun._proto import flashrun_pb2 as pb
from flashrun.agent.store_barrier import SUPERSEDED, await_value, barrier_key, shard_key, supersede

ALL_ACKED = b"acked"
"""The value of `all_acked` once every agent the notice expects acknowledged it."""


def notice_key(generation: int, shard: int = 0, shards: int = 1) -> str:
    return shard_key(generation, "notice", shard, shards)


def publish(store: Any, notice: pb.GenerationNotice) -> None:
    """The coordinator's side, unsharded: publish `notice`, then supersede the previous generation's waits."""
    publish_sharded(store, [(store, notice)])


def publish_sharded(root: Any, notices: Sequence[tuple[Any, pb.GenerationNotice]]) -> None:
    """The coordinator's side: publish each shard's notice on its store (`notices`: one per shard, in shard order;
    the first shard's store may be the root), then supersede the previous generation's waits everywhere."""
    shards = len(notices)
    generation = notices[0][1].generation
    for index, (store, notice) in enumerate(notices):
        store.set(notice_key(generation, index, shards), notice.SerializeToString())
    previous = generation - 1
    supersede(root, [store for store, _ in notices], previous)
    root.compare_set(barrier_key(previous, "all_acked"), b"", SUPERSEDED)
    if shards > 1:
        for index, (store, _) in enumerate(notices):
            store.compare_set(shard_key(previous, "all_acked", index, shards), b"", SUPERSEDED)


def acknowledge(store: Any, generation: int, expected: int, shard: int = 0, shards: int = 1) -> None:
    """An agent acted on generation `generation`'s notice; the last of the `expected` ones (of its shard, when
    sharded) tells the coordinator."""
    if int(store.add(shard_key(generation, "acked", shard, shards), 1)) == expected:
        store.compare_set(shard_key(generation, "all_acked", shard, shards), b"", ALL_ACKED)


def await_notice(waiter: Any, generation: int, timeout_s: float, shard: int = 0,
                 shards: int = 1) -> pb.GenerationNotice | None:
    value = await_value(waiter, notice_key(generation, shard, shards), timeout_s)
    return None if value is None else pb.GenerationNotice.FromString(value)


def respawn_for(notice: pb.GenerationNotice, node_rank: int) -> list[int] | None:
    """The local ranks `node_rank` must replace ([] for none); None when the node ignores the notice (direct)."""
    if node_rank in notice.direct_nodes:
        return None
    return next((list(r.local_ranks) for r in notice.respawn if r.node_rank == node_rank), [])
