"""Recovery time and lost work after a worker crash: flashrun vs torchrun, side by side, on this machine.

Every trial is a fresh job of 4 workers (`--nproc-per-node 4`) running
`scripts/examples/train_ddp.py --steps 150 --step-time 0.05` (about 50 ms steps), faulted once: when rank 0's
`step <kill-step>` line (default 70) arrives here, worker rank 1 gets `kill -9`. Its PID is taken from /proc (the
trial's tagged process whose environment has RANK=1 and whose command line runs train_ddp.py), looked up at step 3
and cross-checked against `flashrun status --json` for flashrun; the kill time is time.time() just before os.kill.

Launchers compared:

- flashrun (one row per variant, see --flashrun-variants): `flashrun --standalone --nproc-per-node 4 --log-dir D
  train_ddp.py ...`, no checkpointing: the failed rank is respawned, the process group rebuilt, and the state comes
  from a healthy replica, in place.
- torchrun relaunch, what torchrun users do: `torchrun --standalone --nproc-per-node 4 --max-restarts 0 train_ddp.py
  ... --checkpoint-dir D --checkpoint-every 50`. After the kill torchrun stops the other workers and exits; this
  script relaunches the same command at once (as a job scheduler or a user would; the "relaunch gap" between
  torchrun's exit, seen by polling every 5 ms, and the new launcher's start is measured and should be ~0), and the
  job resumes from its latest checkpoint (`resumed from step N`).
- torchrun --max-restarts 1: one trial with the same checkpointing, capped (--max-restarts-cap, default 60 s). On
  torch 2.13 with gloo the restarted attempt is expected to hang in init_process_group (see /work/shared/NOTES.md);
  the report says whether a new step arrived within the cap, or what the job was doing when it did not.

Definitions, the same for every launcher, all measured on rank 0's `step <i> loss` lines as they arrive here:

- L, the last step completed before the kill: the highest step index among rank 0's lines received before the kill.
- Recovery time: from the kill until the completion of the first step that had not been completed before the kill,
  i.e. the arrival of the first rank-0 line after the kill whose step index is > L. For flashrun that step is
  normally L + 1, the step in flight at the kill, redone after the recovery (if the survivors had already applied
  L + 1 before the all-reduce that failed, the job resumes at L + 2 and that is the line). For torchrun the job
  restarts at the checkpoint, so the steps after it are recomputed inside the recovery time.
- Completed steps lost: L - (resume_step - 1), floored at 0, where resume_step is the first step the job runs after
  the recovery: the `recovered` event's `resume_step` for flashrun; N + 1 for torchrun's `resumed from step N`
  (0 when it found no checkpoint). As a cross-check the report also counts the step indices <= L that rank 0 printed
  again after the kill ("redone"), which should agree.
- flashrun's phase breakdown, from <log-dir>/events.jsonl: detect = the `failure` event's ts - kill time; abort,
  respawn, rebuild, sync = the `recovered` event's abort_s, respawn_s, rebuild_s, sync_s (each the slowest rank's);
  recovered = its since_detection_s; first step = the `recovery_phase` event with phase `first_step`, its
  since_detection_s (the coordinator learns of steps from node summaries, so this is coarser than the output).
- torchrun's breakdown: kill -> torchrun exited; the relaunch gap; relaunch -> the new run's first step line; and
  from there to the first new step (the recomputed steps).

Overhead: train_ddp.py with --step-time 0 under flashrun (library active: heartbeats, step counting, collective
tracking) and under torchrun (where flashrun's API falls back to plain torch.distributed), alternating; steps/s from
the arrival times of rank 0's lines, the first 20 steps skipped; the overhead is the relative throughput loss.

Hygiene (shared with bench_detection.py, in _bench_common.py): every process runs in its own session and carries
FLASHRUN_BENCH_TAG=<uuid>; after each trial, also on errors and Ctrl-C/SIGTERM, launchers' process groups and every
tagged survivor get SIGKILL; every trial has its own temporary directory (logs kept under the printed root) and every
wait a deadline; a trial that fails or times out is reported as such. `--snapshot REV` benchmarks a git revision
(exported to a temporary tree), `--src DIR` another source tree; by default the working tree as it is.

Usage (with the project's virtual environment):

    .venv/bin/python scripts/bench_recovery.py --trials 3
    .venv/bin/python scripts/bench_recovery.py --trials 5 --snapshot HEAD
    .venv/bin/python scripts/bench_recovery.py --trials 1 --skip-overhead --skip-max-restarts
    .venv/bin/python scripts/bench_recovery.py --flashrun-variants default,--no-prewarm
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
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
    Line,
    Proc,
    Throughput,
    Trial,
    add_overhead_options,
    add_source_options,
    cmdline,
    flashrun_argv,
    interrupt_on_sigterm,
    overhead_lines,
    prepare,
    process_state,
    read_environ,
    read_events,
    run_overhead,
    status_pid,
    step_of,
    tagged_pids,
    torchrun_argv,
    worker_pid,
)

TARGET_FLASHRUN_S = 1.5
"""flashrun's median recovery time target."""
TARGET_SPEEDUP = 5.0
"""flashrun's median recovery at least this many times faster than torchrun's relaunch-from-checkpoint."""
TARGET_OVERHEAD_PCT = 2.0
PID_LOOKUP_STEP = 3
"""The step by which the job is training: rank 1's PID is looked up (and cross-checked) then."""
EVENTS_GRACE_S = 5.0
"""After the first new step arrived, how long to wait for flashrun's `recovered` and `first_step` events."""
END_GRACE_S = 30.0
"""After a job's last expected step, how long it may take to exit before that is noted (not a failure)."""
RESUMED_RE = re.compile(r"resumed from step (\d+)")
PHASES = ("detect", "abort", "respawn", "rebuild", "sync", "recovered", "first_step")
TORCHRUN_PHASES = ("exited", "gap", "restart", "redo")
TORCHRUN_RELAUNCH = "torchrun relaunch"


