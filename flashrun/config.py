"""Every setting of a flashrun job, frozen and validated in one place.

The CLI only parses options into these objects; nothing else reads the environment for settings. Durations are
seconds and carry an `_s` suffix.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import zlib
from collections.abc import Mapping

from flashrun.errors import FlashrunError

PROTOCOL_VERSION = 1
DEFAULT_RDZV_PORT = 29400  # torchrun's default for --rdzv-endpoint
SLURM_PORT_BASE = 20000  # under Slurm the port is derived from the job id so jobs sharing a node don't collide
SLURM_PORT_SPAN = 10000
GENERATION_BARRIER_S = 120.0
"""How long a rank waits at a new generation's barrier for the other ranks, and an agent for the other nodes, before
giving up with an error (a newer generation, commanded when one goes missing, releases them long before)."""
NODES_PER_STORE_SHARD = 256
"""A job of more nodes splits the store work of its recoveries (the notice, the acknowledgements, the new generation's
barrier) over store servers of this many nodes each, all in the coordinator's process, each on a thread of its own
(agent/store_barrier.py). One server handles about 70 µs of operations per node and recovery, all serial on its
thread: 0.28 s at 4,096 nodes; 256 nodes cost a shard 18 ms. `--store-shard-nodes` sets it (0: never shard)."""
COORDINATOR_PING_INTERVAL_S = 10.0
"""How often an agent pings the coordinator on its stream's connection (an HTTP/2 keepalive PING). gRPC's core
answers it in the coordinator's process, not its event loop, so a job of thousands of nodes costs the coordinator
no Python work for them."""
COORDINATOR_PING_TIMEOUT_S = 20.0
"""A ping unanswered this long means the coordinator's host is gone without closing the connection (powered off,
frozen, cut off by the network): the agent stops its workers and exits with an error instead of waiting forever.
Longer than the default node timeout, so a coordinator that was itself paused for longer than that (and then
discounts its own pause, server.PAUSE_S) still finds its agents there."""


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """How long flashrun waits for things. Order is checked: see `__post_init__`."""

    join_s: float = 600.0
    """An agent's wait for the coordinator and for the rendezvous to complete (torchrun's join_timeout)."""
    stop_grace_s: float = 30.0
    """SIGTERM to SIGKILL escalation when workers are stopped (torchrun's --shutdown-timeout default)."""
    kill_wait_s: float = 5.0
    """After SIGKILL, how long to wait for the kernel to reap a worker before reporting it as a survivor."""
    stop_ack_s: float = 60.0
    """The coordinator's wait for agents to confirm that a generation's workers stopped."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not value > 0:
                raise FlashrunError(f"timeout {field.name} must be > 0 seconds, got {value!r}")
        if self.stop_ack_s <= self.stop_grace_s + self.kill_wait_s:
            raise FlashrunError(
                f"stop_ack_s ({self.stop_ack_s}) must exceed stop_grace_s + kill_wait_s "
                f"({self.stop_grace_s + self.kill_wait_s}): agents need that long to stop workers"
            )


@dataclasses.dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class StdSpec:
    """Which of a worker's streams go to files only (redirect) or to files and console (tee)."""

    stdout: bool = False
    stderr: bool = False


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    min_nodes: int
    max_nodes: int
    nproc_per_node: int
    standalone: bool
    rdzv_endpoint: Endpoint
    run_id: str
    token: str
    node_rank: int | None
    master_addr: str | None
    master_port: int | None
    max_restarts: int
    role: str
    entrypoint: tuple[str, ...]
    """The worker command line before the script's arguments, e.g. (python, -u, train.py)."""
    script_args: tuple[str, ...]
    log_dir: str | None
    redirects: Mapping[int, StdSpec]
    tee: Mapping[int, StdSpec]
    local_ranks_filter: frozenset[int] | None
    local_addr: str | None
    """How this node names itself to the coordinator (events, status); the host name by default."""
    max_recoveries: int = 100
    store_shard_nodes: int = NODES_PER_STORE_SHARD
    """Nodes per store shard of the hosted coordinator (NODES_PER_STORE_SHARD)."""
    timeouts: Timeouts = Timeouts()
    detection: Detection = dataclasses.field(default_factory=lambda: Detection())
    prewarm: bool = True
    """Keep a zygote that has imported torch, to fork replacement workers from."""
    prewarm_modules: tuple[str, ...] = ()
    allow_inject: bool = False
    """--allow-inject: the hosted coordinator accepts `flashrun inject` fault drills."""
    base_env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """The launcher's environment as the user gave it: what workers inherit."""
    live: bool = True
    """Show the live job panel when stdout is a terminal (--no-live: plain prefixed logs and event lines)."""

    @property
    def hosts_coordinator(self) -> bool:
        return self.standalone or self.max_nodes == 1 or self.node_rank == 0


def slurm_rdzv_port(job_id: str) -> int:
    """A port derived from the job id, so concurrent jobs sharing a node pick different ones."""
    number = int(job_id) if job_id.isascii() and job_id.isdigit() else zlib.crc32(job_id.encode())
    return SLURM_PORT_BASE + number % SLURM_PORT_SPAN


def parse_nnodes(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*(?::\s*(\d+)\s*)?", value)
    if not match:
        raise FlashrunError(f"--nnodes must be N or MIN:MAX with positive integers, got {value!r}")
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if low < 1 or high < low:
        raise FlashrunError(f"--nnodes must satisfy 1 <= MIN <= MAX, got {value!r}")
    return low, high


def parse_nproc_per_node(value: str, cpu_count: int, gpu_count: int) -> int:
    """torchrun's int|cpu|gpu|auto, with the device counts passed in so this stays pure."""
    value = value.strip()
    if value.isascii() and value.isdigit() and int(value) > 0:
        return int(value)
    if value == "cpu":
        return cpu_count
    if value == "gpu":
        if gpu_count == 0:
            raise FlashrunError("--nproc-per-node gpu: no CUDA device is visible; use a number or 'cpu'")
        return gpu_count
    if value == "auto":
        return gpu_count or cpu_count
    raise FlashrunError(f"--nproc-per-node must be a positive integer, cpu, gpu or auto, got {value!r}")


def parse_endpoint(value: str, default_port: int) -> Endpoint:
    value = value.strip()
    match = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]+)(?::(\d+))?", value)
    if not value or not match:
        raise FlashrunError(f"--rdzv-endpoint must be HOST or HOST:PORT, got {value!r}")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    port = int(port_text) if port_text else default_port
    if not 0 <= port <= 65535:
        raise FlashrunError(f"--rdzv-endpoint port must be 0..65535, got {port}")
    return Endpoint(host, port)


