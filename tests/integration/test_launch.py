"""The launcher end to end: real flashrun processes, real gRPC, real gloo worlds."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from flashrun.config import COORDINATOR_PING_INTERVAL_S, COORDINATOR_PING_TIMEOUT_S
from tests.helpers import PROBES, Launcher, free_port, named, wait_for

ALLREDUCE = str(PROBES / "allreduce_probe.py")
FAIL = str(PROBES / "fail_probe.py")
RAISE = str(PROBES / "raise_probe.py")
SLEEPER = str(PROBES / "sleeper.py")


def world_lines(output: str) -> dict[int, tuple[int, float]]:
    return {int(r): (int(w), float(s)) for r, w, s in re.findall(r"rank (\d+) world (\d+) sum ([\d.]+)", output)}


def test_four_workers_on_one_node_form_a_world(launcher: Launcher) -> None:
    run = launcher.flashrun("--standalone", "--nproc-per-node", "4", ALLREDUCE)
    assert run.wait(60) == 0, run.output
    assert world_lines(run.output) == {rank: (4, 10.0) for rank in range(4)}
    # Every worker line carries its rank prefix on the console.
    assert re.search(r"^\[rank2\]:rank 2 world 4", run.output, re.M), run.output
    assert launcher.survivors() == []


def test_two_launchers_form_a_two_node_world(launcher: Launcher) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", endpoint, "--rdzv-id", "pair"]
    node0 = launcher.flashrun(*common, "--node-rank", "0", ALLREDUCE, name="node0")
    node1 = launcher.flashrun(*common, "--node-rank", "1", ALLREDUCE, name="node1")
    assert node0.wait(60) == 0, node0.output
    assert node1.wait(60) == 0, node1.output
    assert world_lines(node0.output) == {0: (4, 10.0), 1: (4, 10.0)}
    assert world_lines(node1.output) == {2: (4, 10.0), 3: (4, 10.0)}
    assert launcher.survivors() == []


def test_launchers_without_node_ranks_agree_on_who_hosts(launcher: Launcher) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    first = launcher.flashrun(*common, ALLREDUCE, name="first")
    second = launcher.flashrun(*common, ALLREDUCE, name="second")
    assert first.wait(60) == 0, first.output
    assert second.wait(60) == 0, second.output
    assert world_lines(first.output + second.output) == {0: (2, 3.0), 1: (2, 3.0)}


def test_full_restart_recovers_within_max_restarts(launcher: Launcher) -> None:
    run = launcher.flashrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "2", FAIL, "1", "2")
    assert run.wait(60) == 0, run.output
    assert "rank 0 attempt 2 ok" in run.output and "rank 1 attempt 2 ok" in run.output
    assert run.output.count("restarting") == 2
    assert launcher.survivors() == []


def test_failure_beyond_max_restarts_names_the_root_cause(launcher: Launcher, tmp_path: Path) -> None:
    run = launcher.flashrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
                            "--log-dir", str(tmp_path / "logs"), FAIL, "1", "5")
    assert run.wait(60) == 1, run.output
    summary = run.output[run.output.index("job failed"):]
    assert "no restarts are left (--max-restarts 1)" in summary
    assert re.search(r"root cause.*rank 1 \(local rank 1\) on node 0 .* exited with code 1", summary), summary
    assert "ValueError: injected failure on rank 1 attempt 1" in summary  # the last attempt is the root cause
    assert "earlier generation failure: rank 1" in summary
    assert 'fail_probe.py", line' in summary  # the traceback from the error file
    for attempt in (0, 1):
        assert (tmp_path / "logs" / f"attempt_{attempt}" / "1" / "error.json").is_file()
    assert launcher.survivors() == []


def test_worker_that_raises_prints_its_traceback_and_exits_with_code_1(launcher: Launcher, tmp_path: Path) -> None:
    run = launcher.flashrun("--standalone", "--nproc-per-node", "1", "--max-restarts", "0", RAISE, str(tmp_path))
    assert run.wait(60) == 1, run.output
    assert re.search(r"root cause.*rank 0 .* exited with code 1", run.output), run.output
    # The agent's prefix, then torch's: its excepthook wrapper wrote what flashrun's hook printed.
    assert "[rank0]:[rank0]: ValueError: injected failure on rank 0" in run.output, run.output
    assert (tmp_path / "0.atexit").exists()  # the script's exit handlers ran
    assert (tmp_path / "0.log").read_text() == "written before the crash, never flushed\n"
    assert launcher.survivors() == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_to_launcher_is_forwarded_and_nothing_survives(
    launcher: Launcher, tmp_path: Path, signum: signal.Signals
) -> None:
    run = launcher.flashrun("--standalone", "--nproc-per-node", "2", SLEEPER, str(tmp_path))
    wait_for(lambda: all((tmp_path / f"{r}.pid").exists() for r in range(2)), 60, "both workers to start")
    run.signal(signum)
    assert run.wait(30) == 128 + signum, run.output
    for rank in range(2):
        assert (tmp_path / f"{rank}.signal").read_text() == signum.name
    assert launcher.survivors() == []


def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(launcher: Launcher, tmp_path: Path) -> None:
    run = launcher.flashrun("--standalone", "--nproc-per-node", "1", "--shutdown-timeout", "1",
                            SLEEPER, str(tmp_path), "--ignore-term")
    wait_for(lambda: (tmp_path / "0.pid").exists(), 60, "the worker to start")
    run.signal(signal.SIGTERM)
    assert run.wait(30) == 128 + signal.SIGTERM, run.output
    assert (tmp_path / "0.signal").read_text() == "SIGTERM"
    assert launcher.survivors() == []


def test_sigkill_of_launcher_takes_its_workers_down(launcher: Launcher, tmp_path: Path) -> None:
    run = launcher.flashrun("--standalone", "--nproc-per-node", "2", SLEEPER, str(tmp_path))
    wait_for(lambda: all((tmp_path / f"{r}.pid").exists() for r in range(2)), 60, "both workers to start")
    run.signal(signal.SIGKILL)
    run.wait(10)
    wait_for(lambda: launcher.survivors() == [], 10, "orphaned workers to die")


def test_losing_a_node_stops_the_other_node(launcher: Launcher, tmp_path: Path) -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    node0 = launcher.flashrun(*common, "--node-rank", "0", SLEEPER, str(tmp_path), name="node0")
    node1 = launcher.flashrun(*common, "--node-rank", "1", SLEEPER, str(tmp_path), name="node1")
    wait_for(lambda: all((tmp_path / f"{r}.pid").exists() for r in range(2)), 60, "both workers to start")
    node1.signal(signal.SIGKILL)
    assert node0.wait(30) == 1, node0.output
    assert "node 1" in node0.output and "lost" in node0.output
    wait_for(lambda: launcher.survivors() == [], 10, "every worker to be gone")


def test_ctrl_c_on_the_launcher_hosting_the_coordinator_ends_every_node_with_that_reason(launcher: Launcher,
                                                                                         tmp_path: Path) -> None:
    """A user's SIGINT is not a lost node: the other nodes stop and say why, and the event log records no failure."""
    logs = tmp_path / "logs"
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    node0 = launcher.flashrun(*common, "--node-rank", "0", "--log-dir", str(logs), SLEEPER, str(tmp_path),
                              name="node0")
    node1 = launcher.flashrun(*common, "--node-rank", "1", SLEEPER, str(tmp_path), name="node1")
    wait_for(lambda: all((tmp_path / f"{r}.pid").exists() for r in range(2)), 60, "both workers to start")
    node0.signal(signal.SIGINT)
    assert node0.wait(30) == 128 + signal.SIGINT, node0.output
    assert node1.wait(30) == 1, node1.output
    assert "job failed: the launcher hosting the coordinator received SIGINT" in node1.output
    assert named(logs, "failure") == []
    assert [e["reason"] for e in named(logs, "job_failed")] == ["the launcher hosting the coordinator received SIGINT"]
    wait_for(lambda: launcher.survivors() == [], 10, "every worker to be gone")