# Results --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    variant: str
    index: int
    status: str = "ok"
    """ok | not recovered | timeout: ... | error: ..."""
    recovery_s: float | None = None
    last_before_kill: int | None = None
    resume_step: int | None = None
    redone: int | None = None
    first_new_step: int | None = None
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    detail: str = ""
    anomalies: list[str] = dataclasses.field(default_factory=list)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def lost(self) -> int | None:
        if self.last_before_kill is None or self.resume_step is None:
            return None
        return max(0, self.last_before_kill - (self.resume_step - 1))


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    flashrun_args: tuple[str, ...] | None
    """Extra flashrun options; None for torchrun's relaunch."""


# Trials ---------------------------------------------------------------------------------------------------------


def train_args(args: argparse.Namespace, checkpoint_dir: Path | None = None) -> list[str]:
    argv = [str(args.src / TRAIN_RELPATH), "--steps", str(args.steps), "--step-time", str(args.step_time),
            "--seed", str(args.seed)]
    if checkpoint_dir is not None:
        argv += ["--checkpoint-dir", str(checkpoint_dir), "--checkpoint-every", str(args.checkpoint_every)]
    return argv


def started_or_reason(proc: Proc, step: int, deadline: float) -> Line | str:
    line = proc.wait_for_step(step, deadline)
    if line is not None:
        return line
    ended = proc.popen.poll()
    what = f"launcher exited with {ended}" if ended is not None else "timed out"
    return f"timeout: step {step} not reached ({what}); stderr tail: {proc.tail()}"


def kill_worker(proc: Proc, trial: Trial, args: argparse.Namespace, pid: int) -> tuple[float, int] | str:
    """Wait for rank 0's `step <kill-step>` line, SIGKILL `pid`; (kill time, L) or why not."""
    seen = proc.wait_for_step(args.kill_step, time.monotonic() + args.startup_timeout)
    if seen is None:
        return f"timeout: step {args.kill_step} not reached; stderr tail: {proc.tail()}"
    env = read_environ(pid) or {}
    if env.get("RANK") != str(args.kill_rank) or TRAIN_NAME not in cmdline(pid):
        return f"error: rank {args.kill_rank}'s worker (pid {pid}) is gone before the kill"
    kill_t = time.time()
    os.kill(pid, signal.SIGKILL)
    before = [step for step, t in proc.step_lines() if t <= kill_t]
    return kill_t, max(before)


