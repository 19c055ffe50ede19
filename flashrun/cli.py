"""The `flashrun` command line: options in, a validated `LaunchConfig` out, nothing else.

Options and defaults follow torchrun's, including both spellings and the PET_* environment fallbacks; under Slurm,
options left unset come from the allocation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import click

from flashrun import __version__
from flashrun.config import (
    DEFAULT_RDZV_PORT,
    NODES_PER_STORE_SHARD,
    Detection,
    Endpoint,
    LaunchConfig,
    cpu_count,
    node_timeout_from_rdzv_conf,
    parse_detection,
    parse_endpoint,
    parse_local_ranks_filter,
    parse_nnodes,
    parse_nproc_per_node,
    parse_rdzv_conf,
    parse_std_spec,
    resolve_token,
    slurm_rdzv_port,
    timeouts_from_rdzv_conf,
)
from flashrun.errors import EXIT_JOB_FAILED, EXIT_USAGE, FlashrunError
from flashrun.slurm import SlurmAllocation

# torchrun options flashrun deliberately does not implement, with what to do instead.
UNSUPPORTED = {
    "run_path": "run the script with plain `python -u` semantics (the default) instead",
    "event_log_handler": "flashrun writes its own events to <log-dir>/events.jsonl",
    "logs_specs": "use --log-dir, --redirects and --tee",
    "duplicate_stdout_filters": "filter the per-rank files under --log-dir instead",
    "duplicate_stderr_filters": "filter the per-rank files under --log-dir instead",
    "numa_binding": "bind inside the script (os.sched_setaffinity) instead",
    "virtual_local_rank": "set CUDA_VISIBLE_DEVICES inside the script instead",
}


def _option(*names: str, **kwargs: object):  # noqa: ANN202 - a thin wrapper over click.option
    """A torchrun option: both spellings and its PET_<NAME> environment fallback."""
    dest = next(name for name in names if name.startswith("--"))[2:].replace("-", "_")
    spellings = list(names)
    for name in names:
        if name.startswith("--") and "-" in name[2:]:
            spellings.append("--" + name[2:].replace("-", "_"))
    return click.option(*dict.fromkeys(spellings), dest, envvar=f"PET_{dest.upper()}", show_envvar=False, **kwargs)


def detection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Failure-detection options, shared by the launcher and `flashrun coordinator` (whose values win)."""
    defaults = Detection()
    for option in reversed([
        click.option("--heartbeat-interval", type=click.FloatRange(min=0, min_open=True), default=None,
                     help=f"Seconds between worker heartbeats and node summaries. [default: "
                          f"{defaults.heartbeat_interval_s:g}]"),
        click.option("--heartbeat-timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                     help=f"A worker silent this long is unresponsive. [default: {defaults.heartbeat_timeout_s:g}]"),
        click.option("--stall-timeout", default="auto", show_default=True,
                     help=f"auto, or seconds: how long the job's steps may stop before it is stalled (a floor; "
                          f"auto: {defaults.stall_floor_s:g} s or {defaults.stall_multiplier:g} recent step times, "
                          f"at most {defaults.stall_ceiling_s:g} s)."),
    ]):
        command = option(command)
    return command


class _OneLineErrors:
    """Usage errors (click's own too: an option out of range, an unknown option) as one `flashrun: error:` line with
    exit code 2, like the launcher's own checks, instead of click's usage block."""

    def main(self, *args: Any, **kwargs: Any) -> NoReturn:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)  # type: ignore[misc]
        except click.ClickException as err:
            click.echo(f"flashrun: error: {err.format_message()} (see {kwargs.get('prog_name', 'flashrun')} "
                       "--help)", err=True)
            sys.exit(EXIT_USAGE)
        except click.Abort:
            sys.exit(EXIT_JOB_FAILED)
        sys.exit(code if isinstance(code, int) else 0)


class _OneLineErrorsCommand(_OneLineErrors, click.Command):
    pass


class _OneLineErrorsGroup(_OneLineErrors, click.Group):
    pass


