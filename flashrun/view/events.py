"""Event records (the lines of events.jsonl) as short human text, and the latest recovery assembled from them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from rich.text import Text

RECOVERY_PHASES = ("abort", "respawn", "rebuild", "sync")
"""The in-place recovery phases the coordinator times, in order."""

QUIET_EVENTS = frozenset({"worker_succeeded"})
"""Per-rank events left out of event lines and the panel's list: thousands at the end of a big job would bury the
rest, and `job_succeeded` (or the ranks' states) says the same."""

EVENT_STYLES: Mapping[str, str] = {
    "failure": "red", "job_failed": "bold red", "agent_rejected": "red", "stopping": "red",
    "recovered": "green", "job_succeeded": "bold green", "worker_succeeded": "dim",
    "recovery_started": "cyan", "recovery_phase": "cyan", "spare_takes_over": "cyan", "restarting": "yellow",
    "straggler": "yellow", "prewarm_fallback": "yellow",
}


def format_duration(seconds: float) -> str:
    """Short human durations: 85ms, 1.77s, 42s, 3m12s, 2h03m; `-` for an unknown (negative) one."""
    if seconds < 0:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_step(step: int) -> str:
    return "-" if step < 0 else str(step)


def one_line(value: object) -> str:
    return " ".join(str(value).split())


def ranks_text(ranks: Sequence[int]) -> str:
    """`rank 3` or `ranks 0,1,...` (at most 8 listed)."""
    ranks = list(ranks)
    shown = ",".join(str(rank) for rank in ranks[:8]) + (f",... ({len(ranks)} in all)" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) != 1 else ''} {shown}"


def describe_event(record: Mapping[str, Any]) -> str:
    """One line for one events.jsonl record, without its time and generation."""
    name = str(record.get("event", "?"))
    f = record
    if name == "failure":
        return f"failure {f.get('kind', '?')}: {one_line(f.get('evidence', ''))}"
    if name == "recovery_started":
        return (f"recovery #{f.get('recoveries', '?')} started after {f.get('kind', '?')} of "
                f"{ranks_text(f.get('ranks', []))}")
    if name == "recovered":
        return (f"recovered in {format_duration(float(f.get('since_detection_s', -1)))}, resuming at step "
                f"{format_step(int(f.get('resume_step', -1)))}")
    if name == "recovery_phase":
        if f.get("phase") == "first_step":
            return (f"first step {f.get('step')} done {format_duration(float(f.get('since_detection_s', -1)))} "
                    "after detection")
        if "duration_s" in f:
            return f"recovery phase {f.get('phase')} took {format_duration(float(f['duration_s']))}"
        if "since_detection_s" in f:
            return (f"recovery phase {f.get('phase')} {format_duration(float(f['since_detection_s']))} "
                    "after detection")
    if name == "straggler":
        return f"straggler: rank {f.get('rank')} at step {f.get('step')}, leader at {f.get('leader_step')}"
    if name == "restarting":
        return f"restarting all workers (restart {f.get('restarts')})"
    if name == "job_failed":
        return f"job failed: {one_line(f.get('reason', ''))}"
    if name == "job_succeeded":
        return f"job succeeded (restarts {f.get('restarts', 0)})"
    if name == "worker_succeeded":
        return f"rank {f.get('rank')} finished"
    if name == "rendezvous_complete":
        return f"rendezvous complete: {f.get('world_size')} ranks on {f.get('nnodes')} node(s)"
    if name == "stopping":
        return f"stopping workers: {one_line(f.get('reason', ''))}"
    details = " ".join(f"{key}={one_line(value)}" for key, value in record.items()
                       if key not in ("ts", "event", "generation"))
    return f"{name} {details}".rstrip()


def event_line(record: Mapping[str, Any]) -> str:
    """`[gen N] <description>`: how the plain (non-terminal) mode prints each event."""
    return f"[gen {record.get('generation', '?')}] {describe_event(record)}"


@dataclasses.dataclass(frozen=True)
class Recovery:
    """The latest in-place recovery, assembled from its events; None fields are not known (yet)."""

    number: object
    generation: int
    cause: str
    started_ts: float
    detect_s: float | None
    phases: dict[str, float]
    recovered_s: float | None
    resume_step: int | None
    first_step_s: float | None


def latest_recovery(events: Sequence[Mapping[str, Any]]) -> Recovery | None:
    start = next((i for i in range(len(events) - 1, -1, -1) if events[i].get("event") == "recovery_started"), None)
    if start is None:
        return None
    started = events[start]
    generation = int(started.get("generation", -1))
    # Detection latency is known for crashes: the agent stamped the exit, the coordinator stamped the failure.
    detect_s = None
    for record in reversed(events[:start]):
        if record.get("event") != "failure":
            break
        if "exited_at" in record:
            detect_s = max(0.0, float(record["ts"]) - float(record["exited_at"]))
    phases: dict[str, float] = {}
    recovered_s = first_step_s = None
    resume_step = None
    for record in events[start + 1:]:
        if int(record.get("generation", -1)) != generation:
            continue
        name, phase = record.get("event"), record.get("phase")
        if name == "recovery_phase" and phase in RECOVERY_PHASES:
            phases[str(phase)] = float(record.get("duration_s", 0.0))
        elif name == "recovery_phase" and phase == "first_step":
            first_step_s = float(record.get("since_detection_s", 0.0))
        elif name == "recovered":
            recovered_s = float(record.get("since_detection_s", 0.0))
            resume_step = int(record.get("resume_step", -1))
            for name in RECOVERY_PHASES:
                if f"{name}_s" in record:
                    phases.setdefault(name, float(record[f"{name}_s"]))
    cause = f"{started.get('kind', '?')} of {ranks_text(started.get('ranks', []))}"
    return Recovery(started.get("recoveries", "?"), generation, cause, float(started.get("ts", 0.0)), detect_s,
                    phases, recovered_s, resume_step, first_step_s)


def recovery_chunks(recovery: Recovery, now_wall: float) -> list[Text]:
    """The recovery line's pieces, outcome first (it must survive a narrow terminal), then the phase timings."""
    chunks = [Text(f"recovery #{recovery.number} (gen {recovery.generation}, {recovery.cause})", style="bold cyan")]
    if recovery.recovered_s is None:
        chunks.append(Text(f"in progress for {format_duration(max(0.0, now_wall - recovery.started_ts))}",
                           style="bold cyan"))
    else:
        chunks.append(Text(f"recovered in {format_duration(recovery.recovered_s)}", style="bold green"))
        resume_step = -1 if recovery.resume_step is None else recovery.resume_step
        chunks.append(Text(f"resumed at step {format_step(resume_step)}"))
    if recovery.detect_s is not None:
        chunks.append(Text(f"detect {format_duration(recovery.detect_s)}"))
    chunks.extend(Text(f"{phase} {format_duration(recovery.phases[phase])}") for phase in RECOVERY_PHASES
                  if phase in recovery.phases)
    if recovery.first_step_s is not None:
        chunks.append(Text(f"first step after {format_duration(recovery.first_step_s)}"))
    return chunks
