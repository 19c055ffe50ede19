"""The coordinator's own bookkeeping at scale, without gRPC or simulators: the pure `Job` (flashrun/coordinator/job.py)
driven in this process at N nodes of --nproc ranks.

For each N it measures, as medians over --reps runs:
- per summary: `Job.node_summary` for one node of a running job (what every one of the ~1,700 summaries a second
  costs the coordinator besides gRPC: O(ranks of one node), so no more than cache effects as N grows);
- per check: `Job.tick` while nothing is wrong (20 a second);
- detection -> notice: a node's stream breaks (`Job.disconnect`) with a spare standing by, until the job has returned
  the new generation's `Publish` command: the coordinator's own share of the critical path of a recovery, before a
  single agent can act;
- after publishing, what the coordinator's shell does next: building the new generation's detector (`Job.settle`)
  and freeing the previous generation's state (the `Output.retired` the job hands back).

The heap is frozen before each measurement (the coordinator does the same after each generation starts: see
`_settle_heap` in flashrun/coordinator/server.py), so the cyclic collector does not run inside them. This is not a
comparison with torchrun, whose rendezvous has no counterpart to these steps. Run from the repository root:

    .venv/bin/python scripts/bench_job.py
    .venv/bin/python scripts/bench_job.py --sizes 4096 --reps 9
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import TypeVar

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from flashrun.config import PROTOCOL_VERSION  # noqa: E402
from flashrun.coordinator.detector import RankReport  # noqa: E402
from flashrun.coordinator.job import Job, JobSpec, JoinRequest, Phase, Publish  # noqa: E402

RUN_ID, TOKEN = "bench", "bench"
T = TypeVar("T")
SUMMARIES_TIMED = 2_000
TICKS_TIMED = 200


def join(job: Job, agent_id: str, nproc: int, node_rank: int | None, now: float) -> None:
    job.join(JoinRequest(agent_id, f"host-{agent_id}", RUN_ID, TOKEN, PROTOCOL_VERSION, node_rank, nproc), now)


def summarise(job: Job, agent_id: str, step: int, now: float) -> None:
    assignment = job.assignments[agent_id]
    reports = [RankReport(-1, -1, local, 100_000 + assignment.rank_offset + local, step, 0.1,
                          generation=job.generation, recoverable=True)
               for local in range(assignment.local_world_size)]
    job.node_summary(agent_id, job.generation, reports, now, watching=True)


def recoverable_job(nodes: int, nproc: int) -> tuple[Job, list[str], float]:
    """A running job whose every rank reported twice (recoverable, watching the store), plus one spare."""
    job = Job(JobSpec(run_id=RUN_ID, token=TOKEN, min_nodes=nodes, max_nodes=nodes + 1, max_restarts=0,
                      stop_ack_s=60.0))
    agents = [f"a{node}" for node in range(nodes)]
    for node, agent_id in enumerate(agents):
        join(job, agent_id, nproc, node, 0.0)
    assert job.phase is Phase.RUNNING
    now = 0.0
    for step in (10, 11):
        now += 0.5
        for agent_id in agents:
            summarise(job, agent_id, step, now)
    join(job, "spare", nproc, None, now)
    return job, agents, now


def settled() -> None:
    gc.collect()
    gc.freeze()


def timed(action: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def measure(nodes: int, nproc: int) -> dict[str, float]:
    job, agents, now = recoverable_job(nodes, nproc)
    settled()
    summary_s, _ = timed(lambda: [summarise(job, agents[i % nodes], 12, now + 0.4) for i in range(SUMMARIES_TIMED)])
    tick_s, _ = timed(lambda: [job.tick(now + 0.4 + i * 1e-4) for i in range(TICKS_TIMED)])
    settled()
    detect_s, outputs = timed(lambda: [job.disconnect(agents[nodes // 2], now + 0.5)])
    assert any(isinstance(command, Publish) for command in outputs[0].commands), "no notice was published"
    settle_s, _ = timed(job.settle)
    free_s, _ = timed(outputs.clear)  # the Output goes, with the state it retired, as in the shell after publishing
    gc.unfreeze()
    return {"summary_us": 1e6 * summary_s / SUMMARIES_TIMED, "tick_us": 1e6 * tick_s / TICKS_TIMED,
            "notice_ms": 1e3 * detect_s, "settle_ms": 1e3 * settle_s, "free_ms": 1e3 * free_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64,512,4096", help="node counts, comma-separated")
    parser.add_argument("--nproc", type=int, default=8, help="ranks per node")
    parser.add_argument("--reps", type=int, default=5, help="fresh jobs measured per size (medians)")
    args = parser.parse_args()
    print(f"\n`{' '.join(['scripts/bench_job.py', *sys.argv[1:]])}`: the pure Job in one process, medians of "
          f"{args.reps} jobs per size")
    print("\n| nodes x ranks | per summary | per check (tick) | detection -> notice published | "
          "after publishing: the new detector | after publishing: freeing the previous generation |")
    print("|---|---|---|---|---|---|")
    for nodes in (int(size) for size in args.sizes.split(",")):
        runs = [measure(nodes, args.nproc) for _ in range(args.reps)]

        def med(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[key] for run in runs)

        print(f"| {nodes} x {args.nproc} | {med('summary_us'):.1f} µs | {med('tick_us'):.1f} µs | "
              f"{med('notice_ms'):.2f} ms | {med('settle_ms'):.2f} ms | {med('free_ms'):.2f} ms |", flush=True)


if __name__ == "__main__":
    main()
