"""Unit tests for flashrun.slurm: hostlist expansion and SLURM_* parsing.

The expected expansions were checked against ``scontrol show hostnames`` from
Slurm 22.05.8 (Debian 12's slurm-client).
"""

from __future__ import annotations

import dataclasses

import pytest

from flashrun.slurm import MAX_HOSTS, SlurmAllocation, expand_hostlist


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("n1", ["n1"]),
        ("localhost", ["localhost"]),
        ("node-7.cluster.example", ["node-7.cluster.example"]),
        ("n[1-2]", ["n1", "n2"]),
        ("n[1]", ["n1"]),
        ("n[007]", ["n007"]),
        ("n[1-1]", ["n1"]),
        ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
        ("a[1-2],b3,c[05-06]", ["a1", "a2", "b3", "c05", "c06"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("r[1-2]-n[3-4]", ["r1-n3", "r1-n4", "r2-n3", "r2-n4"]),
        ("a[1-3]b[1-2]", ["a1b1", "a1b2", "a2b1", "a2b2", "a3b1", "a3b2"]),
        ("a[1-2]b[1-3]", ["a1b1", "a1b2", "a1b3", "a2b1", "a2b2", "a2b3"]),
        ("a[1,3]b[1-2]", ["a1b1", "a1b2", "a3b1", "a3b2"]),
        # Three or more brackets: Slurm varies the last fastest, then the
        # first, second, ..., and the one before the last slowest.
        ("r[1-2]n[01-02]s[7]", ["r1n01s7", "r2n01s7", "r1n02s7", "r2n02s7"]),
        (
            "a[1-2]b[1-2]c[1-2]",
            ["a1b1c1", "a1b1c2", "a2b1c1", "a2b1c2", "a1b2c1", "a1b2c2", "a2b2c1", "a2b2c2"],
        ),
        (
            "a[1-2]b[1-3]c[1-2]",
            [
                *("a1b1c1", "a1b1c2", "a2b1c1", "a2b1c2"),
                *("a1b2c1", "a1b2c2", "a2b2c1", "a2b2c2"),
                *("a1b3c1", "a1b3c2", "a2b3c1", "a2b3c2"),
            ],
        ),
        ("a[1-2]b[7]c[1-2]", ["a1b7c1", "a1b7c2", "a2b7c1", "a2b7c2"]),
        # Width is that of the lower bound, a minimum, as in Slurm.
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("n[8-010]", ["n8", "n9", "n10"]),
        ("n[01-2]", ["n01", "n02"]),
        ("n[1-02]", ["n1", "n2"]),
        ("n[98-101]", ["n98", "n99", "n100", "n101"]),
        ("n[0-1]", ["n0", "n1"]),
        # Order and duplicates are kept as written, as in Slurm.
        ("n[3,1-2]", ["n3", "n1", "n2"]),
        ("b1,a1", ["b1", "a1"]),
        ("n1,n1", ["n1", "n1"]),
        # Empty prefix, and a suffix after the bracket.
        ("[1-2]", ["1", "2"]),
        ("n[1-2]-ib", ["n1-ib", "n2-ib"]),
        # Surrounding whitespace (e.g. from a file) is ignored.
        ("  n[1-2]\n", ["n1", "n2"]),
        ("a,b[1-2],c", ["a", "b1", "b2", "c"]),
        ("x[1-2],y[1-2]z[3]", ["x1", "x2", "y1z3", "y2z3"]),
    ],
)
def test_expand_hostlist(spec: str, expected: list[str]) -> None:
    assert expand_hostlist(spec) == expected


def test_expand_hostlist_four_brackets_in_slurm_order() -> None:
    # Recorded from scontrol show hostnames 'a[1-2]b[1-2]c[1-2]d[1-2]'.
    expected = [
        "a1b1c1d1",
        "a1b1c1d2",
        "a2b1c1d1",
        "a2b1c1d2",
        "a1b2c1d1",
        "a1b2c1d2",
        "a2b2c1d1",
        "a2b2c1d2",
        "a1b1c2d1",
        "a1b1c2d2",
        "a2b1c2d1",
        "a2b1c2d2",
        "a1b2c2d1",
        "a1b2c2d2",
        "a2b2c2d1",
        "a2b2c2d2",
    ]
    assert expand_hostlist("a[1-2]b[1-2]c[1-2]d[1-2]") == expected


