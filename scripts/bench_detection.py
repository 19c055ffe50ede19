"""Failure-detection latency of flashrun vs torchrun, side by side, on this machine; plus flashrun's step overhead.

Every trial is a fresh job of 4 workers running `scripts/examples/train_ddp.py --step-time 0.1 --steps 100000`
(about 100 ms steps), faulted once it is training. Per fault kind:

- crash:        at step 20 (rank 0's `step <i>` line), `kill -9` worker rank 1. Fault time: time.time() just before
                os.kill. flashrun: the `crash` failure's `ts` in <log-dir>/events.jsonl. torchrun: when this script's
                reader thread receives torchrun's first failure line on stderr (see TORCHRUN_FAILURE_RE: normally
                `Sending process <pid> closing signal SIGTERM`, logged by torch.distributed.elastic the moment its
                monitor loop sees the dead worker, followed by `failed (exitcode: -9) local_rank: 1 ...`).
- unresponsive: at step 20, SIGSTOP worker rank 1. flashrun: the `unresponsive` failure. torchrun: capped wait.
- stalled:      the job runs with `--inject-hang 1:20` (rank 1 spins in Python at step 20, its peers wait in the
                all-reduce). Fault time: when rank 0's `step 19` line arrived here (the last step the job completes).
                flashrun: the `stalled` failure. torchrun: capped wait.
- node_lost:    two launchers on localhost, 2 workers each (`--nnodes 2 --nproc-per-node 2`, node 0 hosts the
                rendezvous); at step 20, `kill -9` the node-1 launcher process (only it). flashrun: the `node_lost`
                failure in node 0's events.jsonl. torchrun (static rendezvous, --master-addr/--master-port/
                --node-rank): node 0's first failure line on stderr, capped.

"Culprit correct" means the job's first failure event has the expected kind, ranks and node ([1] on node 0; [2, 3]
on node 1 for node_lost). Worker PIDs are found in /proc (children whose environment has this run's
FLASHRUN_BENCH_TAG and RANK=1), and for flashrun cross-checked against `flashrun status --json`.

Overhead: train_ddp.py with --step-time 0 under flashrun (library active: heartbeats, step counting, collective
tracking) and under torchrun (where `import flashrun` is a no-op), alternating; steps/s from the arrival times of
rank 0's `step <i>` lines, the first 20 steps skipped as warm-up; the overhead is the relative throughput loss.

Every process runs in its own session and carries FLASHRUN_BENCH_TAG=<uuid>; after each trial (also on errors and
Ctrl-C) stopped processes get SIGCONT, launchers' process groups SIGKILL, and any tagged survivor SIGKILL.

By default the repository's working tree is benchmarked as it is; `--snapshot REV` benchmarks a git revision instead
(exported to a temporary tree, so edits made while the benchmark runs cannot change what is measured), and `--src DIR`
any other flashrun source tree. Launchers and workers import flashrun from that tree via PYTHONPATH.

Usage (with the project's virtual environment; per-trial logs are kept under the printed temporary directory):

    .venv/bin/python scripts/bench_detection.py --trials 5
    .venv/bin/python scripts/bench_detection.py --trials 5 --snapshot HEAD
    .venv/bin/python scripts/bench_detection.py --trials 2 --kinds crash,stalled --skip-overhead
    .venv/bin/python scripts/bench_detection.py --skip-torchrun --torchrun-cap 10
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
TRAIN_RELPATH = Path("scripts", "examples", "train_ddp.py")
TRAIN_NAME = TRAIN_RELPATH.name
BIN = Path(sys.executable).parent
TAG_VAR = "FLASHRUN_BENCH_TAG"
KINDS = ("crash", "unresponsive", "stalled", "node_lost")
TARGETS_S = {"crash": 0.3, "unresponsive": 2.5, "stalled": 5.0, "node_lost": 3.0}
FAULT_STEP = 20
NPROC = 4
STEP_TIME_S = 0.1
LONG_STEPS = 100_000
FLASHRUN_DEADLINE_S = 30.0
"""How long a flashrun trial waits for its failure event after the fault before calling it undetected."""
STEP_RE = re.compile(r"step (\d+) loss ")
STATUS_RE = re.compile(r"flashrun status --rdzv-endpoint (\S+) --token-file ([^\s)]+)")
TORCHRUN_FAILURE_RE = re.compile(r"closing signal|failed \(exitcode|ChildFailedError")
"""torchrun's first line on stderr once it noticed a failed worker (see the module docstring)."""
FLASHRUN_CONSOLE_FAILURE_RE = re.compile(r"\] failure kind=(\S+)")
# Variables of an enclosing launcher that must not leak into the jobs this script starts.
SCRUBBED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                "FLASHRUN_AGENT_SOCKET", "FLASHRUN_TOKEN", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


