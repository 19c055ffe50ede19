"""Worker stdout/stderr: prefixed on the console, kept per rank and attempt under --log-dir."""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable
from typing import BinaryIO

from flashrun.config import StdSpec

_console_lock = threading.Lock()  # whole lines from different workers must not interleave

ConsoleRoute = Callable[[BinaryIO, bytes], bool]
"""Takes one prefixed console line meant for a stream; returns False to have it written to the stream as usual."""
_console_route: ConsoleRoute | None = None


def route_console(route: ConsoleRoute | None) -> None:
    """While a live view owns the terminal, worker lines go to `route` (queued for its next redraw) instead of
    straight to the terminal, where they would garble the panel; None restores direct writes."""
    global _console_route
    _console_route = route


@dataclasses.dataclass(frozen=True)
class OutputPolicy:
    """Where one worker's streams go, resolved from --redirects/--tee/--local-ranks-filter/--log-dir."""

    prefix: bytes
    log_dir: str | None
    redirect: StdSpec
    tee: StdSpec
    on_console: bool

    def console(self, stream: str) -> bool:
        return self.on_console and not getattr(self.redirect, stream)


def attempt_dir(log_root: str, generation: int, rank: int) -> str:
    return os.path.join(log_root, f"attempt_{generation}", str(rank))


class StreamPump:
    """Copies one pipe line by line to the console and/or a file until EOF, in its own thread."""

    def __init__(self, pipe: BinaryIO, console: BinaryIO | None, prefix: bytes, file_path: str | None) -> None:
        self._pipe = pipe
        self._console = console
        self._prefix = prefix
        self._file = open(file_path, "ab") if file_path else None  # noqa: SIM115 - closed by the pump thread
        self._thread = threading.Thread(target=self._run, name="flashrun-output", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for line in iter(self._pipe.readline, b""):
                if self._file is not None:
                    self._file.write(line)
                    self._file.flush()
                if self._console is not None:
                    if not line.endswith(b"\n"):
                        line += b"\n"
                    route = _console_route
                    if route is not None and route(self._console, self._prefix + line):
                        continue
                    with _console_lock:
                        self._console.write(self._prefix + line)
                        self._console.flush()
        except (OSError, ValueError):
            pass  # the console went away; the worker's exit is what matters
        finally:
            self._pipe.close()
            if self._file is not None:
                self._file.close()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
