"""Drivers of the job view: a rich live panel under the scrolling logs in a terminal, plain lines elsewhere.

The panel is redrawn by its own daemon thread; snapshots are fetched by another, so a slow or vanished coordinator
never delays the redraw. While the panel is live, worker lines and the launcher's own messages are queued (never
blocking a writer) and written above the panel in one batch per redraw.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.segment import Segment
from rich.text import Text

from flashrun.agent import output
from flashrun.view.events import QUIET_EVENTS, event_line
from flashrun.view.render import render, status_line

REFRESH_PER_S = 4.0
"""Redraws of the live panel per second; worker output waits at most one interval to scroll above it."""
LOCAL_POLL_S = 0.25
"""Between snapshots taken from a coordinator in this process (cheap: no network)."""
REMOTE_POLL_S = 1.0
"""Between snapshots fetched over gRPC from a coordinator elsewhere (`flashrun status`, other nodes)."""
PLAIN_STATUS_EVERY_S = 30.0
"""Without a terminal, how often one status line is written (besides one line per event)."""
LOG_ROWS = 10
"""Terminal rows the launcher's panel leaves for the scrolling worker output above it."""
MIN_PANEL_ROWS = 6
"""The panel keeps at least this many rows, however short the terminal."""
VIEW_MAX_RANKS = 256
"""Ranks a view asks the coordinator for: more than any terminal shows; big jobs send only the lagging ones."""
MAX_PENDING_BYTES = 16 << 20
"""Worker output queued for the terminal beyond this is dropped from the console (files keep it), so a worker
that writes faster than the terminal can show is never slowed and the launcher's memory stays bounded."""
STOP_JOIN_S = 2.0
"""How long stopping the view waits for its threads."""
ATTACH_POLL_S = 0.25
"""Between snapshots an attached `flashrun status` fetches (often enough to catch the job's final state)."""
ATTACH_CHECK_S = 0.25
"""How often an attached `flashrun status` checks whether the job has ended."""
ATTACH_GONE_S = 3.0
"""An attached `flashrun status` gives up this long after the coordinator that answered it stopped answering."""
FINAL_PHASES = frozenset({"succeeded", "failed"})
FINAL_SNAPSHOT_WAIT_S = 1.0
"""When the launcher stops, how long its last frame waits for a snapshot of the finished job (the coordinator may
answer from a cache a moment old); a launcher stopped by a signal spends this much extra at most."""
FINAL_SNAPSHOT_POLL_S = 0.05

Snapshot = Mapping[str, Any]
SnapshotSource = Callable[[], Snapshot]


def is_live_terminal(console: Console) -> bool:
    return console.is_terminal and not console.is_dumb_terminal


class SnapshotPoller:
    """Calls `source` every `interval_s` in a daemon thread and keeps the latest snapshot, or why there is none."""

    def __init__(self, source: SnapshotSource, interval_s: float) -> None:
        self._source = source
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._snapshot: Snapshot | None = None
        self._error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashrun-view-poll", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_JOIN_S)

    def latest(self) -> tuple[Snapshot | None, str | None]:
        with self._lock:
            return self._snapshot, self._error

    def poll(self) -> None:
        try:
            snapshot, error = self._source(), None
        except Exception as err:  # noqa: BLE001 - a view must survive whatever the coordinator does
            snapshot, error = None, f"no status: {' '.join(str(err).split()) or type(err).__name__}"
        with self._lock:
            if snapshot is not None:
                self._snapshot = snapshot
            self._error = error

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._interval_s)


class PendingOutput:
    """Console lines waiting for the next redraw. `put` never blocks on the terminal."""

    def __init__(self, limit_bytes: int = MAX_PENDING_BYTES) -> None:
        self._lock = threading.Lock()
        self._chunks: list[bytes] = []
        self._bytes = 0
        self._dropped = 0
        self._limit = limit_bytes

    def put(self, data: bytes) -> None:
        with self._lock:
            if self._bytes + len(data) > self._limit:
                self._dropped += 1
                return
            self._chunks.append(data)
            self._bytes += len(data)

    def drain(self) -> str:
        with self._lock:
            chunks, dropped = self._chunks, self._dropped
            self._chunks, self._bytes, self._dropped = [], 0, 0
        text = b"".join(chunks).decode("utf-8", errors="replace")
        if dropped:
            text += (f"flashrun: {dropped} lines of output came faster than the terminal could show them and were "
                     "left off the console (per-rank files under --log-dir keep everything)\n")
        return text


