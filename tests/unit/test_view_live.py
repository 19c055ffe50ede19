"""The view drivers on a recorded console: worker lines scroll above the panel, failures of the source are shown
and survived, the terminal is given back intact; the plain mode's lines."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import Any

from rich.console import Console

from flashrun.agent import output
from flashrun.agent.output import StreamPump
from flashrun.view.live import LiveView, PendingOutput, PlainView
from tests.helpers import wait_for
from tests.unit.test_view_render import RUN_ID, recovery_events, snapshot

SHOW_CURSOR = "\x1b[?25h"


class FakeTerminalStreams:
    """sys.stdout/sys.stderr stand-ins with a binary `.buffer`, as the worker pumps expect. Installed in the test
    body: pytest's own capture replaces sys.stdout again after fixtures are set up."""

    def __init__(self) -> None:
        self.stdout = io.TextIOWrapper(io.BytesIO(), write_through=True)
        self.stderr = io.TextIOWrapper(io.BytesIO(), write_through=True)


@contextlib.contextmanager
def fake_streams() -> Iterator[FakeTerminalStreams]:
    fake = FakeTerminalStreams()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = fake.stdout, fake.stderr
    try:
        yield fake
    finally:
        sys.stdout, sys.stderr = saved
        output.route_console(None)


def terminal(width: int = 120, height: int = 40) -> tuple[Console, io.StringIO]:
    file = io.StringIO()
    return Console(file=file, width=width, height=height, force_terminal=True, color_system=None), file


def pump_line(stream: io.TextIOWrapper, line: bytes) -> None:
    """One worker line through a real StreamPump, as the agent wires it."""
    read_fd, write_fd = os.pipe()
    pump = StreamPump(os.fdopen(read_fd, "rb"), stream.buffer, b"[rank3]:", None)  # type: ignore[arg-type]
    with os.fdopen(write_fd, "wb") as pipe:
        pipe.write(line)
    pump.join(10)


def test_worker_lines_and_messages_scroll_above_the_panel() -> None:
    console, screen = terminal()
    with fake_streams() as streams:
        view = LiveView(lambda: snapshot(), 0.01, console=console, fresh_on_stop=True)
        view.start()
        try:
            pump_line(streams.stdout, b"step 7 loss 0.5\n")
            print("flashrun: a launcher message")
            view.on_event(recovery_events()[2])
        finally:
            view.stop()
        restored = sys.stdout is streams.stdout and sys.stderr is streams.stderr
    drawn = screen.getvalue()
    assert "[rank3]:step 7 loss 0.5\n" in drawn
    assert "flashrun: a launcher message\n" in drawn
    assert "flashrun: [gen 0] failure crash: rank 2" in drawn
    final_panel = drawn.rindex(f"flashrun  run {RUN_ID}")
    assert drawn.rindex("[rank3]:step 7") < final_panel, "the final panel is drawn below the output"
    assert "recovered in 1.79s" in drawn[final_panel:]
    assert drawn.endswith(SHOW_CURSOR), "the cursor is shown again"
    assert restored
    assert streams.stdout.buffer.getvalue() == b"", "nothing bypassed the panel"  # type: ignore[attr-defined]
    assert output._console_route is None


def test_after_the_view_stops_workers_write_directly() -> None:
    console, _ = terminal()
    with fake_streams() as streams:
        view = LiveView(lambda: snapshot(), 0.01, console=console)
        view.start()
        view.stop()
        pump_line(streams.stdout, b"late line\n")
    assert streams.stdout.buffer.getvalue() == b"[rank3]:late line\n"  # type: ignore[attr-defined]


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
