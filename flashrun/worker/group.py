"""(Re)building the default process group in place, one store namespace per generation.

Healthy workers keep their TCPStore connection. Before the group forms, every rank passes the generation's
barrier (`await_peers`): it tells its agent it arrived and waits for the outcome the agent relays. The agent arrives
at the job-wide barrier once for its whole node (flashrun/agent/node_barrier.py), so a rank costs the store server
nothing until gloo's own rendezvous.
"""

from __future__ import annotations

import ctypes
import datetime
import sys
from typing import Any, Protocol

import torch.distributed as dist
from torch.distributed import distributed_c10d

from flashrun.agent.node_barrier import COMPLETE, SUPERSEDED, TIMEOUT
from flashrun.worker.abort import Aborter

COLLECTIVE_TIMEOUT_S = 1800.0
"""The process group's own timeout; flashrun aborts long before it matters."""
GROUPS_PER_GENERATION = 1_000_000
"""Room for the subgroups a script creates within one generation before names could repeat."""
RELEASE_SLACK_S = 5.0
"""A rank waits this much longer than the barrier's deadline, so that the agent's own timeout (which says how many
nodes came) normally reaches it first. The agent's deadline runs from the node's arrival, so a rank whose local
peers came more than this late meets its own deadline first, with a plainer message."""


class Superseded(Exception):
    """A newer generation was commanded while this one was being formed."""


class BarrierLink(Protocol):
    def await_release(self, generation: int, timeout_s: float) -> tuple[str, str] | None: ...


def await_peers(link: BarrierLink, generation: int, aborter: Aborter, deadline_s: float) -> None:
    """Return once every rank reached `generation`; Superseded if a newer one is commanded first, TimeoutError
    after `deadline_s`, RuntimeError if the job's store failed."""
    if aborter.target > generation:
        # The agent put its node in the newer generation before relaying the command, so it answers this
        # generation's barrier "superseded" on this node, and the barrier cannot complete without this node.
        raise Superseded
    released = link.await_release(generation, deadline_s + RELEASE_SLACK_S)
    if released is None:
        raise TimeoutError(f"the agent did not release generation {generation} within {deadline_s:g} s")
    outcome, detail = released
    if outcome == COMPLETE:
        return
    if outcome == TIMEOUT:
        raise TimeoutError(detail)
    if outcome != SUPERSEDED:
        raise RuntimeError(detail or f"generation {generation}'s barrier failed ({outcome})")
    # A newer generation was commanded on some node first; this rank's command is on its way.
    if aborter.wait_for_generation(generation, deadline_s) is None:
        raise TimeoutError(f"generation {generation} was superseded, but no newer generation reached this rank "
                           f"within {deadline_s:g} s")
    raise Superseded


def join_generation(store: Any, link: BarrierLink, generation: int, rank: int, world_size: int, backend: str,
                    aborter: Aborter, deadline_s: float) -> None:
    """Pass the generation's barrier, then form its default process group on `store`."""
    await_peers(link, generation, aborter, deadline_s)
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
