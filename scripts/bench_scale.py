"""Does flashrun's control plane cost the same at 8 nodes and at 4,096? Simulated agents against the real coordinator.

For each job size N (nodes of --nproc simulated ranks), this starts the real coordinator (`flashrun coordinator`, its
own process) and N simulated agents (scripts/sim_agents.py, several per process, real gRPC protocol), plus one spare
agent per trial, and measures:

- node-loss detection: an agent stops summarising (a frozen node; detection takes the node timeout by design) or
  its stream breaks (a dead node); from the moment the simulator froze or dropped it to the coordinator's `failure`;
- control-plane recovery: failure detected -> every agent acknowledged the new generation (`acknowledged`) -> every
  rank's new-generation store rendezvous done (`rendezvous`: the coordinator saw the new generation's barrier on its
  TCPStore released complete; each agent arrives once for its ranks, as flashrun's agent does). The coordinator
  publishes the generation as one notice on its store: the agents that watch it (all but a spare taking over)
  acknowledge it there and get no Recover message (sim_agents.py; each trial's line on stderr says how many agents
  the notice moved). With --no-store the agents neither watch nor run the barrier: each gets a Recover, there is no
  rendezvous, and the column falls back to the next figure;
- every rank reported: until the coordinator had every rank's summary in the new generation (`recovered`);
- on stderr, per trial: also when the simulated agents heard of the new generation (first, last) and passed its
  barrier (last), counted from the failure;
- notice fallbacks: how often the coordinator sent Recover messages after all because the notice's acknowledgements
  were late (`notice_fallback` events over the whole run of a size; it should be 0);
- the coordinator process's CPU time during that recovery, and of it its TCPStore server threads', and the simulator
  processes' CPU time (where the 2 cores went);
- the coordinator's CPU share (of one core) and resident memory in steady state, default heartbeat interval.

With --soak-s it instead runs one size for that long and samples the coordinator's memory (for unbounded growth);
with --soak-losses as well, a node is lost (a spare takes over) and recovered before each sample.
With --overlap-s it instead loses a node, then a second one that long after the first failure was detected, while
the first recovery is still in flight, and reports whether every agent ended in the last generation.
Everything runs on this machine, simulators included: on 2 cores the simulators compete with the coordinator, so
latencies are upper bounds for the coordinator's own share. Prints a markdown table; run from the repository root:

    .venv/bin/python scripts/bench_scale.py                      # N = 8, 64, 512, 4096
    .venv/bin/python scripts/bench_scale.py --soak-s 600 --sizes 512
    .venv/bin/python scripts/bench_scale.py --soak-s 600 --sizes 512 --soak-losses
    .venv/bin/python scripts/bench_scale.py --overlap-s 0.3 --sizes 512,4096
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
AGENTS_PER_PROCESS = 256
"""Simulated agents per simulator process (one asyncio loop each)."""
WARMUP_S = 5.0
"""After the last agent started, how long before steady-state measurements begin."""
EVENT_WAIT_S = float(os.environ.get("BENCH_SCALE_WAIT_S", "120"))
"""Longest wait for any one expected event before the run is declared broken."""
TOKEN = "bench-scale-token"
SIMULATOR_NICE = 10
"""Niceness of the simulator processes (the coordinator keeps 0)."""
STALL_TIMEOUT_S = 60.0
"""Longer than the node timeout, so that a frozen node is found by the node-loss check this benchmark measures."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    return _stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def _stat_cpu_seconds(stat: Path) -> float:
    """User plus system time from a /proc stat file (a process's or one thread's)."""
    fields = stat.read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


LOG_TAIL_LINES = 20
"""On a failed measurement, how much of each process's log is printed before its work directory is removed."""
STORE_THREAD = "pt_tcpstore_uv"
"""The name of the thread that runs torch's TCPStore server (libuv backend) in the coordinator's process."""