def first_step_above(proc: Proc, above: int, after_t: float, deadline: float) -> Line | None:
    """Rank 0's first line received after `after_t` with a step index > above; None at the deadline or job end."""

    def found() -> Line | str | None:
        for line in proc.lines["stdout"]:
            if line.t > after_t and step_of(line) > above:
                return line
        return "ended" if proc.popen.poll() is not None and proc._open == 0 else None

    value = proc.wait_until(found, deadline)
    return value if isinstance(value, Line) else None


def redone_steps(procs: Sequence[Proc], last: int, kill_t: float) -> int:
    """Distinct step indices <= last that rank 0 printed again after the kill."""
    return len({step for proc in procs for step, t in proc.step_lines() if t > kill_t and step <= last})


def wait_end(proc: Proc, args: argparse.Namespace) -> str:
    """Let the job finish (bounded) and say how it ended; the measurement is already complete."""
    last = args.steps - 1
    deadline = time.monotonic() + END_GRACE_S + args.steps * max(args.step_time, 0.01) * 3
    if proc.wait_for_step(last, deadline) is None:
        code = proc.popen.poll()
        return f"step {last} not reached (launcher {'still running' if code is None else f'exited with {code}'})"
    if proc.wait_exit(time.monotonic() + END_GRACE_S) is None:
        return f"step {last} done, launcher still running {END_GRACE_S:g} s later"
    return f"job finished, exit code {proc.popen.returncode}"


def lookup_pid(proc: Proc, trial: Trial, args: argparse.Namespace, cross_check: bool) -> int | str:
    started = started_or_reason(proc, PID_LOOKUP_STEP, time.monotonic() + args.startup_timeout)
    if isinstance(started, str):
        return started
    pid = worker_pid(trial.tag, args.kill_rank)
    if pid is None:
        return f"error: rank {args.kill_rank}'s worker PID not found in /proc"
    if cross_check:
        reported, problem = status_pid(proc, trial, args.kill_rank, time.monotonic() + 30)
        if problem or reported != pid:
            return f"error: PID cross-check: /proc says {pid}, flashrun status says {reported} {problem}"
    return pid


def flashrun_trial(variant: Variant, index: int, root: Path, args: argparse.Namespace) -> Result:
    result = Result(variant.label, index)
    assert variant.flashrun_args is not None
    slug = re.sub(r"[^A-Za-z0-9]+", "-", variant.label).strip("-")
    with Trial(root, f"{slug}-{index}", args.src) as trial:
        log_dir = trial.dir / "flashrun-logs"
        result.detail = f"logs {trial.dir}; "
        proc = trial.start("flashrun", flashrun_argv("--standalone", "--nproc-per-node", str(NPROC), "--log-dir",
                                                     str(log_dir), *variant.flashrun_args, *train_args(args)))
        pid = lookup_pid(proc, trial, args, cross_check=True)
        if isinstance(pid, str):
            result.status = pid
            return result
        killed = kill_worker(proc, trial, args, pid)
        if isinstance(killed, str):
            result.status = killed
            return result
        kill_t, last = killed
        result.last_before_kill = last
        line = first_step_above(proc, last, kill_t, kill_t + args.recovery_timeout)
        if line is None:
            result.status = "not recovered"
            result.detail += f"no step > {last} within {args.recovery_timeout:g} s of the kill; {proc.tail()}"
        else:
            result.recovery_s = line.t - kill_t
            result.first_new_step = step_of(line)

        # The coordinator's view: wait (bounded) for the recovered and first_step events.
        events_path = log_dir / "events.jsonl"

        def has_first_step() -> bool:
            return any(e.get("event") == "recovery_phase" and e.get("phase") == "first_step"
                       for e in read_events(events_path))

        deadline = time.monotonic() + EVENTS_GRACE_S
        while not has_first_step() and time.monotonic() < deadline and proc.popen.poll() is None:
            time.sleep(0.05)
        ended = wait_end(proc, args)
        result.events = read_events(events_path)
        result.redone = redone_steps([proc], last, kill_t)
        fill_flashrun_phases(result, kill_t, args)
        result.detail += f"L={last}, first new step {result.first_new_step}, resume_step {result.resume_step}, " \
                         f"redone {result.redone}; {ended}"
        if not ended.startswith("job finished, exit code 0"):
            result.anomalies.append(ended)
    return result