class TerminalCapture:
    """Takes the terminal away from everything but the panel while it is live.

    The process's stdout (and stderr, when it is the same kind of terminal) become one pipe read by a thread into
    the pending output: Python prints, C libraries' logs and children that inherited the descriptors (the zygote)
    all scroll above the panel instead of through it. The panel draws on a duplicate of the original stdout.
    """

    def __init__(self, pending: PendingOutput, fds: tuple[int, ...]) -> None:
        self._pending = pending
        self.fds = fds
        self._saved: dict[int, int] = {}
        self._reader: threading.Thread | None = None
        self.terminal: TextIO | None = None

    def start(self) -> TextIO:
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        self.terminal = open(os.dup(1), "w", encoding="utf-8", errors="replace", closefd=True)  # noqa: SIM115
        read_fd, write_fd = os.pipe()
        for fd in self.fds:
            self._saved[fd] = os.dup(fd)
            os.dup2(write_fd, fd)
        os.close(write_fd)
        self._reader = threading.Thread(target=self._read, args=(read_fd,), name="flashrun-view-capture",
                                        daemon=True)
        self._reader.start()
        return self.terminal

    def _read(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as pipe:
            for line in iter(pipe.readline, b""):
                self._pending.put(line if line.endswith(b"\n") else line + b"\n")

    def stop(self) -> None:
        """Give the descriptors back; what is still in the pipe follows into the pending output."""
        for stream in (sys.stdout, sys.stderr):
            _flush(stream)
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)
            os.close(saved)
        self._saved.clear()
        if self._reader is not None:
            # EOF comes once no process holds the pipe; one that inherited it (a lingering child) is not waited for.
            self._reader.join(STOP_JOIN_S)
        if self.terminal is not None:
            self.terminal.close()


def _flush(stream: TextIO) -> None:
    with contextlib.suppress(OSError, ValueError):
        stream.flush()


class _Raw:
    """Already formatted output (worker lines) written as is: no wrapping, cropping or markup."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Segment(self.text)


def _waiting(error: str | None) -> Text:
    text = Text("flashrun: waiting for the coordinator's first status", style="bold")
    if error:
        text.append(f"  {error}", style="red")
    return text


class LiveView:
    """The rich panel, redrawn REFRESH_PER_S times a second from the latest snapshot.

    With `capture_output`, worker lines (via `flashrun.agent.output.route_console`) and whatever this process
    prints to the terminal scroll above the panel; without it (an attached `flashrun status`) the panel is all.
    """

    def __init__(self, source: SnapshotSource, poll_s: float, *, capture_output: bool = True,
                 console: Console | None = None, log_rows: int = LOG_ROWS, refresh_per_s: float = REFRESH_PER_S,
                 fresh_on_stop: bool = False, capture_fds: tuple[int, ...] | None = None) -> None:
        self._pending = PendingOutput()
        self._capture: TerminalCapture | None = None
        if capture_output:
            fds = capture_fds if capture_fds is not None else (1, 2) if _is_tty(2) else (1,)
            self._capture = TerminalCapture(self._pending, fds)
        self.console = console
        self._source = source
        self._poller = SnapshotPoller(source, poll_s)
        self._log_rows = log_rows
        self._interval_s = 1.0 / refresh_per_s
        self._fresh_on_stop = fresh_on_stop
        self._live: Live | None = None
        self._measure_terminal = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashrun-view", daemon=True)
        self.last_snapshot: Snapshot | None = None

    # Life cycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._measure_terminal = self.console is None
        if self._capture is not None:
            terminal = self._capture.start()
            self.console = self.console or Console(file=terminal)
            output.route_console(self._route)
        self.console = self.console or Console()
        self._live = Live(console=self.console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False,
                          vertical_overflow="crop")
        self._poller.start()
        self._live.start()
        self._thread.start()

    def stop(self) -> None:
        """Final frame (fresh snapshot when cheap), cursor shown again, terminal given back. Never raises."""
        self._stop.set()
        self._thread.join(STOP_JOIN_S)
        self._poller.stop()
        try:
            if self._fresh_on_stop:
                self._final_poll()
            self._frame()
        except Exception:  # noqa: BLE001, S110 - the job's result matters more than its last frame
            pass
        finally:
            try:
                if self._live is not None:
                    self._live.stop()
            except (OSError, ValueError):
                pass  # the terminal is gone (a hangup): nothing left to draw on
            finally:
                self._release_terminal()

    def _final_poll(self) -> None:
        deadline = time.monotonic() + FINAL_SNAPSHOT_WAIT_S
        while True:
            self._poller.poll()
            snapshot, _ = self._poller.latest()
            if (snapshot is not None and snapshot.get("phase") in FINAL_PHASES) or time.monotonic() >= deadline:
                return
            time.sleep(FINAL_SNAPSHOT_POLL_S)

    def latest(self) -> tuple[Snapshot | None, str | None]:
        """The latest snapshot and, if the last fetch failed, why."""
        return self._poller.latest()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until stopped from another thread or `timeout_s`; True if stopped."""
        return self._stop.wait(timeout_s)

    def on_event(self, record: Mapping[str, Any]) -> None:
        """Events scroll above the panel like the launcher's other messages (the panel lists the latest)."""
        if record.get("event") not in QUIET_EVENTS:
            self._pending.put(f"flashrun: {event_line(record)}\n".encode())

    # Terminal ---------------------------------------------------------------------------------------------------

    def _route(self, stream: BinaryIO, data: bytes) -> bool:
        """Worker lines bound for a captured descriptor skip the pipe: straight into the pending output."""
        try:
            fd = stream.fileno()
        except (OSError, ValueError, AttributeError):
            return False
        if self._capture is None or fd not in self._capture.fds:
            return False
        self._pending.put(data)
        return True

    def _release_terminal(self) -> None:
        if self._capture is None:
            return
        output.route_console(None)
        self._capture.stop()
        leftover = self._pending.drain()  # what arrived after the final frame
        if leftover:
            with contextlib.suppress(OSError, ValueError):
                sys.stdout.write(leftover)
                sys.stdout.flush()

    # Frames -----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._frame()
            except Exception:  # noqa: BLE001 - keep the job's output flowing even if a frame fails
                self._write_through(self._pending.drain())

    def _frame(self) -> None:
        assert self.console is not None and self._live is not None
        text = self._pending.drain()
        snapshot, error = self._poller.latest()
        self.last_snapshot = snapshot
        if self._measure_terminal and self._capture is not None and self._capture.terminal is not None:
            # stdout and stderr are the capture pipe now: rich would not find the terminal's size through them.
            with contextlib.suppress(OSError, ValueError):
                self.console.size = os.get_terminal_size(self._capture.terminal.fileno())
        width, height = self.console.size
        rows = height - self._log_rows if self._capture is not None else height - 1
        panel = render(snapshot, time.time(), width, max(MIN_PANEL_ROWS, rows), error) if snapshot else \
            _waiting(error)
        # Buffered into one write, so the terminal never shows a half-drawn frame: the new panel is set, then the
        # live hook erases it, the lines scroll out above, and the panel follows them.
        with self.console:
            self._live.update(panel, refresh=True)
            if text:
                self.console.print(_Raw(text), crop=False, soft_wrap=True)

    def _write_through(self, text: str) -> None:
        if text and self.console is not None:
            with contextlib.suppress(OSError, ValueError):
                self.console.file.write(text)
                self.console.file.flush()


