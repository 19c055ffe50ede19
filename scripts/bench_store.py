"""The store side of a generation change at scale: N simulated ranks against real TCPStore servers.

Measures the barrier a new generation passes before its process group forms (flashrun/agent/store_barrier.py: the
real `GenerationBarrier`, imported, not copied), in four designs:
- shard (flashrun's beyond --shard-nodes nodes): as node, but each shard of --shard-nodes nodes arrives and waits on
  a store server of its own; the last to arrive marks the shard full, and the shard's first node (its leader) passes
  it on to the root (the first server) and copies the root's release back;
- node (flashrun's up to --shard-nodes nodes): each node's agent arrives once for its ranks, and waits once on ONE
  server (flashrun/agent/node_barrier.py); the local hop from the ranks to their agent is not part of this benchmark;
- rank (the previous one): every rank arrives and waits on the store itself;
- old (the one before): every rank arrives, then polls the count (a copy kept below, labelled).
gloo's own rendezvous inside init_process_group is not part of this benchmark.

Simulation (a 2-core machine cannot run 32,768 processes):
- the servers: torch.distributed.TCPStore(is_master=True) (libuv backend, torch's default) in this process, one for
  every design but shard, which has one per shard (the first also the root), each a thread of its own;
- --procs worker processes (spawned before the server starts), each with --threads threads;
- one simulated node = 8 ranks sharing ONE client connection, plus one waiter connection (as an agent has two);
  in the rank design a node's 8 ranks issue their operations in turn on it: first all 8 arrive, then all 8 wait
  (the first wait blocks until the release; the next 7 find it already there);
- a thread drives several nodes: it arrives for all of them, then waits for each.
Time is measured from "generation announced" (every connection open, a start event set by this process) until the
last simulated rank passed the barrier (CLOCK_MONOTONIC is shared by the processes). Operations are counted per
rank by a thin wrapper around each real client. On the wire, a `get` is a WAIT then a GET; `add` and `compare_set`
are one message each; the old loop's poll is an `add(key, 0)`.

Usage (project virtualenv; defaults take about 2-3 minutes, most of it the 32,768-rank rows):

    .venv/bin/python scripts/bench_store.py
    .venv/bin/python scripts/bench_store.py --ranks 64,512 --trials 3 --designs node
    .venv/bin/python scripts/bench_store.py --ranks 32768 --designs shard,node
"""

from __future__ import annotations

import argparse
import collections
import datetime
import multiprocessing as mp
import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# torch 2.13's store server resolves every new client's address (a reverse DNS lookup) on its only thread, and so
# does a client whose wait times out. Where the resolver drops queries (this sandbox's does), each costs glibc's
# 5 s timeout and opening thousands of connections takes many minutes. Connections are opened before the clock
# starts, so a shorter resolver timeout changes no measured number; it only makes the set-up finish.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")
from flashrun.config import NODES_PER_STORE_SHARD  # noqa: E402

RANKS_PER_NODE = 8
STORE_TIMEOUT_S = 300.0
"""Client timeout: far beyond any barrier here, so a stuck trial fails loudly rather than quietly."""
OLD_POLL_S = 0.002
"""The previous implementation's poll interval (ARRIVAL_POLL_S before this change)."""


class CountingStore:
    """Forwards to a real store client, counting the operations issued through it."""

    def __init__(self, store: Any, ops: collections.Counter[str]) -> None:
        self._store = store
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._ops[name] += 1
            return method(*args, **kwargs)

        return counted


# The previous implementation (flashrun/worker/group.py before this change), for comparison only: each rank
# `add`s itself, then polls the counter with `add(key, 0)` every OLD_POLL_S until it reaches world_size. Here the
# ranks of a thread's nodes all arrive first, then poll in turn, one round over the still-waiting ranks per
# OLD_POLL_S.
def old_polling_barrier(stores: list[Any], generation: int, world_size: int) -> None:
    key = f"flashrun/g{generation}/arrived"
    for store in stores:
        for _ in range(RANKS_PER_NODE):
            store.add(key, 1)
    waiting = {index: RANKS_PER_NODE for index in range(len(stores))}
    while waiting:
        for index in list(waiting):
            for _ in range(waiting[index]):
                if int(stores[index].add(key, 0)) >= world_size:
                    waiting[index] -= 1
            if not waiting[index]:
                del waiting[index]
        if waiting:
            time.sleep(OLD_POLL_S)


