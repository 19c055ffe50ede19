"""Each fault, injected into real processes, is reported with the right kind and the right culprit."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.helpers import PROBES, Launch, Launcher, free_port, wait_for

FAULT = str(PROBES / "fault_probe.py")


def failures(log_dir: Path) -> list[dict]:
    path = log_dir / "events.jsonl"
    if not path.exists():
        return []
    events = [json.loads(line) for line in path.read_text().splitlines()]
    return [event for event in events if event["event"] == "failure"]


def reached_step(work: Path, rank: int, step: int) -> bool:
    try:
        return int((work / f"{rank}.step").read_text() or -1) >= step
    except (FileNotFoundError, ValueError):
        return False


def start_job(launcher: Launcher, tmp_path: Path, *probe_args: str) -> tuple[Path, Path]:
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    launcher.flashrun("--standalone", "--nproc-per-node", "3", "--log-dir", str(logs), FAULT, str(work), "100000",
                      *probe_args)
    return work, logs


def first_failure(launcher: Launcher, logs: Path) -> dict:
    found = wait_for(lambda: failures(logs), 60, "a failure event")
    run = launcher.launches[-1]
    assert run.wait(60) == 1, run.output
    wait_for(lambda: launcher.survivors() == [], 15, "every process to be gone")
    return found[0]  # type: ignore[index]


def test_kill_9_of_a_worker_is_a_crash_of_that_rank(launcher: Launcher, tmp_path: Path) -> None:
    work, logs = start_job(launcher, tmp_path)
    wait_for(lambda: reached_step(work, 1, 3), 60, "rank 1 to reach step 3")
    os.kill(int((work / "1.pid").read_text()), signal.SIGKILL)
    failure = first_failure(launcher, logs)
    assert (failure["kind"], failure["ranks"], failure["exit_code"]) == ("crash", [1], -signal.SIGKILL)
    assert "SIGKILL" in failure["evidence"]


def test_sigstop_of_a_worker_makes_it_unresponsive(launcher: Launcher, tmp_path: Path) -> None:
    work, logs = start_job(launcher, tmp_path)
    wait_for(lambda: reached_step(work, 2, 3), 60, "rank 2 to reach step 3")
    os.kill(int((work / "2.pid").read_text()), signal.SIGSTOP)
    failure = first_failure(launcher, logs)
    assert (failure["kind"], failure["ranks"]) == ("unresponsive", [2])
    assert "no heartbeat from rank 2" in failure["evidence"]


def test_rank_looping_before_a_collective_is_the_culprit_of_a_stall(launcher: Launcher, tmp_path: Path) -> None:
    _, logs = start_job(launcher, tmp_path, "--fault-rank", "1", "--fault-step", "8", "--fault", "loop")
    failure = first_failure(launcher, logs)
    assert (failure["kind"], failure["ranks"]) == ("stalled", [1])
    assert "ranks [0, 2] wait in all_reduce" in failure["evidence"]


def two_nodes_at_step_3(launcher: Launcher, tmp_path: Path, *node0_flags: str) -> tuple[Launch, Launch, Path]:
    """Two launchers of one fault-probe rank each, node 0 hosting the coordinator (with `node0_flags`), rank 1 past
    step 3: (node0, node1, the log dir)."""
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    node0 = launcher.flashrun(*common, "--node-rank", "0", "--log-dir", str(logs), *node0_flags, FAULT, str(work),
                              "100000", name="node0")
    node1 = launcher.flashrun(*common, "--node-rank", "1", FAULT, str(work), "100000", name="node1")
    wait_for(lambda: reached_step(work, 1, 3), 60, "rank 1 to reach step 3")
    return node0, node1, logs


def test_kill_9_of_an_agent_loses_its_node(launcher: Launcher, tmp_path: Path) -> None:
    node0, node1, logs = two_nodes_at_step_3(launcher, tmp_path)
    node1.signal(signal.SIGKILL)
    found = wait_for(lambda: failures(logs), 30, "a failure event")
    assert node0.wait(60) == 1, node0.output
    failure = found[0]  # type: ignore[index]
    assert (failure["kind"], failure["node"], failure["ranks"]) == ("node_lost", 1, [1])
    wait_for(lambda: launcher.survivors() == [], 15, "every process to be gone")


def assert_frozen_node_1_lost_after_2_s(node0: Launch, node1: Launch, logs: Path) -> None:
    """Freeze node 1's launcher (SIGSTOP: its stream stays open): with a 2 s node timeout it is lost after 2 s, and
    node 0 exits 1."""
    node1.signal(signal.SIGSTOP)  # left stopped: the teardown's SIGKILL ends it
    found = wait_for(lambda: failures(logs), 30, "a failure event")
    assert node0.wait(60) == 1, node0.output
    failure = found[0]  # type: ignore[index]
    assert (failure["kind"], failure["node"]) == ("node_lost", 1)
    assert failure["evidence"].endswith("(timeout 2 s)") and 2.0 <= failure["silent_s"] < 5.0, failure


def test_a_frozen_agent_is_lost_after_torchruns_keep_alive_timeout(launcher: Launcher, tmp_path: Path) -> None:
    """`--rdzv-conf keep_alive_interval=1,keep_alive_max_attempt=2` on the launcher hosting the coordinator: a node
    whose agent stopped summarising (SIGSTOP: its stream stays open) is lost after 2 s, not the default 10 s."""
    node0, node1, logs = two_nodes_at_step_3(launcher, tmp_path, "--rdzv-conf",
                                             "keep_alive_interval=1,keep_alive_max_attempt=2")
    assert_frozen_node_1_lost_after_2_s(node0, node1, logs)
    assert "job failed: node 1 (" in node0.output and ") was lost; the job cannot continue without it" in node0.output


def test_a_coordinator_of_its_own_takes_torchruns_keep_alive_timeout_too(launcher: Launcher, tmp_path: Path) -> None:
    """`flashrun coordinator --rdzv-conf keep_alive_interval=1,keep_alive_max_attempt=2`, with two launchers joining
    it: a frozen node is lost after 2 s, as with a launcher hosting the coordinator."""
    work, logs = tmp_path / "work", tmp_path / "logs"
    work.mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    coordinator = launcher.flashrun("coordinator", "--bind", endpoint, "--nnodes", "2", "--log-dir", str(logs),
                                    "--rdzv-conf", "keep_alive_interval=1,keep_alive_max_attempt=2",
                                    name="coordinator")
    wait_for(lambda: "coordinator listening" in coordinator.output, 60, "the coordinator")
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    node0 = launcher.flashrun(*common, "--node-rank", "0", FAULT, str(work), "100000", name="node0")
    node1 = launcher.flashrun(*common, "--node-rank", "1", FAULT, str(work), "100000", name="node1")
    wait_for(lambda: reached_step(work, 1, 3), 60, "rank 1 to reach step 3")
    assert_frozen_node_1_lost_after_2_s(node0, node1, logs)


def test_status_reports_every_rank_of_a_running_job(launcher: Launcher, tmp_path: Path) -> None:
    work, logs = start_job(launcher, tmp_path)
    wait_for(lambda: all(reached_step(work, r, 20) for r in range(3)), 60, "every rank to reach step 20")
    run = launcher.launches[-1]
    line = next(line for line in run.output.splitlines() if "flashrun status --rdzv-endpoint" in line)
    command = line[line.index("flashrun status"):].rstrip(")").split()
    status = launcher.flashrun(*command[1:], "--json", name="status")
    assert status.wait(30) == 0, status.output
    snapshot = json.loads(status.output)
    assert (snapshot["phase"], snapshot["generation"], snapshot["world_size"]) == ("running", 0, 3)
    assert [r["rank"] for r in snapshot["ranks"]] == [0, 1, 2]
    for rank in snapshot["ranks"]:
        # Heartbeats sample the step counter: it may lag the probe's own file by an interval or two.
        assert rank["state"] == "running" and rank["step"] >= 10 and rank["pid"] > 0
        assert 0 <= rank["heartbeat_age_s"] < 1.5 and rank["steps_per_s"] > 0
    run.signal(signal.SIGTERM)
    run.wait(30)