def fill_flashrun_phases(result: Result, kill_t: float, args: argparse.Namespace) -> None:
    events = result.events
    failures = [e for e in events if e.get("event") == "failure"]
    recovered = [e for e in events if e.get("event") == "recovered"]
    first_steps = [e for e in events if e.get("event") == "recovery_phase" and e.get("phase") == "first_step"]
    if failures:
        first = failures[0]
        result.phases["detect"] = float(first["ts"]) - kill_t
        if first.get("kind") != "crash" or first.get("ranks") != [args.kill_rank]:
            result.anomalies.append(f"first failure kind={first.get('kind')} ranks={first.get('ranks')}")
    else:
        result.anomalies.append("no failure event")
    if len(failures) > 1:
        result.anomalies.append(f"{len(failures)} failure events")
    if recovered:
        rec = recovered[0]
        for phase in ("abort", "respawn", "rebuild", "sync"):
            if f"{phase}_s" in rec:
                result.phases[phase] = float(rec[f"{phase}_s"])
        result.phases["recovered"] = float(rec["since_detection_s"])
        result.resume_step = int(rec["resume_step"])
    else:
        result.anomalies.append("no recovered event")
    if len(recovered) > 1:
        result.anomalies.append(f"{len(recovered)} recovered events")
    if first_steps:
        result.phases["first_step"] = float(first_steps[0]["since_detection_s"])
    else:
        result.anomalies.append("no first_step event")
    if result.lost:
        result.anomalies.append(f"{result.lost} completed step(s) lost")
    if result.redone:
        result.anomalies.append(f"{result.redone} completed step(s) printed again")


def torchrun_relaunch_trial(index: int, root: Path, args: argparse.Namespace) -> Result:
    result = Result(TORCHRUN_RELAUNCH, index)
    with Trial(root, f"torchrun-relaunch-{index}", args.src) as trial:
        result.detail = f"logs {trial.dir}; "
        argv = torchrun_argv("--standalone", "--nproc-per-node", str(NPROC), "--max-restarts", "0",
                             *train_args(args, trial.dir / "checkpoints"))
        first = trial.start("torchrun", argv)
        pid = lookup_pid(first, trial, args, cross_check=False)
        if isinstance(pid, str):
            result.status = pid
            return result
        first_workers = [p for p in tagged_pids(trial.tag)
                         if "RANK" in (read_environ(p) or {}) and TRAIN_NAME in cmdline(p)]
        killed = kill_worker(first, trial, args, pid)
        if isinstance(killed, str):
            result.status = killed
            return result
        kill_t, last = killed
        result.last_before_kill = last
        exited_t = first.wait_exit(time.monotonic() + args.recovery_timeout)
        if exited_t is None:
            result.status = f"timeout: torchrun did not exit within {args.recovery_timeout:g} s of the kill"
            return result
        second = trial.start("torchrun-relaunch", argv)
        old_workers = [p for p in first_workers if process_state(p) not in (None, "Z")]
        result.phases["exited"] = exited_t - kill_t
        result.phases["gap"] = second.started_at - exited_t
        line = first_step_above(second, last, kill_t, kill_t + args.recovery_timeout)
        with second.cond:
            resumed = second.first_line("stdout", RESUMED_RE)
            first_line = next((ln for ln in second.lines["stdout"] if step_of(ln) >= 0), None)
        if resumed is not None:
            match = RESUMED_RE.search(resumed.text)
            assert match is not None
            result.resume_step = int(match.group(1)) + 1
        elif line is not None:
            result.resume_step = 0  # no checkpoint found: the job started over
        if line is None:
            result.status = "not recovered"
            result.detail += f"no step > {last} within {args.recovery_timeout:g} s of the kill; {second.tail()}"
        else:
            result.recovery_s = line.t - kill_t
            result.first_new_step = step_of(line)
            if first_line is not None:
                result.phases["restart"] = first_line.t - second.started_at
                result.phases["redo"] = line.t - first_line.t
        ended = wait_end(second, args)
        result.redone = redone_steps([first, second], last, kill_t)
        result.detail += (f"L={last}, torchrun exit code {first.popen.returncode}, resumed at step "
                          f"{result.resume_step}, first new step {result.first_new_step}, redone {result.redone}; "
                          f"relaunch: {ended}")
        if old_workers:
            result.anomalies.append(f"old workers still alive at the relaunch: {old_workers}")
        if result.lost is not None and result.redone != result.lost:
            result.anomalies.append(f"redone {result.redone} != lost {result.lost}")
    return result


