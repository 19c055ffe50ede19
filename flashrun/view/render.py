"""The job view as a pure function: one status snapshot (see `CoordinatorServer.status`) in, a rich renderable out.

Every line is built here with a known width and no wrapping, so the panel occupies exactly the lines counted for it:
at most `height` lines of at most `width` cells. With more ranks than fit, it switches to one row per node (worst
first) plus only the ranks that are not plainly running. Cost is linear in the nodes listed, whatever the height.
"""

from __future__ import annotations

import dataclasses
import heapq
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.text import Text

from flashrun.view.events import (
    EVENT_STYLES,
    QUIET_EVENTS,
    describe_event,
    format_duration,
    format_step,
    latest_recovery,
    recovery_chunks,
)

STATE_STYLES: Mapping[str, str] = {
    "running": "green",
    "straggler": "yellow",
    "recovering": "cyan",
    "ready": "cyan",
    "rendezvous": "cyan",
    "stopping": "cyan",
    "crash": "bold red",
    "unresponsive": "bold red",
    "stalled": "bold red",
    "escalated": "bold red",
    "failed": "bold red",
    "lost": "bold magenta",
    "succeeded": "dim",
}
"""Colour per rank/node state; job phases share the names where they mean the same."""

PHASE_STYLES: Mapping[str, str] = {**STATE_STYLES, "running": "bold green", "succeeded": "bold green"}

_SEVERITY_ORDER = ("crash", "unresponsive", "stalled", "escalated", "failed", "lost", "recovering", "stopping",
                   "straggler", "ready", "rendezvous", "running", "succeeded")
SEVERITY: Mapping[str, int] = {state: index for index, state in enumerate(_SEVERITY_ORDER)}
"""Lower is worse: the order in which nodes and ranks are listed when not all fit."""

PLAINLY_RUNNING = frozenset({"running", "succeeded"})
"""Rank states that big-job mode leaves out of the rank list."""

EVENT_LINES = 6
"""At most this many recent events are listed (fewer when the terminal is short)."""
MIN_EVENT_LINES = 2
"""Events keep at least this many lines when the rank table competes for the height."""
RECOVERY_LINES = 2
"""The latest recovery's summary wraps onto at most this many lines."""
UNLISTED_EVENTS = QUIET_EVENTS | {"recovery_phase"}
"""Events the panel does not list one by one (recovery phases are summarised in the recovery line)."""


def _rate(value: float) -> str:
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2f}"


def _age(value: float) -> str:
    return "-" if value < 0 else f"{value:.1f}s"


# Tables -------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Column:
    title: str
    width: int
    cell: Callable[[Mapping[str, Any]], str]
    right: bool = True
    keep: int = 0
    """Higher survives longer when the terminal is too narrow for every column."""
    flexible: bool = False
    """Takes the width the others leave (up to `width`); at least FLEX_MIN."""


FLEX_MIN = 6
COLUMN_GAP = 1


def _state(row: Mapping[str, Any]) -> str:
    return str(row.get("state", "?"))


RANK_COLUMNS = (
    Column("rank", 6, lambda r: str(r["rank"]), keep=9),
    Column("node", 5, lambda r: str(r.get("node", "?")), keep=5),
    Column("host", 20, lambda r: str(r.get("host", "")), right=False, keep=1, flexible=True),
    Column("state", 12, _state, right=False, keep=8),
    Column("pid", 8, lambda r: str(r["pid"]) if r.get("pid") else "-", keep=3),
    Column("step", 8, lambda r: format_step(int(r.get("step", -1))), keep=7),
    Column("steps/s", 7, lambda r: _rate(float(r.get("steps_per_s", 0.0))), keep=6),
    Column("hb age", 6, lambda r: _age(float(r.get("heartbeat_age_s", -1.0))), keep=4),
    Column("restarts", 8, lambda r: str(r.get("restarts", 0)), keep=2),
)