def attach(source: SnapshotSource, console: Console | None = None) -> str:
    """`flashrun status` in a terminal: the panel alone, fetched from the coordinator, until the job ends, the
    coordinator stops answering, or Ctrl-C. Returns why it ended."""
    view = LiveView(source, ATTACH_POLL_S, capture_output=False, console=console)
    view.start()
    silent_since: float | None = None
    reason = "stopped watching"
    try:
        while not view.wait(ATTACH_CHECK_S):
            snapshot, error = view.latest()
            if snapshot is not None and snapshot.get("phase") in FINAL_PHASES:
                reason = f"the job {snapshot['phase']}"
                break
            if error is None:
                silent_since = None
            elif silent_since is None:
                silent_since = time.monotonic()
            elif snapshot is not None and time.monotonic() - silent_since >= ATTACH_GONE_S:
                reason = "the coordinator stopped answering: the job has ended or its launcher is gone"
                break
    except KeyboardInterrupt:
        pass  # the user is done watching; the job goes on
    finally:
        view.stop()
    return reason


def print_once(snapshot: Snapshot, console: Console | None = None) -> None:
    console = console or Console()
    width, height = console.size
    console.print(render(snapshot, time.time(), width, max(MIN_PANEL_ROWS, height - 1)))


def _is_tty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class PlainView:
    """No terminal (Slurm logs, CI): one line per event as it happens, and a status line every so often."""

    def __init__(self, source: SnapshotSource, write: Callable[[str], None] | None = None,
                 every_s: float = PLAIN_STATUS_EVERY_S) -> None:
        self._source = source
        self._write = write or _say
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashrun-view-plain", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(STOP_JOIN_S)

    def on_event(self, record: Mapping[str, Any]) -> None:
        if record.get("event") not in QUIET_EVENTS:
            self._write(event_line(record))

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            try:
                self._write(status_line(self._source()))
            except Exception:  # noqa: BLE001, S112 - no status this time; the job goes on
                continue


def _say(line: str) -> None:
    stream = sys.stderr
    try:
        stream.write(f"flashrun: {line}\n")
        stream.flush()
    except (OSError, ValueError):
        pass