def test_a_coordinator_gone_silent_ends_the_other_nodes_after_the_ping_timeout(launcher: Launcher,
                                                                               tmp_path: Path) -> None:
    """The launcher hosting the coordinator stops for good without closing its connections (its host frozen, powered
    off, cut off by the network). The other node must not wait forever: its agent's pings go unanswered, so it stops
    its workers and exits with one line that says why."""
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    node0 = launcher.flashrun(*common, "--node-rank", "0", SLEEPER, str(tmp_path), name="node0")
    node1 = launcher.flashrun(*common, "--node-rank", "1", SLEEPER, str(tmp_path), name="node1")
    wait_for(lambda: all((tmp_path / f"{r}.pid").exists() for r in range(2)), 60, "both workers to start")
    worker1 = int((tmp_path / "1.pid").read_text())
    node0.signal(signal.SIGSTOP)  # left stopped: the teardown's SIGKILL ends it
    assert node1.wait(COORDINATOR_PING_INTERVAL_S + COORDINATOR_PING_TIMEOUT_S + 30) == 1, node1.output
    assert (f"lost the coordinator at {endpoint} (it did not answer for {COORDINATOR_PING_TIMEOUT_S:g} s: its host "
            "is down, frozen or cut off); workers stopped") in node1.output
    assert (tmp_path / "1.signal").read_text() == "SIGTERM"
    wait_for(lambda: not Path(f"/proc/{worker1}").exists(), 10, "node 1's worker to be gone")


def test_log_dir_keeps_per_rank_files_and_filters_apply(launcher: Launcher, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run = launcher.flashrun("--standalone", "--nproc-per-node", "3", "--log-dir", str(logs),
                            "--local-ranks-filter", "1", "--redirects", "2:1", ALLREDUCE)
    assert run.wait(60) == 0, run.output
    assert world_lines(run.output) == {1: (3, 6.0)}  # rank 0 and 2 are filtered off the console
    for rank in range(3):
        assert f"rank {rank} world 3 sum 6" in (logs / "attempt_0" / str(rank) / "stdout.log").read_text()
    assert (logs / "events.jsonl").is_file()


def test_redirected_rank_reaches_only_its_file(launcher: Launcher, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run = launcher.flashrun("--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "--redirects", "0:1",
                            ALLREDUCE)
    assert run.wait(60) == 0, run.output
    assert set(world_lines(run.output)) == {1}
    assert "rank 0 world 2" in (logs / "attempt_0" / "0" / "stdout.log").read_text()