NODE_COLUMNS = (
    Column("node", 5, lambda n: str(n["node"]), keep=9),
    Column("host", 20, lambda n: str(n.get("host", "")), right=False, keep=1, flexible=True),
    Column("state", 12, _state, right=False, keep=8),
    Column("ranks", 5, lambda n: str(n.get("ranks", "?")), keep=3),
    Column("steps", 15, lambda n: _step_range(n), keep=7),
    Column("steps/s", 7, lambda n: _rate(float(n.get("steps_per_s", 0.0))), keep=6),
    Column("hb age", 6, lambda n: _age(float(n.get("heartbeat_age_s", -1.0))), keep=4),
    Column("restarts", 8, lambda n: str(n.get("restarts", 0)), keep=2),
)


def _step_range(node: Mapping[str, Any]) -> str:
    low, high = int(node.get("min_step", -1)), int(node.get("max_step", -1))
    return format_step(low) if low == high else f"{format_step(low)}..{format_step(high)}"


def fit_columns(columns: Sequence[Column], width: int) -> list[tuple[Column, int]]:
    """The columns that fit `width` (dropping the least kept first), each with its width."""
    chosen = list(columns)
    while chosen:
        fixed = sum(c.width for c in chosen if not c.flexible) + COLUMN_GAP * (len(chosen) - 1)
        flexible = [c for c in chosen if c.flexible]
        if fixed + FLEX_MIN * len(flexible) <= width:
            spare = width - fixed
            return [(c, min(c.width, spare) if c.flexible else c.width) for c in chosen]
        chosen.remove(min(chosen, key=lambda c: c.keep))
    return []


