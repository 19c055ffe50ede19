"""Workers must see the same environment, argv and interpreter under flashrun as under torchrun.

Each case runs tests/probes/env_probe.py under both launchers with the same arguments and the same output
directory (one after the other, so the probe's argv is identical) and diffs what every rank recorded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.helpers import BIN, PROBES, Launch, Launcher, free_port

PROBE = str(PROBES / "env_probe.py")
TIMEOUT_S = 60

IGNORED = {
    # The shell's "last command" variable: a shell sets it to the path of the program it started, so it names
    # the launcher binary itself rather than anything the launcher chose for its workers.
    "_",
}
FLASHRUN_ONLY = {
    # flashrun's own link from a worker to its agent, read by `import flashrun` in a script (heartbeats, step
    # counting) and ignored by everything else; a script run under torchrun simply lacks it. Named one by one,
    # not by prefix, so any other addition still shows up in the diff. `check_flashrun_only` checks their shape.
    "FLASHRUN_AGENT_SOCKET",
    "FLASHRUN_HEARTBEAT_INTERVAL",
}
PER_RUN = {
    # Fresh for every run by nature: a free port, a random run id (--standalone) and a temporary directory.
    # Their values cannot match between two runs; `check_per_run_forms` checks their shape instead.
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_ERROR_FILE",
}


def run_probe(launcher: Launcher, program: str, args: list[str], out_dir: Path, nproc: int,
              env: dict[str, str] | None = None, keep_omp: bool = False) -> dict[int, dict]:
    """Run the probe under `program` (torchrun or flashrun) and return {rank: record}.

    Unless `keep_omp`, OMP_NUM_THREADS is removed from the launcher's environment (`env -u`), so a value set
    in the test runner's own environment cannot hide whether the launcher sets it.
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    prefix = [] if keep_omp else ["env", "-u", "OMP_NUM_THREADS"]
    launch = launcher.start([*prefix, str(BIN / program), *args], env=env, name=program)
    code = launch.wait(TIMEOUT_S)
    assert code == 0, f"{program} exited with {code}; output:\n{launch.output[-4000:]}"
    return read_records(out_dir, nproc, program, launch)


def read_records(out_dir: Path, world_size: int, program: str, launch: Launch) -> dict[int, dict]:
    files = sorted(path.name for path in out_dir.glob("*.json"))
    expected = sorted(f"{rank}.json" for rank in range(world_size))
    assert files == expected, f"{program}: probe wrote {files}, expected {expected}; output:\n{launch.output[-4000:]}"
    return {rank: json.loads((out_dir / f"{rank}.json").read_text()) for rank in range(world_size)}


def env_diff(torchrun_env: dict[str, str], flashrun_env: dict[str, str], skip: set[str]) -> list[str]:
    """Readable lines, one per variable that is missing on one side or has a different value."""
    lines = []
    for name in sorted((torchrun_env.keys() | flashrun_env.keys()) - skip):
        if name not in flashrun_env:
            lines.append(f"  only under torchrun: {name}={torchrun_env[name]!r}")
        elif name not in torchrun_env:
            lines.append(f"  only under flashrun: {name}={flashrun_env[name]!r}")
        elif torchrun_env[name] != flashrun_env[name]:
            lines.append(f"  differs: {name}: torchrun={torchrun_env[name]!r} flashrun={flashrun_env[name]!r}")
    return lines


def check_per_run_forms(program: str, records: dict[int, dict]) -> None:
    """The per-run variables exist with the right shape, and agree across the ranks of one run."""
    ports = {record["env"].get("MASTER_PORT") for record in records.values()}
    run_ids = {record["env"].get("TORCHELASTIC_RUN_ID") for record in records.values()}
    assert len(ports) == 1 and len(run_ids) == 1, f"{program}: ranks disagree: ports {ports}, run ids {run_ids}"
    port = ports.pop()
    assert port is not None and port.isdigit() and 0 < int(port) < 65536, f"{program}: MASTER_PORT={port!r}"
    assert run_ids.pop(), f"{program}: TORCHELASTIC_RUN_ID is missing or empty"
    for rank, record in records.items():
        env = record["env"]
        error_file = env.get("TORCHELASTIC_ERROR_FILE", "")
        # torchrun keys the directory by local rank; flashrun by global rank, so nodes sharing a --log-dir on a
        # network file system never write into each other's files.
        expected_tail = ("attempt_0", env["LOCAL_RANK" if program == "torchrun" else "RANK"], "error.json")
        assert Path(error_file).is_absolute() and Path(error_file).parts[-3:] == expected_tail, (
            f"{program} rank {rank}: TORCHELASTIC_ERROR_FILE={error_file!r} should end with "
            f"/{'/'.join(expected_tail)} (RANK={env['RANK']}, LOCAL_RANK={env['LOCAL_RANK']})"
        )


