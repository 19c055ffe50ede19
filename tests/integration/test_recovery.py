"""The oracle: a deterministic run with faults injected ends with the same model as a fault-free run.

Real flashrun jobs of scripts/examples/train_ddp.py; faults are real (SIGKILL, SIGSTOP, an exception, a hang, a
killed agent). Final parameters must be bit-identical with 2 ranks and within 1e-6 with 4, every step must have
been applied exactly once (the loss of the last step matches too), and healthy ranks must keep their PIDs.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from flashrun.config import Detection
from tests.helpers import REPO, Launch, Launcher, free_port, named, tagged_pids, wait_for

TRAIN = str(REPO / "scripts" / "examples" / "train_ddp.py")
STEPS = 80
STEP_TIME = "0.05"


def train_args(out: Path, *extra: str) -> list[str]:
    return [TRAIN, "--steps", str(STEPS), "--step-time", STEP_TIME, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[int, tuple[dict, str]]]:
    """Fault-free runs (2 and 4 ranks): final state_dict and the last step's loss line."""
    tmp = tmp_path_factory.mktemp("reference")
    launcher = Launcher(tmp)
    try:
        results = {}
        for world in (2, 4):
            out = tmp / f"ref{world}.pt"
            run = launcher.flashrun("--standalone", "--nproc-per-node", str(world), *train_args(out))
            assert run.wait(180) == 0, run.output
            results[world] = (torch.load(out), last_loss(run.output))
        yield results
    finally:
        launcher.cleanup()


def last_loss(output: str) -> str:
    return re.findall(rf"^\[rank0\]:(step {STEPS - 1} loss \S+)$", output, re.M)[-1]


def reached(run: Launch, step: int) -> bool:
    return re.search(rf"^\[rank0\]:step {step} loss", run.output, re.M) is not None


def status(launcher: Launcher, run: Launch, logs: Path) -> dict:
    line = next(line for line in run.output.splitlines() if "flashrun status --rdzv-endpoint" in line)
    endpoint = re.search(r"--rdzv-endpoint ([^\s)]+)", line).group(1)  # type: ignore[union-attr]
    token = ["--token-file", str(logs / "token")] if (logs / "token").exists() else []  # none: a job without a token
    query = launcher.flashrun("status", "--rdzv-endpoint", endpoint, *token, "--json", name="status")
    assert query.wait(30) == 0, query.output
    return json.loads(query.output)


def pids(launcher: Launcher, run: Launch, logs: Path) -> dict[int, int]:
    return {r["rank"]: r["pid"] for r in status(launcher, run, logs)["ranks"]}


def assert_same_model(got: Path, expected: tuple[dict, str], output: str, world: int) -> None:
    state, loss_line = expected
    final = torch.load(got)
    if world == 2:
        for name, tensor in state.items():
            assert torch.equal(final[name], tensor), f"{name} differs from the fault-free run"
    else:
        worst = max((final[name] - tensor).abs().max().item() for name, tensor in state.items())
        assert worst <= 1e-6, f"max abs difference {worst} from the fault-free run"
    assert last_loss(output) == loss_line if world == 2 else last_loss(output).startswith(f"step {STEPS - 1} ")


def start(launcher: Launcher, tmp_path: Path, world: int, *extra: str) -> tuple[Launch, Path, Path]:
    logs, out = tmp_path / "logs", tmp_path / "out.pt"
    run = launcher.flashrun("--standalone", "--nproc-per-node", str(world), "--log-dir", str(logs),
                            *train_args(out, *extra))
    return run, logs, out


