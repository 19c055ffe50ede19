"""(Re)building the default process group in place, one store namespace per generation.

Healthy workers keep their TCPStore connection. Before the group forms, every rank announces itself on the
generation's namespace and waits, polling, for the others: a wait that notices when a newer generation is commanded
(a second failure during recovery), which a blocking store wait or gloo's own rendezvous could not.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import torch.distributed as dist

from flashrun.worker.abort import Aborter

ARRIVAL_POLL_S = 0.002
"""How often a rank waiting for its peers checks the generation's arrival counter."""
COLLECTIVE_TIMEOUT_S = 1800.0
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
    dist.init_process_group(
        backend, store=dist.PrefixStore("pg/", namespace), rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )


def abandon_group(graveyard: list[Any]) -> None:
    """Drop the failed generation's group. A gloo group with a collective still blocked on a dead peer cannot be
    woken; it is kept referenced (its destructor could wait on that collective) and simply never used again."""
    if not dist.is_initialized():
        return
    group = dist.group.WORLD
    graveyard.append(group)
    if dist.get_backend(group) == "nccl":
        group.abort()  # NCCL can abort its communicators: in-flight kernels return
    dist.destroy_process_group()