def max_restarts_trial(root: Path, args: argparse.Namespace) -> str:
    """One torchrun --max-restarts 1 trial, capped: a line saying what happened."""
    cap = args.max_restarts_cap
    with Trial(root, "torchrun-max-restarts", args.src) as trial:
        argv = torchrun_argv("--standalone", "--nproc-per-node", str(NPROC), "--max-restarts", "1",
                             *train_args(args, trial.dir / "checkpoints"))
        proc = trial.start("torchrun", argv)
        pid = lookup_pid(proc, trial, args, cross_check=False)
        if isinstance(pid, str):
            return f"torchrun --max-restarts 1: trial failed before the kill: {pid}"
        killed = kill_worker(proc, trial, args, pid)
        if isinstance(killed, str):
            return f"torchrun --max-restarts 1: trial failed: {killed}"
        kill_t, last = killed
        line: Line | None = None
        restarted: set[int] = set()
        deadline = time.monotonic() + cap
        while time.monotonic() < deadline:
            line = first_step_above(proc, last, kill_t, min(deadline, time.monotonic() + 0.5))
            if line is not None or proc.popen.poll() is not None:
                break
            # Sample the restarted attempt's workers (TORCHELASTIC_RESTART_COUNT=1) while the launcher runs.
            restarted.update(p for p in tagged_pids(trial.tag)
                             if (read_environ(p) or {}).get("TORCHELASTIC_RESTART_COUNT") == "1"
                             and TRAIN_NAME in cmdline(p))
        if line is not None:
            wait_end(proc, args)
            resumed = proc.first_line("stdout", RESUMED_RE, kill_t)
            return (f"torchrun --max-restarts 1: recovered, kill → first new step (step {step_of(line)}) "
                    f"{line.t - kill_t:.3f} s (L={last}; {resumed.text if resumed else 'no resume line'}).")
        code = proc.popen.poll()
        ended_after = time.time() - kill_t
        alive = [p for p in restarted if process_state(p) not in (None, "Z")]
        with proc.cond:
            stderr = [ln.text for ln in proc.lines["stderr"] if ln.t > kill_t]
            resumed = proc.first_line("stdout", RESUMED_RE, kill_t)
        refused = sum("Connection refused" in text for text in stderr)
        mesh = any("connectFullMesh failed" in text for text in stderr)
        attempt = (f"its restarted attempt ({len(restarted)} worker(s) seen with TORCHELASTIC_RESTART_COUNT=1) "
                   f"{'printed ' + repr(resumed.text) if resumed else 'printed no step or resume line'}"
                   f"{', its init_process_group failed (gloo connectFullMesh: Connection refused)' if mesh else ''}; "
                   f"{refused} 'Connection refused' line(s) on stderr")
        if code is None:
            what = (f"hung / did not recover within {cap:g} s of the kill: launcher still running, "
                    f"{len(alive)} restarted worker(s) alive, no new step")
        else:
            what = (f"did not recover: torchrun exited with code {code} about {ended_after:.1f} s after the kill, "
                    "no new step")
        return f"torchrun --max-restarts 1 (L={last}, cap {cap:g} s): {what}; {attempt}. Logs {trial.dir}."