def finish(launcher: Launcher, run: Launch, logs: Path) -> None:
    assert run.wait(180) == 0, run.output
    assert named(logs, "recovered"), "no recovery was logged"
    wait_for(lambda: launcher.survivors() == [], 15, "every process to be gone")


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP])
def test_killed_or_frozen_worker_is_replaced_and_the_model_is_bit_identical(
    launcher: Launcher, tmp_path: Path, reference: dict, fault: signal.Signals
) -> None:
    run, logs, out = start(launcher, tmp_path, 2)
    wait_for(lambda: reached(run, 15), 120, "step 15")
    wait_for(lambda: named(logs, "recoverable"), 60, "the job to be known recoverable")
    before = pids(launcher, run, logs)
    os.kill(before[1], fault)
    wait_for(lambda: named(logs, "recovered"), 60, "the recovery")
    after = pids(launcher, run, logs)
    assert after[0] == before[0], "the healthy rank must keep its process"
    assert after[1] != before[1], "the faulty rank must be replaced"
    finish(launcher, run, logs)
    kind = "crash" if fault == signal.SIGKILL else "unresponsive"
    assert named(logs, "recovery_started")[0]["kind"] == kind
    assert_same_model(out, reference[2], run.output, 2)


def test_exception_in_one_rank_after_its_update_resumes_after_that_step(
    launcher: Launcher, tmp_path: Path, reference: dict
) -> None:
    run, logs, out = start(launcher, tmp_path, 2, "--inject-exception", "1:20")
    finish(launcher, run, logs)
    recovered = named(logs, "recovered")[0]
    assert recovered["resume_step"] == 21  # both ranks applied step 20 before rank 1 raised
    assert "injected exception on rank 1 at step 20" in run.output
    assert_same_model(out, reference[2], run.output, 2)


def test_hang_before_a_collective_is_replaced_and_the_model_is_bit_identical(
    launcher: Launcher, tmp_path: Path, reference: dict
) -> None:
    run, logs, out = start(launcher, tmp_path, 2, "--inject-hang", "1:20")
    finish(launcher, run, logs)
    assert named(logs, "recovery_started")[0]["kind"] == "stalled"
    assert named(logs, "recovery_started")[0]["ranks"] == [1]
    assert_same_model(out, reference[2], run.output, 2)


def test_two_failures_at_different_steps_on_four_ranks(launcher: Launcher, tmp_path: Path, reference: dict) -> None:
    run, logs, out = start(launcher, tmp_path, 4)
    wait_for(lambda: reached(run, 10), 120, "step 10")
    wait_for(lambda: named(logs, "recoverable"), 60, "the job to be known recoverable")
    first = pids(launcher, run, logs)
    os.kill(first[1], signal.SIGKILL)
    wait_for(lambda: named(logs, "recovered"), 60, "the first recovery")
    wait_for(lambda: reached(run, 40), 120, "step 40")
    second = pids(launcher, run, logs)
    os.kill(second[2], signal.SIGKILL)
    wait_for(lambda: len(named(logs, "recovered")) == 2, 60, "the second recovery")
    third = pids(launcher, run, logs)
    assert (third[0], third[3]) == (first[0], first[3]), "ranks never at fault keep their processes"
    finish(launcher, run, logs)
    assert_same_model(out, reference[4], run.output, 4)


def test_second_failure_during_a_recovery(launcher: Launcher, tmp_path: Path, reference: dict) -> None:
    run, logs, out = start(launcher, tmp_path, 4)
    wait_for(lambda: reached(run, 15), 120, "step 15")
    wait_for(lambda: named(logs, "recoverable"), 60, "the job to be known recoverable")
    before = pids(launcher, run, logs)
    os.kill(before[1], signal.SIGKILL)
    wait_for(lambda: named(logs, "recovery_started"), 30, "the first recovery to start")
    os.kill(before[2], signal.SIGKILL)  # while rank 1's replacement is still starting
    finish(launcher, run, logs)
    started = named(logs, "recovery_started")
    assert len(started) >= 2 and 2 in started[-1]["ranks"]
    assert_same_model(out, reference[4], run.output, 4)


def test_killed_agent_is_replaced_by_a_spare(launcher: Launcher, tmp_path: Path, reference: dict) -> None:
    logs, out = tmp_path / "logs", tmp_path / "out.pt"
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    node0 = launcher.flashrun(*common, "--node-rank", "0", "--log-dir", str(logs), *train_args(out), name="node0")
    wait_for(lambda: "coordinator listening" in node0.output, 60, "the coordinator")
    node1 = launcher.flashrun(*common, *train_args(out), name="node1")
    wait_for(lambda: reached(node0, 1), 120, "step 1")
    spare = launcher.flashrun(*common, *train_args(out), name="spare")
    wait_for(lambda: "standing by as a spare" in spare.output, 60, "the spare to join")
    wait_for(lambda: reached(node0, 15), 120, "step 15")
    node1.signal(signal.SIGKILL)
    finish(launcher, node0, logs)
    assert spare.wait(60) == 0, spare.output
    assert named(logs, "spare_takes_over")[0]["node"] == 1
    assert_same_model(out, reference[2], node0.output, 2)


