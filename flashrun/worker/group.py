"""(Re)building the default process group in place, one store namespace per generation.

Healthy workers keep their TCPStore connection. Before the group forms, every rank announces itself on the
generation's namespace and waits, polling, for the others: a wait that notices when a newer generation is commanded
(a second failure during recovery), which a blocking store wait or gloo's own rendezvous could not.
"""

from __future__ import annotations

import ctypes
import datetime
import time
from typing import Any

import torch.distributed as dist
from torch.distributed import distributed_c10d

from flashrun.worker.abort import Aborter

ARRIVAL_POLL_S = 0.002
"""How often a rank waiting for its peers checks the generation's arrival counter."""
COLLECTIVE_TIMEOUT_S = 1800.0
GROUPS_PER_GENERATION = 1_000_000
"""Room for the subgroups a script creates within one generation before names could repeat."""
"""The process group's own timeout; flashrun aborts long before it matters."""


class Superseded(Exception):
    """A newer generation was commanded while this one was being formed."""


def join_generation(store: Any, generation: int, rank: int, world_size: int, backend: str, aborter: Aborter,
                    deadline_s: float) -> None:
    namespace = dist.PrefixStore(f"flashrun/g{generation}/", store)
    namespace.add("arrived", 1)
    deadline = time.monotonic() + deadline_s
    while int(namespace.add("arrived", 0)) < world_size:
        if aborter.target > generation:
            raise Superseded
        if time.monotonic() >= deadline:
            raise TimeoutError(f"peers did not reach generation {generation} within {deadline_s:g} s")
        time.sleep(ARRIVAL_POLL_S)
    # torch names an unnamed group after a per-process counter and keys gloo's own rendezvous on that name.
    # A healthy process has created more groups than its replacement, so the counter is set from the generation:
    # every rank of one generation agrees on the name, and no two generations share one.
    distributed_c10d._world.group_count = generation * GROUPS_PER_GENERATION
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg/", namespace), rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


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
