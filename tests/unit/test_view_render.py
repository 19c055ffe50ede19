"""The job view's pure renderer, recorded on a rich console at several terminal sizes."""

from __future__ import annotations

import io
import time
from collections.abc import Mapping
from typing import Any

import pytest
from rich.console import Console

from flashrun.view.events import describe_event, event_line, latest_recovery
from flashrun.view.render import (
    RANK_COLUMNS,
    STATE_STYLES,
    fit_columns,
    nodes_of,
    render,
    status_line,
    table_row,
)

NOW = 1_800_000_000.0
RUN_ID = "3f2a9c01-5b6d-4e1f"


def recovery_events(now: float = NOW, recovered: bool = True) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"ts": now - 30, "event": "agent_joined", "generation": 0, "host": "vm", "agent": "vm:1"},
        {"ts": now - 30, "event": "rendezvous_complete", "generation": 0, "nnodes": 1, "world_size": 4},
        {"ts": now - 10.2, "event": "failure", "generation": 0, "kind": "crash", "ranks": [2], "rank": 2, "node": 0,
         "exit_code": -9, "evidence": "rank 2 (local rank 2) on node 0 (vm) was killed by SIGKILL in generation 0",
         "exited_at": now - 10.25, "job_step": 100, "leader_step": 101},
        {"ts": now - 10.2, "event": "recovery_started", "generation": 1, "kind": "crash", "ranks": [2],
         "cause": "rank 2 was killed", "recoveries": 1},
    ]
    if recovered:
        events += [
            {"ts": now - 8.4, "event": "recovery_phase", "generation": 1, "phase": phase, "duration_s": duration}
            for phase, duration in (("abort", 0.01), ("respawn", 1.77), ("rebuild", 0.88), ("sync", 0.87))
        ]
        events += [
            {"ts": now - 8.4, "event": "recovered", "generation": 1, "since_detection_s": 1.79, "resume_step": 101,
             "abort_s": 0.01, "respawn_s": 1.77, "rebuild_s": 0.88, "sync_s": 0.87},
            {"ts": now - 8.3, "event": "recovery_phase", "generation": 1, "phase": "first_step", "step": 101,
             "since_detection_s": 1.85},
        ]
    return events


def snapshot(nnodes: int = 1, per_node: int = 4, states: Mapping[int, str] | None = None, max_ranks: int = 0,
             events: list[dict[str, Any]] | None = None, phase: str = "running") -> dict[str, Any]:
    """A snapshot as `CoordinatorServer.status(max_ranks)` returns it."""
    states = states or {}
    ranks = []
    for node in range(nnodes):
        for local in range(per_node):
            rank = node * per_node + local
            state = states.get(rank, "running")
            ranks.append({
                "rank": rank, "node": node, "host": f"node{node:04d}.cluster.example", "pid": 10000 + rank,
                "state": state, "step": 120 if state == "running" else 117, "steps_per_s": 4.0,
                "heartbeat_age_s": 0.12, "restarts": 1 if rank in states else 0,
            })
    nodes = nodes_of({"ranks": ranks})
    world = nnodes * per_node
    complete = not (max_ranks and world > max_ranks)
    if not complete:
        ranks = [r for r in ranks if r["state"] not in ("running", "succeeded")][:max_ranks]
    return {
        "run_id": RUN_ID, "phase": phase, "generation": 1, "restarts": 0, "recoveries": 1, "world_size": world,
        "nnodes": nnodes, "spares": 0, "uptime_s": 192.5, "job_step": 117 if states else 120, "steps_per_s": 4.02,
        "nodes": nodes, "ranks": ranks, "ranks_complete": complete,
        "events": recovery_events() if events is None else events,
    }


def recorded(snap: Mapping[str, Any], width: int, height: int, **kwargs: Any) -> list[str]:
    console = Console(record=True, width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system=None)
    console.print(render(snap, NOW, width, height, **kwargs))
    lines = console.export_text().splitlines()
    assert len(lines) <= height, "\n".join(lines)
    too_wide = [line for line in lines if len(line) > width]
    assert not too_wide, too_wide
    return lines


@pytest.mark.parametrize("width", [80, 120, 200])
def test_small_job_shows_header_every_rank_events_and_the_recovery(width: int) -> None:
    lines = recorded(snapshot(states={2: "recovering"}), width, 40)
    text = "\n".join(lines)
    assert lines[0].startswith("flashrun  run " + RUN_ID)
    for expected in ("gen 1", "running", "up 3m12s", "step 117", "4.0 steps/s", "restarts 0", "recoveries 1",
                     "4 ranks on 1 node"):
        assert expected in text
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "node"])
    rows = lines[header + 1:header + 5]
    assert [row.split()[0] for row in rows] == ["0", "1", "2", "3"]
    assert "recovering" in rows[2] and "10002" in rows[2] and "117" in rows[2]
    for column in ("state", "pid", "step", "steps/s", "hb age", "restarts"):
        assert column in lines[header]
    assert "failure crash: rank 2" in text
    assert "recovery #1 started after crash of rank 2" in text
    assert "recovered in 1.79s" in text
    for phase in ("detect 50ms", "abort 10ms", "respawn 1.77s", "rebuild 880ms", "sync 870ms"):
        assert phase in text, phase