@click.command(
    cls=_OneLineErrorsCommand,
    context_settings={"allow_interspersed_args": False, "help_option_names": ["-h", "--help"]},
    epilog="Runs SCRIPT on every node like torchrun; see the README for the fault-tolerance options.",
)
@click.version_option(__version__, "--version", prog_name="flashrun")
@_option("--nnodes", default=None, help="N or MIN:MAX nodes. [default: 1, or SLURM_NNODES under Slurm]")
@_option("--nproc-per-node", default="1", show_default=True, help="Workers per node: int, cpu, gpu or auto.")
@_option("--rdzv-backend", default="static", show_default=True,
         help="Accepted for torchrun compatibility; flashrun's coordinator is always the backend.")
@_option("--rdzv-endpoint", default="", help="HOST[:PORT] of the coordinator (port 29400 if omitted).")
@_option("--rdzv-id", default="none", show_default=True, help="Run id, the same on every node.")
@_option("--rdzv-conf", default="",
         help="KEY=VALUE,...: join_timeout (seconds); keep_alive_interval (seconds) x keep_alive_max_attempt: how "
              "long a silent node may be before it is lost (default 10 s).")
@click.option("--standalone", is_flag=True, help="Single node, coordinator on loopback, random port and run id.")
@_option("--max-restarts", default=0, type=click.IntRange(min=0), show_default=True,
         help="Full restarts of all workers after a failure before the job fails.")
@click.option("--max-recoveries", default=100, type=click.IntRange(min=0), show_default=True,
              help="In-place recoveries (scripts using flashrun's step loop) before falling back to --max-restarts.")
@click.option("--store-shard-nodes", default=NODES_PER_STORE_SHARD, type=click.IntRange(min=0), show_default=True,
              help="Split the store work of a recovery over one store server per this many nodes (0: one server).")
@_option("--monitor-interval", default=0.1, type=click.FloatRange(min=0, min_open=True), show_default=True,
         help="Accepted for compatibility: flashrun learns of exits from the OS wait, without polling.")
@_option("--start-method", default="spawn", type=click.Choice(["spawn"]), show_default=True,
         help="Workers are always fresh processes, as with torchrun's spawn.")
@_option("--role", default="default", show_default=True, help="Role name (ROLE_NAME).")
@click.option("-m", "--module", is_flag=True, help="Run SCRIPT as a module, like python -m.")
@click.option("--no-python", "--no_python", "no_python", is_flag=True, help="Run SCRIPT as an executable.")
@_option("--log-dir", default=None, help="Keep per-rank output and error files per attempt, and events.jsonl.")
@_option("-r", "--redirects", default="0", show_default=True,
         help="Streams to files only: 0 none, 1 stdout, 2 stderr, 3 both, or LOCAL_RANK:N,...")
@_option("-t", "--tee", default="0", show_default=True, help="Streams to files and console, as --redirects.")
@_option("--local-ranks-filter", default="", help="Show only these local ranks' output on the console: 0,1,...")
@_option("--node-rank", default=None, type=click.IntRange(min=0), help="This node's rank. [default: assigned]")
@_option("--master-addr", default=None, help="MASTER_ADDR for workers. [default: the coordinator's host]")
@_option("--master-port", default=None, type=click.IntRange(0, 65535),
         help="MASTER_PORT of the first attempt. [default: a free port]")
@_option("--local-addr", default=None, help="This node's address as others see it.")
@_option("--shutdown-timeout", default=None, type=click.FloatRange(min=0, min_open=True),
         help="Seconds between SIGTERM and SIGKILL when stopping workers. [default: 30]")
@click.option("--token-file", default=None, help="File with the job's shared secret (or set FLASHRUN_TOKEN).")
@click.option("--allow-inject", is_flag=True,
              help="Accept `flashrun inject` fault drills (kill, stop, hang, exception, kill-node) for this job.")
@detection_options
@click.option("--prewarm/--no-prewarm", default=True, show_default=True,
              help="Fork replacement workers from a process that already imported torch.")
@click.option("--prewarm-modules", default="", help="More modules the zygote imports, e.g. transformers,numpy.")
@click.option("--live/--no-live", default=True, show_default=True,
              help="In a terminal, a live panel of nodes, ranks and recoveries under the worker output.")
@click.option("--run-path", "--run_path", "run_path", is_flag=True, hidden=True)
@click.option("--event-log-handler", "--event_log_handler", "event_log_handler", default=None, hidden=True)
@click.option("--logs-specs", "--logs_specs", "logs_specs", default=None, hidden=True)
@click.option("--duplicate-stdout-filters", "--duplicate_stdout_filters", "duplicate_stdout_filters",
              default=None, hidden=True)
