"""One `flashrun` process: hosts the coordinator when this node should, runs this node's agent, cleans up."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from flashrun.agent.agent import FORWARDED_SIGNALS, Agent, say
from flashrun.config import Endpoint, LaunchConfig
from flashrun.coordinator.job import Event, JobSpec
from flashrun.coordinator.server import CoordinatorServer
from flashrun.errors import EXIT_SIGNAL_BASE, FlashrunError
from flashrun.status import fetch_status
from flashrun.view.live import LOCAL_POLL_S, REMOTE_POLL_S, VIEW_MAX_RANKS, LiveView, PlainView, is_live_terminal

COORDINATOR_LINGER_S = 10.0
"""After the job ends, how long the hosting launcher waits for other agents to read their Shutdown."""
GRPC_PROBE_S = 2.0
"""When our coordinator's port is taken, how long to wait for an existing coordinator there to answer."""
CONSOLE_EVENTS = {"failure", "straggler", "restarting", "job_failed", "agent_rejected", "descriptor_limit",
                  "notice_failed", "notice_fallback"}
"""Printed even without --log-dir or a job view: failures, and what the user may have to act on (a hard limit on
open files too low for the job; a recovery that could not go through the store)."""


class EventLog:
    """Appends the coordinator's events to <log-dir>/events.jsonl and echoes the important ones (or, with a job view,
    hands every record to `echo`)."""

    def __init__(self, log_dir: str | None) -> None:
        self.echo: Callable[[dict[str, Any]], None] | None = None
        self._lock = threading.Lock()
        self._file: TextIO | None = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            self._file = open(os.path.join(log_dir, "events.jsonl"), "a", encoding="utf-8")  # noqa: SIM115

    def __call__(self, event: Event) -> None:
        record = event.record(time.time())
        with self._lock:
            if self._file is not None:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
        echo = self.echo
        if echo is not None:
            echo(record)
        elif event.name in CONSOLE_EVENTS:
            details = " ".join(f"{key}={value}" for key, value in event.fields.items())
            say(f"[gen {event.generation}] {event.name} {details}")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def _is_local_address(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((address[0], 0))
            return True
        except OSError:
            continue
    return False


def _answers_grpc(endpoint: Endpoint) -> bool:
    import grpc

    with grpc.insecure_channel(str(endpoint)) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=GRPC_PROBE_S)
            return True
        except grpc.FutureTimeoutError:
            return False


def _coordinator_plan(config: LaunchConfig) -> tuple[Endpoint | None, Endpoint]:
    """(where to host the coordinator or None, where this node's agent reaches it)."""
    if config.rdzv_endpoint is None:  # standalone or single node: embedded, loopback only
        return Endpoint("127.0.0.1", 0), Endpoint("localhost", 0)
    endpoint = config.rdzv_endpoint
    if config.node_rank == 0 or (config.node_rank is None and _is_local_address(endpoint.host)):
        return Endpoint("0.0.0.0", endpoint.port), endpoint
    return None, endpoint


def serve_coordinator(spec: JobSpec, bind: Endpoint, store_host: str, log_dir: str | None) -> int:
    """`flashrun coordinator`: host the job's coordinator off the training nodes until the job ends."""
    events = EventLog(log_dir)
    stop_signal: list[int] = []
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop_signal.append(signum)  # recorded here; acted on by the loop below
        done.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in FORWARDED_SIGNALS}
    server = CoordinatorServer(spec, bind, store_host, None, events, on_finished=done.set)
    try:
        server.start()
        say(f"run {spec.run_id}: coordinator listening on {bind.host}:{server.port}, waiting for "
            f"{spec.min_nodes if spec.min_nodes == spec.max_nodes else f'{spec.min_nodes}-{spec.max_nodes}'} node(s)")
        done.wait()
        if stop_signal:
            server.abort(f"the coordinator received {signal.Signals(stop_signal[0]).name}")
        server.stop(COORDINATOR_LINGER_S)
        if stop_signal:
            return EXIT_SIGNAL_BASE + stop_signal[0]
        return server.exit_code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        events.close()


