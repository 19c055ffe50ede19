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
import dataclasses
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _bench_common import (
    NPROC,
    TRAIN_NAME,
    TRAIN_RELPATH,
    Proc,
    Throughput,
    Trial,
    add_overhead_options,
    add_source_options,
    cmdline,
    failures,
    flashrun_argv,
    free_port,
    interrupt_on_sigterm,
    overhead_lines,
    prepare,
    read_environ,
    run_overhead,
    status_pid,
    step_of,
    tagged_pids,
    torchrun_argv,
    worker_pid,
)

KINDS = ("crash", "unresponsive", "stalled", "node_lost")
TARGETS_S = {"crash": 0.3, "unresponsive": 2.5, "stalled": 5.0, "node_lost": 3.0}
FAULT_STEP = 20
STEP_TIME_S = 0.1
LONG_STEPS = 100_000
FLASHRUN_DEADLINE_S = 30.0
"""How long a flashrun trial waits for its failure event after the fault before calling it undetected."""
OVERHEAD_TARGET_PCT = 1.0
TORCHRUN_FAILURE_RE = re.compile(r"closing signal|failed \(exitcode|ChildFailedError")
"""torchrun's first line on stderr once it noticed a failed worker (see the module docstring)."""


# Events ---------------------------------------------------------------------------------------------------------


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
        out.extend(overhead_lines(overhead, args, OVERHEAD_TARGET_PCT))
    return "\n".join(out)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5, help="trials per fault kind and launcher (default 5)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated subset of {','.join(KINDS)} (empty: overhead only)")
    parser.add_argument("--torchrun-cap", type=float, default=30.0,
                        help="seconds to wait for torchrun to notice a fault (default 30)")
    parser.add_argument("--skip-torchrun", action="store_true", help="measure flashrun only")
    add_overhead_options(parser, "fault")
    add_source_options(parser)
    args = parser.parse_args(argv)
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
    prepared = prepare(args, argv, Path(__file__))
    if prepared is None:
        return 2
    root, header = prepared
    interrupt_on_sigterm()
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
            run_overhead(root, args, overhead, with_torchrun=not args.skip_torchrun)
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
