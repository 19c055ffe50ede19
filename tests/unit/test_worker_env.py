"""Unit tests for flashrun.agent.worker_env: workers see exactly torchrun's environment."""

from __future__ import annotations

import dataclasses

import pytest

from flashrun.agent.worker_env import WorkerPlacement, launcher_env, worker_env

# Node 1 of 3, second local rank of 4; nodes before it hold 6 ranks in all; third attempt (two restarts).
PLACEMENT = WorkerPlacement(
    local_rank=1,
    local_world_size=4,
    rank_offset=6,
    world_size=14,
    node_rank=1,
    nnodes=3,
    generation=2,
    max_restarts=5,
    run_id="job-7",
    role="trainer",
    master_addr="10.0.0.5",
    master_port=29501,
    error_file="/logs/attempt_2/1/error.json",
    agent_socket="/tmp/flashrun-agent-x/agent.sock",
    heartbeat_interval_s=0.25,
)

TORCHRUN_VARS = {
    "LOCAL_RANK": "1",
    "RANK": "7",
    "GROUP_RANK": "1",
    "ROLE_RANK": "7",
    "ROLE_NAME": "trainer",
    "LOCAL_WORLD_SIZE": "4",
    "WORLD_SIZE": "14",
    "GROUP_WORLD_SIZE": "3",
    "ROLE_WORLD_SIZE": "14",
    "MASTER_ADDR": "10.0.0.5",
    "MASTER_PORT": "29501",
    "TORCHELASTIC_RESTART_COUNT": "2",
    "TORCHELASTIC_MAX_RESTARTS": "5",
    "TORCHELASTIC_RUN_ID": "job-7",
    "TORCHELASTIC_USE_AGENT_STORE": "True",
    "TORCHELASTIC_ERROR_FILE": "/logs/attempt_2/1/error.json",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
}


def test_placement_rank_is_offset_plus_local_rank() -> None:
    assert PLACEMENT.rank == 7


@pytest.mark.parametrize(("name", "expected"), sorted(TORCHRUN_VARS.items()))
def test_worker_env_sets_torchrun_variable(name: str, expected: str) -> None:
    assert worker_env({}, PLACEMENT)[name] == expected


FLASHRUN_VARS = {
    "FLASHRUN_AGENT_SOCKET": "/tmp/flashrun-agent-x/agent.sock",
    "FLASHRUN_HEARTBEAT_INTERVAL": "0.25",
}


def test_worker_env_adds_only_torchrun_variables_and_the_agent_link() -> None:
    base = {"PATH": "/usr/bin", "HOME": "/home/me"}

    assert worker_env(base, PLACEMENT) == {**base, **TORCHRUN_VARS, **FLASHRUN_VARS}


def test_worker_env_overrides_stale_torchrun_variables_in_the_base() -> None:
    base = {"RANK": "99", "WORLD_SIZE": "1", "MASTER_PORT": "1"}

    env = worker_env(base, PLACEMENT)

    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_PORT"]) == ("7", "14", "29501")


def test_worker_env_keeps_a_preset_nccl_async_error_handling() -> None:
    env = worker_env({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}, PLACEMENT)

    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_worker_env_does_not_modify_the_base() -> None:
    base = {"PATH": "/usr/bin"}

    worker_env(base, PLACEMENT)

    assert base == {"PATH": "/usr/bin"}


def test_worker_env_on_the_first_node_starts_at_rank_zero() -> None:
    first = dataclasses.replace(PLACEMENT, local_rank=0, rank_offset=0, node_rank=0, generation=0)

    env = worker_env({}, first)

    assert (env["RANK"], env["GROUP_RANK"], env["TORCHELASTIC_RESTART_COUNT"]) == ("0", "0", "0")


def test_launcher_env_sets_omp_threads_for_several_workers() -> None:
    assert launcher_env({}, nproc_per_node=2)["OMP_NUM_THREADS"] == "1"


def test_launcher_env_keeps_a_preset_omp_threads() -> None:
    assert launcher_env({"OMP_NUM_THREADS": "8"}, nproc_per_node=2)["OMP_NUM_THREADS"] == "8"


def test_launcher_env_leaves_omp_threads_unset_for_one_worker() -> None:
    assert "OMP_NUM_THREADS" not in launcher_env({}, nproc_per_node=1)


def test_launcher_env_sets_the_signals_torchrun_handles() -> None:
    assert launcher_env({}, nproc_per_node=1)["TORCHELASTIC_SIGNALS_TO_HANDLE"] == "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


def test_launcher_env_does_not_modify_the_base() -> None:
    base = {"PATH": "/usr/bin"}

    launcher_env(base, nproc_per_node=4)

    assert base == {"PATH": "/usr/bin"}
