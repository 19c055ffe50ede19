"""Drivers of the job view: a rich live panel under the scrolling logs in a terminal, plain lines elsewhere.

The panel is redrawn by its own daemon thread; snapshots are fetched by another, so a slow or vanished coordinator
never delays the redraw. While the panel is live, worker lines and the launcher's own messages are queued (never
blocking a writer) and written above the panel in one batch per redraw.
"""

from __future__ import annotations

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


class _LineWriter:
    """Stands in for sys.stdout/sys.stderr while the panel is live: whole lines go to the pending output."""

    def __init__(self, real: TextIO, pending: PendingOutput) -> None:
        self._real = real
        self._pending = pending
        self._lock = threading.Lock()
        self._partial = ""

    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            if "\n" in self._partial:
                lines, _, self._partial = self._partial.rpartition("\n")
                self._pending.put((lines + "\n").encode("utf-8", errors="replace"))
        return len(text)

    def flush(self) -> None:
        pass  # written at the next redraw

    def finish(self) -> None:
        with self._lock:
            if self._partial:
                self._pending.put((self._partial + "\n").encode("utf-8", errors="replace"))
                self._partial = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)  # fileno, isatty, encoding, buffer (the pumps' direct stream)


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
                 fresh_on_stop: bool = False) -> None:
        self._stdout, self._stderr = sys.stdout, sys.stderr
        self.console = console or Console(file=self._stdout)
        self._source = source
        self._poller = SnapshotPoller(source, poll_s)
        self._capture = capture_output
        self._log_rows = log_rows
        self._interval_s = 1.0 / refresh_per_s
        self._fresh_on_stop = fresh_on_stop
        self._pending = PendingOutput()
        self._writers: list[_LineWriter] = []
        self._routed: set[int] = set()
        self._live = Live(console=self.console, auto_refresh=False, redirect_stdout=False, redirect_stderr=False,
                          vertical_overflow="crop")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flashrun-view", daemon=True)
        self.last_snapshot: Snapshot | None = None

    # Life cycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._capture:
            self._capture_streams()
        self._poller.start()
        self._live.start()
        self._thread.start()

    def stop(self) -> None:
        """Final frame (fresh snapshot when cheap), cursor shown again, streams given back. Never raises."""
        self._stop.set()
        self._thread.join(STOP_JOIN_S)
        self._poller.stop()
        try:
            if self._fresh_on_stop:
                self._poller.poll()
            for writer in self._writers:
                writer.finish()
            self._frame()
        except Exception:  # noqa: BLE001, S110 - the job's result matters more than its last frame
            pass
        finally:
            try:
                self._live.stop()
            finally:
                self._release_streams()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Until stopped from another thread or `timeout_s`; True if stopped."""
        return self._stop.wait(timeout_s)

    def on_event(self, record: Mapping[str, Any]) -> None:
        """Events scroll above the panel like the launcher's other messages (the panel lists the latest)."""
        if record.get("event") not in QUIET_EVENTS:
            self._pending.put(f"flashrun: {event_line(record)}\n".encode())

    # Streams ----------------------------------------------------------------------------------------------------

    def _capture_streams(self) -> None:
        self._routed = {id(self._stdout.buffer)}
        sys.stdout = self._writer(self._stdout)  # type: ignore[assignment]
        if _is_tty(self._stderr):
            self._routed.add(id(self._stderr.buffer))
            sys.stderr = self._writer(self._stderr)  # type: ignore[assignment]
        output.route_console(self._route)

    def _writer(self, real: TextIO) -> _LineWriter:
        writer = _LineWriter(real, self._pending)
        self._writers.append(writer)
        return writer

    def _route(self, stream: BinaryIO, data: bytes) -> bool:
        if id(stream) not in self._routed:
            return False
        self._pending.put(data)
        return True

    def _release_streams(self) -> None:
        if not self._capture:
            return
        output.route_console(None)
        sys.stdout, sys.stderr = self._stdout, self._stderr
        for writer in self._writers:
            writer.finish()
        leftover = self._pending.drain()  # what arrived after the final frame
        if leftover:
            self._stdout.write(leftover)
            self._stdout.flush()

    # Frames -----------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._frame()
            except Exception:  # noqa: BLE001 - keep the job's output flowing even if a frame fails
                self._write_through(self._pending.drain())

    def _frame(self) -> None:
        text = self._pending.drain()
        snapshot, error = self._poller.latest()
        self.last_snapshot = snapshot
        width, height = self.console.size
        rows = height - self._log_rows if self._capture else height - 1
        panel = render(snapshot, time.time(), width, max(MIN_PANEL_ROWS, rows), error) if snapshot else \
            _waiting(error)
        # Buffered into one write, so the terminal never shows a half-drawn frame: the new panel is set, then the
        # live hook erases it, the lines scroll out above, and the panel follows them.
        with self.console:
            self._live.update(panel, refresh=True)
            if text:
                self.console.print(_Raw(text), crop=False, soft_wrap=True)

    def _write_through(self, text: str) -> None:
        if text:
            try:
                self._stdout.write(text)
                self._stdout.flush()
            except (OSError, ValueError):
                pass


def _is_tty(stream: TextIO) -> bool:
    try:
        return os.isatty(stream.fileno())
    except (OSError, ValueError, AttributeError):
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
