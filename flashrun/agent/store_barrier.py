"""A generation's job-wide barrier on the TCPStore: a constant number of store operations per participant (an agent,
one per node), whatever the job's size or the time spent waiting.

- arrive:  `add(arrived, 1)`; the participant whose add returns `participants` releases the barrier with
           `compare_set(released, "", "complete")`.
- wait:    one blocking `get(released)` (a WAIT then a GET on the wire) on a second connection, the waiter, with the
           deadline as its timeout. The server pushes the release; nobody polls.
- abort:   when a newer generation is commanded first, `release(SUPERSEDED)` on the first connection (the waiter's
           is busy) wakes every participant blocked in it.

Why not poll, or wait in short slices? Polling costs every participant an operation per interval on the one store
server. A `store.wait` that times out (torch 2.13) sends a CANCEL_WAIT and leaves the connection usable, but each
timeout also logs two warnings whose socket description does two reverse DNS lookups, every slice (seen stalling a
wait for 5 s when the resolver dropped a query). Why compare_set: the first release wins, so either everyone sees
"complete" (all arrived: the group forms, and a newer generation is handled after it) or everyone sees "superseded";
no rank enters gloo's rendezvous, which cannot be aborted, while others give up.

Sharded (`Shard`, more than NODES_PER_STORE_SHARD nodes): the nodes are split into shards of consecutive node ranks,
each with a store server of its own in the coordinator's process, so that no one server thread handles every node's
operations. A node arrives and waits on its shard's store (keys `flashrun/g{G}/s{i}/...`), as above; the last to
arrive marks the shard `full` instead of releasing it. The shard's first node leads it: it waits for `full`, arrives
once for the shard at the root store (the job's own: `shards_arrived`, then `released`, as above), waits for the
root's release and copies it to its shard. Only leaders hold connections to the root (two more each): a job's
store connections stay at three per node. A release is decided at the root and only copied to shards (by their
leaders, or by the coordinator when it supersedes a generation: it also marks each shard `full` then, so that a
leader waiting for a shard that will never fill moves on), so every node of every shard sees the same outcome. The
root's server does O(shards) operations per generation and each shard's O(its nodes), in parallel on a host with
the cores. With one shard its keys are the root's and nothing is copied.

Imports torch.distributed only when a store connection is opened, so that importing this module stays cheap.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence
from typing import Any

COMPLETE = b"complete"
"""The barrier's release when every participant arrived."""
SUPERSEDED = b"superseded"
"""The barrier's release when a newer generation was commanded first."""
FULL = b"full"
"""A shard's mark once all of its nodes arrived (sharded)."""


def barrier_key(generation: int, name: str) -> str:
    return f"flashrun/g{generation}/{name}"


