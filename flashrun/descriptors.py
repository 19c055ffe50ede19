"""Enough file descriptors for the coordinator's process: about four per node (each agent's gRPC stream and its
three connections to the job's store, or to its shard of it), more than the soft limit of 1,024 that many clusters
default to allows beyond about 190 nodes. Past that, the store server and the gRPC server fail to accept
connections, and agents time out with nothing pointing at the cause.

The soft limit is raised only as far as the job needs and the hard limit allows. The coordinator shares its process
with the agent of the node that hosts it, whose workers would inherit the raised limit: the agent gives each process
it starts the limit this process started with (`restore_inherited`), as torchrun's workers would have.
"""

from __future__ import annotations

import contextlib
import resource

from flashrun.agent.store_barrier import shard_count
from flashrun.config import NODES_PER_STORE_SHARD

DESCRIPTORS_PER_NODE = 4
"""An agent's gRPC stream and its three store connections (two for the barrier, one watching for notices)."""
DESCRIPTORS_PER_SHARD = 6
"""A store shard's (agent/store_barrier.py): its server's listening socket, its leader's two connections to the
root store, and the coordinator's own connection to it (both ends) for the acknowledgements, and one to spare."""
DESCRIPTORS_SPARE = 256
"""The rest of the process: listening sockets, the event log, a hosting node's own workers' pipes and logs."""


def needed(nodes: int, nodes_per_shard: int = NODES_PER_STORE_SHARD) -> int:
    return nodes * DESCRIPTORS_PER_NODE + shard_count(nodes, nodes_per_shard) * DESCRIPTORS_PER_SHARD \
        + DESCRIPTORS_SPARE


def plan(nodes: int, soft: int, hard: int, nodes_per_shard: int = NODES_PER_STORE_SHARD) -> tuple[int | None, str]:
    """The soft limit to set (None: keep `soft`) and a warning when even the hard limit is short. Pure."""
    need = needed(nodes, nodes_per_shard)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return None, ""
    if hard == resource.RLIM_INFINITY or hard >= need:
        return need, ""
    return (hard if hard > soft else None), (
        f"a job of {nodes} nodes needs about {need} open files in the coordinator's process, but the hard limit "
        f"is {hard}: raise it (ulimit -Hn, or limits.conf) or agents beyond about "
        f"{(hard - DESCRIPTORS_SPARE) // DESCRIPTORS_PER_NODE} nodes will fail to connect")


_inherited: tuple[int, int] | None = None
"""The limits this process started with, once `ensure` changed them."""


def ensure(nodes: int, nodes_per_shard: int = NODES_PER_STORE_SHARD) -> str:
    """Raise this process's soft limit for a job of `nodes` nodes; returns a warning if it cannot be enough."""
    global _inherited
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft, warning = plan(nodes, soft, hard, nodes_per_shard)
    if new_soft is not None:
        if _inherited is None:
            _inherited = (soft, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    return warning


def restore_inherited(pid: int) -> None:
    """Give child `pid` back the limit this process started with (nothing to do unless `ensure` raised it). The child
    runs with the raised one for the moment between its start and this call, when it opens next to nothing."""
    prlimit = getattr(resource, "prlimit", None)  # Linux only
    if _inherited is not None and prlimit is not None:
        with contextlib.suppress(ProcessLookupError):  # it already exited: its exit is reported elsewhere
            prlimit(pid, resource.RLIMIT_NOFILE, _inherited)