def launch(config: LaunchConfig) -> int:
    run_dir = config.log_dir or tempfile.mkdtemp(prefix="flashrun-")
    events = EventLog(config.log_dir)
    coordinator: CoordinatorServer | None = None
    try:
        bind, endpoint = _coordinator_plan(config)
        agent = Agent(config, run_dir)
        previous = {signum: signal.signal(signum, agent.on_signal) for signum in FORWARDED_SIGNALS}
        view: LiveView | PlainView | None = None
        try:
            if bind is not None:
                coordinator = _host_coordinator(config, bind, endpoint, events, run_dir)
                if coordinator is not None and endpoint.port == 0:
                    endpoint = Endpoint(endpoint.host, coordinator.port)
            if coordinator is not None:
                hosted = coordinator
                agent.on_stop_signal = lambda signum: hosted.abort(
                    f"the launcher hosting the coordinator received {signal.Signals(signum).name}")
            view = _start_view(config, coordinator, endpoint, events)
            code = agent.run(endpoint)
        finally:
            if view is not None:
                view.stop()
                events.echo = None
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if coordinator is not None and not coordinator.finished:
            coordinator.abort(f"the launcher hosting the coordinator stopped (exit code {code})")
        return code
    except FlashrunError as err:
        if coordinator is not None:
            coordinator.abort(f"the launcher hosting the coordinator failed: {err}")
        raise
    finally:
        if coordinator is not None:
            coordinator.stop(COORDINATOR_LINGER_S)
        events.close()
        if not config.log_dir:
            shutil.rmtree(run_dir, ignore_errors=True)


def _start_view(
    config: LaunchConfig, coordinator: CoordinatorServer | None, endpoint: Endpoint, events: EventLog
) -> LiveView | PlainView | None:
    """The live panel in a terminal; elsewhere, event and status lines from the launcher hosting the coordinator."""
    from rich.console import Console

    if coordinator is not None:
        hosted = coordinator

        def source() -> dict[str, Any]:
            return hosted.status(VIEW_MAX_RANKS)
    else:
        def source() -> dict[str, Any]:
            return fetch_status(endpoint, config.token, max_ranks=VIEW_MAX_RANKS)

    view: LiveView | PlainView
    if config.live and is_live_terminal(Console()):
        view = LiveView(source, LOCAL_POLL_S if coordinator else REMOTE_POLL_S, fresh_on_stop=coordinator is not None)
    elif coordinator is not None:
        view = PlainView(source)
    else:
        return None  # each node of a big job would repeat the same lines; the hosting launcher prints them
    view.start()
    events.echo = view.on_event
    return view


def _host_coordinator(
    config: LaunchConfig, bind: Endpoint, endpoint: Endpoint, events: EventLog, run_dir: str
) -> CoordinatorServer | None:
    spec = JobSpec(
        run_id=config.run_id, token=config.token, min_nodes=config.min_nodes, max_nodes=config.max_nodes,
        max_restarts=config.max_restarts,
        stop_ack_s=config.timeouts.stop_ack_s, detection=config.detection, max_recoveries=config.max_recoveries,
        allow_inject=config.allow_inject, nodes_per_store_shard=config.store_shard_nodes,
    )
    store_host = config.master_addr or endpoint.host
    server = CoordinatorServer(spec, bind, store_host, config.master_port, events)
    try:
        server.start()
    except FlashrunError:
        # The port is taken. If a coordinator answers there (another launcher on this host, or
        # `flashrun coordinator`), join it as a client; otherwise the port belongs to something else.
        if config.rdzv_endpoint is not None and _answers_grpc(endpoint):
            return None
        raise
    token_file = _write_token(run_dir, config.token)
    status_hint = f" (flashrun status --rdzv-endpoint {endpoint.host}:{server.port}"
    status_hint += f" --token-file {token_file})" if token_file else ")"
    say(f"run {config.run_id}: coordinator listening on {bind.host}:{server.port}{status_hint}")
    return server


def _write_token(directory: str, token: str) -> str | None:
    """Keep the job's token where its owner (only) can read it, for `flashrun status`."""
    if not token:
        return None
    path = os.path.join(directory, "token")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return path
