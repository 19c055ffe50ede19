"""`flashrun report` on the log of a real job whose worker crashed: its numbers are the event log's own fields.

The expected figures are computed here straight from events.jsonl, as flashrun/report.py documents them, and
compared with both the JSON and the text output of the real command.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import REPO, Launcher, wait_for

TRAIN = str(REPO / "scripts" / "examples" / "train_ddp.py")
USAGE_EXIT = 2
EXACT = 1e-6
"""Sums of Unix timestamps (about 1.8e9, resolution 2.4e-7) agree to this, in whatever order they are added."""


@pytest.fixture(scope="module")
def crashed_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Launcher, Path]]:
    """A 2-rank job where rank 1 raises at step 20 and is recovered in place; its --log-dir."""
    tmp = tmp_path_factory.mktemp("report")
    launcher = Launcher(tmp)
    try:
        logs = tmp / "logs"
        run = launcher.flashrun("--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), TRAIN,
                                "--steps", "40", "--step-time", "0.05", "--inject-exception", "1:20")
        assert run.wait(180) == 0, run.output
        wait_for(lambda: launcher.survivors() == [], 15, "every process to be gone")
        yield launcher, logs
    finally:
        launcher.cleanup()


def events(logs: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (logs / "events.jsonl").read_text().splitlines()]


def one(records: list[dict[str, Any]], name: str, **match: Any) -> dict[str, Any]:
    found = [r for r in records if r["event"] == name and all(r.get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"expected one {name} {match}, got {found}"
    return found[0]


def report(launcher: Launcher, target: Path, *options: str) -> tuple[int, str]:
    query = launcher.flashrun("report", str(target), *options, name="report")
    return query.wait(60), query.output


def expected(records: list[dict[str, Any]]) -> dict[str, float]:
    failure, recovered = one(records, "failure"), one(records, "recovered")
    first_step = one(records, "recovery_phase", phase="first_step")
    detect = failure["ts"] - failure["exited_at"]
    wall = one(records, "job_succeeded")["ts"] - one(records, "rendezvous_complete")["ts"]
    lost = detect + first_step["since_detection_s"]
    return {
        "detect_s": detect,
        **{f"{p}_s": one(records, "recovery_phase", phase=p)["duration_s"] for p in ("abort", "respawn", "rebuild",
                                                                                       "sync")},
        "recovered_s": recovered["since_detection_s"],
        "first_step_s": first_step["since_detection_s"] - recovered["since_detection_s"],
        "total_s": first_step["since_detection_s"],
        "lost_s": lost,
        "steps_redone": max(0, failure["leader_step"] + 1 - recovered["resume_step"]),
        "wall_s": wall,
        "effective_ratio": (wall - lost) / wall,
    }


def test_json_report_equals_the_event_log(crashed_job: tuple[Launcher, Path]) -> None:
    launcher, logs = crashed_job
    records = events(logs)
    code, output = report(launcher, logs, "--json")
    assert code == 0, output
    data = json.loads(output)
    want = expected(records)
    failure = one(records, "failure")
    (row,) = data["failures"]
    assert (row["kind"], row["ranks"], row["node"], row["exit_code"]) == ("crash", [1], 0, 1)
    assert (row["job_step"], row["leader_step"]) == (failure["job_step"], failure["leader_step"])
    (outage,) = data["outages"]
    assert outage["outcome"] == "recovered"
    for field in ("detect_s", "abort_s", "respawn_s", "rebuild_s", "sync_s", "recovered_s", "first_step_s",
                  "total_s", "lost_s"):
        assert outage[field] == pytest.approx(want[field], abs=EXACT), field
    assert outage["steps_redone"] == want["steps_redone"]
    job = data["job"]
    assert (job["outcome"], job["failures"], job["recoveries"], job["restarts"]) == ("succeeded", 1, 1, 0)
    assert job["wall_s"] == pytest.approx(want["wall_s"], abs=EXACT)
    assert job["time_lost_s"] == pytest.approx(want["lost_s"], abs=EXACT)
    assert job["effective_ratio"] == pytest.approx(want["effective_ratio"], abs=EXACT)
    assert job["steps_redone"] == want["steps_redone"]


def test_text_report_shows_the_same_numbers(crashed_job: tuple[Launcher, Path]) -> None:
    launcher, logs = crashed_job
    want = expected(events(logs))
    code, text = report(launcher, logs)
    assert code == 0, text
    (row,) = [line.split() for line in text.splitlines() if line.split()[:3] == ["1", "1", "recovered"]]
    columns = ["detect_s", "abort_s", "respawn_s", "rebuild_s", "sync_s", "recovered_s", "first_step_s", "total_s",
               "lost_s"]
    assert row[3:12] == [f"{want[c]:.3f}" for c in columns]
    assert row[12] == str(want["steps_redone"])
    assert f"wall time                {want['wall_s']:.3f} s" in text
    assert f"time lost to failures    {want['lost_s']:.3f} s" in text
    assert f"effective training time  {100 * want['effective_ratio']:.2f} %" in text


def test_bad_input_is_one_line_and_exit_2(crashed_job: tuple[Launcher, Path], tmp_path: Path) -> None:
    launcher, _ = crashed_job
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "events.jsonl").write_text("")
    for target, words in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "has no events.jsonl"),
                          (empty, "is empty")):
        code, output = report(launcher, target)
        assert code == USAGE_EXIT, output
        assert output.strip().startswith("flashrun: error:") and words in output, output
        assert len(output.strip().splitlines()) == 1 and "Traceback" not in output, output