# Processes ------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def read_environ(pid: int) -> dict[str, str] | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def process_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries this tag."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        env = read_environ(int(entry))
        if env is not None and env.get(TAG_VAR) == tag and process_state(int(entry)) not in (None, "Z"):
            found.append(int(entry))
    return found


def worker_pid(tag: str, rank: int) -> int | None:
    """The training worker with this global RANK among this trial's processes, or None (also if ambiguous)."""
    matches = []
    for pid in tagged_pids(tag):
        env = read_environ(pid) or {}
        if env.get("RANK") == str(rank) and TRAIN_NAME in cmdline(pid):
            matches.append(pid)
    return matches[0] if len(matches) == 1 else None


@dataclasses.dataclass(frozen=True)
class Line:
    t: float
    """time.time() when this script's reader thread received the line."""
    text: str


def step_of(line: Line) -> int:
    match = STEP_RE.search(line.text)
    return int(match.group(1)) if match else -1


class Proc:
    """One launcher in its own session; stdout and stderr are read by threads that timestamp every line."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log_dir: Path, cwd: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.cond = threading.Condition()
        self.lines: dict[str, list[Line]] = {"stdout": [], "stderr": []}
        self._open = 2
        self.started_at = time.time()
        self.popen = subprocess.Popen(
            self.argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._threads = [
            threading.Thread(target=self._read, name=f"bench-{name}-{stream}", daemon=True,
                             args=(stream, getattr(self.popen, stream), log_dir / f"{name}.{stream}"))
            for stream in ("stdout", "stderr")
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self, stream: str, pipe: IO[bytes], path: Path) -> None:
        with open(path, "w", encoding="utf-8") as log:
            try:
                for raw in iter(pipe.readline, b""):
                    line = Line(time.time(), raw.decode(errors="replace").rstrip("\n"))
                    log.write(f"{line.t:.3f} {line.text}\n")
                    with self.cond:
                        self.lines[stream].append(line)
                        self.cond.notify_all()
            except (OSError, ValueError):
                pass
            finally:
                with self.cond:
                    self._open -= 1
                    self.cond.notify_all()

    def wait_until(self, predicate: Callable[[], Any], deadline: float) -> Any:
        """The predicate's first truthy value (evaluated under the lock, on every new line), or None at the deadline."""
        with self.cond:
            while True:
                value = predicate()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(min(remaining, 0.1))

    def first_line(self, stream: str, pattern: re.Pattern[str], since: float = 0.0) -> Line | None:
        return next((line for line in self.lines[stream] if line.t >= since and pattern.search(line.text)), None)

    def step_lines(self) -> list[tuple[int, float]]:
        with self.cond:
            found = [(int(m.group(1)), line.t) for line in self.lines["stdout"] if (m := STEP_RE.search(line.text))]
        return found

    def wait_for_step(self, step: int, deadline: float) -> Line | None:
        """Rank 0's first `step <i>` line with i >= step; None at the deadline or when the launcher ended first."""

        def reached() -> Line | str | None:
            for line in self.lines["stdout"]:
                match = STEP_RE.search(line.text)
                if match and int(match.group(1)) >= step:
                    return line
            return "ended" if self.popen.poll() is not None and self._open == 0 else None

        found = self.wait_until(reached, deadline)
        return found if isinstance(found, Line) else None

    def tail(self, stream: str = "stderr", count: int = 6) -> str:
        with self.cond:
            return " | ".join(line.text for line in self.lines[stream][-count:])

    def kill(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)
        for thread in self._threads:
            thread.join(2)