# Report ---------------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def median_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def rows_of(results: list[Result], label: str) -> list[Result]:
    return [r for r in results if r.variant == label]


def recovery_table(results: list[Result], variants: list[Variant]) -> list[str]:
    out = ["| launcher | trials recovered | recovery median (s) | recovery max (s) | completed steps lost (median) "
           "| redone (median) | torchrun / this (median) |", "|---|---|---|---|---|---|---|"]
    torch_median = median_or_none([r.recovery_s for r in rows_of(results, TORCHRUN_RELAUNCH)])
    for variant in variants:
        rows = rows_of(results, variant.label)
        if not rows:
            continue
        times = [r.recovery_s for r in rows if r.recovery_s is not None]
        median = median_or_none(times)
        lost = median_or_none([r.lost for r in rows])
        redone = median_or_none([r.redone for r in rows])
        ratio = f"{torch_median / median:.1f}×" if median and torch_median else "—"
        failed = [r.status for r in rows if r.status != "ok"]
        recovered = f"{len(times)}/{len(rows)}" + (f" ({'; '.join(failed)[:120]})" if failed else "")
        out.append(f"| {variant.label} | {recovered} | {fmt(median)} | {fmt(max(times) if times else None)} "
                   f"| {fmt(lost, 0)} | {fmt(redone, 0)} | {ratio} |")
    out.append("")
    return out


def targets(results: list[Result], variants: list[Variant]) -> list[str]:
    out = []
    torch_median = median_or_none([r.recovery_s for r in rows_of(results, TORCHRUN_RELAUNCH)])
    for variant in variants:
        if variant.flashrun_args is None or not rows_of(results, variant.label):
            continue
        rows = rows_of(results, variant.label)
        median = median_or_none([r.recovery_s for r in rows])
        all_ok = all(r.status == "ok" for r in rows)
        losses = [r.lost for r in rows]
        speed = (f"{torch_median / median:.1f}× ({'met' if torch_median / median >= TARGET_SPEEDUP else 'not met'})"
                 if median and torch_median else "— (no torchrun baseline)")
        lost_ok = all_ok and all(v == 0 for v in losses)
        out.append(
            f"Targets, {variant.label}: median recovery ≤ {TARGET_FLASHRUN_S:g} s: {fmt(median)} s "
            f"({'met' if median is not None and median <= TARGET_FLASHRUN_S and all_ok else 'not met'}); "
            f"≥ {TARGET_SPEEDUP:g}× faster than torchrun relaunch: {speed}; 0 completed steps lost: "
            f"{[v for v in losses]} ({'met' if lost_ok else 'not met'})."
        )
    out.append("")
    return out


