"""How long flashrun takes to recover from losing a whole node when a spare stands by. Real launchers, on this machine.

Every trial is a fresh job of two nodes (two launchers on this machine, `--nnodes 2:3 --nproc-per-node 2`)
running `scripts/examples/train_ddp.py --steps 400 --step-time 0.05`, plus a third launcher that joins as a spare.
Once the spare has stood by for --standby-s seconds, at rank 0's next step line (rank 0 is on node 0, which hosts
the coordinator), node 1 fails, by --fault:

- kill (default): its launcher and everything in its session get SIGKILL: its agent and, with it, its workers
  (PR_SET_PDEATHSIG), as when a machine dies; its connections break at once;
- freeze: every process of node 1 (launcher, workers, zygote) gets SIGSTOP, as when a machine hangs or is cut off:
  its connections stay open, so it is lost only when its summaries have stopped for the node timeout (10 s, or
  --keep-alive INTERVAL,ATTEMPTS: torchrun's --rdzv-conf keep-alive keys on node 0's launcher). A fast job's stall
  may be detected first; its recovery waits for node 1, then the node's loss supersedes it.

The spare takes over. Measured per trial, from <log-dir>/events.jsonl and rank 0's step lines as they arrive here:

- first detection: the first `failure` event's ts - the fault's time; node lost: the `node_lost` one's;
- respawn, rebuild, sync: the `recovered` event's respawn_s, rebuild_s, sync_s (each the slowest rank's): the spare
  starts both of node 1's ranks, every rank rebuilds the process group, the spare's ranks get the state of a healthy
  replica;
- recovered: its since_detection_s (from the first detection);
- fault -> next step: from the fault to the arrival of rank 0's first line, after the `recovered` event, for a
  step it had not completed before (a frozen node's step in flight may still complete on the others).

With --baseline REV, trials alternate between that git revision (exported with `git archive`, gRPC code generated)
and the working tree, so both see the same machine. torchrun has no spare: on a node loss it stops every worker on
every node and restarts them all (scripts/bench_recovery.py measures that path for a worker crash).

Usage (with the project's virtual environment):

    .venv/bin/python scripts/bench_node_loss.py --trials 3
    .venv/bin/python scripts/bench_node_loss.py --trials 3 --baseline HEAD~1
    .venv/bin/python scripts/bench_node_loss.py --trials 3 --fault freeze
    .venv/bin/python scripts/bench_node_loss.py --trials 3 --fault freeze --keep-alive 1,3
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    REPO,
    TRAIN_RELPATH,
    Trial,
    export_snapshot,
    flashrun_argv,
    free_port,
    interrupt_on_sigterm,
    machine_header,
    read_events,
    source_description,
    step_of,
)

NPROC = 2
STEPS = 400
STEP_TIME = "0.05"
LISTENING_RE = re.compile(r"coordinator listening")
SPARE_RE = re.compile(r"standing by as a spare")
EVENTS_POLL_S = 0.02
"""How often the job's events.jsonl is read while waiting for its `recovered` event."""