def test_expand_hostlist_large_range() -> None:
    hosts = expand_hostlist("node[0001-1024]")
    assert len(hosts) == 1024
    assert hosts[0] == "node0001"
    assert hosts[-1] == "node1024"
    assert len(set(hosts)) == 1024


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty hostlist"),
        ("   ", "empty hostlist"),
        ("n[]", "empty brackets"),
        ("n[2-1]", "greater than"),
        ("n[1-2", "unclosed"),
        ("n1-2]", "unmatched ']'"),
        ("n]1[", "unmatched ']'"),
        ("n[[1]]", "nested"),
        ("n[1-[2]]", "nested"),
        ("n[a]", "invalid range 'a'"),
        ("n[1-b]", "invalid range '1-b'"),
        ("n[1-]", "invalid range '1-'"),
        ("n[-2]", "invalid range '-2'"),
        ("n[1-2-3]", "invalid range '1-2-3'"),
        ("n[+1]", "invalid range '+1'"),
        ("n[ 1]", "whitespace"),
        ("n[1,,2]", "invalid range ''"),
        ("n[1,]", "invalid range ''"),
        ("n[١]", "invalid range"),  # non-ASCII digit
        ("n1,,n2", "empty element"),
        ("n1,", "empty element"),
        (",n1", "empty element"),
        ("n1 n2", "whitespace"),
        ("n1,\tn2", "whitespace"),
        (f"n[0-{MAX_HOSTS}]", "more than"),
        ("a[1-1024]b[0-1024]", "more than"),
    ],
)
def test_expand_hostlist_rejects_malformed(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        expand_hostlist(spec)
    assert message in str(excinfo.value)


def test_expand_hostlist_error_names_the_input() -> None:
    with pytest.raises(ValueError) as excinfo:
        expand_hostlist("ok[1-2],bad[3-1]")
    assert "bad[3-1]" in str(excinfo.value)


def test_expand_hostlist_rejects_non_str() -> None:
    with pytest.raises(TypeError):
        expand_hostlist(None)  # type: ignore[arg-type]


# -- SlurmAllocation.from_env ---------------------------------------------------

# What srun -N2 --ntasks-per-node=1 exports on the second node (Slurm 22.05).
SRUN_ENV = {
    "SLURM_JOB_ID": "42",
    "SLURM_NNODES": "2",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_NODEID": "1",
    "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_NODELIST": "n[1-2]",
    "SLURM_STEP_NODELIST": "n[1-2]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}


def _env(**changes: str | None) -> dict[str, str]:
    env = dict(SRUN_ENV)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def test_from_env_outside_slurm_is_none() -> None:
    assert SlurmAllocation.from_env({}) is None
    assert SlurmAllocation.from_env({"PATH": "/usr/bin", "SLURM_NNODES": "2"}) is None


def test_from_env_srun_two_nodes() -> None:
    alloc = SlurmAllocation.from_env(SRUN_ENV)
    assert alloc == SlurmAllocation(job_id="42", nnodes=2, node_rank=1, first_host="n1", hosts=("n1", "n2"))


def test_from_env_node_zero() -> None:
    alloc = SlurmAllocation.from_env(_env(SLURM_NODEID="0"))
    assert alloc is not None
    assert alloc.node_rank == 0
    assert alloc.hosts[alloc.node_rank] == "n1"


def test_from_env_minimal_variables() -> None:
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_NNODES": "4",
        "SLURM_NODEID": "3",
        "SLURM_JOB_NODELIST": "gpu[01-02,07],cpu9",
    }
    alloc = SlurmAllocation.from_env(env)
    assert alloc == SlurmAllocation(
        job_id="7",
        nnodes=4,
        node_rank=3,
        first_host="gpu01",
        hosts=("gpu01", "gpu02", "gpu07", "cpu9"),
    )


def test_from_env_fallbacks() -> None:
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "a[3-4]",
    }
    alloc = SlurmAllocation.from_env(env)
    assert alloc is not None
    assert (alloc.nnodes, alloc.first_host, alloc.hosts) == (2, "a3", ("a3", "a4"))