def store_cpu_seconds(pid: int) -> float:
    """CPU time of the coordinator's TCPStore server thread."""
    total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "comm").read_text().strip() == STORE_THREAD:
                total += _stat_cpu_seconds(task / "stat")
    return total


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Lines:
    """Collects a process's JSON stdout lines in a thread; `wait_for` polls them with a deadline."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                with self._lock:
                    self.records.append(record)

    def matching(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r.get("event") == event]

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # its agents were all shut down: it has exited
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()


def wait_for(condition: Any, what: str, timeout_s: float = EVENT_WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")


class Job:
    """One coordinator with its simulated agents."""

    def __init__(self, nodes: int, args: argparse.Namespace, workdir: str) -> None:
        self.nodes = nodes
        self.args = args
        self.workdir = workdir
        self.port = free_port()
        self.events_path = Path(workdir, "events.jsonl")
        # torch 2.13's store server resolves each new client's address (reverse DNS) on its only thread; where the
        # resolver drops queries (this sandbox's does) each costs 5 s. Connections are opened before any clock starts.
        self.env = {**os.environ, "FLASHRUN_TOKEN": TOKEN, "GRPC_VERBOSITY": "NONE",
                    "RES_OPTIONS": "timeout:1 attempts:1"}
        self.coordinator = subprocess.Popen(
            [str(BIN / "flashrun"), "coordinator", "--bind", f"127.0.0.1:{self.port}",
             "--nnodes", f"{nodes}:{nodes + max(args.trials * 2, soak_losses(args))}", "--rdzv-id", "scale",
             "--log-dir", workdir,
             # Simulated ranks are not coupled by collectives: a frozen node would only stall the job's slowest
             # step, which the stall check (3 s floor) would report before the node timeout (10 s) it measures.
             "--stall-timeout", str(STALL_TIMEOUT_S),
             *([] if args.store_shard_nodes is None else ["--store-shard-nodes", str(args.store_shard_nodes)])],
            env=self.env, stdout=subprocess.DEVNULL, stderr=open(Path(workdir, "coordinator.log"), "w"),  # noqa: SIM115
            start_new_session=True,
        )
        self.simulators: list[Lines] = []
        self._spares = 0
        self.epoch = time.time()
        """The simulated job's step 0, shared by every simulator process."""

    def simulate(self, count: int, first: int, prefix: str) -> Lines:
        command = [sys.executable, str(REPO / "scripts" / "sim_agents.py"), "--endpoint", f"127.0.0.1:{self.port}",
                   "--run-id", "scale", "--agents", str(count), "--first", str(first), "--host-prefix", prefix,
                   "--nproc", str(self.args.nproc), "--step-s", str(self.args.step_s),
                   "--epoch", repr(self.epoch)]
        if not self.args.no_store:
            command.append("--store")
        # The simulators run niced: the coordinator stands for a process with a machine of its own, and what it
        # cannot get while thousands of simulated agents wake up is the simulation's cost, not the protocol's.
        command = ["nice", "-n", str(SIMULATOR_NICE), *command]
        proc = subprocess.Popen(command, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=open(Path(self.workdir, f"sim-{prefix}-{first}.log"), "w"),  # noqa: SIM115
                                text=True, start_new_session=True)
        lines = Lines(proc)
        self.simulators.append(lines)
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        records = []
        for line in self.events_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if record.get("event") == name:
                    records.append(record)
        return records

    def start(self) -> None:
        log = Path(self.workdir, "coordinator.log")
        wait_for(lambda: "listening" in log.read_text() or self.coordinator.poll() is not None, "the coordinator")
        if self.coordinator.poll() is not None:
            raise RuntimeError(f"the coordinator exited: {log.read_text()}")
        per_process = min(AGENTS_PER_PROCESS, self.nodes)
        members = [self.simulate(min(per_process, self.nodes - first), first, "node")
                   for first in range(0, self.nodes, per_process)]
        wait_for(lambda: sum(len(m.matching("started")) for m in members) == self.nodes,
                 f"{self.nodes} agents to start")

    def add_spare(self, count: int = 1) -> None:
        """`count` spare agents, in one simulator process."""
        spare = self.simulate(count, self._spares + 1, "spare")
        self._spares += count
        wait_for(lambda: len(spare.matching("spare")) == count, f"{count} spare(s) to join")

    def lose_node(self, how: str, node: int) -> dict[str, float]:
        """Freeze or drop one member node; returns the detection and recovery figures."""
        failures_before = len(self.events("failure"))
        recovered_before = len(self.events("recovered"))
        fallbacks_before = len(self.events("notice_fallback"))
        for simulator in self.simulators:
            simulator.send(f"{how} {node}")
        marker = "silenced" if how == "silence" else "dropped"
        lost_at = wait_for(lambda: next((r["ts"] for s in self.simulators for r in s.matching(marker)
                                         if r.get("node") == node and r["ts"] > 0), None), f"{how} of node {node}")
        failure = wait_for(lambda: self.events("failure")[failures_before:], "the failure")[0]
        cpu_at_failure = cpu_seconds(self.coordinator.pid)
        store_at_failure = store_cpu_seconds(self.coordinator.pid)
        simulators_at_failure = self.simulators_cpu_seconds()
        recovered = wait_for(lambda: self.events("recovered")[recovered_before:], "the recovery")[0]
        cpu_in_recovery = cpu_seconds(self.coordinator.pid) - cpu_at_failure
        store_in_recovery = store_cpu_seconds(self.coordinator.pid) - store_at_failure
        simulators_in_recovery = self.simulators_cpu_seconds() - simulators_at_failure
        generation = recovered["generation"]
        acknowledged = wait_for(lambda: self.phase(generation, "acknowledged"), f"generation {generation}'s acks")
        # The coordinator sees the barrier's release on its store (a thread of its own) and the ranks' reports (after
        # the release) on its gRPC streams: the two events need not come in that order.
        rendezvous = recovered if self.args.no_store else wait_for(
            lambda: self.phase(generation, "rendezvous"), f"generation {generation}'s rendezvous")
        for simulator in self.simulators:  # consumed: the next trial matches only its own marker
            for record in simulator.matching(marker):
                record["ts"] = 0
        return {"detect_s": failure["ts"] - lost_at, "acknowledged_s": acknowledged["since_detection_s"],
                "rendezvous_s": rendezvous["since_detection_s"], "recovered_s": recovered["since_detection_s"],
                "notice_fallbacks": len(self.events("notice_fallback")) - fallbacks_before,
                "moved_by_notice": sum(r["rebuilding"] for s in self.simulators for r in s.matching("noticed")
                                      if r["generation"] == generation),
                **self.spread(generation, failure["ts"]),
                "coordinator_cpu_s": cpu_in_recovery,
                "store_cpu_s": store_in_recovery, "simulators_cpu_s": simulators_in_recovery,
                "kind": failure["kind"] == "node_lost"}

    def spread(self, generation: int, failed_at: float) -> dict[str, float]:
        """When, after the failure, the simulated agents got the new generation (first and last) and passed its
        barrier (last): where a slow recovery spent its time."""
        rebuilt = [r for s in self.simulators for r in s.matching("rebuilt") if r["generation"] == generation]
        if not rebuilt:
            return {}
        received = [r["received"] - failed_at for r in rebuilt]
        return {"told_first_s": round(min(received), 3), "told_last_s": round(max(received), 3),
                "rebuilt_last_s": round(max(r["ts"] for r in rebuilt) - failed_at, 3)}

    def phase(self, generation: int, phase: str) -> dict[str, Any] | None:
        return next((e for e in self.events("recovery_phase")
                     if e["generation"] == generation and e.get("phase") == phase), None)

    def simulators_cpu_seconds(self) -> float:
        total = 0.0
        for simulator in self.simulators:
            with contextlib.suppress(OSError):  # a spare that was shut down has exited
                total += cpu_seconds(simulator.proc.pid)
        return total

    def close(self) -> None:
        for proc in [self.coordinator, *(s.proc for s in self.simulators)]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def measure(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"flashrun-scale-{nodes}-") as workdir:
        job = Job(nodes, args, workdir)
        try:
            started = time.monotonic()
            job.start()
            startup_s = time.monotonic() - started
            time.sleep(WARMUP_S)  # a benchmark's settling time, not a synchronisation
            cpu0, wall0 = cpu_seconds(job.coordinator.pid), time.monotonic()
            time.sleep(args.steady_s)
            cpu_share = (cpu_seconds(job.coordinator.pid) - cpu0) / (time.monotonic() - wall0)
            memory = rss_mb(job.coordinator.pid)
            trials: dict[str, list[dict[str, float]]] = {"silence": [], "drop": []}
            node = nodes // 2
            for trial in range(args.trials):
                for how in ("drop", "silence"):
                    job.add_spare()
                    trials[how].append(job.lose_node(how, node))
                    print(f"  N={nodes} trial {trial} {how}: {trials[how][-1]}", file=sys.stderr, flush=True)
            return {"nodes": nodes, "ranks": nodes * args.nproc, "startup_s": startup_s, "cpu": cpu_share,
                    "rss_mb": memory, "trials": trials, "notice_fallbacks": len(job.events("notice_fallback"))}
        except Exception:
            for log in sorted(Path(workdir).glob("*.log")):  # the work directory goes with this function
                tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
                print(f"--- {log.name} (last {len(tail)} lines)", *tail, sep="\n", file=sys.stderr)
            raise
        finally:
            job.close()


