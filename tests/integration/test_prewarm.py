"""Replacement workers forked from the pre-warmed zygote look exactly like freshly spawned ones to the script."""

from __future__ import annotations

import json
import os
import resource
import shlex
import signal
from pathlib import Path

import pytest

from flashrun import descriptors
from tests.helpers import BIN, PROBES, Launcher, free_port, named, wait_for

PROBE = str(PROBES / "replacement_probe.py")
# Differ between any two processes or runs by nature; compared by presence only.
PER_PROCESS = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "FLASHRUN_AGENT_SOCKET",
               "FLASHRUN_REPLACEMENT", "FLASHRUN_TEST_TAG"}


def records(out: Path, rank: int) -> list[dict]:
    found = sorted(out.glob(f"{rank}-*.json"), key=lambda path: path.stat().st_mtime)
    return [json.loads(path.read_text()) for path in found]


def replacement_of_rank_1(launcher: Launcher, tmp_path: Path, *flags: str,
                          open_files: int | None = None) -> tuple[dict, dict, list[dict]]:
    """`open_files`: start flashrun with this soft limit on open files."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir(parents=True)
    argv = [str(BIN / "flashrun"), "--nproc-per-node", "2", "--log-dir", str(logs), *flags, PROBE, str(out), "100000"]
    if open_files is None:
        run = launcher.start([argv[0], "--standalone", *argv[1:]])
    else:
        run = launcher.start(["bash", "-c", f"ulimit -Sn {open_files} && exec {shlex.join(argv)}"])
    wait_for(lambda: records(out, 1) and records(out, 0), 120, "both workers to start")
    wait_for(lambda: named(logs, "recoverable"), 60, "the step loop to run")
    original = records(out, 1)[0]
    pid = next(int(path.stem.split("-")[1]) for path in out.glob("1-*.json"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(records(out, 1)) == 2, 60, "the replacement to start")
    wait_for(lambda: named(logs, "recovered"), 60, "the recovery")
    replacement = records(out, 1)[1]
    events = named(logs, "prewarm_fallback") + named(logs, "prewarm_restarted")
    run.signal(signal.SIGTERM)
    run.wait(60)
    return original, replacement, events


def comparable(record: dict) -> dict:
    env = {key: value for key, value in record["env"].items() if key not in PER_PROCESS}
    keys = sorted(record["env"])
    # Both runs' own values: output directory in argv, and the random seeds every fresh process draws.
    return {**record, "env": env, "env_keys": keys, "argv": record["argv"][0], "random": None, "parent": None,
            "parent_open_files": None, "torch_seed": None}


def test_forked_and_spawned_replacements_are_indistinguishable(launcher: Launcher, tmp_path: Path) -> None:
    original, forked, fallbacks = replacement_of_rank_1(launcher, tmp_path / "prewarm")
    _, spawned, _ = replacement_of_rank_1(launcher, tmp_path / "spawn", "--no-prewarm")

    assert fallbacks == [], "the replacement should have been forked from the zygote"
    assert "zygote_main.py" in forked["parent"] and "zygote_main.py" not in spawned["parent"]
    assert comparable(forked) == comparable(spawned)
    # Against the process it replaced: the same script, environment and process shape; a new generation.
    assert forked["argv"] == original["argv"] and forked["path0"] == original["path0"]
    assert forked["name"] == "__main__" and forked["own_session"] and forked["stdin_is_devnull"]
    assert forked["handlers"] == original["handlers"]
    assert set(forked["env"]) - set(original["env"]) == {"FLASHRUN_REPLACEMENT"}
    assert forked["env"]["TORCHELASTIC_RESTART_COUNT"] == "1" and original["env"]["TORCHELASTIC_RESTART_COUNT"] == "0"
    assert forked["random"] != original["random"], "a fork must not share the zygote's random state"
    assert forked["torch_seed"] != original["torch_seed"], "nor its torch seed"
    assert launcher.survivors() == []


def test_workers_keep_the_open_files_limit_flashrun_was_started_with(launcher: Launcher, tmp_path: Path) -> None:
    """A job of up to 300 nodes: the coordinator raises its process's soft limit on open files (descriptors.py), and
    the agent that shares that process starts its workers, spawned or forked, with the limit it was given."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < descriptors.needed(300):
        pytest.skip(f"the hard limit on open files ({hard}) leaves the coordinator nothing to raise for 300 nodes")
    endpoint = f"127.0.0.1:{free_port()}"
    original, forked, fallbacks = replacement_of_rank_1(
        launcher, tmp_path, "--nnodes", "1:300", "--rdzv-endpoint", endpoint, open_files=1024)

    assert fallbacks == [], "the replacement should have been forked from the zygote"
    assert "zygote_main.py" not in original["parent"] and original["parent_open_files"] == descriptors.needed(300)
    assert "zygote_main.py" in forked["parent"]
    assert (original["open_files"], forked["open_files"], forked["parent_open_files"]) == (1024, 1024, 1024)


def test_a_spare_forks_the_workers_of_the_node_it_takes_over(launcher: Launcher, tmp_path: Path) -> None:
    """A spare pre-warms its zygote while it stands by: taking over a lost node then costs a fork per worker, not a
    fresh interpreter that imports torch."""
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    endpoint = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2:3", "--nproc-per-node", "1", "--rdzv-endpoint", endpoint]
    node0 = launcher.flashrun(*common, "--node-rank", "0", "--log-dir", str(logs), PROBE, str(out), "100000",
                              name="node0")
    wait_for(lambda: "coordinator listening" in node0.output, 60, "the coordinator")
    node1 = launcher.flashrun(*common, PROBE, str(out), "100000", name="node1")
    wait_for(lambda: named(logs, "recoverable"), 120, "the step loop to run on both nodes")
    spare = launcher.flashrun(*common, PROBE, str(out), "100000", name="spare")
    wait_for(lambda: "standing by as a spare" in spare.output, 60, "the spare to join")
    node1.signal(signal.SIGKILL)
    wait_for(lambda: len(records(out, 1)) == 2, 120, "the spare's worker to start")
    wait_for(lambda: named(logs, "recovered"), 60, "the recovery")
    assert named(logs, "spare_takes_over")[0]["node"] == 1
    assert "zygote_main.py" in records(out, 1)[1]["parent"], "the spare's worker should have been forked"
    assert named(logs, "prewarm_fallback") == []
    node0.signal(signal.SIGTERM)
    node0.wait(60)
    spare.wait(60)
    wait_for(lambda: launcher.survivors() == [], 15, "every process to be gone")