def test_from_env_prefers_nnodes_and_job_nodelist_over_fallbacks() -> None:
    env = _env(
        SLURM_STEP_NODELIST=None,
        SLURM_JOB_NUM_NODES="9",
        SLURM_JOB_NODELIST="x[1-2]",
        SLURM_NODELIST="y[1-9]",
    )
    alloc = SlurmAllocation.from_env(env)
    assert alloc is not None
    assert alloc.nnodes == 2
    assert alloc.hosts == ("x1", "x2")


def test_from_env_step_on_part_of_the_job() -> None:
    # salloc -N2, then srun -N1 -w n2 (recorded from Slurm 22.05): the job
    # lists still name both nodes, only SLURM_STEP_NODELIST names the step's.
    env = {
        "SLURM_JOB_ID": "3",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "n[1-2]",
        "SLURM_PROCID": "0",
        "SLURM_STEP_NODELIST": "n2",
        "SLURM_STEP_NUM_NODES": "1",
    }
    alloc = SlurmAllocation.from_env(env)
    assert alloc == SlurmAllocation(job_id="3", nnodes=1, node_rank=0, first_host="n2", hosts=("n2",))


def test_from_env_strips_whitespace() -> None:
    alloc = SlurmAllocation.from_env(_env(SLURM_JOB_ID=" 42 ", SLURM_NNODES="2\n", SLURM_NODEID=" 0"))
    assert alloc is not None
    assert (alloc.job_id, alloc.nnodes, alloc.node_rank) == ("42", 2, 0)


def test_from_env_is_frozen_and_hashable() -> None:
    alloc = SlurmAllocation.from_env(SRUN_ENV)
    assert alloc is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        alloc.node_rank = 0  # type: ignore[misc]
    assert hash(alloc) == hash(SlurmAllocation.from_env(dict(SRUN_ENV)))


def test_from_env_does_not_modify_mapping() -> None:
    env = dict(SRUN_ENV)
    SlurmAllocation.from_env(env)
    assert env == SRUN_ENV


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"SLURM_JOB_ID": ""}, "SLURM_JOB_ID"),
        ({"SLURM_JOB_ID": "  "}, "SLURM_JOB_ID"),
        ({"SLURM_NNODES": None, "SLURM_JOB_NUM_NODES": None}, "SLURM_NNODES"),
        ({"SLURM_NNODES": "two"}, "SLURM_NNODES"),
        ({"SLURM_NNODES": "0"}, "SLURM_NNODES"),
        ({"SLURM_NNODES": "-2"}, "SLURM_NNODES"),
        ({"SLURM_NNODES": "2.0"}, "SLURM_NNODES"),
        ({"SLURM_NNODES": ""}, "SLURM_NNODES"),
        ({"SLURM_NNODES": None, "SLURM_JOB_NUM_NODES": "x"}, "SLURM_JOB_NUM_NODES"),
        ({"SLURM_NODEID": None}, "SLURM_NODEID"),
        ({"SLURM_NODEID": ""}, "SLURM_NODEID"),
        ({"SLURM_NODEID": "-1"}, "SLURM_NODEID"),
        ({"SLURM_NODEID": "one"}, "SLURM_NODEID"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID"),
        (
            {"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None, "SLURM_NODELIST": None},
            "SLURM_JOB_NODELIST",
        ),
        ({"SLURM_STEP_NODELIST": "n[1-"}, "SLURM_STEP_NODELIST"),
        ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": "n[2-1]"}, "SLURM_JOB_NODELIST"),
        (
            {"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None, "SLURM_NODELIST": ""},
            "SLURM_NODELIST",
        ),
        # The node list and the node count disagree.
        ({"SLURM_STEP_NODELIST": "n[1-3]"}, "SLURM_STEP_NODELIST"),
        ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": "n1"}, "SLURM_JOB_NODELIST"),
    ],
)
def test_from_env_rejects_missing_or_malformed(changes: dict[str, str | None], variable: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        SlurmAllocation.from_env(_env(**changes))
    assert variable in str(excinfo.value)