def _cell(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[: max(0, width - 1)] + "…" if width > 1 else text[:width]
    return text.rjust(width) if right else text.ljust(width)


def table_header(layout: Sequence[tuple[Column, int]]) -> Text:
    text = " " * COLUMN_GAP
    return Text(text.join(_cell(c.title, w, c.right) for c, w in layout), style="bold", no_wrap=True,
                overflow="crop")


def table_row(layout: Sequence[tuple[Column, int]], row: Mapping[str, Any]) -> Text:
    state = _state(row)
    line = Text(no_wrap=True, overflow="crop", style="dim" if state == "succeeded" else "")
    for index, (column, width) in enumerate(layout):
        if index:
            line.append(" " * COLUMN_GAP)
        cell = _cell(column.cell(row), width, column.right)
        line.append(cell, style=STATE_STYLES.get(state, "") if column.title == "state" else "")
    return line


# The panel ----------------------------------------------------------------------------------------------------------

def _pack(chunks: Iterable[Text], width: int, max_lines: int, separator: str = "  ") -> list[Text]:
    """Greedy line filling: chunks separated by `separator`, never split; the last line is cropped if need be."""
    lines: list[Text] = []
    current = Text(no_wrap=True, overflow="ellipsis")
    for chunk in chunks:
        if current.cell_len and current.cell_len + len(separator) + chunk.cell_len > width:
            if len(lines) + 1 == max_lines:
                break
            lines.append(current)
            current = Text(no_wrap=True, overflow="ellipsis")
        if current.cell_len:
            current.append(separator)
        current.append_text(chunk)
    lines.append(current)
    for line in lines:
        line.truncate(width, overflow="ellipsis")
    return lines


def header_chunks(snapshot: Mapping[str, Any], error: str | None = None) -> list[Text]:
    phase = str(snapshot.get("phase", "?"))
    nnodes = int(snapshot.get("nnodes", 0))
    chunks = [
        Text("flashrun", style="bold"),
        Text(f"run {snapshot.get('run_id', '?')}"),
        Text(f"gen {snapshot.get('generation', 0)}"),
        Text(phase, style=PHASE_STYLES.get(phase, "bold")),
        Text(f"up {format_duration(float(snapshot.get('uptime_s', 0.0)))}"),
        Text(f"step {format_step(int(snapshot.get('job_step', -1)))}"),
        Text(f"{_rate(float(snapshot.get('steps_per_s', 0.0)))} steps/s"),
        Text(f"restarts {snapshot.get('restarts', 0)}"),
        Text(f"recoveries {snapshot.get('recoveries', 0)}"),
        Text(f"{snapshot.get('world_size', 0)} ranks on {nnodes} node{'s' if nnodes != 1 else ''}"
             + (f" +{snapshot['spares']} spare" if snapshot.get("spares") else "")),
    ]
    if error:
        chunks.append(Text(error, style="bold red"))
    return chunks


def nodes_of(snapshot: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The snapshot's node rows, or ones derived from complete rank rows when the snapshot has none."""
    if snapshot.get("nodes") is not None:
        return list(snapshot["nodes"])
    by_node: dict[int, list[Mapping[str, Any]]] = {}
    for rank in snapshot.get("ranks", []):
        by_node.setdefault(int(rank.get("node", -1)), []).append(rank)
    nodes = []
    for node, ranks in sorted(by_node.items()):
        worst = min(ranks, key=lambda r: SEVERITY.get(_state(r), -1))
        steps = [int(r.get("step", -1)) for r in ranks]
        nodes.append({
            "node": node, "host": ranks[0].get("host", ""), "state": _state(worst), "ranks": len(ranks),
            "min_step": min(steps), "max_step": max(steps),
            "steps_per_s": min(float(r.get("steps_per_s", 0.0)) for r in ranks),
            "heartbeat_age_s": max(float(r.get("heartbeat_age_s", -1.0)) for r in ranks),
            "restarts": sum(int(r.get("restarts", 0)) for r in ranks),
        })
    return nodes


def _worst_first(rows: Sequence[Mapping[str, Any]], key: str, count: int) -> list[Mapping[str, Any]]:
    return heapq.nsmallest(count, rows, key=lambda r: (SEVERITY.get(_state(r), -1), int(r.get(key, 0))))


def _state_counts(rows: Iterable[Mapping[str, Any]]) -> Text:
    counts: dict[str, int] = {}
    for row in rows:
        counts[_state(row)] = counts.get(_state(row), 0) + 1
    text = Text(no_wrap=True, overflow="ellipsis")
    for index, state in enumerate(sorted(counts, key=lambda s: SEVERITY.get(s, -1))):
        if index:
            text.append(" · ")
        text.append(f"{counts[state]} {state}", style=STATE_STYLES.get(state, ""))
    return text


def _rank_table(snapshot: Mapping[str, Any], width: int) -> list[Text]:
    layout = fit_columns(RANK_COLUMNS, width)
    return [table_header(layout), *(table_row(layout, rank) for rank in snapshot.get("ranks", []))]


def _big_job(snapshot: Mapping[str, Any], width: int, lines: int) -> list[Text]:
    """Node rows (worst first) and the ranks not plainly running, in `lines` lines."""
    nodes = nodes_of(snapshot)
    laggards = [r for r in snapshot.get("ranks", []) if _state(r) not in PLAINLY_RUNNING]
    out: list[Text] = []
    if lines <= 0:
        return out
    summary = Text(f"{len(nodes)} nodes: ", no_wrap=True, overflow="ellipsis")
    summary.append_text(_state_counts(nodes))
    if laggards or not snapshot.get("ranks_complete", True):
        summary.append(f"  ·  ranks not running: {len(laggards)}")
    summary.truncate(width, overflow="ellipsis")
    out.append(summary)
    left = lines - 1
    # Ranks that need attention get up to half of what is left; the nodes take the rest.
    rank_lines = min(1 + len(laggards), left // 2) if laggards else 0
    node_lines = left - rank_lines
    if node_lines >= 2:
        out.extend(_worst_rows(NODE_COLUMNS, nodes, "node", node_lines, width, "more nodes"))
    else:
        rank_lines = left
    if rank_lines >= 2:
        out.extend(_worst_rows(RANK_COLUMNS, laggards, "rank", rank_lines, width, "more ranks not running"))
    return out


def _worst_rows(columns: Sequence[Column], items: Sequence[Mapping[str, Any]], key: str, lines: int, width: int,
                more: str) -> list[Text]:
    """A table of at most `lines` lines (header included): the worst items first, the rest counted on the last."""
    layout = fit_columns(columns, width)
    rows = lines - 1
    shown = _worst_first(items, key, rows if len(items) <= rows else rows - 1)
    out = [table_header(layout), *(table_row(layout, item) for item in shown)]
    if len(shown) < len(items):
        out.append(Text(f"... {len(items) - len(shown)} {more}", style="dim", no_wrap=True))
    return out


def _event_lines(events: Sequence[Mapping[str, Any]], now_wall: float, width: int, lines: int) -> list[Text]:
    """The latest events, one line each, then the latest recovery (up to RECOVERY_LINES lines) in `lines` lines."""
    if lines <= 0:
        return []
    recovery = latest_recovery(events)
    recovery_lines = []
    if recovery is not None:
        recovery_lines = _pack(recovery_chunks(recovery, now_wall), width, min(RECOVERY_LINES, lines), " · ")
    budget = lines - len(recovery_lines)
    listed = [e for e in events if e.get("event") not in UNLISTED_EVENTS]
    out: list[Text] = []
    for record in listed[-budget:] if budget > 0 else []:
        clock = time.strftime("%H:%M:%S", time.localtime(float(record.get("ts", 0.0))))
        line = Text(f"{clock} gen {record.get('generation', '?')} ", style="dim", no_wrap=True, overflow="ellipsis")
        line.append(describe_event(record), style=EVENT_STYLES.get(str(record.get("event")), ""))
        line.truncate(width, overflow="ellipsis")
        out.append(line)
    return out + recovery_lines


def _events_wanted(events: Sequence[Mapping[str, Any]]) -> int:
    listed = sum(1 for e in events if e.get("event") not in UNLISTED_EVENTS)
    has_recovery = any(e.get("event") == "recovery_started" for e in events)
    return min(listed, EVENT_LINES) + (RECOVERY_LINES if has_recovery else 0)


def render_lines(snapshot: Mapping[str, Any], now_wall: float, width: int, height: int,
                 error: str | None = None) -> list[Text]:
    """The panel's lines: at most `height`, each at most `width` cells."""
    width, height = max(1, width), max(1, height)
    header = _pack(header_chunks(snapshot, error), width, 2 if height >= 8 else 1)
    out = list(header[:height])
    left = height - len(out)
    events = list(snapshot.get("events", []))
    wanted_events = _events_wanted(events)
    rank_rows = len(snapshot.get("ranks", []))
    complete = snapshot.get("ranks_complete", True) and rank_rows == int(snapshot.get("world_size", rank_rows))
    if complete and 1 + rank_rows + wanted_events <= left:
        body, event_lines = _rank_table(snapshot, width), wanted_events
    elif complete and 1 + rank_rows + min(wanted_events, MIN_EVENT_LINES) <= left:
        body = _rank_table(snapshot, width)
        event_lines = left - len(body)
    else:
        event_lines = min(wanted_events, max(MIN_EVENT_LINES, left // 3), left)
        body = _big_job(snapshot, width, left - event_lines)
    out.extend(body)
    out.extend(_event_lines(events, now_wall, width, min(event_lines, height - len(out))))
    return out[:height]


def render(snapshot: Mapping[str, Any], now_wall: float, width: int, height: int,
           error: str | None = None) -> Group:
    """The live panel for `snapshot` as of `now_wall` (Unix time), fitted to `width` x `height` cells.

    `error` (e.g. "coordinator not answering") is shown in the header, over the last good snapshot.
    """
    return Group(*render_lines(snapshot, now_wall, width, height, error))


def status_line(snapshot: Mapping[str, Any]) -> str:
    """The whole job on one plain line, for logs that are not a terminal (printed every so often)."""
    counts: dict[str, int] = {}
    if snapshot.get("ranks_complete", True) and snapshot.get("ranks"):
        rows, what = snapshot["ranks"], "ranks"
    else:
        rows, what = nodes_of(snapshot), "nodes"
    for row in rows:
        counts[_state(row)] = counts.get(_state(row), 0) + 1
    states = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=lambda s: SEVERITY.get(s, -1)))
    return (f"status: run {snapshot.get('run_id', '?')} gen {snapshot.get('generation', 0)} "
            f"{snapshot.get('phase', '?')}, step {format_step(int(snapshot.get('job_step', -1)))} at "
            f"{_rate(float(snapshot.get('steps_per_s', 0.0)))} steps/s, up "
            f"{format_duration(float(snapshot.get('uptime_s', 0.0)))}, restarts {snapshot.get('restarts', 0)}, "
            f"recoveries {snapshot.get('recoveries', 0)}; {what}: {states or 'none yet'}")