def shard_count(nnodes: int, nodes_per_shard: int) -> int:
    """How many store shards a generation of `nnodes` nodes uses (1 when `nodes_per_shard` is 0: unsharded)."""
    return 1 if nodes_per_shard <= 0 else max(1, -(-nnodes // nodes_per_shard))


def shard_of(node_rank: int, nnodes: int, nodes_per_shard: int) -> tuple[int, int]:
    """The shard node `node_rank` arrives in, and how many nodes arrive there."""
    count = shard_count(nnodes, nodes_per_shard)
    if count == 1:
        return 0, nnodes
    index = node_rank // nodes_per_shard
    return index, min(nodes_per_shard, nnodes - index * nodes_per_shard)


def leads_shard(node_rank: int, nnodes: int, nodes_per_shard: int) -> bool:
    """Whether `node_rank` leads its shard (the shard's first node) in a sharded generation."""
    return shard_count(nnodes, nodes_per_shard) > 1 and node_rank % nodes_per_shard == 0


@dataclasses.dataclass(frozen=True)
class Shard:
    """A node's place in a sharded generation: shard `index` of `count`; for the shard's leader, its two connections
    to the root store (a blocking get holds the second), else None."""

    index: int
    count: int
    root: Any = None
    root_waiter: Any = None

    @property
    def leads(self) -> bool:
        return self.root is not None


def shard_key(generation: int, name: str, shard: int, shards: int) -> str:
    """A shard's own key; with one shard, the root's."""
    return barrier_key(generation, name if shards == 1 else f"s{shard}/{name}")


def supersede(root: Any, shards: Sequence[Any], generation: int) -> None:
    """The coordinator's side: release `generation`'s barrier as superseded unless it was released first, at the root
    and then on every shard (`shards`, in shard order, the first of them may be the root), whose leaders stop waiting
    for it to fill."""
    decided = root.compare_set(barrier_key(generation, "released"), b"", SUPERSEDED)
    if len(shards) > 1:
        for index, store in enumerate(shards):
            store.compare_set(shard_key(generation, "released", index, len(shards)), b"", decided)
            store.compare_set(shard_key(generation, "full", index, len(shards)), b"", SUPERSEDED)


class GenerationBarrier:
    """One participant's view of a generation's barrier: `arrive`, then `await_release`.

    `store` and `waiter` are two client connections to the participant's store server (its shard's, when `shard` is
    given): a blocking get holds its connection until it returns, and a release must still be able to write.
    `participants`: the nodes that arrive there.
    """

    def __init__(self, store: Any, waiter: Any, generation: int, participants: int,
                 shard: Shard | None = None) -> None:
        self.store = store
        self.waiter = waiter
        self.generation = generation
        self.participants = participants
        self.shard = shard
        self._passed_up: bytes | None = None
        """A leader: its shard's `full` mark, once it went on to the root with it."""

    def _key(self, name: str) -> str:
        if self.shard is None:
            return barrier_key(self.generation, name)
        return shard_key(self.generation, name, self.shard.index, self.shard.count)

    def arrive(self) -> None:
        if int(self.store.add(self._key("arrived"), 1)) != self.participants:
            return
        if self.shard is None:
            self.release(COMPLETE)
        else:
            self.store.compare_set(self._key("full"), b"", FULL)

    def release(self, outcome: bytes) -> None:
        """First release wins; later ones leave it as it is. Sharded, a node does not release on its own: a release
        is decided at the root (by the last leader, or by the coordinator when it supersedes the generation)."""
        if self.shard is None:
            self.store.compare_set(barrier_key(self.generation, "released"), b"", outcome)

    def pass_up(self, deadline_s: float) -> None:
        """A shard's leader: once its shard is full, arrive for it at the root (and release the root if it is the last
        shard). Nothing for any other node. TimeoutError after `deadline_s`."""
        if self.shard is None or not self.shard.leads or self._passed_up is not None:
            return
        full = await_value(self.waiter, self._key("full"), deadline_s)
        if full is None:
            arrived = int(self.store.add(self._key("arrived"), 0))
            raise TimeoutError(f"only {arrived} of {self.participants} nodes of store shard {self.shard.index} "
                               f"reached generation {self.generation} within {deadline_s:.1f} s")
        self._passed_up = full
        if full == FULL and int(self.shard.root.add(barrier_key(self.generation, "shards_arrived"), 1)) \
                == self.shard.count:
            self.shard.root.compare_set(barrier_key(self.generation, "released"), b"", COMPLETE)

    def await_release(self, deadline_s: float) -> bytes:
        """The release (COMPLETE or SUPERSEDED), pushed by the server; TimeoutError after `deadline_s`. A leader
        passes its shard up first (`pass_up`), then copies the root's release to its shard."""
        if self.shard is not None and self.shard.leads:
            self.pass_up(deadline_s)
            decided = await_value(self.shard.root_waiter, barrier_key(self.generation, "released"), deadline_s)
            if decided is not None:
                return bytes(self.waiter.compare_set(self._key("released"), b"", decided))
            arrived = int(self.shard.root.add(barrier_key(self.generation, "shards_arrived"), 0))
            raise TimeoutError(f"only {arrived} of {self.shard.count} store shards reached generation "
                               f"{self.generation} within {deadline_s:.1f} s")
        released = await_value(self.waiter, self._key("released"), deadline_s)
        if released is not None:
            return released
        arrived = int(self.store.add(self._key("arrived"), 0))  # the failure path only
        where = "" if self.shard is None else f" of store shard {self.shard.index}"
        raise TimeoutError(f"only {arrived} of {self.participants} nodes{where} reached generation {self.generation} "
                           f"within {deadline_s:.1f} s")


def await_value(waiter: Any, key: str, timeout_s: float) -> bytes | None:
    """A blocking get of `key` on `waiter` (a connection of its own: the get holds it); None after `timeout_s`."""
    import torch.distributed as dist

    waiter.set_timeout(datetime.timedelta(seconds=max(timeout_s, 0.001)))
    try:
        return bytes(waiter.get(key))
    except dist.DistStoreError as err:
        if "timeout" not in str(err).lower():
            raise
    return None


def connect(host: str, port: int, timeout_s: float) -> tuple[Any, Any]:
    """The two client connections a participant needs: one for arrivals and releases, one for the blocking wait."""
    return connect_one(host, port, timeout_s), connect_one(host, port, timeout_s)


def load() -> None:
    """Import what a connection needs (torch.distributed: about a second), ahead of the first one."""
    import torch.distributed  # noqa: F401


def connect_one(host: str, port: int, timeout_s: float) -> Any:
    """One client connection to the job's store (a blocking get holds a connection of its own)."""
    import torch.distributed as dist

    return dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))
