"""Fault drills end to end: `flashrun inject` against real jobs, which must show the failure and recover from it.

Jobs are scripts/examples/train_ddp.py (flashrun's step loop) or tests/probes/fault_probe.py (no step loop), run
with --allow-inject unless a test says otherwise; every drill's effect is read from events.jsonl and the output.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers import PROBES, REPO, Launch, Launcher, events, free_port, named, wait_for

TRAIN = str(REPO / "scripts" / "examples" / "train_ddp.py")
STEPS = 60
STEP_TIME = "0.05"
AT_STEP = 25
"""Drills at a step are sent once rank 0 printed step 2: far enough ahead for the inject command to arrive first."""
NODE_STEPS = 200
"""The kill-node job's steps: enough to outlast a third launcher's start (the spare) on a loaded machine."""
JOB_S = 180
"""Deadline for a whole job, on a loaded 2-core machine."""
SLOW_EXIT_TIMEOUT_S = 10
"""--heartbeat-timeout for a rank that raises: its exit, however slow, is what the job must see."""
SURVIVORS_S = 60
"""After the job ends, how long its processes may take to be gone."""
INJECT_EXIT_REFUSED = 1
INJECT_EXIT_USAGE = 2


def reached(run: Launch, step: int) -> bool:
    return re.search(rf"^\[rank0\]:step {step} loss", run.output, re.M) is not None


def recoverable(run: Launch, logs: Path) -> None:
    """Wait until every rank reported flashrun's step loop: from then on a failure is recovered in place."""
    wait_for(lambda: reached(run, 2) and named(logs, "recoverable"), JOB_S, "step 2 of a recoverable job")


def start_training(launcher: Launcher, tmp_path: Path, *flags: str) -> tuple[Launch, Path]:
    logs = tmp_path / "logs"
    run = launcher.flashrun("--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), *flags, TRAIN,
                            "--steps", str(STEPS), "--step-time", STEP_TIME)
    return run, logs


def endpoint_of(run: Launch) -> str:
    line = wait_for(lambda: next((line for line in run.output.splitlines() if "--rdzv-endpoint" in line), None), 60,
                    "the coordinator's address")
    return re.search(r"--rdzv-endpoint (\S+)", str(line)).group(1)  # type: ignore[union-attr]


def drill(launcher: Launcher, endpoint: str, token_file: Path, *args: str) -> tuple[int, str]:
    """Run `flashrun inject`; (exit code, its output)."""
    command = launcher.flashrun("inject", "--rdzv-endpoint", endpoint, "--token-file", str(token_file), *args,
                                name="inject")
    return command.wait(30), command.output.strip()


def finish(launcher: Launcher, run: Launch, logs: Path) -> None:
    assert run.wait(JOB_S) == 0, run.output
    assert named(logs, "recovered"), f"no recovery was logged: {events(logs)}"
    # Generous: on a loaded 2-core machine (CI) the last processes' teardown has taken over 15 s.
    wait_for(lambda: launcher.survivors() == [], SURVIVORS_S, "every process to be gone")


@pytest.mark.parametrize(("fault", "kind"), [("kill", "crash"), ("stop", "unresponsive")])
def test_kill_or_stop_at_once_is_detected_and_recovered(launcher: Launcher, tmp_path: Path, fault: str,
                                                        kind: str) -> None:
    run, logs = start_training(launcher, tmp_path, "--allow-inject")
    endpoint = endpoint_of(run)
    recoverable(run, logs)
    code, reply = drill(launcher, endpoint, logs / "token", fault, "--rank", "1")
    assert code == 0, reply
    assert re.fullmatch(rf"{fault} sent to rank 1 \(pid \d+\) on node 0 \(\S+\)", reply), reply
    finish(launcher, run, logs)
    [injected] = named(logs, "fault_injected")
    assert (injected["fault"], injected["rank"], injected.get("at_step")) == (fault, 1, None)
    assert f"(pid {injected['pid']})" in reply
    failure = named(logs, "failure")[0]
    assert (failure["kind"], failure["ranks"]) == (kind, [1])
    assert named(logs, "recovery_started")[0]["kind"] == kind


@pytest.mark.parametrize(("fault", "kind", "flags"), [
    ("kill", "crash", ()),
    ("hang", "stalled", ()),
    # An interpreter that exits after an exception can take longer than the default heartbeat timeout on a loaded
    # machine, and would be found unresponsive before its exit is seen.
    ("exception", "crash", ("--heartbeat-timeout", str(SLOW_EXIT_TIMEOUT_S))),
])
def test_drill_at_a_step_fires_at_that_step(launcher: Launcher, tmp_path: Path, fault: str, kind: str,
                                            flags: tuple[str, ...]) -> None:
    run, logs = start_training(launcher, tmp_path, "--allow-inject", *flags)
    endpoint = endpoint_of(run)
    recoverable(run, logs)
    code, reply = drill(launcher, endpoint, logs / "token", fault, "--rank", "1", "--at-step", str(AT_STEP))
    assert code == 0, reply
    assert reply.startswith(f"{fault} at step {AT_STEP} sent to rank 1 "), reply
    finish(launcher, run, logs)
    assert f"[rank1]:flashrun: fault drill: {fault} on rank 1 at step {AT_STEP}" in run.output
    failure = named(logs, "failure")[0]
    assert (failure["kind"], failure["ranks"]) == (kind, [1])
    # Both ranks applied the step before the drill's: the job resumes exactly at the drill's step.
    assert named(logs, "recovered")[0]["resume_step"] == AT_STEP
    if fault == "exception":
        assert failure["exit_code"] == 1
        assert re.search(r"^\[rank1\]:.*Traceback \(most recent call last\):$", run.output, re.M), run.output
        assert re.search(rf"^\[rank1\]:.*InjectedFault: fault drill: injected exception on rank 1 at step {AT_STEP}$",
                         run.output, re.M), run.output