@click.option("--duplicate-stderr-filters", "--duplicate_stderr_filters", "duplicate_stderr_filters",
              default=None, hidden=True)
@click.option("--numa-binding", "--numa_binding", "numa_binding", default=None, hidden=True)
@click.option("--virtual-local-rank", "--virtual_local_rank", "virtual_local_rank", is_flag=True, hidden=True)
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def run(**options: object) -> None:
    """Launch SCRIPT [SCRIPT_ARGS...] on this node's workers, as torchrun does."""
    worker_base_env = dict(os.environ)
    _prepare_launcher_process()
    from flashrun.launcher import launch

    try:
        config = build_config(options, worker_base_env)
    except FlashrunError as err:
        click.echo(f"flashrun: error: {err}", err=True)
        sys.exit(err.exit_code)
    try:
        code = launch(config)
    except FlashrunError as err:
        click.echo(f"flashrun: error: {err}", err=True)
        code = err.exit_code
    _leave(code)


def _leave(code: int) -> NoReturn:
    """Exit a process that ran an agent or a coordinator without the interpreter's finalization.

    Their store threads sit in blocking TCPStore gets (the agent's watch for the next generation's notice waits all
    job long). If the store server goes away while the interpreter finalizes (the job's store ends as the job does),
    such a thread is woken into a finalizing interpreter and the whole process aborts (std::terminate, exit 134).
    Everything that needs an orderly end (workers, sockets, files) was closed before this.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _prepare_launcher_process() -> None:
    """Settings for flashrun's own process, made before gRPC or torch load; workers get the user's environment."""
    # Workers are started with fork+exec while gRPC threads run; gRPC's fork handlers would crash the child.
    os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
    # gRPC's C core logs expected conditions (a taken port we then join as a client) as errors.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    # The agent's and coordinator's store clients sit in blocking gets (agent/node_barrier.py); torch logs a warning
    # for each one whose server closes the connection, as the job's store does at the end of every job.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    # The coordinator's TCPStore imports torch, which warns when numpy is absent; it needs no numpy.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")


def build_config(options: Mapping[str, object], env: Mapping[str, str]) -> LaunchConfig:
    for name, advice in UNSUPPORTED.items():
        if options.get(name):
            flag = "--" + name.replace("_", "-")
            raise FlashrunError(f"flashrun does not support torchrun's {flag}: {advice}")
    standalone = bool(options["standalone"])
    slurm = _slurm(env, standalone)

    nnodes_text = str(options["nnodes"]) if options["nnodes"] is not None else None
    if nnodes_text is None:
        nnodes_text = str(slurm.nnodes) if slurm and not standalone else "1"
    min_nodes, max_nodes = parse_nnodes(nnodes_text)
    if standalone and max_nodes != 1:
        raise FlashrunError(f"--standalone runs one node, but --nnodes is {nnodes_text}; drop one of them")
    nproc = parse_nproc_per_node(str(options["nproc_per_node"]), cpu_count(), _gpu_count(options))

    node_rank = options["node_rank"]
    run_id = str(options["rdzv_id"])
    endpoint_text = str(options["rdzv_endpoint"] or "")
    if slurm and not standalone:
        node_rank = slurm.node_rank if node_rank is None else node_rank
        run_id = slurm.job_id if run_id == "none" else run_id
        if not endpoint_text:
            endpoint_text = f"{slurm.first_host}:{slurm_rdzv_port(slurm.job_id)}"
    rdzv_endpoint: Endpoint | None = None
    if standalone:
        run_id = str(uuid.uuid4())
    elif max_nodes > 1 or endpoint_text:
        if not endpoint_text:
            if options["master_addr"] is None:
                raise FlashrunError(
                    f"--nnodes {nnodes_text} needs --rdzv-endpoint HOST[:PORT] (or --master-addr), "
                    "the same on every node, or run under srun"
                )
            endpoint_text = str(options["master_addr"])
        rdzv_endpoint = parse_endpoint(endpoint_text, DEFAULT_RDZV_PORT)
    if max_nodes == 1 and node_rank not in (None, 0):
        source = "SLURM_NODEID" if slurm and options["node_rank"] is None else "--node-rank"
        raise FlashrunError(f"{source} is {node_rank} but the job has a single node: it must be 0")

    entrypoint = _entrypoint(str(options["script"]), bool(options["module"]), bool(options["no_python"]))
    rdzv_conf = parse_rdzv_conf(str(options["rdzv_conf"]))
    shutdown_timeout = options["shutdown_timeout"]
    return LaunchConfig(
        min_nodes=min_nodes, max_nodes=max_nodes, nproc_per_node=nproc, standalone=standalone,
        rdzv_endpoint=rdzv_endpoint, run_id=run_id,
        token=resolve_token(options["token_file"], env, standalone or rdzv_endpoint is None),  # type: ignore[arg-type]
        node_rank=node_rank,  # type: ignore[arg-type]
        master_addr=options["master_addr"],  # type: ignore[arg-type]
        master_port=options["master_port"],  # type: ignore[arg-type]
        max_restarts=int(options["max_restarts"]),  # type: ignore[call-overload]
        role=str(options["role"]), entrypoint=entrypoint,
        script_args=tuple(options["script_args"]),  # type: ignore[arg-type]
        log_dir=os.path.abspath(str(options["log_dir"])) if options["log_dir"] else None,
        redirects=parse_std_spec(str(options["redirects"]), "--redirects", nproc),
        tee=parse_std_spec(str(options["tee"]), "--tee", nproc),
        local_ranks_filter=parse_local_ranks_filter(str(options["local_ranks_filter"]), nproc),
        local_addr=options["local_addr"],  # type: ignore[arg-type]
        max_recoveries=int(options.get("max_recoveries", 100)),  # type: ignore[call-overload]
        store_shard_nodes=int(options.get("store_shard_nodes", NODES_PER_STORE_SHARD)),  # type: ignore[call-overload]
        timeouts=timeouts_from_rdzv_conf(rdzv_conf, shutdown_timeout),  # type: ignore[arg-type]
        detection=_detection(options, node_timeout_from_rdzv_conf(rdzv_conf)),
        prewarm=bool(options.get("prewarm", True)),
        allow_inject=bool(options.get("allow_inject", False)),
        prewarm_modules=tuple(m.strip() for m in str(options.get("prewarm_modules") or "").split(",") if m.strip()),
        base_env=dict(env),
        live=bool(options.get("live", True)),
    )


def _detection(options: Mapping[str, object], node_timeout: float | None = None) -> Detection:
    return parse_detection(options.get("heartbeat_interval"), options.get("heartbeat_timeout"),  # type: ignore[arg-type]
                           str(options.get("stall_timeout") or "auto"), node_timeout)


def _slurm(env: Mapping[str, str], standalone: bool) -> SlurmAllocation | None:
    """The allocation, when this process is one task of an `srun` step; a batch script or an salloc shell runs
    on one node only (no SLURM_STEP_ID there), so Slurm's node counts would not describe this launch."""
    if standalone or "SLURM_STEP_ID" not in env:
        return None
    try:
        return SlurmAllocation.from_env(env)
    except ValueError as err:
        raise FlashrunError(f"cannot read the Slurm allocation: {err}") from None