def test_a_recovery_in_progress_shows_its_age() -> None:
    text = "\n".join(recorded(snapshot(states={2: "recovering"}, events=recovery_events(recovered=False)), 120, 30))
    assert "in progress for 10s" in text
    assert "detect 50ms" in text
    assert "recovered in" not in text


def test_colours_follow_the_state() -> None:
    layout = fit_columns(RANK_COLUMNS, 120)
    expected = {"running": "green", "straggler": "yellow", "recovering": "cyan", "ready": "cyan",
                "crash": "red", "unresponsive": "red", "stalled": "red", "lost": "magenta", "succeeded": "dim"}
    for state, colour in expected.items():
        row = table_row(layout, {"rank": 0, "node": 0, "host": "h", "pid": 1, "state": state, "step": 1,
                                 "steps_per_s": 1.0, "heartbeat_age_s": 0.1, "restarts": 0})
        state_at = row.plain.index(state)
        styles = {str(span.style) for span in row.spans if span.start <= state_at < span.end}
        styles.add(str(row.style))
        assert any(colour in style for style in styles), (state, styles)
        assert colour in STATE_STYLES[state]


@pytest.mark.parametrize(("nnodes", "bad"), [(512, {5: "crash", 77: "straggler", 1000: "recovering"}),
                                              (4096, {rank: "recovering" for rank in range(0, 32768, 37)})])
def test_big_job_shows_worst_nodes_first_and_only_ranks_not_running(nnodes: int, bad: dict[int, str]) -> None:
    snap = snapshot(nnodes=nnodes, per_node=8, states=bad, max_ranks=256)
    started = time.perf_counter()
    lines = recorded(snap, 120, 40)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"rendering {nnodes}x8 took {elapsed:.2f} s"  # generous: catches quadratic behaviour
    text = "\n".join(lines)
    node_header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["node", "host"])
    first_node = lines[node_header + 1].split()
    worst = min(bad.items(), key=lambda item: (["crash", "recovering", "straggler"].index(item[1]), item[0] // 8))
    assert first_node[0] == str(worst[0] // 8) and worst[1] in first_node
    assert f"{nnodes} nodes:" in text
    assert "more nodes" in text
    rank_header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "node"])
    listed = [line.split() for line in lines[rank_header + 1:] if line.split() and line.split()[0].isdigit()]
    assert listed and all(row[3] in bad.values() for row in listed)
    assert "recovered in 1.79s" in text


def test_big_job_mode_kicks_in_when_ranks_do_not_fit_the_height() -> None:
    snap = snapshot(nnodes=4, per_node=8, states={9: "straggler"})
    tall = "\n".join(recorded(snap, 120, 60))
    short = recorded(snap, 120, 20)
    assert "4 nodes:" not in tall and sum(1 for line in tall.splitlines() if "running" in line) >= 31
    short_text = "\n".join(short)
    assert "4 nodes: 1 straggler · 3 running" in short_text
    assert any(line.split()[:1] == ["9"] and "straggler" in line for line in short)


@pytest.mark.parametrize(("width", "height"), [(40, 10), (60, 3), (20, 1), (200, 8)])
def test_tiny_terminals_never_overflow(width: int, height: int) -> None:
    recorded(snapshot(nnodes=64, per_node=8, states={3: "crash"}, max_ranks=256), width, height)
    recorded(snapshot(), width, height, error="no status: the coordinator is gone")


def test_an_error_is_shown_over_the_last_snapshot() -> None:
    text = "\n".join(recorded(snapshot(), 120, 30, error="no status: connection refused"))
    assert "no status: connection refused" in text and "10003" in text


def test_a_snapshot_without_node_rows_gets_them_from_its_ranks() -> None:
    snap = snapshot(nnodes=2, per_node=2, states={3: "crash"})
    del snap["nodes"]
    nodes = nodes_of(snap)
    assert [(n["node"], n["state"], n["ranks"], n["min_step"], n["max_step"]) for n in nodes] == \
        [(0, "running", 2, 120, 120), (1, "crash", 2, 117, 120)]


def test_event_descriptions() -> None:
    events = recovery_events()
    assert describe_event(events[2]).startswith("failure crash: rank 2 (local rank 2)")
    assert event_line(events[3]) == "[gen 1] recovery #1 started after crash of rank 2"
    assert describe_event({"event": "straggler", "rank": 3, "step": 7, "leader_step": 10}) == \
        "straggler: rank 3 at step 7, leader at 10"
    assert describe_event({"ts": 1.0, "event": "something_new", "generation": 0, "a": 1, "b": "x\ny"}) == \
        "something_new a=1 b=x y"
    recovery = latest_recovery(events)
    assert recovery is not None and recovery.detect_s == pytest.approx(0.05)
    assert recovery.phases == {"abort": 0.01, "respawn": 1.77, "rebuild": 0.88, "sync": 0.87}
    assert latest_recovery(events[:3]) is None


def test_status_line_sums_the_job_up() -> None:
    line = status_line(snapshot(states={1: "straggler"}))
    assert line.startswith(f"status: run {RUN_ID} gen 1 running, step 117 at 4.0 steps/s, up 3m12s")
    assert "ranks: 1 straggler, 3 running" in line
    big = status_line(snapshot(nnodes=512, per_node=8, states={9: "crash"}, max_ranks=256))
    assert "nodes: 1 crash, 511 running" in big
