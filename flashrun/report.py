"""`flashrun report <log-dir>`: what failures cost a job, computed from its <log-dir>/events.jsonl alone.

Every figure is a sum or a difference of fields the coordinator logged (flashrun/coordinator/job.py); nothing is
estimated. Times are in seconds.

Failures and outages. Each `failure` event is one failure: its kind, its culprit (`ranks`, `node`), the job's
step (`job_step`, the slowest rank's last completed step) and the leader's (`leader_step`, the most advanced
rank's), as the coordinator last heard them. Failures answered together form one *outage*: a failure while a
recovery is under way, or several detected at the same moment, join the outage already open. An outage ends with
the first of:
  - the first new step after an in-place recovery (`recovery_phase` `first_step`);
  - a full restart (`restarting`);
  - the job's end (`job_succeeded`/`job_failed`);
  - the next failure, when one comes after `recovered` but before the first new step;
  - the end of the log (the job may still be running, or its launcher was killed).
Its outcome says how the failures were answered: `recovered` (in place: `recovered` was logged), `restarted`,
`job failed`, `job ended` (the job succeeded before recovering) or `unfinished` (the log ends first).

Per outage, from its first failure (detection = that `failure` event's `ts`):
  detect      onset -> detection. A crash: the `failure`'s ts - its `exited_at` (the worker's exit as its agent saw
              it; across nodes this includes the clocks' skew). The other kinds: its `silent_s`, since the last
              sign of life the coordinator had (the node's last summary, the rank's last heartbeat, the job's last
              step), which came at or before the onset. Unknown when the failure carries neither.
  abort, respawn, rebuild, sync
              the `recovery_phase` events' duration_s (the same as `recovered`'s abort_s, ...): each the slowest
              rank's own measure. They overlap (the replacement starts while the others abort), so they do not add
              up to the total.
  recovered   detection -> every rank in the new generation: `recovered`'s since_detection_s. For a full restart:
              detection -> the `restarting` event (the new workers' start-up is not in the log).
  first step  recovered -> the first new step completed: `first_step`'s since_detection_s - recovered.
  total       detection -> the first new step completed: `first_step`'s since_detection_s.
  lost        onset (detection when unknown) -> the outage's end, as listed above. Overlapping outages count once.
  redone      steps computed twice: (leader_step + 1) - resume_step, at least 0, where leader_step + 1 is how many
              steps the most advanced rank had completed at the failure (the highest `leader_step` among the
              outage's failures) and resume_step (`recovered`) is the first step the job runs after the recovery:
              steps 0 .. resume_step - 1 are kept (flashrun/worker/run.py). leader_step comes from heartbeats, up to
              one interval old, so this is a lower bound. Unknown for full restarts (where the script restarts is
              not logged).

Job figures. Wall time: from `rendezvous_complete` (or the first event) to `job_succeeded`/`job_failed` (or the
last event). Time lost: the sum of the outages' lost time within the wall time. Effective training time ratio:
(wall time - time lost) / wall time. For full restarts time lost stops at the restart, so with restarts the ratio
is an upper bound. Steps redone: the sum over outages where it is known.

A log dir reused by several runs holds them one after another (each begins with `rendezvous_complete`); the report
covers the last one and says how many came before. Lines that are not JSON event objects (a line cut short by a
killed launcher, say) are skipped and counted; a log with no valid event is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from flashrun.errors import FlashrunError

EVENTS_FILE = "events.jsonl"
OUTCOME_RECOVERED = "recovered"
OUTCOME_RESTARTED = "restarted"
OUTCOME_JOB_FAILED = "job failed"
OUTCOME_JOB_ENDED = "job ended"
OUTCOME_UNFINISHED = "unfinished"
PHASES = ("abort", "respawn", "rebuild", "sync")


@dataclasses.dataclass
class FailureRow:
    """One `failure` event."""

    number: int
    outage: int
    at_s: float
    """Detection, seconds since the job started."""
    generation: int
    kind: str
    ranks: list[int]
    node: int | None
    exit_code: int | None
    evidence: str
    job_step: int | None
    leader_step: int | None
    detect_s: float | None


@dataclasses.dataclass
class Outage:
    """The failures one recovery, restart or the job's end answered; figures as the module docstring defines them
    (None: not in the log)."""

    number: int
    failures: list[int]
    outcome: str = OUTCOME_UNFINISHED
    detected_ts: float = 0.0
    detect_s: float | None = None
    abort_s: float | None = None
    respawn_s: float | None = None
    rebuild_s: float | None = None
    sync_s: float | None = None
    recovered_s: float | None = None
    first_step_s: float | None = None
    total_s: float | None = None
    lost_s: float = 0.0
    leader_step: int | None = None
    resume_step: int | None = None
    steps_redone: int | None = None
    end_ts: float | None = None


@dataclasses.dataclass
class JobFigures:
    outcome: str
    """succeeded | failed | unfinished"""
    reason: str
    wall_s: float
    time_lost_s: float
    effective_ratio: float | None
    steps_redone: int
    steps_redone_unknown: int
    """Outages whose redone steps the log cannot tell: no in-place recovery (a restart, the job's end)."""
    failures: int
    recoveries: int
    restarts: int
    stragglers: int
    world_size: int | None
    nnodes: int | None
    earlier_runs: int


@dataclasses.dataclass
class Report:
    job: JobFigures
    failures: list[FailureRow]
    outages: list[Outage]
    skipped_lines: int = 0
    source: str = ""


# Pure ----------------------------------------------------------------------------------------------------------


def is_event(record: object) -> bool:
    """A line of events.jsonl as EventLog writes it: an object with a numeric `ts` and a string `event`."""
    return isinstance(record, dict) and isinstance(record.get("event"), str) and _number(record.get("ts")) is not None


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def build_report(records: list[dict[str, Any]]) -> Report:
    """The report of the last run in `records` (events.jsonl's lines, in order); records that are not events
    (see is_event) are ignored."""
    events = [r for r in records if is_event(r)]
    starts = [i for i, r in enumerate(events) if r["event"] == "rendezvous_complete"]
    earlier_runs = max(0, len(starts) - 1)
    if starts:
        events = events[starts[-1]:]
    if not events:
        return Report(JobFigures("unfinished", "no events", 0.0, 0.0, None, 0, 0, 0, 0, 0, 0, None, None, 0), [], [])
    start_ts = float(events[0]["ts"])
    failures: list[FailureRow] = []
    outages: list[Outage] = []
    open_outage: Outage | None = None
    outcome, reason, end_ts = "unfinished", "the log ends before the job did", float(events[-1]["ts"])
    rendezvous = events[0] if events[0]["event"] == "rendezvous_complete" else {}
    recoveries = restarts = stragglers = 0

    def close(outage: Outage, ts: float, how: str) -> None:
        outage.end_ts = ts
        if outage.outcome != OUTCOME_RECOVERED:
            outage.outcome = how

    for record in events:
        name, ts = record["event"], float(record["ts"])
        if name == "failure":
            if open_outage is not None and open_outage.outcome == OUTCOME_RECOVERED:
                close(open_outage, ts, OUTCOME_RECOVERED)
                open_outage = None
            if open_outage is None:
                open_outage = Outage(len(outages) + 1, [], detected_ts=ts)
                outages.append(open_outage)
            row = _failure_row(record, len(failures) + 1, open_outage.number, start_ts)
            failures.append(row)
            open_outage.failures.append(row.number)
            if len(open_outage.failures) == 1:
                open_outage.detect_s = row.detect_s
            if row.leader_step is not None:
                open_outage.leader_step = max(row.leader_step, open_outage.leader_step
                                              if open_outage.leader_step is not None else row.leader_step)
        elif name == "recovery_phase" and open_outage is not None:
            phase = record.get("phase")
            if phase in PHASES:
                setattr(open_outage, f"{phase}_s", _number(record.get("duration_s")))
            elif phase == "first_step" and open_outage.outcome == OUTCOME_RECOVERED:
                since = _number(record.get("since_detection_s"))
                if since is not None:
                    open_outage.total_s = since
                    if open_outage.recovered_s is not None:
                        open_outage.first_step_s = since - open_outage.recovered_s
                    open_outage.end_ts = open_outage.detected_ts + since
                    open_outage = None
        elif name == "recovered" and open_outage is not None:
            recoveries += 1
            open_outage.outcome = OUTCOME_RECOVERED
            open_outage.recovered_s = _number(record.get("since_detection_s"))
            open_outage.resume_step = _integer(record.get("resume_step"))
        elif name == "restarting":
            restarts += 1
            if open_outage is not None:
                open_outage.recovered_s = ts - open_outage.detected_ts
                close(open_outage, ts, OUTCOME_RESTARTED)
                open_outage = None
        elif name == "straggler":
            stragglers += 1
        elif name in ("job_succeeded", "job_failed"):
            outcome = "succeeded" if name == "job_succeeded" else "failed"
            reason = str(record.get("reason", "all ranks finished" if name == "job_succeeded" else ""))
            end_ts = ts
            if open_outage is not None:
                close(open_outage, ts, OUTCOME_JOB_FAILED if name == "job_failed" else OUTCOME_JOB_ENDED)
                open_outage = None
            break
    if open_outage is not None:
        close(open_outage, end_ts, OUTCOME_UNFINISHED)

    lost_total = _account_lost(outages, start_ts, end_ts)
    for outage in outages:
        if outage.outcome != OUTCOME_RESTARTED and outage.leader_step is not None \
                and outage.resume_step is not None:
            outage.steps_redone = max(0, outage.leader_step + 1 - outage.resume_step)
    wall = end_ts - start_ts
    job = JobFigures(
        outcome=outcome, reason=reason, wall_s=wall, time_lost_s=lost_total,
        effective_ratio=(wall - lost_total) / wall if wall > 0 else None,
        steps_redone=sum(o.steps_redone or 0 for o in outages),
        steps_redone_unknown=sum(1 for o in outages if o.steps_redone is None),
        failures=len(failures), recoveries=recoveries, restarts=restarts, stragglers=stragglers,
        world_size=_integer(rendezvous.get("world_size")), nnodes=_integer(rendezvous.get("nnodes")),
        earlier_runs=earlier_runs,
    )
    return Report(job, failures, outages)


def _failure_row(record: dict[str, Any], number: int, outage: int, start_ts: float) -> FailureRow:
    ts = float(record["ts"])
    exited_at = _number(record.get("exited_at"))
    detect_s = ts - exited_at if exited_at is not None else _number(record.get("silent_s"))
    ranks = record.get("ranks")
    return FailureRow(
        number=number, outage=outage, at_s=ts - start_ts, generation=_integer(record.get("generation")) or 0,
        kind=str(record.get("kind", "?")),
        ranks=[r for r in ranks if _integer(r) is not None] if isinstance(ranks, list) else [],
        node=_integer(record.get("node")), exit_code=_integer(record.get("exit_code")),
        evidence=str(record.get("evidence", "")), job_step=_integer(record.get("job_step")),
        leader_step=_integer(record.get("leader_step")), detect_s=detect_s,
    )


def _account_lost(outages: list[Outage], start_ts: float, end_ts: float) -> float:
    """Each outage's lost time, onset (or detection) to its end, clipped to the job and to the previous outage's
    end so that overlapping time counts once; returns the sum."""
    total, previous_end = 0.0, start_ts
    for outage in outages:
        onset = outage.detected_ts - (outage.detect_s or 0.0)
        begin = max(onset, previous_end, start_ts)
        end = min(outage.end_ts if outage.end_ts is not None else end_ts, end_ts)
        outage.lost_s = max(0.0, end - begin)
        total += outage.lost_s
        previous_end = max(previous_end, end)
    return total


# Output --------------------------------------------------------------------------------------------------------


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _optional(value: object) -> str:
    return "-" if value is None else str(value)


def _table(header: list[str], rows: list[list[str]], left: set[int]) -> list[str]:
    """Columns as wide as their widest cell; the columns in `left` are left-aligned, the others right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = []
    for cells in [header, *rows]:
        parts = [cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths,
                                                                                                 strict=True))]
        lines.append("  " + "  ".join(parts).rstrip())
    return lines


def format_report(report: Report) -> str:
    """Plain text, aligned, readable when piped."""
    job = report.job
    lines = [f"recovery report: {report.source}" if report.source else "recovery report"]
    if job.earlier_runs:
        lines.append(f"  (the log holds {job.earlier_runs} earlier run(s); this is the last one)")
    size = f"{job.nnodes} node(s), {job.world_size} rank(s)" if job.world_size is not None else "size unknown"
    reason = f": {job.reason}" if job.reason and job.outcome != "succeeded" else ""
    lines.append(f"job {job.outcome}{reason}  ({size})")
    lines.append("")
    if not report.failures:
        lines.append("no failures")
    else:
        rows = [[str(f.number), f"{f.at_s:.3f}", str(f.generation), f.kind,
                 ",".join(map(str, f.ranks)) or "-", _optional(f.node),
                 f"{_optional(f.job_step)}/{_optional(f.leader_step)}", str(f.outage)] for f in report.failures]
        lines.append("failures (at: seconds since the job started)")
        lines.extend(_table(["#", "at", "gen", "kind", "ranks", "node", "job/leader step", "outage"], rows,
                            left={3, 4}))
        lines.extend(f"  #{f.number} {f.evidence}" for f in report.failures)
        lines.append("")
        lines.append("outages (seconds; phases overlap, each the slowest rank's: they need not add up)")
        rows = [[str(o.number), ",".join(map(str, o.failures)), o.outcome, _seconds(o.detect_s), _seconds(o.abort_s),
                 _seconds(o.respawn_s), _seconds(o.rebuild_s), _seconds(o.sync_s), _seconds(o.recovered_s),
                 _seconds(o.first_step_s), _seconds(o.total_s), _seconds(o.lost_s), _optional(o.steps_redone)]
                for o in report.outages]
        lines.extend(_table(["#", "failures", "outcome", "detect", "abort", "respawn", "rebuild", "sync", "recovered",
                             "first step", "total", "lost", "redone"], rows, left={1, 2}))
        lines.append("  detect: the crash (or the last sign of life) -> detected.  recovered: detected -> every rank "
                     "in the new generation")
        lines.append("  (for a restart: -> restarting).  first step: recovered -> first new step.  total: detected -> "
                     "first new step.")
        lines.append("  lost: failure (or detected) -> first new step, restart or job end.  redone: steps computed "
                     "twice.")
    lines.append("")
    ratio = "-" if job.effective_ratio is None else f"{100 * job.effective_ratio:.2f} %"
    if job.restarts and job.effective_ratio is not None:
        ratio += " (at most: a restart's start-up is not in the log)"
    redone = str(job.steps_redone)
    if job.steps_redone_unknown:
        redone += f" (+ unknown, in {job.steps_redone_unknown} outage(s) without an in-place recovery)"
    until = "the end of the log" if job.outcome == "unfinished" else f"job {job.outcome}"
    figures = [
        ("wall time", f"{job.wall_s:.3f} s (rendezvous -> {until})"),
        ("time lost to failures", f"{job.time_lost_s:.3f} s"),
        ("effective training time", ratio),
        ("steps redone", redone),
        ("failures", f"{job.failures}"),
        ("in-place recoveries", f"{job.recoveries}"),
        ("full restarts", f"{job.restarts}"),
        ("stragglers", str(job.stragglers)),
    ]
    width = max(len(name) for name, _ in figures)
    lines.append("job")
    lines.extend(f"  {name.ljust(width)}  {value}" for name, value in figures)
    if report.skipped_lines:
        lines.append(f"  (skipped {report.skipped_lines} malformed line(s) of the log)")
    return "\n".join(lines)


def report_json(report: Report) -> str:
    return json.dumps(dataclasses.asdict(report), indent=2)


# I/O -----------------------------------------------------------------------------------------------------------


def load_report(path: str) -> Report:
    """Read <path>/events.jsonl (or `path` itself, if it is the file) and build its report; FlashrunError when
    there is nothing to report on."""
    file = os.path.join(path, EVENTS_FILE) if os.path.isdir(path) else path
    if not os.path.exists(file):
        where = f"{path} has no {EVENTS_FILE}" if os.path.isdir(path) else f"{path} does not exist"
        raise FlashrunError(f"{where}: give the --log-dir of a flashrun run (it holds {EVENTS_FILE})")
    try:
        with open(file, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError as err:
        raise FlashrunError(f"cannot read {file}: {err.strerror}") from None
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if is_event(record):
            records.append(record)
        else:
            skipped += 1
    if not records:
        if not skipped:
            raise FlashrunError(f"{file} is empty: the job has logged no event yet; run the report when it has")
        raise FlashrunError(f"{file} holds no flashrun event ({skipped} malformed line(s)): give the --log-dir of "
                            "a flashrun run")
    report = build_report(records)
    report.skipped_lines, report.source = skipped, file
    return report