class Trial:
    """The processes of one trial: a tag, a directory, and guaranteed cleanup."""

    def __init__(self, root: Path, name: str, src: Path) -> None:
        self.tag = uuid.uuid4().hex
        self.src = src
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
        self.procs: list[Proc] = []
        self.env = {key: value for key, value in os.environ.items()
                    if key not in SCRUBBED_ENV and not key.startswith("PET_")}
        # Launchers and workers import flashrun from `src` (PYTHONPATH wins over the editable install).
        pythonpath = [str(src), *filter(None, self.env.get("PYTHONPATH", "").split(os.pathsep))]
        self.env.update({TAG_VAR: self.tag, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(pythonpath)})

    def start(self, name: str, argv: Sequence[str]) -> Proc:
        proc = Proc(name, argv, self.env, self.dir, self.src)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Trial:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.cleanup()

    def cleanup(self) -> None:
        # Stopped processes first get SIGCONT, so nothing lingers stopped if a SIGKILL were to miss it.
        for pid in tagged_pids(self.tag):
            if process_state(pid) in ("T", "t"):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)
        for proc in self.procs:
            proc.kill()
        deadline = time.monotonic() + 10
        while (survivors := tagged_pids(self.tag)) and time.monotonic() < deadline:
            for pid in survivors:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        if survivors:
            print(f"  warning: tagged processes survived cleanup: {survivors}", flush=True)


# Events ---------------------------------------------------------------------------------------------------------


def read_events(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    return events


def failures(path: Path) -> list[dict[str, Any]]:
    return [event for event in read_events(path) if event.get("event") == "failure"]


def wait_for_failure(path: Path, kind: str, deadline: float, alive: Callable[[], bool]) -> dict[str, Any] | None:
    """The first failure event of this kind; polls the file (its `ts`, not our poll time, is what is measured)."""
    while True:
        found = next((event for event in failures(path) if event.get("kind") == kind), None)
        if found is not None:
            return found
        if time.monotonic() >= deadline:
            return None
        if not alive():
            # The launcher ended: its last events are written before it exits, so one more read is final.
            return next((event for event in failures(path) if event.get("kind") == kind), None)
        time.sleep(0.02)


# Trials ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    kind: str
    launcher: str
    index: int
    latency_s: float | None = None
    status: str = "ok"
    """ok | not detected | timeout: ... | error: ..."""
    culprit_ok: bool | None = None
    detail: str = ""


def flashrun_argv(*args: str) -> list[str]:
    return [str(BIN / "flashrun"), *args]


def torchrun_argv(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), *args]


def train_args(src: Path, extra: Sequence[str] = ()) -> list[str]:
    return [str(src / TRAIN_RELPATH), "--step-time", str(STEP_TIME_S), "--steps", str(LONG_STEPS), *extra]


def check_culprit(path: Path, kind: str, ranks: list[int], node: int) -> tuple[bool, str]:
    found = failures(path)
    if not found:
        return False, "no failure event"
    first = found[0]
    ok = first.get("kind") == kind and first.get("ranks") == ranks and first.get("node") == node
    text = f"first failure kind={first.get('kind')} ranks={first.get('ranks')} node={first.get('node')}"
    if not ok:
        text += f"; evidence: {first.get('evidence')}"
    return ok, text


