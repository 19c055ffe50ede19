"""The live view end to end in a real terminal (tmux): a 4-rank job, a rank killed by a fault drill, the failure and
the recovery on the panel, `flashrun status` attached from a second terminal, the terminal left intact."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import BIN, REPO, TAG_VAR, Launcher, wait_for

TMUX = shutil.which("tmux")
WIDTH, HEIGHT = 160, 50
STEPS, STEP_TIME_S = 400, 0.05
JOB_S = 180
"""Generous bound for the whole job, start to exit, on a loaded 2-core machine."""
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed (CI installs it)")


class Tmux:
    """A private tmux server (its own socket) whose panes run tagged commands."""

    def __init__(self, tag: str) -> None:
        self.socket = f"flashrun-test-{uuid.uuid4().hex[:8]}"
        self.tag = tag

    def run(self, *args: str) -> str:
        result = subprocess.run([TMUX, "-L", self.socket, *args], capture_output=True, text=True, timeout=30,  # type: ignore[list-item]
                                check=True)
        return result.stdout

    def start(self, name: str, command: str) -> None:
        """`command` (tagged) in a new session of WIDTH x HEIGHT; the pane's shell (untagged) stays open after it
        exits, saying how it did."""
        script = (f"env {TAG_VAR}={self.tag} PYTHONUNBUFFERED=1 sh -c {shlex.quote(command)}; "
                  f"echo \"{name} exited with $?\"; exec sleep 3600")
        self.run("new-session", "-d", "-s", name, "-x", str(WIDTH), "-y", str(HEIGHT), "sh", "-c", script)

    def screen(self, name: str) -> str:
        """What the pane shows now."""
        return self.run("capture-pane", "-p", "-t", name)

    def history(self, name: str) -> str:
        """Everything the pane showed, scrollback included, wrapped lines joined."""
        return self.run("capture-pane", "-p", "-J", "-S", "-", "-t", name)

    def cursor_visible(self, name: str) -> bool:
        return self.run("display-message", "-p", "-t", name, "#{cursor_flag}").strip() == "1"

    def kill(self) -> None:
        subprocess.run([TMUX, "-L", self.socket, "kill-server"], capture_output=True, timeout=30)  # type: ignore[list-item]


@pytest.fixture
def tmux(launcher: Launcher) -> Iterator[Tmux]:
    server = Tmux(launcher.tag)
    try:
        yield server
    finally:
        server.kill()  # the launcher fixture then kills whatever tagged process survived


def test_a_killed_rank_and_its_recovery_show_on_the_live_panel(tmux: Tmux, launcher: Launcher, tmp_path: Path) -> None:
    log_dir = tmp_path / "logs"
    tmux.start("job", f"cd {shlex.quote(str(REPO))} && {BIN / 'flashrun'} --standalone --nproc-per-node 4 "
                      f"--allow-inject --log-dir {log_dir} scripts/examples/train_ddp.py --steps {STEPS} "
                      f"--step-time {STEP_TIME_S}")

    hint = wait_for(lambda: re.search(r"flashrun status --rdzv-endpoint (\S+) --token-file (\S+)\)",
                                      tmux.history("job")), 60, "the coordinator's address")
    endpoint, token_file = hint.group(1), hint.group(2)  # type: ignore[union-attr]
    # The panel: header, one row per rank, events. In-place recovery needs every rank on flashrun's step loop.
    def running_and_recoverable(screen: str) -> bool:
        rows = rank_rows(screen)
        return (re.search(r"^flashrun  run \S+  gen 0  running  up \S+  step \d+", screen, re.M) is not None
                and re.search(r"^\d\d:\d\d:\d\d gen 0 recoverable$", screen, re.M) is not None
                and len(rows) == 4 and all(row["state"] == "running" and row["step"] != "-" for row in rows.values()))

    wait_for(lambda: running_and_recoverable(tmux.screen("job")), 90,
             "the panel to list 4 running ranks of a recoverable job")
    screen = tmux.screen("job")
    assert max(len(line) for line in screen.splitlines()) <= WIDTH

    tmux.start("watch", f"{BIN / 'flashrun'} status --rdzv-endpoint {endpoint} --token-file {token_file}")
    wait_for(lambda: len(rank_rows(tmux.screen("watch"))) == 4, 60, "the attached status view's rank table")

    victim_pid = rank_rows(tmux.screen("job"))[2]["pid"]
    drill = launcher.flashrun("inject", "--rdzv-endpoint", endpoint, "--token-file", token_file, "kill", "--rank", "2",
                              name="inject")
    assert drill.wait(60) == 0, drill.output

    recovered = re.compile(r"^recovery #1 \(gen 1, crash of rank 2\) · recovered in \S+ · resumed at step \d+", re.M)
    wait_for(lambda: recovered.search(tmux.screen("job")), 90, "the panel to show the recovery")
    screen = tmux.screen("job")
    failure = r"^\S+ gen 0 failure crash: rank 2 \(local rank 2\) on node 0 \(\S+\) was killed by SIGKILL"
    assert re.search(failure, screen, re.M), screen
    for phase in ("detect", "abort", "respawn", "rebuild", "sync"):
        assert re.search(rf"\b{phase} \d", screen), (phase, screen)
    replacement = rank_rows(screen)[2]
    assert replacement["pid"] != victim_pid and replacement["restarts"] == "1", screen

    wait_for(lambda: "job exited with" in tmux.screen("job"), JOB_S, "the job to finish")
    history = tmux.history("job")
    assert "job exited with 0" in history, history[-4000:]
    assert "Traceback" not in history, history
    final = tmux.screen("job")
    assert re.search(r"^flashrun  run \S+  gen 1  succeeded", final, re.M), final
    assert recovered.search(final), "the final panel stays on screen"
    assert tmux.cursor_visible("job"), "the launcher left the cursor hidden"
    # Worker output scrolled above the panel, not through it: every loss line is whole.
    losses = re.findall(r"^\[rank0\]:step (\d+) loss \d+\.\d+$", history, re.M)
    assert str(STEPS - 1) in losses, history[-4000:]

    wait_for(lambda: "watch exited with 0" in tmux.screen("watch"), 60, "the attached view to exit with the job")
    watched = tmux.screen("watch")
    assert recovered.search(watched), watched
    assert "flashrun: the job succeeded" in watched or "the coordinator stopped answering" in watched, watched
    assert tmux.cursor_visible("watch")
    wait_for(lambda: not launcher.survivors(), 30, "every flashrun process to exit")


def rank_rows(screen: str) -> dict[int, dict[str, str]]:
    """The panel's rank table: rank -> {state, pid, step, restarts}."""
    rows = {}
    for line in screen.splitlines():
        match = re.match(r"^\s+(\d+)\s+(\d+) \S+\s+([a-z]+)\s+(\d+|-)\s+(\d+|-)\s+\S+\s+\S+\s+(\d+)$", line)
        if match:
            rank, _, state, pid, step, restarts = match.groups()
            rows[int(rank)] = {"state": state, "pid": pid, "step": step, "restarts": restarts}
    return rows
