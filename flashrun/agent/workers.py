"""Starting, watching and stopping one node's worker processes.

Each worker leads its own process group (so a stop reaches everything it started) and is told by the kernel to
die if the agent dies (PR_SET_PDEATHSIG), so no worker outlives its agent even after a SIGKILL. A thread per
worker blocks in the OS wait and reports the exit the moment it happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from flashrun import descriptors
from flashrun.agent.output import OutputPolicy, StreamPump
from flashrun.agent.prewarm import Zygote

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def die_with_agent() -> None:
    # Runs in the child between fork and exec: only async-signal-safe work, no Python objects created.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class ExitReport:
    generation: int
    local_rank: int
    exit_code: int
    timestamp: float
    error_message: str = ""
    traceback: str = ""
    pid: int = 0


def read_error_file(path: str) -> tuple[str, str]:
    """(message, traceback) from torch elastic's error file format, or empty strings."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return "", ""
    message = data.get("message", "") if isinstance(data, dict) else ""
    if isinstance(message, dict):
        extra = message.get("extraInfo") or {}
        return str(message.get("message", "")), str(extra.get("py_callstack", ""))
    return str(message), ""


@dataclasses.dataclass
class _Worker:
    local_rank: int
    process: subprocess.Popen[bytes]
    error_file: str
    pumps: list[StreamPump]
    exited: threading.Event
    retired: bool = False
    """Replaced on purpose: its exit is expected and not reported."""


class WorkerGroup:
    """This node's workers. `generation` moves on with every in-place recovery; replaced workers are retired."""

    def __init__(self, generation: int, on_exit: Callable[[ExitReport], None]) -> None:
        self.generation = generation
        self._on_exit = on_exit
        self._workers: list[_Worker] = []

    @property
    def _current(self) -> list[_Worker]:
        return [worker for worker in self._workers if not worker.retired]

    @property
    def pids_by_local_rank(self) -> dict[int, int]:
        return {worker.local_rank: worker.process.pid for worker in self._current}

    def retire(self, local_ranks: Sequence[int], kill_wait_s: float) -> set[int]:
        """SIGKILL these workers (to be replaced) and wait for them to go; returns their PIDs."""
        doomed = [worker for worker in self._current if worker.local_rank in local_ranks]
        for worker in doomed:
            worker.retired = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signal.SIGKILL)
        deadline = time.monotonic() + kill_wait_s
        for worker in doomed:
            worker.exited.wait(max(0.0, deadline - time.monotonic()))
        return {worker.process.pid for worker in doomed}

    def kill(self, local_ranks: Sequence[int]) -> None:
        """SIGKILL these workers' process groups now: they were found hung or frozen and will not heed SIGTERM."""
        for worker in self._current:
            if worker.local_rank in local_ranks and not worker.exited.is_set():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(worker.process.pid, signal.SIGKILL)

    def spawn(
        self, local_rank: int, argv: Sequence[str], env: Mapping[str, str], policy: OutputPolicy, error_file: str,
        zygote: Zygote | None = None,
    ) -> bool:
        """Start one worker, forked from `zygote` when given and able; returns whether it was.

        Must be called from a thread that lives as long as the worker: PDEATHSIG follows the spawning thread.
        """
        files_dir = os.path.dirname(error_file) if policy.log_dir else None
        os.makedirs(os.path.dirname(error_file), exist_ok=True)
        forked = zygote.spawn(argv, env, os.getcwd()) if zygote is not None else None
        process = forked or subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=die_with_agent,
        )
        if forked is None:
            descriptors.restore_inherited(process.pid)
        pumps = [
            StreamPump(
                process.stdout, sys.stdout.buffer if policy.console("stdout") else None, policy.prefix,  # type: ignore[arg-type]
                os.path.join(files_dir, "stdout.log") if files_dir else None,
            ),
            StreamPump(
                process.stderr, sys.stderr.buffer if policy.console("stderr") else None, policy.prefix,  # type: ignore[arg-type]
                os.path.join(files_dir, "stderr.log") if files_dir else None,
            ),
        ]
        worker = _Worker(local_rank, process, error_file, pumps, threading.Event())  # type: ignore[arg-type]
        self._workers.append(worker)
        threading.Thread(target=self._watch, args=(worker,), name=f"flashrun-wait-{local_rank}", daemon=True).start()
        return forked is not None

    def _watch(self, worker: _Worker) -> None:
        code = worker.process.wait()
        timestamp = time.time()
        message, traceback = read_error_file(worker.error_file) if code != 0 else ("", "")
        worker.exited.set()
        if not worker.retired:
            self._on_exit(ExitReport(self.generation, worker.local_rank, code, timestamp, message, traceback,
                                     worker.process.pid))

    def stop(self, first_signal: int, grace_s: float, kill_wait_s: float, output_wait_s: float) -> list[int]:
        """Signal every worker's process group, SIGKILL what is left after `grace_s`; return surviving PIDs."""
        self._signal_groups(first_signal, only_running=True)
        if not self._wait_all(grace_s):
            self._signal_groups(signal.SIGKILL, only_running=True)
            self._wait_all(kill_wait_s)
        # Children a worker left in its group would otherwise outlive it.
        self._signal_groups(signal.SIGKILL, only_running=False)
        for worker in self._workers:
            for pump in worker.pumps:
                pump.join(output_wait_s)
        return [worker.process.pid for worker in self._workers if not worker.exited.is_set()]

    def _signal_groups(self, signum: int, only_running: bool) -> None:
        for worker in self._workers:
            if only_running and worker.exited.is_set():
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signum)

    def _wait_all(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        return all(worker.exited.wait(max(0.0, deadline - time.monotonic())) for worker in self._workers)