def parse_rdzv_conf(value: str) -> dict[str, str]:
    conf: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise FlashrunError(f"--rdzv-conf must be KEY=VALUE[,KEY=VALUE...], got {item!r}")
        conf[key.strip()] = val.strip()
    return conf


KEEP_ALIVE_DEFAULTS = {"keep_alive_interval": 5, "keep_alive_max_attempt": 3}
"""torchrun's --rdzv-conf keys for when a silent node counts as dead (interval x attempts), with torchrun's defaults
for the one not given. flashrun reads the product as its node timeout; its agents still summarise every heartbeat
interval."""


def node_timeout_from_rdzv_conf(conf: Mapping[str, str]) -> float | None:
    """The node timeout torchrun's keep_alive_interval x keep_alive_max_attempt ask for; None when neither is set."""
    if not set(conf) & set(KEEP_ALIVE_DEFAULTS):
        return None
    factors = []
    for key, default in KEEP_ALIVE_DEFAULTS.items():
        text = conf.get(key, str(default))
        try:
            value = float(text) if key == "keep_alive_interval" else int(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise FlashrunError(f"--rdzv-conf {key} must be a positive "
                                f"{'number of seconds' if key == 'keep_alive_interval' else 'integer'}, got {text!r}")
        factors.append(value)
    return float(factors[0] * factors[1])


def timeouts_from_rdzv_conf(conf: Mapping[str, str], shutdown_timeout_s: float | None) -> Timeouts:
    # torchrun's last_call_timeout has no meaning here: the job starts once MIN nodes joined (more are spares).
    known = {"join_timeout": "join_s"}
    unknown = sorted(set(conf) - set(known) - set(KEEP_ALIVE_DEFAULTS) - {"timeout", "read_timeout", "is_host"})
    if unknown:
        raise FlashrunError(
            f"--rdzv-conf: unknown key(s) {', '.join(unknown)}; flashrun understands "
            f"{', '.join(sorted([*known, *KEEP_ALIVE_DEFAULTS]))}"
        )
    values: dict[str, float] = {}
    for key, field in known.items():
        if key in conf:
            try:
                values[field] = float(conf[key])
            except ValueError:
                raise FlashrunError(f"--rdzv-conf {key} must be a number of seconds, got {conf[key]!r}") from None
    if shutdown_timeout_s is not None:
        values["stop_grace_s"] = shutdown_timeout_s
        values["stop_ack_s"] = max(Timeouts.stop_ack_s, shutdown_timeout_s + Timeouts.kill_wait_s + 30.0)
    return Timeouts(**values)


def parse_std_spec(value: str, option: str, nproc: int) -> dict[int, StdSpec]:
    """torchrun's 0|1|2|3 for all local ranks, or `LOCAL_RANK:N,...` per rank (1 stdout, 2 stderr, 3 both)."""

    def one(code: str) -> StdSpec:
        if code not in {"0", "1", "2", "3"}:
            raise FlashrunError(f"{option} values are 0 (none), 1 (stdout), 2 (stderr) or 3 (both), got {code!r}")
        bits = int(code)
        return StdSpec(stdout=bool(bits & 1), stderr=bool(bits & 2))

    value = value.strip()
    if ":" not in value:
        spec = one(value or "0")
        return {rank: spec for rank in range(nproc)}
    specs = {rank: StdSpec() for rank in range(nproc)}
    for item in value.split(","):
        rank_text, _, code = item.partition(":")
        if not (rank_text.strip().isascii() and rank_text.strip().isdigit()):
            raise FlashrunError(f"{option} per-rank form is LOCAL_RANK:N,..., got {item!r}")
        specs[int(rank_text)] = one(code.strip())
    return specs


def parse_local_ranks_filter(value: str, nproc: int) -> frozenset[int] | None:
    if not value.strip():
        return None
    try:
        ranks = frozenset(int(part) for part in value.split(","))
    except ValueError:
        raise FlashrunError(f"--local-ranks-filter must be comma-separated integers, got {value!r}") from None
    bad = sorted(rank for rank in ranks if not 0 <= rank < nproc)
    if bad:
        raise FlashrunError(f"--local-ranks-filter: local rank(s) {bad} outside 0..{nproc - 1}")
    return ranks


def resolve_token(token_file: str | None, env: Mapping[str, str], standalone: bool) -> str:
    """The shared secret agents present. Generated for a standalone job, whose agent lives in-process."""
    if token_file:
        try:
            with open(token_file, encoding="utf-8") as handle:
                token = handle.read().strip()
        except OSError as err:
            raise FlashrunError(f"--token-file {token_file}: {err.strerror}; give a readable file") from None
        if not token:
            raise FlashrunError(f"--token-file {token_file} is empty; put the job's token in it")
        return token
    if env.get("FLASHRUN_TOKEN"):
        return env["FLASHRUN_TOKEN"]
    if standalone:
        return secrets.token_hex(16)
    return ""


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


NODE_TIMEOUT_SUMMARIES = 4
"""A node is lost only after missing at least this many of its summaries in a row."""


@dataclasses.dataclass(frozen=True)
class Detection:
    """Failure detection settings (coordinator and agents). Order: interval < timeout < stall floor."""

    heartbeat_interval_s: float = 0.25
    """How often workers beat and agents send their node summary."""
    heartbeat_timeout_s: float = 2.0
    """A worker silent this long is `unresponsive`."""
    startup_heartbeat_timeout_s: float = 20.0
    """...but before its first completed step, only after this long: importing torch, building the model or joining
    the process group can hold the GIL (and so the heartbeat thread) for seconds on a loaded machine."""
    node_timeout_s: float = 10.0
    """An agent whose summaries stop this long is `node_lost`: a frozen agent or a silent partition. A killed agent
    breaks its stream and is noticed at once, so this can be generous enough for a heavily loaded node."""
    stall_floor_s: float = 3.0
    """The job's steps may stop advancing at least this long before it is `stalled`."""
    stall_multiplier: float = 10.0
    """...or this many recent step times, when that is longer (the adaptive part of --stall-timeout auto)."""
    stall_ceiling_s: float = 600.0
    """...but never longer than this; also the limit before the first step of a generation completes."""
    straggler_lag_steps: int = 2
    """A progressing rank this many steps behind the leader is reported as a straggler, not a failure."""
    summary_budget_per_s: float = 1700.0
    """Node summaries per second the coordinator takes from the whole job. Each agent summarises every
    max(heartbeat interval, nodes / budget) seconds, so the coordinator's load stays flat as the job grows; what is
    urgent (a silent worker, a recovery's progress, an exit) is sent at once whatever the interval. A summary costs
    the coordinator 190-270 µs (gRPC included) on the 2-core build machine, so this stays under half a core there;
    4 intervals still fit the 10 s node timeout up to 4,250 nodes."""

    def summary_interval_s(self, nnodes: int) -> float:
        return max(self.heartbeat_interval_s, nnodes / self.summary_budget_per_s)

    def node_timeout_for(self, nnodes: int) -> float:
        """The node timeout, stretched when summaries are spaced out so far that a few late ones could trip it."""
        return max(self.node_timeout_s, NODE_TIMEOUT_SUMMARIES * self.summary_interval_s(nnodes))

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise FlashrunError(
                f"--heartbeat-timeout ({self.heartbeat_timeout_s:g} s) must be longer than --heartbeat-interval "
                f"({self.heartbeat_interval_s:g} s), which must be > 0"
            )
        if self.node_timeout_s <= self.heartbeat_interval_s:
            raise FlashrunError(f"node timeout ({self.node_timeout_s:g} s) must exceed the heartbeat interval")
        if not self.heartbeat_timeout_s < self.stall_floor_s <= self.stall_ceiling_s:
            raise FlashrunError(
                f"--stall-timeout ({self.stall_floor_s:g} s) must be longer than --heartbeat-timeout "
                f"({self.heartbeat_timeout_s:g} s) and at most {self.stall_ceiling_s:g} s"
            )
        if self.stall_multiplier < 1 or self.straggler_lag_steps < 1:
            raise FlashrunError("stall multiplier and straggler lag must be at least 1")


def parse_detection(heartbeat_interval: float | None, heartbeat_timeout: float | None, stall_timeout: str,
                    node_timeout: float | None = None) -> Detection:
    """--heartbeat-interval, --heartbeat-timeout, --stall-timeout (`auto`, or the floor in seconds), and the node
    timeout torchrun's keep-alive keys of --rdzv-conf ask for (node_timeout_from_rdzv_conf).

    The stall threshold is always adaptive above its floor: a job whose steps slow down gradually is not stalled.
    """
    values: dict[str, float] = {}
    if heartbeat_interval is not None:
        values["heartbeat_interval_s"] = heartbeat_interval
        values["node_timeout_s"] = max(Detection.node_timeout_s, 4 * heartbeat_interval)
    if heartbeat_timeout is not None:
        values["heartbeat_timeout_s"] = heartbeat_timeout
        values["stall_floor_s"] = max(Detection.stall_floor_s, heartbeat_timeout + 0.5)
    if node_timeout is not None:
        if node_timeout <= values.get("heartbeat_interval_s", Detection.heartbeat_interval_s):
            raise FlashrunError(
                f"--rdzv-conf keep_alive_interval x keep_alive_max_attempt ({node_timeout:g} s) must be longer than "
                f"the heartbeat interval ({values.get('heartbeat_interval_s', Detection.heartbeat_interval_s):g} s)")
        values["node_timeout_s"] = node_timeout
    text = stall_timeout.strip().lower()
    if text != "auto":
        try:
            values["stall_floor_s"] = float(text)
        except ValueError:
            raise FlashrunError(f"--stall-timeout must be 'auto' or seconds, got {stall_timeout!r}") from None
    return Detection(**values)
