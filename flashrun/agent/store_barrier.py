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

Imports torch.distributed only when a store connection is opened, so that importing this module stays cheap.
"""

from __future__ import annotations

import datetime
from typing import Any

COMPLETE = b"complete"
"""The barrier's release when every participant arrived."""
SUPERSEDED = b"superseded"
"""The barrier's release when a newer generation was commanded first."""


def barrier_key(generation: int, name: str) -> str:
    return f"flashrun/g{generation}/{name}"


class GenerationBarrier:
    """One participant's view of a generation's barrier: `arrive`, then `await_release`.

    `store` and `waiter` are two client connections to the same store server: a blocking get holds its
    connection until it returns, and a release must still be able to write.
    """

    def __init__(self, store: Any, waiter: Any, generation: int, participants: int) -> None:
        self.store = store
        self.waiter = waiter
        self.generation = generation
        self.participants = participants

    def arrive(self) -> None:
        if int(self.store.add(barrier_key(self.generation, "arrived"), 1)) == self.participants:
            self.release(COMPLETE)

    def release(self, outcome: bytes) -> None:
        """First release wins; later ones leave it as it is."""
        self.store.compare_set(barrier_key(self.generation, "released"), b"", outcome)

    def await_release(self, deadline_s: float) -> bytes:
        """The release (COMPLETE or SUPERSEDED), pushed by the server; TimeoutError after `deadline_s`."""
        released = await_value(self.waiter, barrier_key(self.generation, "released"), deadline_s)
        if released is not None:
            return released
        arrived = int(self.store.add(barrier_key(self.generation, "arrived"), 0))  # the failure path only
        raise TimeoutError(f"only {arrived} of {self.participants} nodes reached generation {self.generation} "
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