def environ(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/environ").read_text()
    return dict(item.split("=", 1) for item in text.split("\0") if "=" in item)


def workers_by_rank(launcher: Launcher) -> dict[int, int]:
    """The live workers of this test's launches: global rank -> PID."""
    found = {}
    for pid in tagged_pids(launcher.tag):
        with contextlib.suppress(OSError):
            env = environ(pid)
            if "RANK" in env and "LOCAL_RANK" in env:
                found[int(env["RANK"])] = pid
    return found


def two_watching_nodes(launcher: Launcher, tmp_path: Path, *options: str) -> tuple[Launch, Launch, Path, Path]:
    """Two launchers of two ranks each (with `options`), node 0 hosting the coordinator (its log dir), trained past
    step 10, the job known recoverable and both agents watching the store for notices: (node0, node1, logs, out)."""
    logs, out = tmp_path / "logs", tmp_path / "out.pt"
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", endpoint, *options]
    node0 = launcher.flashrun(*common, "--node-rank", "0", "--log-dir", str(logs), *train_args(out), name="node0")
    wait_for(lambda: "coordinator listening" in node0.output, 60, "the coordinator")
    node1 = launcher.flashrun(*common, "--node-rank", "1", *train_args(out), name="node1")
    wait_for(lambda: reached(node0, 10), 120, "step 10")
    wait_for(lambda: named(logs, "recoverable"), 60, "the job to be known recoverable")
    wait_for(lambda: status(launcher, node0, logs)["watching_nodes"] == 2, 60, "both agents to watch the store")
    return node0, node1, logs, out


def recovered_from_a_crash_of_rank_3(launcher: Launcher, logs: Path) -> tuple[Any, int]:
    """SIGKILL rank 3 (on node 1) and wait for the recovery: a client of the job's store, and the new generation."""
    before = workers_by_rank(launcher)
    env = environ(before[0])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    os.kill(before[3], signal.SIGKILL)
    wait_for(lambda: named(logs, "recovered"), 60, "the recovery")
    return store, named(logs, "recovered")[0]["generation"]


def test_each_node_arrives_once_at_a_generations_barrier(launcher: Launcher, tmp_path: Path,
                                                          reference: dict) -> None:
    """Two nodes of two ranks: the store barrier counts nodes, both at the start and after a recovery; the recovery
    reaches both agents through one notice on the store, which each acknowledges there."""
    node0, node1, logs, out = two_watching_nodes(launcher, tmp_path)
    store, generation = recovered_from_a_crash_of_rank_3(launcher, logs)
    assert [int(store.add(f"flashrun/g{g}/arrived", 0)) for g in (0, generation)] == [2, 2]
    assert [store.get(f"flashrun/g{g}/released") for g in (0, generation)] == [b"complete", b"complete"]
    assert (int(store.add(f"flashrun/g{generation}/acked", 0)), store.get(f"flashrun/g{generation}/all_acked")) \
        == (2, b"acked")
    phases = [e["phase"] for e in named(logs, "recovery_phase") if e["generation"] == generation]
    assert {"acknowledged", "rendezvous"} <= set(phases)
    assert named(logs, "notice_fallback") == []
    del store
    finish(launcher, node0, logs)
    assert node1.wait(60) == 0, node1.output
    assert_same_model(out, reference[4], node0.output, 4)


def test_a_job_of_one_node_per_store_shard_recovers_in_place_through_the_root(launcher: Launcher, tmp_path: Path,
                                                                             reference: dict) -> None:
    """--store-shard-nodes 1: each node watches, acknowledges and arrives on a store server of its own (node 0's is
    the job's store, also the root), and leads its shard: it passes its arrival on to the root, where the coordinator
    watches. A crashed worker is replaced in place, through the shards, with nothing lost."""
    node0, node1, logs, out = two_watching_nodes(launcher, tmp_path, "--store-shard-nodes", "1")
    store, generation = recovered_from_a_crash_of_rank_3(launcher, logs)
    root = [int(store.add(f"flashrun/g{g}/shards_arrived", 0)) for g in (0, generation)]
    shard0 = [int(store.add(f"flashrun/g{g}/s0/arrived", 0)) for g in (0, generation)]  # node 0's shard is the root's
    assert (root, shard0) == ([2, 2], [1, 1])
    assert [store.get(f"flashrun/g{g}/{k}") for g in (0, generation) for k in ("released", "s0/released")] \
        == [b"complete"] * 4
    assert (int(store.add(f"flashrun/g{generation}/s0/acked", 0)), store.get(f"flashrun/g{generation}/s0/all_acked")) \
        == (1, b"acked")
    assert [store.check([f"flashrun/g{generation}/{key}"]) for key in ("arrived", "s1/arrived")] == [False, False]
    assert named(logs, "notice_fallback") == []
    del store
    finish(launcher, node0, logs)
    assert node1.wait(60) == 0, node1.output
    assert_same_model(out, reference[4], node0.output, 4)


def test_an_agent_that_misses_the_notice_is_told_directly(launcher: Launcher, tmp_path: Path,
                                                          reference: dict) -> None:
    """Node 1's agent is stopped (SIGSTOP) when node 0 loses a worker: it cannot act on the notice, so after
    JobSpec.notice_fallback_s the coordinator sends it a Recover. Resumed, the agent has both the notice and the
    Recover for the same generation; it acts once and the job finishes with nothing lost."""
    node0, node1, logs, out = two_watching_nodes(launcher, tmp_path)
    victim = workers_by_rank(launcher)[1]  # on node 0
    node1.signal(signal.SIGSTOP)
    try:
        os.kill(victim, signal.SIGKILL)
        fallback = wait_for(lambda: named(logs, "notice_fallback"), 30, "the notice fallback")
    finally:
        node1.signal(signal.SIGCONT)
    assert [e["nodes"] for e in fallback] == [[1]], fallback
    wait_for(lambda: named(logs, "recovered"), 60, "the recovery")
    assert len(named(logs, "failure")) == 1  # the stopped agent was not taken for a lost node
    finish(launcher, node0, logs)
    assert node1.wait(60) == 0, node1.output
    assert_same_model(out, reference[4], node0.output, 4)


def test_a_replacement_superseded_before_its_group_formed_joins_the_newer_generation(
        launcher: Launcher, tmp_path: Path, reference: dict) -> None:
    """Node 1's agent is stopped, so generation 1's barrier cannot complete: rank 1's replacement waits in its
    `flashrun.init()`. Rank 0 is then killed too, and generation 2 supersedes generation 1 under the replacement. It
    must join generation 2 like every other rank; exiting counted as a crash, whose recovery superseded the next
    replacement in turn (a crash loop up to --max-recoveries, seen in CI)."""
    node0, node1, logs, out = two_watching_nodes(launcher, tmp_path)
    before = workers_by_rank(launcher)
    env = environ(before[0])
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=30))
    node1.signal(signal.SIGSTOP)
    try:
        os.kill(before[1], signal.SIGKILL)  # node 0
        wait_for(lambda: int(store.add("flashrun/g1/acked", 0)) >= 1, 60, "node 0 to act on generation 1")
        # Rank 1's replacement was started for generation 1 (its agent reports its PID); it cannot get past its
        # barrier, which waits for node 1.
        wait_for(lambda: pids(launcher, node0, logs).get(1, before[1]) != before[1], 60, "rank 1's replacement",
                 poll_s=0.5)
        os.kill(before[0], signal.SIGKILL)  # node 0's other rank
        wait_for(lambda: [e for e in named(logs, "recovery_started") if e["generation"] == 2], 60, "generation 2")
    finally:
        node1.signal(signal.SIGCONT)
    wait_for(lambda: [e for e in named(logs, "recovered") if e["generation"] == 2], 60, "generation 2's recovery")
    finish(launcher, node0, logs)
    assert node1.wait(60) == 0, node1.output
    assert [(f["kind"], f["ranks"]) for f in named(logs, "failure")] == [("crash", [1]), ("crash", [0])]
    assert_same_model(out, reference[4], node0.output, 4)


