"""Real-process helpers for integration tests: free ports, tagged launches, condition waits, orphan hunting.

Every process a test starts carries FLASHRUN_TEST_TAG in its environment (workers inherit it), so teardown can
find and kill whatever survived, and tests can assert that nothing did.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROBES = REPO / "tests" / "probes"
BIN = Path(sys.executable).parent
TAG_VAR = "FLASHRUN_TEST_TAG"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def tagged_pids(tag: str) -> list[int]:
    """PIDs of live processes whose environment carries this tag (zombies excluded)."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat", "rb") as handle:
                state = handle.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z":
            found.append(int(entry))
    return found


class Launch:
    """One `flashrun` (or torchrun) process with its output in a file."""

    def __init__(self, argv: Sequence[str], tag: str, log: Path, env: dict[str, str] | None = None,
                 cwd: Path | None = None) -> None:
        self.log = log
        full_env = {**os.environ, **(env or {}), TAG_VAR: tag, "PYTHONUNBUFFERED": "1"}
        self._out = open(log, "wb")  # noqa: SIM115 - closed in wait/kill
        self.process = subprocess.Popen(
            list(argv), env=full_env, stdin=subprocess.DEVNULL, stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=cwd or REPO,
        )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.process.args[:3]} did not finish in {timeout_s} s; output:\n"
                                 f"{self.output[-4000:]}") from None
        finally:
            self._out.flush()

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self._out.close()


class Launcher:
    """Starts tagged processes for one test and kills every survivor at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.tmp_path = tmp_path
        self.launches: list[Launch] = []

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None, name: str = "") -> Launch:
        log = self.tmp_path / f"{name or 'launch'}-{len(self.launches)}.log"
        launch = Launch(argv, self.tag, log, env)
        self.launches.append(launch)
        return launch

    def flashrun(self, *args: str, env: dict[str, str] | None = None, name: str = "flashrun") -> Launch:
        return self.start([str(BIN / "flashrun"), *args], env=env, name=name)

    def survivors(self) -> list[int]:
        return tagged_pids(self.tag)

    def cleanup(self) -> None:
        for launch in self.launches:
            launch.kill()
        for pid in self.survivors():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def events(logs: Path) -> list[dict]:
    """The job's event log (<log-dir>/events.jsonl) so far; empty before it exists."""
    path = logs / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def named(logs: Path, name: str) -> list[dict]:
    return [event for event in events(logs) if event["event"] == name]


class CountingStore:
    """Forwards to a real TCPStore client, counting the operations each call issues (by method name)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.ops: collections.Counter[str] = collections.Counter()
        self.host, self.port = store.host, store.port

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.ops[name] += 1
            return method(*args, **kwargs)

        return counted
