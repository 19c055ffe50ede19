"""The environment a worker sees: exactly what torchrun gives it, so unmodified scripts run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from flashrun.worker.link import AGENT_SOCKET_ENV, HEARTBEAT_INTERVAL_ENV


@dataclasses.dataclass(frozen=True)
class WorkerPlacement:
    local_rank: int
    local_world_size: int
    rank_offset: int
    world_size: int
    node_rank: int
    nnodes: int
    generation: int
    max_restarts: int
    run_id: str
    role: str
    master_addr: str
    master_port: int
    error_file: str
    agent_socket: str
    heartbeat_interval_s: float

    @property
    def rank(self) -> int:
        return self.rank_offset + self.local_rank


def worker_env(base: Mapping[str, str], placement: WorkerPlacement) -> dict[str, str]:
    """`base` is the launcher's environment; torchrun's variables are laid over it."""
    env = dict(base)
    env.update(
        {
            "LOCAL_RANK": str(placement.local_rank),
            "RANK": str(placement.rank),
            "GROUP_RANK": str(placement.node_rank),
            "ROLE_RANK": str(placement.rank),
            "ROLE_NAME": placement.role,
            "LOCAL_WORLD_SIZE": str(placement.local_world_size),
            "WORLD_SIZE": str(placement.world_size),
            "GROUP_WORLD_SIZE": str(placement.nnodes),
            "ROLE_WORLD_SIZE": str(placement.world_size),
            "MASTER_ADDR": placement.master_addr,
            "MASTER_PORT": str(placement.master_port),
            "TORCHELASTIC_RESTART_COUNT": str(placement.generation),
            "TORCHELASTIC_MAX_RESTARTS": str(placement.max_restarts),
            "TORCHELASTIC_RUN_ID": placement.run_id,
            # The coordinator hosts the store, so workers connect as clients, as under torchrun's agent.
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_ERROR_FILE": placement.error_file,
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": base.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
            # flashrun's own: where `import flashrun` finds the agent. Absent under torchrun, so the library idles.
            AGENT_SOCKET_ENV: placement.agent_socket,
            HEARTBEAT_INTERVAL_ENV: repr(placement.heartbeat_interval_s),
        }
    )
    return env


def launcher_env(base: Mapping[str, str], nproc_per_node: int) -> dict[str, str]:
    """What torchrun sets in its own environment, which every worker then inherits."""
    env = dict(base)
    if "OMP_NUM_THREADS" not in env and nproc_per_node > 1:
        env["OMP_NUM_THREADS"] = "1"
    env.setdefault("TORCHELASTIC_SIGNALS_TO_HANDLE", "SIGTERM,SIGINT,SIGHUP,SIGQUIT")
    return env
