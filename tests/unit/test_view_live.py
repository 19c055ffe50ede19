"""The view drivers on a recorded console: worker lines scroll above the panel, failures of the source are shown
and survived, the terminal is given back intact; the plain mode's lines."""

from __future__ import annotations

import contextlib
import io
import os
from typing import Any

from rich.console import Console

from flashrun.agent import output
from flashrun.agent.output import StreamPump
from flashrun.view.live import LiveView, PendingOutput, PlainView
from tests.helpers import wait_for
from tests.unit.test_view_render import RUN_ID, recovery_events, snapshot

SHOW_CURSOR = "\x1b[?25h"


def terminal(width: int = 120, height: int = 40) -> tuple[Console, io.StringIO]:
    file = io.StringIO()
    return Console(file=file, width=width, height=height, force_terminal=True, color_system=None), file


def pump_line(fd: int, line: bytes) -> None:
    """One worker line through a real StreamPump bound for descriptor `fd`, as the agent wires it."""
    read_fd, write_fd = os.pipe()
    with open(fd, "wb", closefd=False) as console_stream:
        pump = StreamPump(os.fdopen(read_fd, "rb"), console_stream, b"[rank3]:", None)  # type: ignore[arg-type]
        with os.fdopen(write_fd, "wb") as pipe:
            pipe.write(line)
        pump.join(10)


def same_file(fd: int, stat: os.stat_result) -> bool:
    now = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (stat.st_dev, stat.st_ino)


def test_worker_lines_and_direct_writes_scroll_above_the_panel() -> None:
    console, screen = terminal()
    stdout_before = os.fstat(1)
    view = LiveView(lambda: snapshot(), 0.01, console=console, fresh_on_stop=True, capture_fds=(1,))
    view.start()
    try:
        pump_line(1, b"step 7 loss 0.5\n")
        os.write(1, b"a write by a child or a C library\n")  # what the zygote's inherited stdout would do
        view.on_event(recovery_events()[2])
        wait_for(lambda: "a write by a child" in screen.getvalue(), 10, "the direct write to reach the console")
    finally:
        view.stop()
    drawn = screen.getvalue()
    assert "[rank3]:step 7 loss 0.5\n" in drawn
    assert "a write by a child or a C library\n" in drawn
    assert "flashrun: [gen 0] failure crash: rank 2" in drawn
    final_panel = drawn.rindex(f"flashrun  run {RUN_ID}")
    assert drawn.rindex("a write by a child") < final_panel, "the final panel is drawn below the output"
    assert "recovered in 1.79s" in drawn[final_panel:]
    assert drawn.endswith(SHOW_CURSOR), "the cursor is shown again"
    assert same_file(1, stdout_before), "stdout is given back"
    assert output._console_route is None


def test_uncaptured_descriptors_are_left_alone() -> None:
    console, _ = terminal()
    read_fd, write_fd = os.pipe()
    try:
        view = LiveView(lambda: snapshot(), 0.01, console=console, capture_fds=(1,))
        view.start()
        try:
            pump_line(write_fd, b"to another stream\n")
        finally:
            view.stop()
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            assert pipe.read() == b"[rank3]:to another stream\n"
    finally:
        with contextlib.suppress(OSError):
            os.close(write_fd)


def test_a_failing_source_is_shown_not_raised() -> None:
    calls: list[int] = []

    def source() -> dict[str, Any]:
        calls.append(1)
        if len(calls) > 1:
            raise ConnectionError("the coordinator went away")
        return snapshot()

    console, screen = terminal()
    view = LiveView(source, 0.01, console=console, capture_output=False, fresh_on_stop=True)
    view.start()
    wait_for(lambda: len(calls) > 2, 10, "the poller to call the failing source again")
    view.stop()
    drawn = screen.getvalue()
    final_panel = drawn.rindex(f"flashrun  run {RUN_ID}")
    assert "no status: the coordinator went away" in drawn[final_panel:]
    assert drawn.endswith(SHOW_CURSOR)


def test_without_a_first_snapshot_the_panel_says_it_waits() -> None:
    def source() -> dict[str, Any]:
        raise TimeoutError("no answer")

    console, screen = terminal()
    view = LiveView(source, 0.01, console=console, capture_output=False, fresh_on_stop=True)
    view.start()
    view.stop()
    assert "waiting for the coordinator's first status  no status: no answer" in screen.getvalue()


def test_output_beyond_the_limit_is_dropped_and_counted() -> None:
    pending = PendingOutput(limit_bytes=12)
    for _ in range(5):
        pending.put(b"12345\n")
    text = pending.drain()
    assert text.startswith("12345\n12345\n")
    assert "flashrun: 3 lines of output came faster than the terminal could show them" in text
    assert pending.drain() == ""


def test_plain_view_prints_events_and_status_lines() -> None:
    lines: list[str] = []
    view = PlainView(lambda: snapshot(), lines.append, every_s=0.01)
    view.on_event(recovery_events()[3])
    view.on_event({"ts": 1.0, "event": "worker_succeeded", "generation": 1, "rank": 0})
    assert lines == ["[gen 1] recovery #1 started after crash of rank 2"]
    view.start()
    try:
        wait_for(lambda: len(lines) >= 3, 10, "two status lines")
    finally:
        view.stop()
    assert lines[1].startswith(f"status: run {RUN_ID} gen 1 running")
