"""The live view of a big job stays responsive: 512 simulated agents (8 ranks each) against the real coordinator,
viewed the way `flashrun status` and a non-hosting launcher do (a node-level snapshot over gRPC, rendered)."""

from __future__ import annotations

import io
import statistics
import sys
import time
from pathlib import Path

from rich.console import Console

from flashrun.config import Endpoint
from flashrun.status import fetch_status
from flashrun.view.render import render
from tests.helpers import REPO, Launcher, free_port, wait_for

NODES = 512
TOKEN = "big-job-token"


def test_a_512_node_job_is_shown_node_by_node_within_the_terminal_quickly(launcher: Launcher, tmp_path: Path) -> None:
    port = free_port()
    env = {"FLASHRUN_TOKEN": TOKEN}
    events = tmp_path / "logs" / "events.jsonl"
    launcher.flashrun("coordinator", "--bind", f"127.0.0.1:{port}", "--nnodes", str(NODES), "--rdzv-id", "big",
                      "--log-dir", str(tmp_path / "logs"), env=env, name="coordinator")
    launcher.start([sys.executable, str(REPO / "scripts" / "sim_agents.py"), "--endpoint", f"127.0.0.1:{port}",
                    "--run-id", "big", "--agents", str(NODES), "--step-s", "0.1"], env=env, name="simulated-agents")
    wait_for(lambda: events.exists() and '"recoverable"' in events.read_text(), 120, "512 agents to start")

    timings = []
    for _ in range(5):
        started = time.monotonic()
        snapshot = fetch_status(Endpoint("127.0.0.1", port), TOKEN, max_ranks=40)
        console = Console(record=True, width=160, height=50, file=io.StringIO(), force_terminal=True,
                          color_system=None)
        console.print(render(snapshot, time.time(), 160, 50))
        timings.append(time.monotonic() - started)
    text = console.export_text()

    assert snapshot["world_size"] == NODES * 8 and len(snapshot["nodes"]) == NODES
    assert snapshot["ranks_complete"] is False
    assert len(text.splitlines()) <= 50
    assert "more nodes" in text  # node rows, the rest summarised: one screen, not 4,096 rank rows
    assert statistics.median(timings) < 1.0, timings