def _drive(design: str, nodes: list[tuple[Any, Any]], generation: int, world_size: int) -> None:
    from flashrun.agent.store_barrier import COMPLETE, GenerationBarrier

    if design == "shard":
        barriers = [GenerationBarrier(store, waiter, generation, arriving, shard)
                    for store, waiter, (arriving, shard) in nodes]
        for barrier in barriers:
            barrier.arrive()
        leaders_first = sorted(barriers, key=lambda b: not (b.shard and b.shard.leads))
        for barrier in leaders_first:  # every leader passes its shard up before any waits for the root's release
            barrier.pass_up(STORE_TIMEOUT_S)
        for barrier in leaders_first:  # a leader copies the root's release to its shard
            assert barrier.await_release(STORE_TIMEOUT_S) == COMPLETE
        return
    if design == "old":
        old_polling_barrier([store for store, _ in nodes], generation, world_size)
        return
    per_node, participants = (1, world_size // RANKS_PER_NODE) if design == "node" else (RANKS_PER_NODE, world_size)
    barriers = [[GenerationBarrier(store, waiter, generation, participants) for _ in range(per_node)]
                for store, waiter in nodes]
    for node in barriers:
        for barrier in node:
            barrier.arrive()
    for node in barriers:
        for barrier in node:
            assert barrier.await_release(STORE_TIMEOUT_S) == COMPLETE


def _run_share(design: str, share: list[tuple[Any, Any]], generation: int, world_size: int, start: Any,
               finished: list[float], index: int) -> None:
    start.wait()
    _drive(design, share, generation, world_size)
    finished[index] = time.monotonic()


def worker(ports: list[int], first_node: int, node_count: int, shard_nodes: int, threads: int, start: Any,
           commands: Any, results: Any) -> None:
    import torch.distributed as dist

    from flashrun.agent.store_barrier import Shard, leads_shard, shard_count, shard_of

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ops: collections.Counter[str] = collections.Counter()
    timeout = datetime.timedelta(seconds=STORE_TIMEOUT_S)

    def connect(port: int = ports[0]) -> Any:
        return CountingStore(dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                                           timeout=timeout), ops)

    def plain() -> list[Any]:
        """Two connections per node to the one server."""
        return [(connect(), connect()) for _ in range(node_count)]

    def sharded(nnodes: int) -> list[Any]:
        """Two connections per node to its shard's server and, for a shard's leader beyond the first shard, two to
        the root (the first server), as a sharded job's agent has."""
        count, built = shard_count(nnodes, shard_nodes), []
        for node in range(first_node, first_node + node_count):
            index, arriving = shard_of(node, nnodes, shard_nodes)
            own = (connect(ports[index]), connect(ports[index]))
            shard = None if count == 1 else Shard(index, count)
            if shard and leads_shard(node, nnodes, shard_nodes):
                shard = Shard(index, count, *(own if index == 0 else (connect(), connect())))
            built.append((*own, (arriving, shard)))
        return built

    # Only one design's connections are open at a time.
    family, nodes, shares = "", [], []  # opened for the first command, before it is armed
    results.put(("ready", None))
    while (command := commands.get()) is not None:
        design, generation, world_size = command
        wanted = "shard" if design == "shard" else "plain"
        if wanted != family:
            nodes = shares = []  # closed before the other design's are opened
            family, nodes = wanted, sharded(world_size // RANKS_PER_NODE) if wanted == "shard" else plain()
        shares = [nodes[i::threads] for i in range(threads)]
        ops.clear()
        finished = [0.0] * threads
        pool = [threading.Thread(target=_run_share, args=(design, share, generation, world_size, start, finished, i))
                for i, share in enumerate(shares) if share]
        for thread in pool:
            thread.start()
        results.put(("armed", None))
        for thread in pool:
            thread.join()
        results.put(("done", (max(finished), dict(ops))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="64,512,4096,32768", help="comma-separated world sizes (multiples of 8)")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--procs", type=int, default=4, help="worker processes simulating the ranks")
    parser.add_argument("--threads", type=int, default=8, help="threads per worker process")
    parser.add_argument("--shard-nodes", type=int, default=NODES_PER_STORE_SHARD,
                        help="nodes per store server in the shard design (flashrun's --store-shard-nodes)")
    parser.add_argument("--designs", default="node,rank,old",
                        help="node (flashrun's: an arrival per node), rank (an arrival per rank), old (polling)")
    args = parser.parse_args()
    sizes = [int(n) for n in args.ranks.split(",")]
    designs = args.designs.split(",")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    needed = 2 * max(sizes) // RANKS_PER_NODE + 100
    if hard < needed:
        sys.exit(f"bench_store: error: RLIMIT_NOFILE hard limit {hard} < {needed} needed for {max(sizes)} ranks")

    ctx = mp.get_context("spawn")
    import torch.distributed as dist

    # One server for every size (each trial has its own generation namespace): dropping a server that has served
    # thousands of connections was seen to hang this process.
    def serve() -> Any:
        return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                             timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))

    from flashrun.agent.store_barrier import shard_count

    shards = shard_count(max(sizes) // RANKS_PER_NODE, args.shard_nodes) if "shard" in designs else 1
    servers = [serve() for _ in range(shards)]
    rows = []
    generation = 0
    for world_size in sizes:
        node_total = world_size // RANKS_PER_NODE
        counts = [node_total // args.procs + (i < node_total % args.procs) for i in range(args.procs)]
        results = ctx.Queue()
        start = ctx.Event()
        procs = []
        first = 0
        for count in counts:
            first += count
            if count:
                commands = ctx.Queue()
                proc = ctx.Process(target=worker, args=([s.port for s in servers], first - count, count,
                                                        args.shard_nodes, args.threads, start, commands, results))
                proc.start()
                procs.append((proc, commands))
        for _ in procs:
            assert results.get(timeout=600)[0] == "ready"
        for design in designs:
            times, per_rank = [], []
            for _ in range(args.trials):
                generation += 1
                for _, commands in procs:
                    commands.put((design, generation, world_size))
                for _ in procs:
                    assert results.get(timeout=600)[0] == "armed"
                time.sleep(0.2)  # the armed threads reach start.wait() before the clock starts
                announced = time.monotonic()
                start.set()
                done = [results.get(timeout=600)[1] for _ in procs]
                start.clear()
                times.append(max(finished for finished, _ in done) - announced)
                total: collections.Counter[str] = collections.Counter()
                for _, ops in done:
                    total.update(ops)
                per_rank.append({name: count / world_size for name, count in total.items()})
            rows.append((world_size, design, times, per_rank))
            print(f"  {world_size} ranks, {design}: median {statistics.median(times) * 1e3:.1f} ms "
                  f"(trials {', '.join(f'{t * 1e3:.0f}' for t in times)})", file=sys.stderr, flush=True)
        for _, commands in procs:
            commands.put(None)
        for proc, _ in procs:
            proc.join(60)

    print(f"\n`{' '.join([Path(sys.executable).name, *sys.argv])}` (torch TCPStore, libuv server; {args.procs} "
          f"processes x {args.threads} threads; {RANKS_PER_NODE} simulated ranks share a node's connection)\n")
    print("| ranks (nodes) | design | barrier, median of trials | min - max | store ops per rank (client calls) |")
    print("|---|---|---|---|---|")
    for world_size, design, times, per_rank in rows:
        mean_ops = {name: statistics.mean(trial.get(name, 0.0) for trial in per_rank)
                    for name in sorted({name for trial in per_rank for name in trial})}
        described = ", ".join(f"{name} {count:.3g}" for name, count in mean_ops.items() if name != "set_timeout")
        label = {"shard": f"shard: as node, on a server per {args.shard_nodes} nodes, passed on to the root",
                 "node": "node: per node, add + release + blocking get",
                 "rank": "rank: per rank, add + release + blocking get", "old": "old: add + poll every 2 ms"}[design]
        print(f"| {world_size} ({world_size // RANKS_PER_NODE}) | {label} | {statistics.median(times) * 1e3:.1f} ms "
              f"| {min(times) * 1e3:.1f} - {max(times) * 1e3:.1f} ms | {described} |")


if __name__ == "__main__":
    main()