def soak_losses(args: argparse.Namespace) -> int:
    """With --soak-losses: one node lost per memory sample, each taken over by a spare."""
    return math.ceil(args.soak_s / args.soak_sample_s) if args.soak_s > 0 and args.soak_losses else 0


def soak(nodes: int, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix=f"flashrun-soak-{nodes}-") as workdir:
        job = Job(nodes, args, workdir)
        try:
            job.start()
            if soak_losses(args):
                job.add_spare(soak_losses(args))
            samples = []
            started = time.monotonic()
            cpu0 = cpu_seconds(job.coordinator.pid)
            while time.monotonic() - started < args.soak_s:
                if soak_losses(args):  # recovered before the sample is taken
                    job.lose_node("drop", len(samples))
                samples.append((time.monotonic() - started, rss_mb(job.coordinator.pid)))
                time.sleep(args.soak_sample_s)
            cpu = (cpu_seconds(job.coordinator.pid) - cpu0) / (time.monotonic() - started)
        finally:
            job.close()
    half = len(samples) // 2
    first, second = [m for _, m in samples[:half]], [m for _, m in samples[half:]]
    losses = f", a node lost and recovered before each sample ({len(samples)} recoveries)" if soak_losses(args) else ""
    print(f"\nSoak: {nodes} nodes x {args.nproc} ranks for {args.soak_s:g} s; coordinator RSS sampled every "
          f"{args.soak_sample_s:g} s{losses}; CPU {100 * cpu:.1f}% of one core")
    print(f"RSS MB: start {samples[0][1]:.1f}, end {samples[-1][1]:.1f}, max {max(m for _, m in samples):.1f}; "
          f"median first half {statistics.median(first):.1f}, second half {statistics.median(second):.1f}")
    print("samples (s, MB): " + ", ".join(f"{t:.0f}:{m:.1f}" for t, m in samples))


