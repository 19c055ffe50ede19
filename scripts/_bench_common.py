"""Helpers shared by the benchmarks in this directory: tagged processes, per-trial directories, events, sources.

Every process a benchmark starts runs in its own session and carries FLASHRUN_BENCH_TAG=<uuid> in its environment
(`Trial`); `Trial.cleanup()` (also run on errors and Ctrl-C) sends stopped processes SIGCONT, launchers' process
groups SIGKILL, and any tagged survivor SIGKILL. `Proc` timestamps every line of a launcher's stdout and stderr as it
arrives here. `export_snapshot` / `source_description` / `machine_header` implement `--snapshot REV` and the report
header; `overhead_run` / `overhead_lines` the steps/s overhead measurement (flashrun vs torchrun, `--step-time 0`).
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
NPROC = 4
STEP_RE = re.compile(r"step (\d+) loss ")
STATUS_RE = re.compile(r"flashrun status --rdzv-endpoint (\S+) --token-file ([^\s)]+)")
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

    def wait_exit(self, deadline: float, poll_s: float = 0.005) -> float | None:
        """time.time() when this script first saw the launcher's exit (polled every poll_s), or None at the deadline."""
        while self.popen.poll() is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(poll_s)
        return time.time()

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



# Launchers -----------------------------------------------------------------------------------------------------


def flashrun_argv(*args: str) -> list[str]:
    return [str(BIN / "flashrun"), *args]


def torchrun_argv(*args: str) -> list[str]:
    return [str(BIN / "torchrun"), *args]



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



# Sources and the report header ----------------------------------------------------------------------------------


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



def add_overhead_options(parser: argparse.ArgumentParser, fault: str) -> None:
    """The steady-state overhead measurement's options, and the start-up deadline, shared by both benchmarks."""
    parser.add_argument("--skip-overhead", action="store_true", help="skip the steps/s overhead measurement")
    parser.add_argument("--overhead-steps", type=int, default=500, help="steps per overhead run (default 500)")
    parser.add_argument("--overhead-runs", type=int, default=3, help="overhead runs per launcher (default 3)")
    parser.add_argument("--warmup-steps", type=int, default=20, help="first overhead steps not timed (default 20)")
    parser.add_argument("--startup-timeout", type=float, default=180.0,
                        help=f"seconds a job may take to reach the {fault} step (default 180)")


def add_source_options(parser: argparse.ArgumentParser) -> None:
    """--src DIR | --snapshot REV; call resolve_source_args() on the parsed namespace."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--src", type=Path, default=REPO,
                        help="flashrun source tree to benchmark: launchers and workers import flashrun from it and "
                             "run its scripts/examples/train_ddp.py (default: this repository as it is now)")
    source.add_argument("--snapshot", metavar="REV", default=None,
                        help="benchmark git revision REV of this repository instead (e.g. HEAD): exported with "
                             "`git archive` to a temporary tree, gRPC code generated there; the working tree can "
                             "keep changing meanwhile")


def prepare(args: argparse.Namespace, argv: Sequence[str], script: Path) -> tuple[Path, list[str]] | None:
    """Check the tools, make the logs root, export --snapshot, print the header; None (after printing why) on error.

    Sets args.src to the tree to benchmark. Returns (logs root, header lines)."""
    for tool in ("flashrun", "torchrun"):
        if not (BIN / tool).exists():
            print(f"error: {BIN / tool} not found; run this script with the project's virtual environment's python",
                  file=sys.stderr)
            return None
    root = Path(tempfile.mkdtemp(prefix="flashrun-bench-"))
    snapshot = None
    if args.snapshot is not None:
        try:
            args.src, snapshot = export_snapshot(args.snapshot, root)
        except (OSError, subprocess.SubprocessError) as err:
            print(f"error: cannot export revision {args.snapshot!r}: {err}", file=sys.stderr)
            return None
    args.src = args.src.resolve()
    if not (args.src / TRAIN_RELPATH).is_file() or not (args.src / "flashrun" / "__init__.py").is_file():
        print(f"error: {args.src} has no flashrun package or {TRAIN_RELPATH}", file=sys.stderr)
        return None
    script = script.resolve()
    header = machine_header([str(script.relative_to(REPO)) if script.is_relative_to(REPO) else str(script), *argv],
                            source_description(args.src, snapshot))
    print("\n".join(header), flush=True)
    print(f"Logs: {root}", flush=True)
    return root, header


def interrupt_on_sigterm() -> None:
    """SIGTERM raises KeyboardInterrupt in the main thread, which unwinds through every trial's cleanup."""

    def on_sigterm(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)


def overhead_lines(overhead: list[Throughput], args: argparse.Namespace, target_pct: float) -> list[str]:
    """The overhead paragraph of a report: median steps/s per launcher and flashrun's relative throughput loss."""
    out: list[str] = []
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
            f"(target ≤ {target_pct:g} %: {'met' if loss <= target_pct else 'not met'})."
        )
    elif rates["flashrun"]:
        out.append(f"Overhead: flashrun median {statistics.median(rates['flashrun']):.1f} steps/s "
                   f"(runs {runs['flashrun']}); no torchrun baseline (skipped or failed).")
    else:
        out.append("Overhead: not measured (runs failed; see above).")
    return out


def run_overhead(root: Path, args: argparse.Namespace, overhead: list[Throughput], with_torchrun: bool = True) -> None:
    """args.overhead_runs runs per launcher, alternating which goes first, appended to `overhead` (so an interrupt
    keeps the finished ones) and printed as each ends."""
    order = [("flashrun", "torchrun") if i % 2 == 0 else ("torchrun", "flashrun") for i in range(args.overhead_runs)]
    for index, pair in enumerate(order):
        for launcher in pair:
            if launcher == "torchrun" and not with_torchrun:
                continue
            try:
                run = overhead_run(launcher, index, root, args)
            except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as err:
                run = Throughput(launcher, None, f"error: {type(err).__name__}: {err}")
            overhead.append(run)
            rate = f"{run.steps_per_s:.1f} steps/s" if run.steps_per_s else "failed"
            print(f"[overhead {index + 1}] {launcher}: {rate} — {run.detail}", flush=True)
