"""(Re)building the default process group in place, one store namespace per generation.

Healthy workers keep their TCPStore connection. Before the group forms, every rank passes the generation's
barrier (`await_peers`), a constant number of store operations per rank, whatever the world size or the time spent
waiting:

- arrive:  `add(arrived, 1)`; the rank whose add returns `world_size` releases the barrier with
           `compare_set(released, "", "complete")`.
- wait:    one blocking `get(released)` (a WAIT then a GET on the wire) on a second connection, the waiter, with the
           deadline as its timeout. The server pushes the release; nobody polls.
- abort:   when a newer generation is commanded, the aborter's waker releases the barrier with
           `compare_set(released, "", "superseded")` on the first connection (the waiter's is busy), which wakes
           every rank blocked in it.

Why not poll, or wait in short slices? Polling costs every rank an operation per interval on the one store server.
A `store.wait` that times out (torch 2.13) sends a CANCEL_WAIT and leaves the connection usable, but each timeout
also logs two warnings whose socket description does two reverse DNS lookups, on every rank, every slice (seen
stalling a wait for 5 s when the resolver dropped a query). Why compare_set: the first release wins, so either every
rank sees "complete" (all arrived: the group forms, and a newer generation is handled after it) or every rank sees
"superseded"; no rank enters gloo's rendezvous, which cannot be aborted, while others give up.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import sys
import time
import weakref
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.distributed import distributed_c10d

from flashrun.worker.abort import Aborter

COLLECTIVE_TIMEOUT_S = 1800.0
"""The process group's own timeout; flashrun aborts long before it matters."""
GROUPS_PER_GENERATION = 1_000_000
"""Room for the subgroups a script creates within one generation before names could repeat."""
COMPLETE = b"complete"
"""The barrier's release when every rank arrived."""
SUPERSEDED = b"superseded"
"""The barrier's release when a newer generation was commanded first."""


class Superseded(Exception):
    """A newer generation was commanded while this one was being formed."""


def _key(generation: int, name: str) -> str:
    return f"flashrun/g{generation}/{name}"


class GenerationBarrier:
    """One rank's view of a generation's barrier: `arrive`, then `await_release`.

    `store` and `waiter` are two client connections to the same store server: a blocking get holds its
    connection until it returns, and the abort must still be able to write.
    """

    def __init__(self, store: Any, waiter: Any, generation: int, world_size: int) -> None:
        self.store = store
        self.waiter = waiter
        self.generation = generation
        self.world_size = world_size

    def arrive(self) -> None:
        if int(self.store.add(_key(self.generation, "arrived"), 1)) == self.world_size:
            self.release(COMPLETE)

    def release(self, outcome: bytes) -> None:
        """First release wins; later ones leave it as it is."""
        self.store.compare_set(_key(self.generation, "released"), b"", outcome)

    def await_release(self, deadline_s: float) -> bytes:
        """The release (COMPLETE or SUPERSEDED), pushed by the server; TimeoutError after `deadline_s`."""
        self.waiter.set_timeout(datetime.timedelta(seconds=max(deadline_s, 0.001)))
        try:
            return bytes(self.waiter.get(_key(self.generation, "released")))
        except dist.DistStoreError as err:
            if "timeout" not in str(err).lower():
                raise
        arrived = int(self.store.add(_key(self.generation, "arrived"), 0))  # the failure path only
        raise TimeoutError(f"only {arrived} of {self.world_size} ranks reached generation {self.generation} "
                           f"within {deadline_s:.1f} s")


@contextlib.contextmanager
def _released_on_abort(barrier: GenerationBarrier, aborter: Aborter) -> Iterator[None]:
    def wake() -> None:
        if aborter.target > barrier.generation:
            with contextlib.suppress(RuntimeError):  # the store is gone: the waiting rank meets its deadline
                barrier.release(SUPERSEDED)

    waker_id = aborter._add_waker(wake)
    try:
        yield
    finally:
        aborter._remove_waker(waker_id)


def await_peers(store: Any, waiter: Any, generation: int, world_size: int, aborter: Aborter,
                deadline_s: float) -> None:
    """Return once all `world_size` ranks reached `generation`; Superseded if a newer one is commanded first,
    TimeoutError after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    barrier = GenerationBarrier(store, waiter, generation, world_size)
    with _released_on_abort(barrier, aborter):
        if aborter.target > generation:  # checked after the waker is in place, so a command in between counts
            barrier.release(SUPERSEDED)
            raise Superseded
        barrier.arrive()
        outcome = barrier.await_release(deadline - time.monotonic())
    if outcome == COMPLETE:
        return
    # Another rank's aborter saw the newer generation first; this rank's command is on its way.
    if aborter.wait_for_generation(generation, max(deadline - time.monotonic(), 0.0)) is None:
        raise TimeoutError(f"generation {generation} was superseded, but no newer generation reached this rank "
                           f"within {deadline_s:g} s")
    raise Superseded


def connect_waiter(store: Any, timeout_s: float) -> Any:
    """A second connection to `store`'s server, for the barrier's blocking wait."""
    return dist.TCPStore(store.host, store.port, is_master=False, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


_waiters: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
"""Each store's waiter, opened on its first generation and kept: the libuv store server resolves every new
connection's peer address (a reverse DNS lookup) on its only thread, so a connection per rank per generation would
stall the server at scale."""


def join_generation(store: Any, generation: int, rank: int, world_size: int, backend: str, aborter: Aborter,
                    deadline_s: float) -> None:
    """Pass the generation's barrier, then form its default process group."""
    waiter = _waiters.get(store)
    if waiter is None:
        waiter = _waiters[store] = connect_waiter(store, deadline_s)
    await_peers(store, waiter, generation, world_size, aborter, deadline_s)
    namespace = dist.PrefixStore(f"flashrun/g{generation}/", store)
    # torch names an unnamed group after a per-process counter and keys gloo's own rendezvous on that name.
    # A healthy process has created more groups than its replacement, so the counter is set from the generation:
    # every rank of one generation agrees on the name, and no two generations share one.
    distributed_c10d._world.group_count = generation * GROUPS_PER_GENERATION
    hook = sys.excepthook
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg/", namespace), rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    # torch wraps sys.excepthook on every init to prefix tracebacks with "[rankN]:". A process keeps its rank across
    # generations, so the first wrapper is kept; otherwise a survivor's traceback would carry one per generation.
    global _excepthook_prefixed
    if _excepthook_prefixed:
        sys.excepthook = hook
    _excepthook_prefixed = True


_excepthook_prefixed = False
"""Whether torch's rank-prefixing excepthook is in place already (see join_generation)."""


def abandon_group(graveyard: list[Any]) -> None:
    """Forget the failed generation's group without shutting it down.

    A gloo collective blocked on a dead or frozen peer cannot be woken, and `destroy_process_group()` would shut
    the group down underneath it: when that collective finally errors out, it touches freed state (seen as
    SIGSEGV seconds later). So the group is kept referenced, unregistered as the default, and never used again.
    """
    if not dist.is_initialized():
        return
    group = dist.group.WORLD
    graveyard.append(group)
    # Never freed, not even at interpreter exit: destroying a gloo group whose thread is still blocked in a
    # collective destroys a joinable std::thread, and the process dies of SIGABRT on its way out.
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(group))
    if dist.get_backend(group) == "nccl":
        group.abort()  # NCCL can abort its communicators: in-flight kernels return
    distributed_c10d._update_default_pg(None)
