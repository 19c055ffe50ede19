"""The worker's connection to its agent: a gRPC stream over a Unix socket carrying heartbeats.

Started when a script imports flashrun under the flashrun launcher (the agent sets FLASHRUN_AGENT_SOCKET); a no-op
anywhere else, so the same script runs under torchrun or plain python.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import gc
import io
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator

from flashrun.config import Detection

AGENT_SOCKET_ENV = "FLASHRUN_AGENT_SOCKET"
HEARTBEAT_INTERVAL_ENV = "FLASHRUN_HEARTBEAT_INTERVAL"
EXIT_BEAT_S = 0.02
"""At interpreter exit, how long the last heartbeat (saying "finished") gets to leave."""
REPLACEMENT_ENV = "FLASHRUN_REPLACEMENT"
"""Set (to the spawn's Unix time) on a worker started in place of a failed one: it must fetch state from a replica."""


class AgentLink:
    def __init__(self, socket_path: str, interval_s: float, local_rank: int) -> None:
        # Set before gRPC loads: a script that forks (DataLoader workers) must not run gRPC's fork handlers.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        import grpc

        from flashrun._proto import flashrun_pb2 as pb
        from flashrun._proto import flashrun_pb2_grpc as pb_grpc

        self._pb = pb
        self._interval_s = interval_s
        self._local_rank = local_rank
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._urgent = False
        self.on_command: Callable[[int], None] | None = None
        self._early_commands: list[int] = []
        self._handler_lock = threading.Lock()
        self._awaiting: int | None = None
        """The generation whose barrier this worker waits at, told to the agent in every beat until released."""
        self._released = threading.Condition()
        self._releases: dict[int, tuple[str, str]] = {}
        self._channel = grpc.insecure_channel(f"unix:{socket_path}")
        self._stub = pb_grpc.WorkerChannelStub(self._channel)
        self._thread = threading.Thread(target=self._run, name="flashrun-heartbeat", daemon=True)
        self._thread.start()

    def _beats(self) -> Iterator[object]:
        from flashrun.worker.progress import progress

        pid = os.getpid()
        while True:
            report = progress.recovery
            urgent, self._urgent = self._urgent, False
            awaiting = self._awaiting
            yield self._pb.WorkerBeat(urgent=urgent,
                awaiting=self._pb.Arrival(generation=awaiting) if awaiting is not None else None,
                local_rank=self._local_rank, generation=progress.generation, pid=pid, step=progress.step,
                in_collective=bool(progress.collective), collective=progress.collective,
                collective_seq=progress.collective_seq, recoverable=progress.recoverable, finished=progress.finished,
                recovery=self._pb.Recovery(**dataclasses.asdict(report)) if report else None,
            )
            self._wake.wait(self._interval_s)
            self._wake.clear()
            if self._closed.is_set():
                return

    def _run(self) -> None:
        import grpc

        from flashrun.worker import drills

        try:
            for command in self._stub.Attach(self._beats(), wait_for_ready=True):
                if command.HasField("fault"):
                    drills.arm(command.fault.kind, command.fault.at_step)
                    continue  # a drill moves no generation
                if command.HasField("release"):
                    with self._released:
                        release = command.release
                        self._releases[release.generation] = (release.outcome, release.detail)
                        self._released.notify_all()
                    continue
                with self._handler_lock:
                    handler = self.on_command
                    if handler is None:
                        self._early_commands.append(command.generation)
                if handler is not None:
                    handler(command.generation)
        except grpc.RpcError:
            pass  # the agent is gone; it takes this process down with it (PR_SET_PDEATHSIG)

    def set_command_handler(self, handler: Callable[[int], None]) -> None:
        """`handler(generation)` runs on the link's thread for each new generation the coordinator commands."""
        with self._handler_lock:
            self.on_command = handler
            early, self._early_commands = self._early_commands, []
        for generation in early:
            handler(generation)

    def await_release(self, generation: int, timeout_s: float) -> tuple[str, str] | None:
        """Arrive at `generation`'s barrier through the agent (which arrives once for the whole node) and wait for
        its outcome: (outcome, detail) as flashrun/agent/node_barrier.py names them, or None after `timeout_s`."""
        with self._released:
            self._awaiting = generation
        self.beat_now()
        try:
            with self._released:
                if self._released.wait_for(lambda: generation in self._releases, timeout_s):
                    return self._releases.pop(generation)
                return None
        finally:
            self._awaiting = None

    def beat_now(self, urgent: bool = False) -> None:
        """Send a heartbeat now; an urgent one the agent forwards to the coordinator at once."""
        self._urgent = self._urgent or urgent
        self._wake.set()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()


_link: AgentLink | None = None


def attach_if_launched() -> AgentLink | None:
    """Connect to the agent once, when this process is a flashrun worker."""
    global _link
    socket_path = os.environ.get(AGENT_SOCKET_ENV)
    if _link is None and socket_path:
        from flashrun.worker.collectives import track_collectives

        track_collectives()
        _link = AgentLink(
            socket_path, float(os.environ.get(HEARTBEAT_INTERVAL_ENV, Detection.heartbeat_interval_s)),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
        atexit.register(_exiting)
        sys.excepthook = _note_crash
    return _link


def beat_now() -> None:
    """Report progress the coordinator is waiting for (a recovery's end, its first step) without delay."""
    if _link is not None:
        _link.beat_now(urgent=True)


def mark_finished() -> None:
    """Tell the agent at once that silence from here on is a shutdown, not a hang."""
    from flashrun.worker.progress import progress

    progress.finished = True
    if _link is not None:
        _link.beat_now()


def _exiting() -> None:
    if _crashed_by is None:
        mark_finished()
        time.sleep(EXIT_BEAT_S)  # let that last beat leave before the interpreter stops its threads
    elif not issubclass(_crashed_by, KeyboardInterrupt):  # Python ends that one by SIGINT: leave it so
        _exit_after_crash()
    # After an uncaught exception the agent reports the exit itself, not a quiet shutdown.


_crashed_by: type[BaseException] | None = None
"""The uncaught exception's type, once one ended the script."""
UNCAUGHT_EXCEPTION_EXIT_CODE = 1
"""What Python itself exits with after an uncaught exception."""


def _note_crash(kind: type[BaseException], value: BaseException, traceback: object) -> None:
    # Only noted here: torch.distributed wraps sys.excepthook (to prefix "[rankN]:") and writes what this hook
    # prints after it returns, so the process must not end inside it.
    global _crashed_by
    _crashed_by = kind
    _previous_excepthook(kind, value, traceback)  # type: ignore[arg-type]


def _exit_after_crash() -> None:
    """End a crashed worker once the exit handlers registered after `import flashrun` have run.

    Finalising the interpreter would tear torch's C++ objects down under threads that still use them (gloo, DDP):
    that sometimes ended in std::terminate, a SIGABRT instead of Python's exit code 1 (seen in CI). Handlers
    registered before `import flashrun` are skipped.
    """
    _flush_open_files()
    os._exit(UNCAUGHT_EXCEPTION_EXIT_CODE)


def _flush_open_files() -> None:
    """What finalisation would have written: the buffers of every file object still open (logs, metrics)."""
    files = [obj for obj in gc.get_objects() if isinstance(obj, io.IOBase)]
    for handle in [*files, sys.stdout, sys.stderr]:  # the console last, so that it gets what the others said
        with contextlib.suppress(Exception):  # closed, read-only or broken: there is nothing to save in it
            if not handle.closed:
                handle.flush()


_previous_excepthook = sys.excepthook