def _gpu_count(options: Mapping[str, object]) -> int:
    if str(options["nproc_per_node"]) not in ("gpu", "auto"):
        return 0
    import torch  # only these two values need to look at the devices

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _entrypoint(script: str, module: bool, no_python: bool) -> tuple[str, ...]:
    if module and no_python:
        raise FlashrunError("--module and --no-python exclude each other: give one")
    if no_python:
        if shutil.which(script) is None:
            raise FlashrunError(f"--no-python: {script!r} is not an executable on PATH or a path; check the name")
        return (script,)
    if module:
        return (sys.executable, "-u", "-m", script)
    if not os.path.isfile(script):
        raise FlashrunError(f"script {script!r} does not exist; give the path of a Python file")
    return (sys.executable, "-u", script)


@click.command(cls=_OneLineErrorsCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--bind", "bind", required=True, help="HOST:PORT to listen on; agents use it as --rdzv-endpoint.")
@_option("--nnodes", default="1", show_default=True, help="N or MIN:MAX nodes the job needs.")
@_option("--rdzv-id", default="none", show_default=True, help="Run id; agents must give the same.")
@_option("--max-restarts", default=0, type=click.IntRange(min=0), show_default=True,
         help="Full restarts of all workers after a failure before the job fails.")
@click.option("--max-recoveries", default=100, type=click.IntRange(min=0), show_default=True,
              help="In-place recoveries before falling back to --max-restarts.")
@click.option("--store-shard-nodes", default=NODES_PER_STORE_SHARD, type=click.IntRange(min=0), show_default=True,
              help="Split the store work of a recovery over one store server per this many nodes (0: one server).")
@_option("--master-addr", default=None, help="Host workers reach this coordinator's TCPStore at. [default: --bind's]")
@_option("--rdzv-conf", default="",
         help="KEY=VALUE,...: keep_alive_interval (seconds) x keep_alive_max_attempt: how long a silent node may be "
              "before it is lost (default 10 s), as for the launcher.")
@_option("--log-dir", default=None, help="Where events.jsonl is written.")
@click.option("--token-file", default=None, help="File with the job's shared secret (or set FLASHRUN_TOKEN).")
@click.option("--allow-inject", is_flag=True, help="Accept `flashrun inject` fault drills for this job.")
@detection_options
def coordinator(**options: object) -> None:
    """Run only the coordinator of a multi-node job, e.g. off the training nodes."""
    _prepare_launcher_process()
    from flashrun.coordinator.job import JobSpec
    from flashrun.launcher import serve_coordinator

    try:
        min_nodes, max_nodes = parse_nnodes(str(options["nnodes"]))
        bind = parse_endpoint(str(options["bind"]), DEFAULT_RDZV_PORT)
        rdzv_conf = parse_rdzv_conf(str(options["rdzv_conf"]))
        timeouts = timeouts_from_rdzv_conf(rdzv_conf, None)  # the same keys are valid as for the launcher
        spec = JobSpec(
            run_id=str(options["rdzv_id"]), token=resolve_token(options["token_file"], os.environ, False),  # type: ignore[arg-type]
            min_nodes=min_nodes, max_nodes=max_nodes, max_restarts=int(options["max_restarts"]),  # type: ignore[call-overload]
            stop_ack_s=timeouts.stop_ack_s, detection=_detection(options, node_timeout_from_rdzv_conf(rdzv_conf)),
            max_recoveries=int(options["max_recoveries"]),  # type: ignore[call-overload]
            allow_inject=bool(options["allow_inject"]),
            nodes_per_store_shard=int(options["store_shard_nodes"]),  # type: ignore[call-overload]
        )
        log_dir = os.path.abspath(str(options["log_dir"])) if options["log_dir"] else None
        store_host = str(options["master_addr"] or bind.host)
    except FlashrunError as err:
        click.echo(f"flashrun: error: {err}", err=True)
        sys.exit(err.exit_code)
    try:
        code = serve_coordinator(spec, bind, store_host, log_dir)
    except FlashrunError as err:
        click.echo(f"flashrun: error: {err}", err=True)
        code = err.exit_code
    _leave(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rdzv-endpoint", "--rdzv_endpoint", "rdzv_endpoint", required=True,
              help="HOST:PORT of the job's coordinator (printed by the launcher that hosts it).")
@click.option("--token-file", default=None, help="File with the job's token (or set FLASHRUN_TOKEN).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON snapshot, for scripts.")
@click.option("--once", is_flag=True, help="In a terminal, draw the live view once and exit.")
def status(rdzv_endpoint: str, token_file: str | None, as_json: bool, once: bool) -> None:
    """Show a running job's state. In a terminal, the launcher's live view (read-only) until the job ends or
    Ctrl-C; otherwise one plain table of the ranks: node, PID, state, step, rate, heartbeat age."""
    _prepare_launcher_process()
    from rich.console import Console

    from flashrun.status import fetch_status, format_status
    from flashrun.view.live import VIEW_MAX_RANKS, attach, is_live_terminal, print_once

    live = not as_json and is_live_terminal(Console())
    try:
        endpoint = parse_endpoint(rdzv_endpoint, DEFAULT_RDZV_PORT)
        token = resolve_token(token_file, os.environ, False)
        snapshot = fetch_status(endpoint, token, max_ranks=VIEW_MAX_RANKS if live else 0)
    except FlashrunError as err:
        click.echo(f"flashrun: error: {err}", err=True)
        sys.exit(err.exit_code)
    if not live:
        click.echo(json.dumps(snapshot, indent=2) if as_json else format_status(snapshot))
    elif once:
        print_once(snapshot)
    else:
        click.echo(f"flashrun: {attach(lambda: fetch_status(endpoint, token, max_ranks=VIEW_MAX_RANKS))}", err=True)


@click.group(cls=_OneLineErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rdzv-endpoint", "--rdzv_endpoint", "rdzv_endpoint", required=True,
              help="HOST:PORT of the job's coordinator (printed by the launcher that hosts it).")
@click.option("--token-file", default=None, help="File with the job's token (or set FLASHRUN_TOKEN).")
@click.pass_context
def inject(ctx: click.Context, rdzv_endpoint: str, token_file: str | None) -> None:
    """Fault drills on a running job started with --allow-inject: kill, stop, hang or raise in one rank, or lose a
    whole node, and watch the job recover."""
    ctx.obj = (rdzv_endpoint, token_file)


def _drill(target: tuple[str, str | None], fault: str, **where: int | None) -> None:
    _prepare_launcher_process()
    from flashrun.inject import send_fault

    rdzv_endpoint, token_file = target
    try:
        endpoint = parse_endpoint(rdzv_endpoint, DEFAULT_RDZV_PORT)
        detail = send_fault(endpoint, resolve_token(token_file, os.environ, False), fault, **where)
    except FlashrunError as err:
        click.echo(f"flashrun: error: {err}", err=True)
        sys.exit(err.exit_code)
    click.echo(detail)


def _rank_drill(fault: str, summary: str) -> None:
    @inject.command(fault, help=f"{summary} Without --at-step at once (at the next step for hang and exception); "
                                "with it when the rank is about to run that step. hang, exception and --at-step need "
                                "flashrun's step loop, run.steps().")
    @click.option("--rank", required=True, type=click.IntRange(min=0), help="The global rank.")
    @click.option("--at-step", type=click.IntRange(min=0), default=None, help="The step the fault comes at.")
    @click.pass_obj
    def command(target: tuple[str, str | None], rank: int, at_step: int | None) -> None:
        _drill(target, fault, rank=rank, at_step=at_step)


_rank_drill("kill", "SIGKILL the rank's worker (a crash).")
_rank_drill("stop", "SIGSTOP the rank's worker (it freezes: unresponsive).")
_rank_drill("hang", "The rank's step loop spins before the step's collectives (the job stalls).")
_rank_drill("exception", "The rank's step loop raises an exception (a crash with a traceback).")


@inject.command("kill-node")
@click.option("--node", required=True, type=click.IntRange(min=0), help="The node rank.")
@click.pass_obj
def kill_node(target: tuple[str, str | None], node: int) -> None:
    """The node's agent SIGKILLs its workers and exits without a word, as a lost machine would (a spare, if any,
    takes over)."""
    _drill(target, "kill-node", node=node)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("log_dir")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON, for scripts.")
def report(log_dir: str, as_json: bool) -> None:
    """Per failure its kind, culprit and recovery phases, and the time and steps failures cost the job, from
    LOG_DIR/events.jsonl (the run's --log-dir)."""
    from flashrun.report import format_report, load_report, report_json

    try:
        built = load_report(log_dir)
    except FlashrunError as err:
        click.echo(f"flashrun: error: {err}", err=True)
        sys.exit(err.exit_code)
    if built.skipped_lines:
        click.echo(f"flashrun: warning: skipped {built.skipped_lines} malformed line(s) of {built.source}", err=True)
    click.echo(report_json(built) if as_json else format_report(built))


SUBCOMMANDS = {"coordinator": coordinator, "status": status, "inject": inject, "report": report}


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: `flashrun [OPTIONS] SCRIPT ...` or `flashrun coordinator ...`.

    Not a click group: the launcher's first positional argument is the user's script, so a subcommand is
    recognised only as the very first argument (run a script named like one as ./coordinator).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:
        SUBCOMMANDS[args[0]].main(args=args[1:], prog_name=f"flashrun {args[0]}", standalone_mode=True)
    run.main(args=args, prog_name="flashrun", standalone_mode=True)


if __name__ == "__main__":
    main()
