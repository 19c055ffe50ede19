"""Enough file descriptors for the coordinator's process: up to six per node (each agent's gRPC stream, its three
connections to its shard of the job's store and, in a sharded job, two to the root store), more than the soft limit
of 1,024 that many clusters default to allows beyond about 120 nodes. Past that, the store server and the gRPC server
fail to accept connections, and agents time out with nothing pointing at the cause.

The soft limit is raised only as far as the job needs and the hard limit allows. The coordinator shares its process
with the agent of the node that hosts it, whose workers would inherit the raised limit: the agent gives each process
it starts the limit this process started with (`restore_inherited`), as torchrun's workers would have.
"""

from __future__ import annotations

import contextlib
import resource

DESCRIPTORS_PER_NODE = 6
"""An agent's gRPC stream, its three store connections (two for the barrier, one watching for notices) and, in a
sharded job (agent/store_barrier.py), two to the root store. An unsharded job needs four of them."""
DESCRIPTORS_SPARE = 256
"""The rest of the process: listening sockets, the event log, a hosting node's own workers' pipes and logs."""


def needed(nodes: int) -> int:
    return nodes * DESCRIPTORS_PER_NODE + DESCRIPTORS_SPARE


def plan(nodes: int, soft: int, hard: int) -> tuple[int | None, str]:
    """The soft limit to set (None: keep `soft`) and a warning when even the hard limit is short. Pure."""
    need = needed(nodes)
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


def ensure(nodes: int) -> str:
    """Raise this process's soft limit for a job of `nodes` nodes; returns a warning if it cannot be enough."""
    global _inherited
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft, warning = plan(nodes, soft, hard)
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
