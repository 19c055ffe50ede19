"""The recovery report from synthetic event logs: each figure is the documented sum or difference of log fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from flashrun.errors import FlashrunError
from flashrun.report import build_report, format_report, load_report, report_json

T0 = 1_000.0


def ev(ts: float, event: str, generation: int = 0, **fields: Any) -> dict[str, Any]:
    return {"ts": T0 + ts, "event": event, "generation": generation, **fields}


def start(world: int = 2) -> list[dict[str, Any]]:
    return [ev(-0.1, "agent_joined", host="h"), ev(0.0, "rendezvous_complete", nnodes=1, world_size=world),
            ev(2.0, "recoverable")]


def crash(ts: float, rank: int, generation: int = 0, job_step: int = 10, leader_step: int = 12,
          detect: float = 0.02) -> dict[str, Any]:
    return ev(ts, "failure", generation, kind="crash", ranks=[rank], rank=rank, node=0, exit_code=-9,
              exited_at=T0 + ts - detect, evidence=f"rank {rank} was killed", job_step=job_step,
              leader_step=leader_step)


def recovery(ts: float, generation: int, since: float, resume: int, first_step: float,
             phases: tuple[float, float, float, float] = (0.01, 0.08, 0.03, 0.02)) -> list[dict[str, Any]]:
    """recovery_started at ts, recovered `since` s after ts, first step `first_step` s after ts."""
    durations = dict(zip(("abort", "respawn", "rebuild", "sync"), phases, strict=True))
    return [
        ev(ts, "recovery_started", generation, kind="crash", ranks=[1], cause="c", recoveries=generation),
        *(ev(ts + since, "recovery_phase", generation, phase=n, duration_s=d) for n, d in durations.items()),
        ev(ts + since, "recovered", generation, since_detection_s=since, resume_step=resume,
           **{f"{n}_s": d for n, d in durations.items()}),
        ev(ts + first_step, "recovery_phase", generation, phase="first_step", step=resume,
           since_detection_s=first_step),
    ]


def succeeded(ts: float, generation: int) -> list[dict[str, Any]]:
    return [ev(ts, "worker_succeeded", generation, rank=0, node=0, exit_code=0),
            ev(ts, "worker_succeeded", generation, rank=1, node=0, exit_code=0),
            ev(ts, "job_succeeded", generation, restarts=0)]


def test_in_place_recovery_of_a_crash() -> None:
    log = [*start(), crash(5.0, 1, job_step=10, leader_step=12, detect=0.02),
           *recovery(5.0, 1, since=0.1, resume=12, first_step=0.25), *succeeded(10.0, 1)]
    report = build_report(log)
    (failure,) = report.failures
    assert (failure.kind, failure.ranks, failure.node, failure.job_step, failure.leader_step) == ("crash", [1], 0,
                                                                                                  10, 12)
    assert failure.at_s == pytest.approx(5.0)
    (outage,) = report.outages
    assert outage.outcome == "recovered"
    assert outage.detect_s == pytest.approx(0.02)
    assert (outage.abort_s, outage.respawn_s, outage.rebuild_s, outage.sync_s) == (0.01, 0.08, 0.03, 0.02)
    assert outage.recovered_s == 0.1
    assert outage.first_step_s == pytest.approx(0.15)
    assert outage.total_s == 0.25
    assert outage.lost_s == pytest.approx(0.27)
    assert outage.steps_redone == 1  # the leader had completed steps 0..12; the job resumes at 12
    job = report.job
    assert (job.outcome, job.failures, job.recoveries, job.restarts, job.world_size) == ("succeeded", 1, 1, 0, 2)
    assert job.wall_s == pytest.approx(10.0)
    assert job.time_lost_s == pytest.approx(0.27)
    assert job.effective_ratio == pytest.approx((10.0 - 0.27) / 10.0)
    assert job.steps_redone == 1


def test_redone_steps_are_never_negative() -> None:
    # The survivor had applied a step the heartbeats had not reported yet: the job resumes beyond leader_step + 1.
    log = [*start(), crash(5.0, 1, leader_step=19), *recovery(5.0, 1, 0.1, resume=21, first_step=0.2),
           *succeeded(9.0, 1)]
    assert build_report(log).outages[0].steps_redone == 0


def test_two_failures_at_different_times_are_two_outages() -> None:
    log = [*start(4), crash(5.0, 1, leader_step=40), *recovery(5.0, 1, 0.1, resume=41, first_step=0.2),
           crash(8.0, 2, generation=1, leader_step=70, detect=0.03), *recovery(8.0, 2, 0.2, resume=70, first_step=0.5),
           *succeeded(12.0, 2)]
    report = build_report(log)
    assert [o.failures for o in report.outages] == [[1], [2]]
    assert [f.outage for f in report.failures] == [1, 2]
    assert [o.steps_redone for o in report.outages] == [0, 1]
    assert report.outages[1].lost_s == pytest.approx(0.53)
    assert report.job.time_lost_s == pytest.approx(0.22 + 0.53)
    assert report.job.steps_redone == 1
    assert report.job.recoveries == 2


def test_a_failure_during_a_recovery_joins_its_outage() -> None:
    second = ev(5.05, "failure", 1, kind="crash", ranks=[2], rank=2, node=0, exit_code=-9, exited_at=T0 + 5.04,
                evidence="rank 2 was killed", job_step=-1, leader_step=-1)
    log = [*start(4), crash(5.0, 1, leader_step=30, detect=0.01),
           ev(5.0, "recovery_started", 1, kind="crash", ranks=[1], cause="c", recoveries=1), second,
           *recovery(5.05, 2, since=0.4, resume=31, first_step=0.6)]
    # The coordinator times the whole outage from the first detection: shift the since_detection_s accordingly.
    for record in log:
        if "since_detection_s" in record:
            record["since_detection_s"] = round(record["ts"] - (T0 + 5.0), 4)
    log += succeeded(9.0, 2)
    report = build_report(log)
    (outage,) = report.outages
    assert outage.failures == [1, 2]
    assert outage.detect_s == pytest.approx(0.01)  # the first failure's
    assert outage.leader_step == 30  # the fresh detector of the recovery knows no step: -1 does not win
    assert outage.steps_redone == 0
    assert outage.total_s == pytest.approx(0.65)
    assert report.job.time_lost_s == pytest.approx(0.66)
    assert report.job.recoveries == 1


def test_full_restart_loses_time_until_the_restart() -> None:
    log = [*start(), crash(3.0, 1, job_step=-1, leader_step=-1, detect=0.001),
           ev(3.001, "stopping", reason="r"), ev(3.5, "restarting", 1, restarts=1), *succeeded(8.0, 1)]
    report = build_report(log)
    (outage,) = report.outages
    assert outage.outcome == "restarted"
    assert outage.recovered_s == pytest.approx(0.5)
    assert outage.lost_s == pytest.approx(0.501)
    assert outage.steps_redone is None
    assert (report.job.restarts, report.job.steps_redone, report.job.steps_redone_unknown) == (1, 0, 1)
    assert "at most" in format_report(report)


def test_failed_job_loses_the_time_until_its_end() -> None:
    log = [*start(), crash(3.0, 1, detect=0.002), ev(3.001, "stopping", reason="r"),
           ev(3.01, "job_failed", reason="a worker failed and no restarts are left", restarts=0),
           ev(3.02, "worker_succeeded", rank=0, node=0, exit_code=0)]
    report = build_report(log)
    assert report.outages[0].outcome == "job failed"
    assert report.outages[0].lost_s == pytest.approx(0.012)
    assert report.job.outcome == "failed"
    assert report.job.reason == "a worker failed and no restarts are left"
    assert report.job.wall_s == pytest.approx(3.01)  # events after the job's end do not count
    assert "job failed: a worker failed" in format_report(report)


def test_no_failures() -> None:
    report = build_report([*start(), *succeeded(6.0, 0)])
    assert report.failures == [] and report.outages == []
    assert (report.job.wall_s, report.job.time_lost_s, report.job.effective_ratio) == (6.0, 0.0, 1.0)
    text = format_report(report)
    assert "no failures" in text and "100.00 %" in text


def test_a_failure_without_onset_loses_time_from_detection() -> None:
    failure = ev(5.0, "failure", kind="unresponsive", ranks=[1], rank=1, node=0, evidence="no heartbeat",
                 job_step=10, leader_step=11)  # a log written before failures carried silent_s
    report = build_report([*start(), failure, *recovery(5.0, 1, 0.1, resume=12, first_step=0.3),
                           *succeeded(9.0, 1)])
    assert report.outages[0].detect_s is None
    assert report.outages[0].lost_s == pytest.approx(0.3)


def test_a_hang_is_timed_from_the_last_sign_of_life_the_coordinator_had() -> None:
    failure = ev(5.0, "failure", kind="unresponsive", ranks=[1], rank=1, node=0, evidence="no heartbeat",
                 job_step=10, leader_step=11, silent_s=2.1)
    report = build_report([*start(), failure, *recovery(5.0, 1, 0.1, resume=12, first_step=0.3),
                           *succeeded(9.0, 1)])
    assert report.outages[0].detect_s == pytest.approx(2.1)
    assert report.outages[0].lost_s == pytest.approx(2.1 + 0.3)
    outage_row = next(line for line in format_report(report).splitlines() if line.split()[:3] == ["1", "1",
                                                                                                    "recovered"])
    assert outage_row.split()[3:4] == ["2.100"]  # the detect column


def test_log_that_ends_mid_recovery_counts_until_its_last_event() -> None:
    log = [*start(), crash(5.0, 1, detect=0.0), ev(5.0, "recovery_started", 1, kind="crash", ranks=[1], cause="c",
                                                   recoveries=1), ev(6.0, "straggler", rank=0, step=3, leader_step=9)]
    report = build_report(log)
    assert report.outages[0].outcome == "unfinished"
    assert report.job.outcome == "unfinished"
    assert report.outages[0].lost_s == pytest.approx(1.0)
    assert report.job.stragglers == 1


def test_next_failure_before_the_first_new_step_ends_the_outage() -> None:
    partial = recovery(5.0, 1, 0.1, resume=12, first_step=0.3)[:-1]  # no first_step event
    log = [*start(), crash(5.0, 1, detect=0.0), *partial, crash(5.2, 0, generation=1, detect=0.05),
           *recovery(5.2, 2, 0.1, resume=12, first_step=0.3), *succeeded(9.0, 2)]
    report = build_report(log)
    first, second = report.outages
    assert first.outcome == "recovered" and first.total_s is None
    assert first.lost_s == pytest.approx(0.2)
    assert second.lost_s == pytest.approx(0.3)  # its onset (5.15) falls inside the first outage: counted once
    assert report.job.time_lost_s == pytest.approx(0.5)


def test_only_the_last_run_of_a_reused_log_dir_is_reported() -> None:
    first_run = [*start(), crash(1.0, 1), ev(1.01, "job_failed", reason="r", restarts=0)]
    second_run = [{**r, "ts": r["ts"] + 100} for r in [*start(), *succeeded(5.0, 0)]]
    report = build_report([*first_run, *second_run])
    assert report.job.earlier_runs == 1
    assert report.failures == [] and report.job.outcome == "succeeded"
    assert "1 earlier run" in format_report(report)


def test_text_and_json_show_the_same_numbers() -> None:
    log = [*start(), crash(5.0, 1, detect=0.02), *recovery(5.0, 1, 0.1, resume=12, first_step=0.25),
           *succeeded(10.0, 1)]
    report = build_report(log)
    text = format_report(report)
    for figure in ("0.020", "0.010", "0.080", "0.030", "0.100", "0.150", "0.250", "0.270", "10.000 s", "97.30 %"):
        assert figure in text, figure
    data = json.loads(report_json(report))
    assert data["outages"][0]["lost_s"] == pytest.approx(0.27)
    assert data["job"]["effective_ratio"] == pytest.approx(0.973)
    assert max(len(line) for line in text.splitlines()) <= 120


def test_records_that_are_not_events_are_ignored() -> None:
    log = [*start(), {"event": "failure"}, {"ts": "soon", "event": "failure"}, ["not", "a", "dict"],
           *succeeded(4.0, 0)]
    assert build_report(log).failures == []  # type: ignore[arg-type]


def write(tmp_path: Path, lines: list[str]) -> Path:
    (tmp_path / "events.jsonl").write_text("".join(line + "\n" for line in lines))
    return tmp_path


def test_load_skips_malformed_lines_and_counts_them(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in [*start(), *succeeded(4.0, 0)]]
    write(tmp_path, [*lines[:2], "{not json", "42", *lines[2:], '{"ts": 1, "event"'])
    report = load_report(str(tmp_path))
    assert report.skipped_lines == 3
    assert report.job.outcome == "succeeded"
    assert report.source == str(tmp_path / "events.jsonl")
    assert load_report(report.source).job.wall_s == report.job.wall_s  # the file itself may be given


@pytest.mark.parametrize(("lines", "words"), [
    (None, "does not exist"),
    ([], "is empty"),
    (["", "  "], "is empty"),
    (["garbage", "[1, 2]"], "no flashrun event (2 malformed"),
])
def test_load_refuses_logs_with_nothing_to_report(tmp_path: Path, lines: list[str] | None, words: str) -> None:
    target = tmp_path / "missing" if lines is None else write(tmp_path, lines)
    with pytest.raises(FlashrunError, match=words.replace("(", r"\(")) as caught:
        load_report(str(target))
    assert caught.value.exit_code == 2


def test_load_refuses_a_dir_without_events(tmp_path: Path) -> None:
    with pytest.raises(FlashrunError, match="has no events.jsonl"):
        load_report(str(tmp_path))
