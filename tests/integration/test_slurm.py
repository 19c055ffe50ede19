"""flashrun under a real Slurm cluster (the one .ci/slurm-cluster.sh sets up).

``srun -N2 --ntasks-per-node=1 flashrun --nproc-per-node 2 probe.py`` passes
no rendezvous options at all: flashrun has to find the node count, its node
rank and the host to meet on in the ``SLURM_*`` variables, and the two
agents have to form one world of 4 ranks.

Skipped, saying what is missing, when there is no ``srun``/``sinfo`` on PATH
or fewer than 2 idle nodes.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flashrun.slurm import expand_hostlist

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PROBE = REPO / "tests" / "probes" / "allreduce_probe.py"
# The console script installed next to this interpreter (.venv/bin/flashrun).
# sys.executable is not resolved: .venv/bin/python is a symlink out of the venv.
FLASHRUN = Path(sys.executable).parent / "flashrun"
JOB_TIMEOUT_S = 75  # plus up to ~25 s of scancel: under the suite's 120 s per-test limit
RESULT_RE = re.compile(r"\brank (\d+) world (\d+) sum (\d+)\s*$")

# Variables that would make the job inherit a surrounding job or launcher:
# an enclosing Slurm allocation (srun would start a step inside it) or a
# torchrun-style rendezvous that flashrun might use instead of Slurm's.
_INHERITED = re.compile(
    r"SLURM_.*|MASTER_ADDR|MASTER_PORT|RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|"
    r"GROUP_RANK|ROLE_RANK|NODE_RANK|TORCHELASTIC_.*"
)


def _require_slurm_cluster() -> None:
    """Skip the test unless srun can get 2 idle nodes."""
    for tool in ("srun", "sinfo", "squeue", "scancel"):
        if shutil.which(tool) is None:
            pytest.skip(
                f"Slurm is not available: {tool!r} is not on PATH "
                "(start a test cluster with 'sudo bash .ci/slurm-cluster.sh')"
            )
    try:
        proc = subprocess.run(
            ["sinfo", "--noheader", "--Node", "--states=idle", "--format=%N"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("Slurm is not available: 'sinfo' did not answer in 20 s (is slurmctld running?)")
    if proc.returncode != 0:
        pytest.skip(
            f"Slurm is not available: 'sinfo' failed with exit code {proc.returncode}: "
            f"{proc.stderr.strip()} (is slurmctld running? see .ci/slurm-cluster.sh)"
        )
    idle = sorted(set(proc.stdout.split()))
    if len(idle) < 2:
        pytest.skip(
            f"the Slurm cluster needs 2 idle nodes for this test, sinfo reports "
            f"{len(idle)}: {', '.join(idle) or 'none'}"
        )


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _INHERITED.fullmatch(k)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data


def _cancel(job_name: str) -> str:
    """scancel the job called job_name and wait (bounded) until it is gone."""
    subprocess.run(["scancel", f"--name={job_name}"], capture_output=True, timeout=20)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        listed = subprocess.run(
            ["squeue", "--noheader", f"--name={job_name}", "--format=%A %T"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.strip()
        if not listed:
            return "cancelled"
        time.sleep(0.5)
    return f"still listed 20 s after scancel: {listed}"


def test_srun_two_nodes_forms_one_world() -> None:
    _require_slurm_cluster()
    assert FLASHRUN.is_file(), (
        f"flashrun console script not found at {FLASHRUN}; install the package with 'pip install -e .'"
    )
    job_name = f"flashrun-it-{uuid.uuid4().hex[:8]}"
    cmd = [
        "srun",
        "--nodes=2",
        "--ntasks-per-node=1",
        f"--job-name={job_name}",
        "--time=5",  # minutes: Slurm's own backstop if this test is killed
        "--kill-on-bad-exit=1",  # one node's flashrun failing ends the other
        str(FLASHRUN),
        "--nproc-per-node",
        "2",
        str(PROBE),
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=_clean_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        cancelled = _cancel(job_name)
        pytest.fail(
            f"{' '.join(cmd)} did not finish within {JOB_TIMEOUT_S} s (job {cancelled})\n"
            f"--- stdout ---\n{_text(exc.stdout)}\n--- stderr ---\n{_text(exc.stderr)}"
        )

    report = (
        f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    assert proc.returncode == 0, report
    results: dict[int, tuple[int, int]] = {}
    for line in proc.stdout.splitlines():
        match = RESULT_RE.search(line)
        if match:
            rank, world, total = map(int, match.groups())
            assert rank not in results, f"rank {rank} reported twice\n{report}"
            results[rank] = (world, total)
    assert sorted(results) == [0, 1, 2, 3], f"expected ranks 0-3, got {sorted(results)}\n{report}"
    for rank, (world, total) in sorted(results.items()):
        assert world == 4, f"rank {rank} saw world {world}, expected 4\n{report}"
        assert total == 10, f"rank {rank} all-reduced {total}, expected 1+2+3+4 = 10\n{report}"


def test_expand_hostlist_matches_scontrol() -> None:
    """Cross-check expand_hostlist against Slurm's own expansion."""
    if shutil.which("scontrol") is None:
        pytest.skip("Slurm is not available: 'scontrol' is not on PATH")
    _require_slurm_cluster()  # scontrol needs a slurm.conf, which the cluster brings
    rng = random.Random(1234)
    specs = [
        "n[1-2]",
        "gpu[01-04,07]",
        "a[1-2],b3,c[05-06]",
        "r[1-2]n[1-2]",
        "a[1-2]b[1-3]c[1-2]",
        "a[1-2]b[1-2]c[1-2]d[1-2]",
        "n[8-010],n[1-02]",
        "x[1-2]-y[3,5-6]",
    ]
    for _ in range(30):
        specs.append(
            "".join(
                f"{chr(ord('a') + i)}[{rng.randint(0, 3):0{rng.randint(1, 2)}d}-{rng.randint(3, 5)}]"
                for i in range(rng.randint(1, 4))
            )
        )
    for spec in specs:
        proc = subprocess.run(["scontrol", "show", "hostnames", spec], capture_output=True, text=True, timeout=20)
        assert proc.returncode == 0, f"scontrol show hostnames {spec!r}: {proc.stderr}"
        assert expand_hostlist(spec) == proc.stdout.split(), spec