def test_a_pause_of_the_coordinators_process_loses_no_node(launcher: Launcher, tmp_path: Path) -> None:
    """The process hosting the coordinator (and node 0's agent) is stopped for longer than the node timeout while
    the workers train on. Resumed, it must not take a node for lost, nor a worker for unresponsive, before it has
    read what they sent meanwhile: the job goes on and ends without a failure."""
    logs, out = tmp_path / "logs", tmp_path / "out.pt"
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--rdzv-endpoint", endpoint]
    args = [TRAIN, "--steps", "400", "--step-time", STEP_TIME, "--out", str(out)]
    node0 = launcher.flashrun(*common, "--node-rank", "0", "--log-dir", str(logs), *args, name="node0")
    wait_for(lambda: "coordinator listening" in node0.output, 60, "the coordinator")
    node1 = launcher.flashrun(*common, "--node-rank", "1", *args, name="node1")
    wait_for(lambda: reached(node0, 10), 120, "step 10")
    wait_for(lambda: named(logs, "recoverable"), 60, "the job to be known recoverable")
    node0.signal(signal.SIGSTOP)
    try:
        time.sleep(Detection().node_timeout_s + 2.0)  # the fault itself, not a synchronisation: a pause this long
    finally:
        node0.signal(signal.SIGCONT)
    assert node0.wait(180) == 0, node0.output
    assert node1.wait(60) == 0, node1.output
    assert named(logs, "failure") == []
    assert [e["paused_s"] > Detection().node_timeout_s for e in named(logs, "coordinator_paused")] == [True]