def overlap(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    """A second node lost while the first loss's recovery is in flight: does the job end in one generation with every
    agent in it, without falling back to messages, and how long after the first detection?"""
    with tempfile.TemporaryDirectory(prefix=f"flashrun-overlap-{nodes}-") as workdir:
        job = Job(nodes, args, workdir)
        try:
            job.start()
            time.sleep(WARMUP_S)  # a benchmark's settling time, not a synchronisation
            job.add_spare()
            job.add_spare()
            first, second = nodes // 2, nodes // 3
            for simulator in job.simulators:
                simulator.send(f"drop {first}")
            wait_for(lambda: job.events("failure"), "the first failure")
            time.sleep(args.overlap_s)  # the point of the measurement: a loss this long into the recovery
            for simulator in job.simulators:
                simulator.send(f"drop {second}")
            wait_for(lambda: len(job.events("failure")) >= 2, "the second failure")
            failures = job.events("failure")
            final = failures[1]["generation"] + 1
            recovered = wait_for(lambda: [e for e in job.events("recovered") if e["generation"] == final],
                                 f"generation {final}'s recovery")[0]
            rendezvous = wait_for(lambda: job.phase(final, "rendezvous"), f"generation {final}'s rendezvous")
            return {"nodes": nodes, "second_after_first_s": failures[1]["ts"] - failures[0]["ts"],
                    "generations": [f["generation"] + 1 for f in failures],
                    "recovered_generations": sorted({e["generation"] for e in job.events("recovered")}),
                    "rendezvous_s": rendezvous["since_detection_s"], "recovered_s": recovered["since_detection_s"],
                    "agents_in_final": sum(1 for s in job.simulators for r in s.matching("rebuilt")
                                           if r["generation"] == final),
                    "fallbacks": len(job.events("notice_fallback")),
                    "escalated": len([f for f in job.events("failure") if f["kind"] == "escalated"])}
        finally:
            job.close()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,64,512,4096", help="node counts, comma-separated")
    parser.add_argument("--nproc", type=int, default=8, help="simulated ranks per node")
    parser.add_argument("--trials", type=int, default=3, help="node losses of each kind per size")
    parser.add_argument("--steady-s", type=float, default=10.0, help="steady-state CPU measurement window")
    parser.add_argument("--step-s", type=float, default=0.1, help="simulated step time")
    parser.add_argument("--no-store", action="store_true", help="skip the nodes' store barrier on recovery")
    parser.add_argument("--store-shard-nodes", type=int, default=None,
                        help="the coordinator's --store-shard-nodes (default: flashrun's, 256; 0: one store server)")
    parser.add_argument("--soak-s", type=float, default=0.0, help="instead: run one size this long, sample memory")
    parser.add_argument("--soak-sample-s", type=float, default=10.0)
    parser.add_argument("--soak-losses", action="store_true",
                        help="during the soak, lose a node (a spare takes over) before each sample")
    parser.add_argument("--overlap-s", type=float, default=None,
                        help="instead: per size, lose a second node this long after the first loss was detected")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.soak_s > 0:
        soak(sizes[0], args)
        return
    if args.overlap_s is not None:
        print(f"\n`{' '.join(['scripts/bench_scale.py', *sys.argv[1:]])}`: a node dropped, then a second one "
              f"{args.overlap_s:g} s after the first failure was detected. Times are since the detection that began "
              "the recovery: the first one when the second loss came while the first recovery was in flight")
        print("\n| nodes x ranks | second failure after the first | first recovery in flight | generations started | "
              "generations recovered | control-plane recovery of the last | every rank reported | "
              "agents in the last generation | notice fallbacks | escalations |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for nodes in sizes:
            r = overlap(nodes, args)
            in_flight = "yes" if r["generations"][0] not in r["recovered_generations"] else "no (it had recovered)"
            print(f"| {nodes} x {args.nproc} | {r['second_after_first_s']:.3f} s | {in_flight} | {r['generations']} | "
                  f"{r['recovered_generations']} | {r['rendezvous_s']:.3f} s | {r['recovered_s']:.3f} s | "
                  f"{r['agents_in_final']} of {nodes} | {r['fallbacks']} | {r['escalated']} |", flush=True)
        return
    results = [measure(n, args) for n in sizes]
    base = results[0]
    print(f"\n`{' '.join(['scripts/bench_scale.py', *sys.argv[1:]])}`: {args.trials} trials per kind of loss, "
          f"medians; {os.cpu_count()} cores shared by the coordinator and the simulators; node timeout 10 s")
    recovery = ("control-plane recovery (--no-store: no rendezvous, every rank reported)" if args.no_store
                else "control-plane recovery (every rank's store rendezvous done)")
    print("\n| nodes x ranks | node lost: stream broke | node lost: frozen (timeout 10 s) | agents acknowledged | "
          f"{recovery} | vs smallest | every rank reported | coordinator busy during it (store server) | "
          "simulators busy during it | coordinator CPU | coordinator RSS | notice fallbacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        drop, frozen = r["trials"]["drop"], r["trials"]["silence"]
        rendezvous = median([t["rendezvous_s"] for t in drop + frozen])
        base_rendezvous = median([t["rendezvous_s"] for t in base["trials"]["drop"] + base["trials"]["silence"]])
        print(f"| {r['nodes']} x {args.nproc} | {median([t['detect_s'] for t in drop]):.3f} s | "
              f"{median([t['detect_s'] for t in frozen]):.3f} s | "
              f"{median([t['acknowledged_s'] for t in drop + frozen]):.3f} s | {rendezvous:.3f} s | "
              f"{rendezvous / base_rendezvous:.2f}x | {median([t['recovered_s'] for t in drop + frozen]):.3f} s | "
              f"{median([t['coordinator_cpu_s'] for t in drop + frozen]):.2f} s "
              f"({median([t['store_cpu_s'] for t in drop + frozen]):.2f} s) | "
              f"{median([t['simulators_cpu_s'] for t in drop + frozen]):.2f} s | "
              f"{100 * r['cpu']:.1f}% | {r['rss_mb']:.0f} MB | {r['notice_fallbacks']} |")


if __name__ == "__main__":
    main()