def status_pid(proc: Proc, trial: Trial, rank: int, deadline: float) -> tuple[int | None, str]:
    """Rank's PID as `flashrun status --json` reports it (the launcher prints the exact command on stderr)."""
    line = proc.wait_until(lambda: proc.first_line("stderr", STATUS_RE), deadline)
    if line is None:
        return None, "no `flashrun status` line on the launcher's stderr"
    match = STATUS_RE.search(line.text)
    assert match is not None
    argv = flashrun_argv("status", "--rdzv-endpoint", match.group(1), "--token-file", match.group(2), "--json")
    try:
        done = subprocess.run(argv, env=trial.env, cwd=trial.src, capture_output=True, text=True,
                              start_new_session=True, timeout=max(1.0, deadline - time.monotonic()))
        snapshot = json.loads(done.stdout)
    except (subprocess.TimeoutExpired, ValueError) as err:
        return None, f"flashrun status failed: {err}"
    pid = next((r.get("pid") for r in snapshot.get("ranks", []) if r.get("rank") == rank), None)
    return (pid or None), ""


def single_node_trial(kind: str, launcher: str, index: int, root: Path, args: argparse.Namespace) -> Result:
    result = Result(kind, launcher, index)
    with Trial(root, f"{kind}-{launcher}-{index}", args.src) as trial:
        log_dir = trial.dir / "flashrun-logs"
        events = log_dir / "events.jsonl"
        extra = ["--inject-hang", f"1:{FAULT_STEP}"] if kind == "stalled" else []
        if launcher == "flashrun":
            argv = flashrun_argv("--standalone", "--nproc-per-node", str(NPROC), "--log-dir", str(log_dir),
                                 *train_args(args.src, extra))
        else:
            argv = torchrun_argv("--standalone", "--nproc-per-node", str(NPROC), *train_args(args.src, extra))
        proc = trial.start(launcher, argv)
        start_deadline = time.monotonic() + args.startup_timeout

        if launcher == "flashrun" and kind != "stalled":
            # Cross-check the /proc lookup against the coordinator's view, once the job is training.
            if proc.wait_for_step(3, start_deadline) is None:
                return failed_start(result, proc, 3)
            reported, problem = status_pid(proc, trial, 1, start_deadline)
            found = worker_pid(trial.tag, 1)
            if problem or reported != found:
                result.detail = f"PID cross-check: /proc says {found}, flashrun status says {reported} {problem}; "

        if kind == "stalled":
            seen = proc.wait_for_step(FAULT_STEP - 1, start_deadline)
            if seen is None:
                return failed_start(result, proc, FAULT_STEP - 1)
            fault_t = seen.t
            fault_what = f"step {step_of(seen)} line"
        else:
            seen = proc.wait_for_step(FAULT_STEP, start_deadline)
            if seen is None:
                return failed_start(result, proc, FAULT_STEP)
            pid = worker_pid(trial.tag, 1)
            if pid is None:
                result.status = "error: rank 1's worker PID not found in /proc"
                return result
            signum = signal.SIGKILL if kind == "crash" else signal.SIGSTOP
            fault_what = f"{signal.Signals(signum).name} to pid {pid} after step {step_of(seen)}"
            fault_t = time.time()
            os.kill(pid, signum)

        if launcher == "flashrun":
            event = wait_for_failure(events, kind, time.monotonic() + FLASHRUN_DEADLINE_S,
                                     lambda: proc.popen.poll() is None)
            result.culprit_ok, culprit = check_culprit(events, kind, [1], 0)
            if event is None:
                result.status = "not detected"
                result.detail += (f"no {kind} event within {FLASHRUN_DEADLINE_S:g} s of the fault ({fault_what}); "
                                  f"{culprit}")
            else:
                result.latency_s = float(event["ts"]) - fault_t
                result.detail += f"{fault_what}; {culprit}"
        else:
            line = proc.wait_until(lambda: proc.first_line("stderr", TORCHRUN_FAILURE_RE, fault_t),
                                   time.monotonic() + args.torchrun_cap)
            if line is None:
                result.status = "not detected"
                result.detail = f"{fault_what}; no failure line within {args.torchrun_cap:g} s"
            else:
                result.latency_s = line.t - fault_t
                result.detail = f"{fault_what}; line: {line.text.strip()[:160]}"
    return result