CHECKPOINT = str(REPO / "tests" / "probes" / "checkpoint_probe.py")


def test_single_rank_recovers_from_its_checkpoint(launcher: Launcher, tmp_path: Path) -> None:
    reference = launcher.flashrun("--standalone", CHECKPOINT, str(tmp_path / "ref.pt"), "40", "-", name="ref")
    assert reference.wait(120) == 0, reference.output
    logs = tmp_path / "logs"
    run = launcher.flashrun("--standalone", "--log-dir", str(logs), CHECKPOINT, str(tmp_path / "out.pt"), "40",
                            str(tmp_path / "ckpt"))
    wait_for(lambda: re.search(r"^\[rank0\]:step 12$", run.output, re.M), 120, "step 12")
    wait_for(lambda: named(logs, "recoverable"), 60, "the job to be known recoverable")
    os.kill(pids(launcher, run, logs)[0], signal.SIGKILL)
    finish(launcher, run, logs)
    resume = named(logs, "recovered")[0]["resume_step"]
    assert resume >= 10 and resume % 5 == 0  # right after a checkpoint (every 5 steps), not from the start
    final, expected = torch.load(tmp_path / "out.pt"), torch.load(tmp_path / "ref.pt")
    assert all(torch.equal(final[name], expected[name]) for name in expected)


def test_single_rank_without_checkpoint_fails_with_a_clear_message(launcher: Launcher, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run = launcher.flashrun("--standalone", "--log-dir", str(logs), CHECKPOINT, str(tmp_path / "out.pt"), "1000",
                            "-")
    wait_for(lambda: re.search(r"^\[rank0\]:step 5$", run.output, re.M), 120, "step 5")
    # The coordinator must know the rank runs the step loop (its next summary) before the kill, or the failure takes
    # the full-restart path instead of the in-place one under test.
    wait_for(lambda: named(logs, "recoverable"), 30, "the job to be known recoverable")
    os.kill(pids(launcher, run, logs)[0], signal.SIGKILL)
    assert run.wait(120) == 1, run.output
    assert "no replica holds the lost state and the script set no run.checkpoint()" in run.output
    assert "job failed: rank 0 found no replica holding the lost state and no checkpoint" in run.output
    wait_for(lambda: launcher.survivors() == [], 15, "every process to be gone")