def phase_tables(results: list[Result], variants: list[Variant]) -> list[str]:
    out = []
    flash = [v for v in variants if v.flashrun_args is not None and rows_of(results, v.label)]
    if flash:
        out.append("flashrun recovery phases, medians (s): detect = failure ts − kill; abort/respawn/rebuild/sync from "
                   "the `recovered` event; recovered and first step are since detection (coordinator's clock); "
                   "kill → first new step is the recovery time above.")
        out.append("")
        out.append("| variant | detect | abort | respawn | rebuild | sync | recovered | first step | "
                   "kill → first new step |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for variant in flash:
            rows = rows_of(results, variant.label)
            cells = [fmt(median_or_none([r.phases.get(p) for r in rows])) for p in PHASES]
            cells.append(fmt(median_or_none([r.recovery_s for r in rows])))
            out.append(f"| {variant.label} | {' | '.join(cells)} |")
        out.append("")
    rows = rows_of(results, TORCHRUN_RELAUNCH)
    if rows:
        out.append("torchrun relaunch phases, medians (s): kill → torchrun exited; relaunch gap (this script); "
                   "relaunch → first step line of the new run (startup, rendezvous, checkpoint load); then → first "
                   "new step (recomputing the steps since the checkpoint).")
        out.append("")
        out.append("| kill → exited | relaunch gap | relaunch → first step | redo → first new step | total |")
        out.append("|---|---|---|---|---|")
        cells = [fmt(median_or_none([r.phases.get(p) for r in rows])) for p in TORCHRUN_PHASES]
        out.append(f"| {' | '.join(cells)} | {fmt(median_or_none([r.recovery_s for r in rows]))} |")
        out.append("")
    return out


def report(results: list[Result], variants: list[Variant], max_restarts: str | None, overhead: list[Throughput],
           args: argparse.Namespace, header: list[str]) -> str:
    out = [*header, "", f"Job: {NPROC} workers, train_ddp.py --steps {args.steps} --step-time {args.step_time:g}; "
           f"kill -9 rank {args.kill_rank} at rank 0's `step {args.kill_step}` line; torchrun checkpoints every "
           f"{args.checkpoint_every} steps; {args.trials} trial(s) each.", ""]
    if results:
        out.extend(recovery_table(results, variants))
        out.extend(targets(results, variants))
        out.extend(phase_tables(results, variants))
    if max_restarts:
        out.extend([max_restarts, ""])
    if overhead:
        out.extend(overhead_lines(overhead, args, TARGET_OVERHEAD_PCT))
    return "\n".join(out)


def describe(result: Result) -> str:
    took = f"{result.recovery_s:.3f} s" if result.recovery_s is not None else result.status
    lost = f", lost {result.lost}" if result.lost is not None else ""
    phases = " ".join(f"{k}={v:.3f}" for k, v in result.phases.items())
    text = f"[{result.index + 1}] {result.variant}: {took}{lost} ({phases}) — {result.detail}"
    if result.status != "ok" and result.recovery_s is not None:
        text += f" [{result.status}]"
    if result.anomalies:
        text += f"\n    ANOMALY: {'; '.join(result.anomalies)}"
        if result.events:
            text += "".join(f"\n    events.jsonl: {event}" for event in result.events
                            if event.get("event") not in ("recoverable",))
    return text


# Main -----------------------------------------------------------------------------------------------------------


def flashrun_help(src: Path) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        done = subprocess.run(flashrun_argv("--help"), env=env, cwd=src, capture_output=True, text=True, timeout=60,
                              start_new_session=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout


def choose_variants(spec: str, help_text: str) -> list[Variant]:
    """`auto`: flashrun with pre-warming on and off when the CLI has --prewarm/--no-prewarm, else plain flashrun;
    otherwise a comma-separated list of flashrun option strings, `default` meaning none."""
    if spec == "auto":
        if "--no-prewarm" in help_text and "--prewarm" in help_text.replace("--prewarm-", ""):
            items = ["--prewarm", "--no-prewarm"]
        elif "--no-prewarm" in help_text:
            items = ["default", "--no-prewarm"]
        else:
            items = ["default"]
    else:
        items = [item.strip() for item in spec.split(",") if item.strip()]
    variants = []
    for item in items:
        extra = () if item == "default" else tuple(shlex.split(item))
        variants.append(Variant(" ".join(["flashrun", *extra]), extra))
    return variants


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=3, help="trials per launcher (default 3)")
    parser.add_argument("--steps", type=int, default=150, help="steps per job (default 150)")
    parser.add_argument("--step-time", type=float, default=0.05, help="train_ddp.py --step-time (default 0.05)")
    parser.add_argument("--kill-step", type=int, default=70, help="kill when rank 0 prints this step (default 70)")
    parser.add_argument("--kill-rank", type=int, default=1, help="the rank to kill -9 (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="train_ddp.py --seed (default 0)")
    parser.add_argument("--checkpoint-every", type=int, default=50,
                        help="torchrun jobs' --checkpoint-every (default 50)")
    parser.add_argument("--flashrun-variants", default="auto",
                        help="comma-separated flashrun option strings to compare, `default` for none (e.g. "
                             "'default,--no-prewarm'); auto (default): --prewarm and --no-prewarm when the CLI has "
                             "them, else default")
    parser.add_argument("--recovery-timeout", type=float, default=60.0,
                        help="seconds after the kill before a trial counts as not recovered (default 60)")
    parser.add_argument("--max-restarts-cap", type=float, default=60.0,
                        help="seconds to wait for torchrun --max-restarts 1 to recover (default 60)")
    parser.add_argument("--skip-torchrun", action="store_true", help="no torchrun trials (flashrun only)")
    parser.add_argument("--skip-max-restarts", action="store_true", help="skip the torchrun --max-restarts 1 trial")
    add_overhead_options(parser, "kill")
    add_source_options(parser)
    args = parser.parse_args(argv)
    if args.trials < 1 or args.overhead_runs < 1 or args.overhead_steps <= args.warmup_steps + 1:
        parser.error("--trials and --overhead-runs must be >= 1, --overhead-steps > --warmup-steps + 1")
    if args.kill_step <= PID_LOOKUP_STEP or args.steps < args.kill_step + 10:
        parser.error(f"need {PID_LOOKUP_STEP} < --kill-step and --steps >= --kill-step + 10 (the job must still be "
                     "running after the recovery)")
    if not 0 <= args.kill_rank < NPROC or args.checkpoint_every < 1 or args.step_time < 0:
        parser.error(f"need 0 <= --kill-rank < {NPROC}, --checkpoint-every >= 1, --step-time >= 0")
    return args


def run_trial(fn: Callable[[], Result], variant: str, index: int) -> Result:
    try:
        return fn()
    except (OSError, subprocess.SubprocessError, RuntimeError, ValueError, KeyError, TypeError) as err:
        return Result(variant, index, status=f"error: {type(err).__name__}: {err}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    prepared = prepare(args, argv, Path(__file__))
    if prepared is None:
        return 2
    root, header = prepared
    help_text = flashrun_help(args.src)
    variants = choose_variants(args.flashrun_variants, help_text)
    prewarm = "has --prewarm/--no-prewarm" if "--no-prewarm" in help_text else "has no --no-prewarm option"
    header.append(f"flashrun variants: {', '.join(v.label for v in variants)} (the benchmarked flashrun CLI {prewarm})")
    print(header[-1], flush=True)
    if not args.skip_torchrun:
        variants.append(Variant(TORCHRUN_RELAUNCH, None))
    interrupt_on_sigterm()
    results: list[Result] = []
    overhead: list[Throughput] = []
    max_restarts: str | None = None
    interrupted = False
    try:
        for index in range(args.trials):
            for variant in variants:
                if variant.flashrun_args is None:
                    result = run_trial(lambda i=index: torchrun_relaunch_trial(i, root, args), variant.label, index)
                else:
                    result = run_trial(lambda v=variant, i=index: flashrun_trial(v, i, root, args), variant.label,
                                       index)
                results.append(result)
                print(describe(result), flush=True)
        if not args.skip_torchrun and not args.skip_max_restarts:
            try:
                max_restarts = max_restarts_trial(root, args)
            except (OSError, subprocess.SubprocessError, RuntimeError, ValueError) as err:
                max_restarts = f"torchrun --max-restarts 1: error: {type(err).__name__}: {err}"
            print(max_restarts, flush=True)
        if not args.skip_overhead:
            run_overhead(root, args, overhead, with_torchrun=not args.skip_torchrun)
    except KeyboardInterrupt:
        interrupted = True
        print("interrupted: the tables cover the trials completed so far", flush=True)
    load = os.getloadavg()
    print("", flush=True)
    print(report(results, variants, max_restarts, overhead, args, header))
    print(f"Load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}. Recovery time = kill → arrival of rank 0's "
          "first line for a step not completed before the kill; lost = L − (resume_step − 1), floored at 0.")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
