"""Bad input gets one clear line on stderr, a non-zero exit, no traceback and no process left behind.

The messages are pinned by their important words (the bad value, the endpoint), never by whole sentences.
"""

from __future__ import annotations

import dataclasses
import re
import signal
import socket
from pathlib import Path

import pytest

from tests.helpers import BIN, PROBES, Launch, Launcher, free_port, wait_for

PROBE = str(PROBES / "env_probe.py")
USAGE_EXIT = 2


@dataclasses.dataclass
class Run:
    """A flashrun process whose stderr goes to its own file, so stderr and stdout can be told apart."""

    launch: Launch
    stderr_path: Path

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    @property
    def stdout(self) -> str:
        return self.launch.output

    def wait(self, timeout_s: float) -> int:
        return self.launch.wait(timeout_s)

    def error_line(self) -> str:
        """The one line flashrun printed; fails unless stderr is exactly one line, stdout is empty, no traceback."""
        report = f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        assert "Traceback" not in self.stdout + self.stderr, report
        assert self.stdout.strip() == "", report
        lines = self.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected exactly one line on stderr\n{report}"
        assert lines[0].startswith("flashrun: error:"), report
        return lines[0]


def start(launcher: Launcher, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
          name: str = "flashrun") -> Run:
    stderr_path = tmp_path / f"{name}-{len(launcher.launches)}.stderr"
    # `sh -c 'exec "$@" 2>"$0"' FILE flashrun ...` replaces the shell by flashrun with stderr in FILE.
    launch = launcher.start(["sh", "-c", 'exec "$@" 2>"$0"', str(stderr_path), str(BIN / "flashrun"), *args],
                            env=env, name=name)
    return Run(launch, stderr_path)


def nodes_args(port: int, nnodes: int, node_rank: int, *extra: str) -> list[str]:
    return ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--rdzv-endpoint", f"127.0.0.1:{port}",
            *extra, PROBE, "unused-out-dir"]


def stop(run: Run) -> int:
    run.launch.signal(signal.SIGTERM)
    return run.wait(15)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--nnodes", "2:1", PROBE], ["--nnodes", "'2:1'"]),
        (["--nnodes", "x", PROBE], ["--nnodes", "'x'"]),
        (["--nproc-per-node", "0", PROBE], ["--nproc-per-node", "'0'"]),
        (["--nproc-per-node", "many", PROBE], ["--nproc-per-node", "'many'"]),
        (["--standalone", "no_such_script.py"], ["no_such_script.py", "does not exist"]),
        (["--numa-binding", "node", PROBE], ["--numa-binding"]),
        (["--module", "--no-python", "tests.probes.env_probe"], ["--module", "--no-python"]),
        (["--store-shard-nodes", "-1", PROBE], ["--store-shard-nodes", "-1"]),
        (["--no-such-option", PROBE], ["--no-such-option"]),
        (["coordinator", "--bind", "127.0.0.1:0", "--rdzv-conf", "keep_alive_interval=0"],
         ["keep_alive_interval", "'0'"]),
    ],
    ids=["nnodes-min-above-max", "nnodes-not-a-number", "nproc-zero", "nproc-word", "missing-script",
         "unsupported-option", "module-and-no-python", "store-shard-nodes-negative", "unknown-option",
         "coordinator-keep-alive-zero"],
)
def test_usage_error(launcher: Launcher, tmp_path: Path, args: list[str], words: list[str]) -> None:
    run = start(launcher, tmp_path, *args)
    assert run.wait(30) == USAGE_EXIT, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    line = run.error_line()
    for word in words:
        assert word in line
    assert launcher.survivors() == []


def test_unreachable_endpoint(launcher: Launcher, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    run = start(launcher, tmp_path, *nodes_args(port, 2, 1, "--rdzv-conf", "join_timeout=3"))
    code = run.wait(15)
    assert code != 0
    assert f"127.0.0.1:{port}" in run.error_line()
    assert launcher.survivors() == []


def test_wrong_token(launcher: Launcher, tmp_path: Path) -> None:
    port = free_port()
    node0 = start(launcher, tmp_path, *nodes_args(port, 2, 0, "--rdzv-conf", "join_timeout=60"),
                  env={"FLASHRUN_TOKEN": "a"}, name="node0")
    node1 = start(launcher, tmp_path, *nodes_args(port, 2, 1, "--rdzv-conf", "join_timeout=20"),
                  env={"FLASHRUN_TOKEN": "b"}, name="node1")
    code = node1.wait(25)
    assert code != 0
    assert "token" in node1.error_line()

    assert node0.launch.process.poll() is None, f"node 0 should still wait for a node:\n{node0.stderr}"
    assert stop(node0) != 0
    assert "Traceback" not in node0.stdout + node0.stderr
    assert launcher.survivors() == []


def test_node_rank_already_taken(launcher: Launcher, tmp_path: Path) -> None:
    port = free_port()
    node0 = start(launcher, tmp_path, *nodes_args(port, 3, 0, "--rdzv-conf", "join_timeout=60"), name="node0")
    node1 = start(launcher, tmp_path, *nodes_args(port, 3, 1, "--rdzv-conf", "join_timeout=60"), name="node1")
    # Each agent hears the count its own join made, in whichever order the two joined.
    wait_for(lambda: all(f"{n}/3 joined" in node0.stderr + node1.stderr for n in (1, 2)), 30, "both nodes to join")

    duplicate = start(launcher, tmp_path, *nodes_args(port, 3, 1, "--rdzv-conf", "join_timeout=20"), name="dup")
    code = duplicate.wait(25)
    assert code != 0
    line = duplicate.error_line()
    assert "already taken" in line and re.search(r"\b1\b", line), line  # the rank in question

    assert node0.launch.process.poll() is None and node1.launch.process.poll() is None
    assert stop(node1) != 0
    assert stop(node0) != 0
    assert "Traceback" not in node0.stderr + node1.stderr
    assert launcher.survivors() == []


def test_rdzv_port_in_use(launcher: Launcher, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = start(launcher, tmp_path, *nodes_args(port, 2, 0, "--rdzv-conf", "join_timeout=5"))
        code = run.wait(15)
    assert code != 0
    line = run.error_line()
    assert str(port) in line and "in use" in line
    assert launcher.survivors() == []


def test_a_hard_limit_on_open_files_too_low_for_the_job_is_said_in_one_line(launcher: Launcher,
                                                                              tmp_path: Path) -> None:
    """--nnodes 1:300 needs about 1,456 open files in the coordinator's process; with a hard limit of 1,100 the job
    still runs, and one line on stderr says what to raise and how far the job can grow."""
    out = tmp_path / "out"
    out.mkdir()
    stderr_path = tmp_path / "flashrun.stderr"
    argv = [str(BIN / "flashrun"), "--nnodes", "1:300", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", PROBE,
            str(out)]
    run = Run(launcher.start(["sh", "-c", 'ulimit -n 1100 && exec "$@" 2>"$0"', str(stderr_path), *argv]),
              stderr_path)
    assert run.wait(120) == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr}"
    warnings = [line for line in run.stderr.splitlines() if "descriptor_limit" in line]
    assert len(warnings) == 1, run.stderr
    assert "hard limit is 1100" in warnings[0] and "ulimit -Hn" in warnings[0] and "about 211 nodes" in warnings[0]
    assert (out / "0.json").exists()
    assert launcher.survivors() == []
