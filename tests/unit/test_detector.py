"""The failure detector: typed failures with the right culprit, from summaries and a clock passed in."""

from __future__ import annotations

from flashrun.config import Detection
from flashrun.coordinator.detector import FailureDetector, RankReport

SETTINGS = Detection()  # interval 0.25 s, heartbeat timeout 2 s, node timeout 10 s, stall floor 3 s
NODES = {0: range(0, 2), 1: range(2, 4)}


def report(rank: int, step: int, age: float = 0.1, collective: str = "", seq: int = 0,
           finished: bool = False) -> RankReport:
    return RankReport(rank=rank, node_rank=rank // 2, local_rank=rank % 2, pid=100 + rank, step=step,
                      heartbeat_age_s=age, in_collective=bool(collective), collective=collective,
                      collective_seq=seq, finished=finished)


def feed(detector: FailureDetector, now: float, **per_rank: RankReport) -> None:
    by_node: dict[int, list[RankReport]] = {}
    for r in per_rank.values():
        by_node.setdefault(r.node_rank, []).append(r)
    for node, reports in by_node.items():
        detector.observe(node, reports, now)


def steady(detector: FailureDetector, until: float, step_s: float = 0.1) -> int:
    """All four ranks step in lockstep every `step_s` until `until`; returns the last step."""
    now, step = 0.0, 0
    while now < until:
        feed(detector, now, **{f"r{r}": report(r, step) for r in range(4)})
        assert detector.check(now) == []
        now, step = now + step_s, step + 1
    return step - 1


def test_silent_heartbeats_make_that_rank_unresponsive() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    step = steady(detector, 5.0)
    feed(detector, 7.5, r0=report(0, step), r1=report(1, step, age=2.4), r2=report(2, step), r3=report(3, step))

    [failure] = detector.check(7.5)

    assert (failure.kind, failure.ranks, failure.node_rank) == ("unresponsive", (1,), 0)
    assert "no heartbeat from rank 1 (pid 101) for 2.40 s" in failure.evidence
    assert abs(failure.silent_s - 2.4) < 1e-9  # its last heartbeat, as old as its agent measured it


def test_an_unresponsive_rank_was_silent_since_its_last_beat_before_the_summary_came() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    step = steady(detector, 5.0)
    feed(detector, 7.5, r0=report(0, step), r1=report(1, step, age=2.4), r2=report(2, step), r3=report(3, step))

    [failure] = detector.check(7.7)  # the check comes 0.2 s after the summary

    assert abs(failure.silent_s - 2.6) < 1e-9


def test_a_late_summary_is_not_taken_for_silent_workers() -> None:
    # The agent's last summary said every worker was fine; it is late, which is the node's matter, not theirs.
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    steady(detector, 5.0)

    assert detector.check(7.2) == []  # 2.3 s after the last summary: an extrapolated age would exceed 2 s


def test_the_rank_outside_the_blocked_collective_is_the_culprit_of_a_stall() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    step = steady(detector, 5.0)
    stuck = {f"r{r}": report(r, step, collective="all_reduce", seq=step + 1) for r in (0, 2, 3)}
    for now in (5.5, 6.5, 7.5, 8.5):
        feed(detector, now, **stuck, r1=report(1, step, seq=step))
    assert detector.stall_threshold_s() == 3.0  # the floor: 10 x 0.1 s steps is shorter

    [failure] = detector.check(8.5)

    assert (failure.kind, failure.ranks) == ("stalled", (1,))
    assert f"ranks [0, 2, 3] wait in all_reduce #{step + 1}, ranks [1] never entered it" in failure.evidence
    assert abs(failure.silent_s - (8.5 - step * 0.1)) < 0.01  # since the job's last step


def test_a_stall_with_every_rank_inside_the_collective_names_no_culprit() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    step = steady(detector, 5.0)
    feed(detector, 8.5, **{f"r{r}": report(r, step, collective="all_reduce", seq=7) for r in range(4)})

    [failure] = detector.check(8.5)

    assert (failure.kind, failure.ranks) == ("stalled", ())
    assert "no single culprit" in failure.evidence


def test_the_stall_threshold_adapts_to_slow_steps() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    step = steady(detector, 20.0, step_s=1.0)  # 1 s steps: threshold 10 s, not the 3 s floor
    feed(detector, 26.0, **{f"r{r}": report(r, step) for r in range(4)})

    assert detector.stall_threshold_s() == 10.0
    assert detector.check(26.0) == []


def test_before_the_first_step_only_the_ceiling_applies() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    feed(detector, 100.0, **{f"r{r}": report(r, -1) for r in range(4)})  # still building the model

    assert detector.check(100.0) == []
    assert detector.stall_threshold_s() == SETTINGS.stall_ceiling_s


def test_a_node_whose_summaries_stop_is_lost_with_all_its_ranks() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    steady(detector, 2.0)
    for now in (3.0, 6.0, 9.0, 12.5):
        detector.observe(0, [report(0, 30), report(1, 30)], now)

    [failure] = detector.check(12.5)

    assert (failure.kind, failure.node_rank, failure.ranks) == ("node_lost", 1, (2, 3))
    assert abs(failure.silent_s - (12.5 - 1.9)) < 0.11  # since its last summary, in the steady phase


def test_a_slow_but_progressing_rank_is_a_straggler_not_a_failure() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    now = 0.0
    for tick in range(100):  # rank 3 runs at half speed, the others keep going (no collective couples them)
        now = tick * 0.25
        feed(detector, now, **{f"r{r}": report(r, tick // 2 if r == 3 else tick) for r in range(4)})
        assert detector.check(now) == []

    assert detector.stragglers == {3}


def test_sampling_jitter_of_fast_steps_makes_no_straggler() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    for tick in range(100):  # 100 steps/s; rank 2's beats are always sampled 0.2 s earlier than the others
        now = tick * 0.25
        feed(detector, now, **{f"r{r}": report(r, int((now - (0.2 if r == 2 else 0)) * 100)) for r in range(4)})
        assert detector.check(now) == []

    assert detector.stragglers == set()


def test_a_burst_of_simultaneous_failures_reports_each_once() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    step = steady(detector, 5.0)
    silent = {f"r{r}": report(r, step, age=2.5) for r in (0, 2, 3)}
    feed(detector, 7.5, r1=report(1, step), **silent)

    failures = detector.check(7.5)

    assert sorted((f.kind, f.ranks) for f in failures) == [("unresponsive", (0,)), ("unresponsive", (2,)),
                                                            ("unresponsive", (3,))]
    assert detector.check(7.6) == []  # reported once


def test_finished_ranks_may_go_quiet() -> None:
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    step = steady(detector, 5.0)
    feed(detector, 9.0, **{f"r{r}": report(r, step, age=3.5, finished=True) for r in range(4)})

    assert detector.check(9.0) == []


def test_before_its_first_step_a_silent_rank_gets_the_startup_timeout() -> None:
    # Importing torch or building the model can hold the GIL, and so the heartbeat thread, for seconds.
    detector = FailureDetector(SETTINGS, NODES, 0.0)
    starting = {f"r{r}": report(r, -1) for r in range(4)}
    feed(detector, 5.0, **{**starting, "r1": report(1, -1, age=SETTINGS.heartbeat_timeout_s + 1)})
    assert detector.check(5.0) == []

    feed(detector, 25.0, **{**starting, "r1": report(1, -1, age=SETTINGS.startup_heartbeat_timeout_s + 0.5)})
    [failure] = detector.check(25.0)
    assert (failure.kind, failure.ranks) == ("unresponsive", (1,))