def test_a_job_without_allow_inject_refuses_drills_and_a_wrong_token_is_refused(launcher: Launcher,
                                                                                  tmp_path: Path) -> None:
    run, logs = start_training(launcher, tmp_path)
    endpoint = endpoint_of(run)
    wait_for(lambda: reached(run, 2), JOB_S, "step 2")
    code, reply = drill(launcher, endpoint, logs / "token", "kill", "--rank", "1")
    assert (code, reply) == (INJECT_EXIT_REFUSED, f"flashrun: error: the coordinator at {endpoint} refused: this job "
                                                  "was not started with --allow-inject")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    code, reply = drill(launcher, endpoint, wrong, "kill-node", "--node", "0")
    assert code == INJECT_EXIT_REFUSED and "refused: wrong token" in reply, reply
    assert run.wait(JOB_S) == 0, run.output
    assert not named(logs, "fault_injected") and not named(logs, "failure")


def test_drills_the_job_cannot_take_are_refused_with_the_reason(launcher: Launcher, tmp_path: Path) -> None:
    """fault_probe.py runs flashrun.steps(), not run.steps(): only kill and stop at once can reach it."""
    logs = tmp_path / "logs"
    run = launcher.flashrun("--standalone", "--nproc-per-node", "2", "--log-dir", str(logs), "--allow-inject",
                            str(PROBES / "fault_probe.py"), str(tmp_path), "100000")
    endpoint = endpoint_of(run)
    wait_for(lambda: (tmp_path / "1.step").exists(), JOB_S, "rank 1's first step")
    token = logs / "token"
    refusals = {
        ("kill", "--rank", "2"): "rank 2 does not exist: the job's ranks are 0..1",
        ("kill-node", "--node", "1"): "node 1 does not exist: the job's nodes are 0..0",
        ("kill-node", "--node", "0"): "node 0's launcher also hosts the coordinator",
        ("hang", "--rank", "1"): "rank 1 does not run flashrun's step loop (run.steps())",
        ("kill", "--rank", "1", "--at-step", "100"): "rank 1 does not run flashrun's step loop (run.steps())",
    }
    for args, reason in refusals.items():
        code, reply = drill(launcher, endpoint, token, *args)
        assert code == INJECT_EXIT_REFUSED and reply.startswith("flashrun: error: ") and reason in reply, (args, reply)
    assert not named(logs, "fault_injected")
    code, reply = drill(launcher, endpoint, token, "kill", "--rank", "1")  # no library needed for this one
    assert code == 0, reply
    assert run.wait(JOB_S) == 1, run.output  # no step loop, no --max-restarts: a crash ends the job
    assert named(logs, "failure")[0]["kind"] == "crash"
    # Generous: on a loaded 2-core machine (CI) the last processes' teardown has taken over 15 s.
    wait_for(lambda: launcher.survivors() == [], SURVIVORS_S, "every process to be gone")


@pytest.mark.parametrize("args", [["kill"], ["kill", "--rank", "x"], ["kill-node"], ["explode", "--rank", "1"]],
                         ids=["missing-rank", "bad-rank", "missing-node", "unknown-fault"])
def test_usage_errors_are_one_line_with_exit_code_2(launcher: Launcher, tmp_path: Path, args: list[str]) -> None:
    code, reply = drill(launcher, f"127.0.0.1:{free_port()}", tmp_path / "unused", *args)
    assert code == INJECT_EXIT_USAGE, reply
    assert reply.startswith("flashrun: error: ") and len(reply.splitlines()) == 1, reply


def test_unreachable_coordinator_is_one_line_with_exit_code_1(launcher: Launcher, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    endpoint = f"127.0.0.1:{free_port()}"  # nothing listens there
    code, reply = drill(launcher, endpoint, token, "kill", "--rank", "0")
    assert code == INJECT_EXIT_REFUSED, reply
    assert reply.startswith(f"flashrun: error: no coordinator answered at {endpoint}") and "\n" not in reply


def test_kill_node_is_a_lost_node_a_spare_takes_over(launcher: Launcher, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    token = tmp_path / "token"
    token.write_text("drill-token\n")
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint, "--token-file", str(token)]
    train = [TRAIN, "--steps", str(NODE_STEPS), "--step-time", STEP_TIME]
    node0 = launcher.flashrun(*common, "--node-rank", "0", "--log-dir", str(logs), "--allow-inject", *train,
                              name="node0")
    wait_for(lambda: "coordinator listening" in node0.output, 60, "the coordinator")
    node1 = launcher.flashrun(*common, *train, name="node1")
    wait_for(lambda: reached(node0, 1), JOB_S, "step 1")
    spare = launcher.flashrun(*common, *train, name="spare")
    wait_for(lambda: "standing by as a spare" in spare.output, 60, "the spare to join")
    recoverable(node0, logs)
    code, reply = drill(launcher, endpoint, token, "kill-node", "--node", "1")
    assert code == 0, reply
    assert reply.startswith("kill-node sent to node 1 ") and reply.endswith("its agent and rank 1 go down"), reply
    assert node1.wait(30) != 0, node1.output
    assert "fault drill kill-node" in node1.output
    assert "Traceback" not in node1.output
    finish(launcher, node0, logs)
    assert spare.wait(60) == 0, spare.output
    lost = named(logs, "failure")[0]
    assert (lost["kind"], lost["node"]) == ("node_lost", 1)
    assert named(logs, "spare_takes_over")[0]["node"] == 1
