"""How long flashrun takes to recover from losing a whole node when a spare stands by. Real launchers, on this machine.

Every trial is a fresh job of two nodes (two launchers on this machine, `--nnodes 2:3 --nproc-per-node 2`)
running `scripts/examples/train_ddp.py --steps 400 --step-time 0.05`, plus a third launcher that joins as a spare.
Once the spare has stood by for --standby-s seconds, at rank 0's next step line (rank 0 is on node 0, which hosts
the coordinator), node 1's launcher and everything in its session get SIGKILL: its agent and, with it, its workers
(PR_SET_PDEATHSIG), as when a machine dies. The spare takes over.

Measured per trial, from <log-dir>/events.jsonl and rank 0's step lines as they arrive here:

- detect: the `failure` event's ts - the kill time (a dead node's connections break at once);
- respawn, rebuild, sync: the `recovered` event's respawn_s, rebuild_s, sync_s (each the slowest rank's): the spare
  starts both of node 1's ranks, every rank rebuilds the process group, the spare's ranks get the state of a healthy
  replica;
- recovered: its since_detection_s;
- kill -> next step: from the kill to the arrival of rank 0's first line for a step it had not completed before.

With --baseline REV, trials alternate between that git revision (exported with `git archive`, gRPC code generated)
and the working tree, so both see the same machine. torchrun has no spare: on a node loss it stops every worker on
every node and restarts them all (scripts/bench_recovery.py measures that path for a worker crash).

Usage (with the project's virtual environment):

    .venv/bin/python scripts/bench_node_loss.py --trials 3
    .venv/bin/python scripts/bench_node_loss.py --trials 3 --baseline HEAD~1
"""

from __future__ import annotations

import argparse
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


def one_trial(root: Path, src: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One node loss; the measurements, or {"error": why}."""
    with Trial(root, name, src) as trial:
        deadline = time.monotonic() + args.startup_timeout
        endpoint = f"127.0.0.1:{free_port()}"
        logs = trial.dir / "logs"
        common = ["--nnodes", "2:3", "--nproc-per-node", str(NPROC), "--rdzv-endpoint", endpoint]
        train = [str(src / TRAIN_RELPATH), "--steps", str(STEPS), "--step-time", STEP_TIME]
        node0 = trial.start("node0", flashrun_argv(*common, "--node-rank", "0", "--log-dir", str(logs), *train))
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
        os.killpg(node1.pid, signal.SIGKILL)
        resumed = node0.wait_for_step(last + 1, time.monotonic() + args.recovery_timeout)
        if resumed is None:
            return {"error": f"no step after {last} within {args.recovery_timeout:g} s: {node0.tail()}"}
        events = read_events(logs / "events.jsonl")
        failure = next((e for e in events if e.get("event") == "failure"), None)
        recovered = next((e for e in events if e.get("event") == "recovered"), None)
        if failure is None or recovered is None:
            return {"error": "no failure or recovered event in events.jsonl"}
        return {
            "detect_s": failure["ts"] - killed_at,
            "respawn_s": recovered["respawn_s"],
            "rebuild_s": recovered["rebuild_s"],
            "sync_s": recovered["sync_s"],
            "recovered_s": recovered["since_detection_s"],
            "next_step_s": resumed.t - killed_at,
            "step": step_of(resumed),
            "forked_fallbacks": sum(e.get("event") == "prewarm_fallback" for e in events),
        }


def cell(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="node losses per variant (default 3)")
    parser.add_argument("--baseline", metavar="REV", default=None,
                        help="also run git revision REV, alternating with the working tree")
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
    print(f"\nNode loss with a spare standing by: 2 nodes x {NPROC} ranks, node 1 killed after the spare stood by "
          f"{args.standby_s:g} s; "
          f"medians (min-max) of {args.trials} trials\n")
    print("| flashrun | detect | respawn | rebuild | sync | recovered (since detection) | kill -> next step | "
          "failed trials |")
    print("|---|---|---|---|---|---|---|---|")
    for label, _, _ in variants:
        done = [r for r in results[label] if "error" not in r]
        print(f"| {label} | " + " | ".join(cell([r[key] for r in done]) for key in
                                            ("detect_s", "respawn_s", "rebuild_s", "sync_s", "recovered_s",
                                             "next_step_s"))
              + f" | {len(results[label]) - len(done)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