def one_trial(root: Path, src: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One node loss; the measurements, or {"error": why}."""
    with Trial(root, name, src) as trial:
        deadline = time.monotonic() + args.startup_timeout
        endpoint = f"127.0.0.1:{free_port()}"
        logs = trial.dir / "logs"
        common = ["--nnodes", "2:3", "--nproc-per-node", str(NPROC), "--rdzv-endpoint", endpoint]
        train = [str(src / TRAIN_RELPATH), "--steps", str(STEPS), "--step-time", STEP_TIME]
        keep_alive = []
        if args.keep_alive:
            interval, attempts = args.keep_alive.split(",")
            keep_alive = ["--rdzv-conf", f"keep_alive_interval={interval},keep_alive_max_attempt={attempts}"]
        node0 = trial.start("node0", flashrun_argv(*common, "--node-rank", "0", "--log-dir", str(logs), *keep_alive,
                                                   *train))
        if node0.wait_until(lambda: node0.first_line("stderr", LISTENING_RE), deadline) is None:
            return {"error": f"the coordinator did not start: {node0.tail()}"}
        node1 = trial.start("node1", flashrun_argv(*common, *train))
        if node0.wait_for_step(3, deadline) is None:
            return {"error": f"the job did not reach step 3: {node0.tail()} / {node1.tail()}"}
        spare = trial.start("spare", flashrun_argv(*common, *train))
        if spare.wait_until(lambda: spare.first_line("stderr", SPARE_RE), deadline) is None:
            return {"error": f"the spare did not stand by: {spare.tail()}"}
        time.sleep(args.standby_s)  # the scenario, not a synchronisation: spares stand by before a node is lost
        last = max(step for step, _ in node0.step_lines())
        if node0.wait_for_step(last + 1, deadline) is None:
            return {"error": f"the job ended before the loss (standing by longer than the job runs?): {node0.tail()}"}
        last = max(step for step, _ in node0.step_lines())
        killed_at = time.time()
        if args.fault == "kill":
            os.killpg(node1.pid, signal.SIGKILL)
        else:  # the whole node stops at once: its launcher, its workers (sessions of their own) and its zygote
            for pid in descendants(node1.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        recovery_deadline = time.monotonic() + args.recovery_timeout
        while (recovered := next((e for e in read_events(logs / "events.jsonl") if e.get("event") == "recovered"),
                                 None)) is None:
            if time.monotonic() >= recovery_deadline:
                return {"error": f"no recovery within {args.recovery_timeout:g} s: {node0.tail()}"}
            time.sleep(EVENTS_POLL_S)
        # A frozen node's last step may still complete on the others after the fault: the step that counts is the
        # first one rank 0 reports after the recovery.
        resumed = node0.wait_until(lambda: next((line for line in node0.lines["stdout"] if line.t >= recovered["ts"]
                                                 and step_of(line) > last), None), recovery_deadline)
        if resumed is None:
            return {"error": f"no step after {last} within {args.recovery_timeout:g} s: {node0.tail()}"}
        events = read_events(logs / "events.jsonl")
        failure = next((e for e in events if e.get("event") == "failure"), None)
        lost = next((e for e in events if e.get("event") == "failure" and e.get("kind") == "node_lost"), None)
        if failure is None:
            return {"error": "no failure event in events.jsonl"}
        return {
            "detect_s": failure["ts"] - killed_at,
            "lost_s": lost["ts"] - killed_at if lost else None,
            "failures": [e.get("kind") for e in events if e.get("event") == "failure"],
            "respawn_s": recovered["respawn_s"],
            "rebuild_s": recovered["rebuild_s"],
            "sync_s": recovered["sync_s"],
            "recovered_s": recovered["since_detection_s"],
            "next_step_s": resumed.t - killed_at,
            "step": step_of(resumed),
            "forked_fallbacks": sum(e.get("event") == "prewarm_fallback" for e in events),
        }


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="node losses per variant (default 3)")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run git revision REV, alternating with the working tree")
    parser.add_argument("--fault", choices=("kill", "freeze"), default="kill",
                        help="kill: SIGKILL to node 1's launcher, a dead machine (default); freeze: SIGSTOP to every "
                             "process of node 1, a frozen or cut-off machine, whose connections stay open")
    parser.add_argument("--keep-alive", metavar="INTERVAL,ATTEMPTS", default=None,
                        help="--rdzv-conf keep_alive_interval,keep_alive_max_attempt on node 0, which hosts the "
                             "coordinator: a silent node is lost after INTERVAL x ATTEMPTS seconds (default 10 s)")
    parser.add_argument("--standby-s", type=float, default=5.0,
                        help="how long the spare stands by before node 1 dies (default 5 s)")
    parser.add_argument("--startup-timeout", type=float, default=180.0)
    parser.add_argument("--recovery-timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    interrupt_on_sigterm()
    root = Path(tempfile.mkdtemp(prefix="flashrun-bench-node-loss-"))
    variants = [("working tree", REPO, source_description(REPO, None))]
    if args.baseline is not None:
        src, commit = export_snapshot(args.baseline, root)
        variants.insert(0, (f"{args.baseline} ({commit[:9]})", src, source_description(src, commit)))
    print("\n".join(machine_header(["scripts/bench_node_loss.py", *argv], "; ".join(v[2] for v in variants))))
    print(f"Logs: {root}", flush=True)
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _, _ in variants}
    try:
        for index in range(args.trials):
            for label, src, _ in variants:
                result = one_trial(root, src, f"t{index}", args)
                results[label].append(result)
                print(f"  {label} trial {index}: {result}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted; every trial's processes were killed", file=sys.stderr)
        return 130
    fault = "killed" if args.fault == "kill" else "frozen"
    keep_alive = f", --rdzv-conf keep-alive {args.keep_alive.replace(',', ' x ')}" if args.keep_alive else ""
    print(f"\nNode loss with a spare standing by: 2 nodes x {NPROC} ranks{keep_alive}, node 1 {fault} after the "
          f"spare stood by {args.standby_s:g} s; "
          f"medians (min-max) of {args.trials} trials\n")
    print("| flashrun | first detection | node lost | respawn | rebuild | sync | recovered (since detection) | "
          "fault -> next step | failed trials |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, _, _ in variants:
        done = [r for r in results[label] if "error" not in r]
        print(f"| {label} | " + " | ".join(cell([r[key] for r in done if r[key] is not None]) for key in
                                            ("detect_s", "lost_s", "respawn_s", "rebuild_s", "sync_s", "recovered_s",
                                             "next_step_s"))
              + f" | {len(results[label]) - len(done)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