def check_flashrun_only(torchrun: dict[int, dict], flashrun: dict[int, dict]) -> None:
    for rank in torchrun:
        leaked = FLASHRUN_ONLY & torchrun[rank]["env"].keys()
        assert not leaked, f"torchrun rank {rank} has {leaked}: the test runner's environment sets them; unset them"
        env = flashrun[rank]["env"]
        if "FLASHRUN_AGENT_SOCKET" in env:
            assert Path(env["FLASHRUN_AGENT_SOCKET"]).is_absolute(), env["FLASHRUN_AGENT_SOCKET"]
        if "FLASHRUN_HEARTBEAT_INTERVAL" in env:
            assert float(env["FLASHRUN_HEARTBEAT_INTERVAL"]) > 0, env["FLASHRUN_HEARTBEAT_INTERVAL"]


def assert_parity(torchrun: dict[int, dict], flashrun: dict[int, dict], skip: set[str] = PER_RUN) -> None:
    check_per_run_forms("torchrun", torchrun)
    check_per_run_forms("flashrun", flashrun)
    check_flashrun_only(torchrun, flashrun)
    problems = []
    for rank in sorted(torchrun):
        lines = env_diff(torchrun[rank]["env"], flashrun[rank]["env"], IGNORED | FLASHRUN_ONLY | skip)
        for key in ("argv", "executable", "flags_unbuffered"):
            theirs, ours = torchrun[rank][key], flashrun[rank][key]
            if key == "executable":
                # Both launchers start workers with their own sys.executable, which is the interpreter named in
                # their console script's shebang: `python3` in torchrun's wheel, possibly `python` in flashrun's
                # (editable) install. Those are links to one interpreter, so the resolved file is what must match.
                theirs, ours = os.path.realpath(theirs), os.path.realpath(ours)
            if theirs != ours:
                lines.append(f"  differs: {key}: torchrun={theirs!r} flashrun={ours!r}")
        if lines:
            problems.append(f"rank {rank}:\n" + "\n".join(lines))
    assert not problems, "worker environments differ between torchrun and flashrun:\n" + "\n".join(problems)


def standalone_pair(launcher: Launcher, tmp_path: Path, target: list[str], nproc: int,
                    env: dict[str, str] | None = None, keep_omp: bool = False) -> tuple[dict, dict]:
    out_dir = tmp_path / "out"
    args = ["--standalone", "--nproc-per-node", str(nproc), *target, str(out_dir)]
    torchrun = run_probe(launcher, "torchrun", args, out_dir, nproc, env, keep_omp)
    flashrun = run_probe(launcher, "flashrun", args, out_dir, nproc, env, keep_omp)
    assert_parity(torchrun, flashrun)
    return torchrun, flashrun


def test_two_workers_see_torchruns_environment(launcher: Launcher, tmp_path: Path) -> None:
    torchrun, flashrun = standalone_pair(launcher, tmp_path, [PROBE], nproc=2)
    for records in (torchrun, flashrun):
        assert records[1]["env"]["OMP_NUM_THREADS"] == "1"  # torchrun's default for more than one worker
        assert records[1]["env"]["WORLD_SIZE"] == "2"
    assert launcher.survivors() == []


def test_preset_omp_num_threads_is_kept(launcher: Launcher, tmp_path: Path) -> None:
    torchrun, flashrun = standalone_pair(launcher, tmp_path, [PROBE], nproc=2, env={"OMP_NUM_THREADS": "3"},
                                         keep_omp=True)
    for records in (torchrun, flashrun):
        assert [records[rank]["env"]["OMP_NUM_THREADS"] for rank in (0, 1)] == ["3", "3"]


def test_one_worker_gets_no_omp_num_threads(launcher: Launcher, tmp_path: Path) -> None:
    torchrun, flashrun = standalone_pair(launcher, tmp_path, [PROBE], nproc=1)
    for records in (torchrun, flashrun):
        assert "OMP_NUM_THREADS" not in records[0]["env"]


def test_module_mode(launcher: Launcher, tmp_path: Path) -> None:
    # `-m` resolves the module from the working directory: Launcher starts both launchers in the repo root.
    torchrun, flashrun = standalone_pair(launcher, tmp_path, ["-m", "tests.probes.env_probe"], nproc=2)
    assert flashrun[0]["argv"][0] == PROBE


def test_two_nodes_see_torchruns_environment(launcher: Launcher, tmp_path: Path) -> None:
    """Two single-worker nodes on this machine, through each launcher's own rendezvous (c10d for torchrun)."""
    out_dir = tmp_path / "out"
    records = {}
    for program in ("torchrun", "flashrun"):
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.mkdir()
        port = free_port()
        launches = [
            launcher.start([str(BIN / program), "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
                            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", PROBE, str(out_dir)],
                           name=f"{program}-node{node}")
            for node in (0, 1)
        ]
        for launch in launches:
            code = launch.wait(TIMEOUT_S)
            assert code == 0, f"{program} exited with {code}; output:\n{launch.output[-4000:]}"
        records[program] = read_records(out_dir, 2, program, launches[0])
    for program, by_rank in records.items():
        # Both name this machine, but in their own words (torchrun: the rank-0 agent's host name; flashrun: the
        # --rdzv-endpoint host), so only the presence is compared.
        assert all(record["env"].get("MASTER_ADDR") for record in by_rank.values()), program
    assert_parity(records["torchrun"], records["flashrun"], skip=PER_RUN | {"MASTER_ADDR"})
    assert launcher.survivors() == []