def failed_start(result: Result, proc: Proc, step: int) -> Result:
    ended = proc.popen.poll()
    what = f"launcher exited with {ended}" if ended is not None else "timed out"
    result.status = f"timeout: step {step} not reached ({what})"
    result.detail = f"stderr tail: {proc.tail()}"
    return result


def node_lost_trial(launcher: str, index: int, root: Path, args: argparse.Namespace) -> Result:
    result = Result("node_lost", launcher, index)
    with Trial(root, f"node_lost-{launcher}-{index}", args.src) as trial:
        port = free_port()
        log_dir = trial.dir / "flashrun-logs-node0"
        events = log_dir / "events.jsonl"
        nodes: list[Proc] = []
        for node in (0, 1):
            if launcher == "flashrun":
                argv = flashrun_argv("--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                     "--node-rank", str(node),
                                     *(["--log-dir", str(log_dir)] if node == 0 else []), *train_args(args.src))
            else:
                argv = torchrun_argv("--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                     "--master-port", str(port), "--node-rank", str(node), *train_args(args.src))
            nodes.append(trial.start(f"{launcher}-node{node}", argv))
        node0, node1 = nodes
        seen = node0.wait_for_step(FAULT_STEP, time.monotonic() + args.startup_timeout)
        if seen is None:
            return failed_start(result, node0, FAULT_STEP)
        fault_what = f"SIGKILL to the node-1 launcher (pid {node1.pid}) after step {step_of(seen)}"
        fault_t = time.time()
        os.kill(node1.pid, signal.SIGKILL)

        if launcher == "flashrun":
            event = wait_for_failure(events, "node_lost", time.monotonic() + FLASHRUN_DEADLINE_S,
                                     lambda: node0.popen.poll() is None)
            result.culprit_ok, culprit = check_culprit(events, "node_lost", [2, 3], 1)
            if event is None:
                result.status = "not detected"
                result.detail = f"no node_lost event within {FLASHRUN_DEADLINE_S:g} s; {culprit}"
            else:
                result.latency_s = float(event["ts"]) - fault_t
                result.detail = f"{fault_what}; {culprit}"
        else:
            line = node0.wait_until(lambda: node0.first_line("stderr", TORCHRUN_FAILURE_RE, fault_t),
                                    time.monotonic() + args.torchrun_cap)
            after = [step for step, t in node0.step_lines() if t > fault_t]
            orphans = [pid for pid in tagged_pids(trial.tag)
                       if (read_environ(pid) or {}).get("RANK") in ("2", "3") and TRAIN_NAME in cmdline(pid)]
            note = (f"node 0 kept training to step {max(after)}" if after else "node 0 made no progress after the kill")
            note += f"; node-1 workers still alive: {orphans}" if orphans else "; node-1 workers gone"
            if line is None:
                result.status = "not detected"
                result.detail = f"{fault_what}; no failure line within {args.torchrun_cap:g} s; {note}"
            else:
                result.latency_s = line.t - fault_t
                result.detail = f"{fault_what}; line: {line.text.strip()[:160]}; {note}"
    return result


# Overhead -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Throughput:
    launcher: str
    steps_per_s: float | None
    detail: str


def overhead_run(launcher: str, index: int, root: Path, args: argparse.Namespace) -> Throughput:
    steps = args.overhead_steps
    script = [str(args.src / TRAIN_RELPATH), "--step-time", "0", "--steps", str(steps)]
    with Trial(root, f"overhead-{launcher}-{index}", args.src) as trial:
        if launcher == "flashrun":
            proc = trial.start(launcher, flashrun_argv("--standalone", "--nproc-per-node", str(NPROC), *script))
        else:
            proc = trial.start(launcher, torchrun_argv("--standalone", "--nproc-per-node", str(NPROC), *script))
        if proc.wait_for_step(steps - 1, time.monotonic() + args.startup_timeout + steps) is None:
            return Throughput(launcher, None, f"timeout: step {steps - 1} not reached; {proc.tail()}")
        # Let the job end on its own (briefly) to record how it ended; the timing is already complete.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(15)
        proc.wait_until(lambda: proc._open == 0, time.monotonic() + 3)
        # Only the first pass up to the last step counts: a recovery after it could print steps again.
        timed: list[tuple[int, float]] = []
        for step, t in proc.step_lines():
            if step >= args.warmup_steps and (not timed or step > timed[-1][0]):
                timed.append((step, t))
            if step == steps - 1:
                break
        (s0, t0), (s1, t1) = timed[0], timed[-1]
        rate = (s1 - s0) / (t1 - t0) if t1 > t0 else None
        code = proc.popen.poll()
        detail = f"exit code {code}" if code is not None else "still running 15 s after its last step"
        with proc.cond:
            console_failures = [line.text for line in proc.lines["stderr"]
                                if FLASHRUN_CONSOLE_FAILURE_RE.search(line.text)]
        if console_failures:
            detail += f"; at job end: {console_failures[0].removeprefix('flashrun: ')[:220]}"
        return Throughput(launcher, rate, detail)


# Report ---------------------------------------------------------------------------------------------------------


def fmt_s(value: float) -> str:
    return f"{value:.3f}"


def summarize(results: list[Result], kind: str, launcher: str, cap: float) -> tuple[str, str, str, bool | None]:
    """(median, max, culprit k/N, target met) cells for one kind and launcher."""
    rows = [r for r in results if r.kind == kind and r.launcher == launcher]
    if not rows:
        return "—", "—", "—", None
    latencies = [r.latency_s for r in rows if r.latency_s is not None]
    undetected = sum(r.status == "not detected" for r in rows)
    failed = sum(r.status.startswith(("timeout", "error")) for r in rows)
    culprits = f"{sum(bool(r.culprit_ok) for r in rows)}/{len(rows)}"
    if not latencies:
        limit = cap if launcher == "torchrun" else FLASHRUN_DEADLINE_S
        median = f"not detected within {limit:g} s" if undetected else "—"
        suffix = f" ({failed} trial(s) failed)" if failed else ""
        return median + suffix, "—", culprits, False if launcher == "flashrun" else None
    median, worst = fmt_s(statistics.median(latencies)), fmt_s(max(latencies))
    notes = []
    if undetected:
        notes.append(f"{undetected} not detected")
    if failed:
        notes.append(f"{failed} failed")
    if notes:
        median += f" ({len(latencies)}/{len(rows)} detected; {', '.join(notes)})"
    met = None
    if launcher == "flashrun":
        met = not undetected and not failed and max(latencies) <= TARGETS_S[kind]
    return median, worst, culprits, met


def latency_table(results: list[Result], args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    out.append("| fault | target | flashrun median (s) | flashrun max (s) | met | culprit correct "
               "| torchrun median (s) | torchrun max (s) |")
    out.append("|---|---|---|---|---|---|---|---|")
    for kind in args.kinds:
        if not any(r.kind == kind for r in results):
            continue
        f_med, f_max, culprit, met = summarize(results, kind, "flashrun", args.torchrun_cap)
        t_med, t_max, _, _ = summarize(results, kind, "torchrun", args.torchrun_cap)
        met_cell = "—" if met is None else ("yes" if met else "no")
        out.append(f"| {kind} | ≤ {TARGETS_S[kind]:g} s | {f_med} | {f_max} | {met_cell} | {culprit} "
                   f"| {t_med} | {t_max} |")
    out.append("")
    return out


def report(results: list[Result], overhead: list[Throughput], args: argparse.Namespace, header: list[str]) -> str:
    out = [*header, ""]
    if results:
        out.extend(latency_table(results, args))
    if overhead:
        rates = {name: [t.steps_per_s for t in overhead if t.launcher == name and t.steps_per_s]
                 for name in ("flashrun", "torchrun")}
        runs = {name: ", ".join(f"{v:.1f}" for v in values) for name, values in rates.items()}
        if rates["flashrun"] and rates["torchrun"]:
            f_rate, t_rate = statistics.median(rates["flashrun"]), statistics.median(rates["torchrun"])
            loss = (t_rate - f_rate) / t_rate * 100
            out.append(
                f"Overhead (train_ddp.py --step-time 0 --steps {args.overhead_steps}, {NPROC} workers, steps "
                f"{args.warmup_steps}+ timed, {args.overhead_runs} runs each, alternating): flashrun median "
                f"{f_rate:.1f} steps/s (runs {runs['flashrun']}), torchrun median {t_rate:.1f} steps/s "
                f"(runs {runs['torchrun']}); overhead {loss:+.2f} % "
                f"(target ≤ 1 %: {'met' if loss <= 1 else 'not met'})."
            )
        elif rates["flashrun"]:
            out.append(f"Overhead: flashrun median {statistics.median(rates['flashrun']):.1f} steps/s "
                       f"(runs {runs['flashrun']}); no torchrun baseline (skipped or failed).")
        else:
            out.append("Overhead: not measured (runs failed; see above).")
    return "\n".join(out)


def export_snapshot(rev: str, root: Path) -> tuple[Path, str]:
    """`git archive REV` of this repository under root, with its gRPC modules generated as the Makefile does."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{rev}^{{commit}}"], cwd=REPO, capture_output=True,
                            text=True, check=True, timeout=30).stdout.strip()
    dest = root / f"src-{commit[:12]}"
    dest.mkdir()
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, capture_output=True, check=True,
                             timeout=60).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    out = dest / "flashrun" / "_proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iprotos", f"--python_out={out}", f"--pyi_out={out}",
                    f"--grpc_python_out={out}", "protos/flashrun.proto"], cwd=dest, check=True, timeout=120)
    grpc_module = out / "flashrun_pb2_grpc.py"
    grpc_module.write_text(re.sub(r"^import flashrun_pb2 as", "from . import flashrun_pb2 as",
                                  grpc_module.read_text(), flags=re.MULTILINE))
    return dest, commit


def source_description(src: Path, snapshot: str | None) -> str:
    if snapshot is not None:
        return f"git snapshot {snapshot[:12]} (exported to {src})"
    if src != REPO:
        return f"source tree {src}"
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return f"working tree {REPO}"
    changes = f" + {len(dirty)} uncommitted change(s) to tracked files" if dirty else ""
    return f"working tree {REPO} at {head}{changes}"


def machine_header(argv: Sequence[str], source: str) -> list[str]:
    load = os.getloadavg()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "not installed"
    return [
        f"Command (in {os.getcwd()}): {shlex.join([sys.executable, *argv])}",
        f"Machine: {cpus} CPUs (nproc) {model}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"Python {platform.python_version()}, torch {torch_version}",
        f"flashrun benchmarked: {source}",
    ]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per fault kind and launcher (default 5)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)} (empty: overhead only)")
    parser.add_argument("--torchrun-cap", type=float, default=30.0,
                        help="seconds to wait for torchrun to notice a fault (default 30)")
    parser.add_argument("--skip-torchrun", action="store_true", help="measure flashrun only")
    parser.add_argument("--skip-overhead", action="store_true", help="skip the steps/s overhead measurement")
    parser.add_argument("--overhead-steps", type=int, default=500, help="steps per overhead run (default 500)")
    parser.add_argument("--overhead-runs", type=int, default=3, help="overhead runs per launcher (default 3)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="first steps not timed (default 20)")
    parser.add_argument("--startup-timeout", type=float, default=180.0,
                        help="seconds a job may take to reach the fault step (default 180)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--src", type=Path, default=REPO,
                        help="flashrun source tree to benchmark: launchers and workers import flashrun from it and "
                             "run its scripts/examples/train_ddp.py (default: this repository as it is now)")
    source.add_argument("--snapshot", metavar="REV", default=None,
                        help="benchmark git revision REV of this repository instead (e.g. HEAD): exported with "
                             "`git archive` to a temporary tree, gRPC code generated there; the working tree can "
                             "keep changing meanwhile")
    args = parser.parse_args(argv)
    args.src = args.src.resolve()
    args.kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kind(s) {unknown}; choose from {','.join(KINDS)}")
    if args.trials < 1 or args.overhead_runs < 1 or args.overhead_steps <= args.warmup_steps + 1:
        parser.error("--trials and --overhead-runs must be >= 1, --overhead-steps > --warmup-steps + 1")
    return args


def describe(result: Result) -> str:
    latency = f"{result.latency_s:.3f} s" if result.latency_s is not None else result.status
    culprit = "" if result.culprit_ok is None else (" culprit ok" if result.culprit_ok else " CULPRIT WRONG")
    return f"[{result.kind} {result.index + 1}] {result.launcher}: {latency}{culprit} — {result.detail}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    for tool in ("flashrun", "torchrun"):
        if not (BIN / tool).exists():
            print(f"error: {BIN / tool} not found; run this script with the project's virtual environment's python",
                  file=sys.stderr)
            return 2
    root = Path(tempfile.mkdtemp(prefix="flashrun-bench-"))
    snapshot = None
    if args.snapshot is not None:
        try:
            args.src, snapshot = export_snapshot(args.snapshot, root)
        except (OSError, subprocess.SubprocessError) as err:
            print(f"error: cannot export revision {args.snapshot!r}: {err}", file=sys.stderr)
            return 2
    if not (args.src / TRAIN_RELPATH).is_file() or not (args.src / "flashrun" / "__init__.py").is_file():
        print(f"error: {args.src} has no flashrun package or {TRAIN_RELPATH}", file=sys.stderr)
        return 2
    script = Path(__file__).resolve()
    header = machine_header([str(script.relative_to(REPO)) if script.is_relative_to(REPO) else str(script), *argv],
                            source_description(args.src, snapshot))
    print("\n".join(header), flush=True)
    print(f"Logs: {root}", flush=True)

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # unwinds through every trial's cleanup

    signal.signal(signal.SIGTERM, on_sigterm)
    launchers = ["flashrun"] if args.skip_torchrun else ["flashrun", "torchrun"]
    results: list[Result] = []
    overhead: list[Throughput] = []
    interrupted = False
    try:
        for kind in args.kinds:
            for index in range(args.trials):
                for launcher in launchers:
                    try:
                        if kind == "node_lost":
                            result = node_lost_trial(launcher, index, root, args)
                        else:
                            result = single_node_trial(kind, launcher, index, root, args)
                    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as err:
                        result = Result(kind, launcher, index, status=f"error: {type(err).__name__}: {err}")
                    results.append(result)
                    print(describe(result), flush=True)
        if not args.skip_overhead:
            order = [("flashrun", "torchrun") if i % 2 == 0 else ("torchrun", "flashrun")
                     for i in range(args.overhead_runs)]
            for index, pair in enumerate(order):
                for launcher in pair:
                    if launcher == "torchrun" and args.skip_torchrun:
                        continue
                    try:
                        run = overhead_run(launcher, index, root, args)
                    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as err:
                        run = Throughput(launcher, None, f"error: {type(err).__name__}: {err}")
                    overhead.append(run)
                    rate = f"{run.steps_per_s:.1f} steps/s" if run.steps_per_s else "failed"
                    print(f"[overhead {index + 1}] {launcher}: {rate} — {run.detail}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the table covers the trials completed so far", flush=True)
    load = os.getloadavg()
    print("", flush=True)
    print(report(results, overhead, args, header))
    print(f"Load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. Latency: flashrun = failure event ts "
          f"(events.jsonl) - fault time; torchrun = arrival of its first failure line on stderr - fault time.")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
