"""Read a Slurm allocation from the environment of an ``srun`` task.

Why this exists: ``srun -N2 --ntasks-per-node=1 flashrun ... script.py`` starts
one flashrun per node with no rendezvous options at all. Everything flashrun
needs to form the world (how many nodes, which one this is, which host runs
the coordinator) is in the ``SLURM_*`` variables that ``srun`` exports, but
the node list arrives in Slurm's compressed *hostlist* syntax
(``gpu[01-04,07]``, ``r[1-2]n[1-2]``), which has to be expanded the way Slurm
does it so that every node agrees on the same ordering and the same first
host.

Everything here is pure: the functions only read the strings and the mapping
they are given, so they can be unit-tested without a cluster.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["MAX_HOSTS", "SlurmAllocation", "expand_hostlist"]

#: Upper bound on the number of names one hostlist may expand to. Real
#: clusters have at most tens of thousands of nodes; the bound only stops a
#: typo such as ``n[1-999999999]`` from exhausting memory.
MAX_HOSTS = 1 << 20

# One element of a bracket: ``7``, ``07`` or ``01-16``. Signs, blanks and
# anything else are rejected (Slurm's strtoul would quietly accept some).
_RANGE_RE = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def _expand_range(body: str, element: str) -> list[str]:
    """Expand the inside of one bracket, e.g. ``01-04,07``."""
    if not body:
        raise ValueError(f"empty brackets '[]' in hostlist element {element!r}")
    values: list[str] = []
    for part in body.split(","):
        match = _RANGE_RE.fullmatch(part)
        if match is None:
            raise ValueError(
                f"invalid range {part!r} in hostlist element {element!r}: expected N or N-M with non-negative integers"
            )
        lo_text, hi_text = match.group(1), match.group(2)
        lo = int(lo_text)
        hi = int(hi_text) if hi_text is not None else lo
        if lo > hi:
            raise ValueError(
                f"invalid range {part!r} in hostlist element {element!r}: start {lo} is greater than end {hi}"
            )
        if hi - lo + 1 > MAX_HOSTS:
            raise ValueError(f"range {part!r} in hostlist element {element!r} expands to more than {MAX_HOSTS} names")
        # Slurm keeps the width of the lower bound as the minimum width:
        # [01-10] -> 01..10, [8-010] -> 8, 9, 10, [1-02] -> 1, 2.
        width = len(lo_text)
        values.extend(f"{n:0{width}d}" for n in range(lo, hi + 1))
    return values


def _split_elements(spec: str) -> list[str]:
    """Split a hostlist at the commas that are outside brackets."""
    elements: list[str] = []
    depth = 0
    start = 0
    for i, char in enumerate(spec):
        if char == "[":
            if depth:
                raise ValueError(f"nested '[' at position {i} in hostlist {spec!r}")
            depth = 1
        elif char == "]":
            if not depth:
                raise ValueError(f"unmatched ']' at position {i} in hostlist {spec!r}")
            depth = 0
        elif char == "," and not depth:
            elements.append(spec[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unclosed '[' in hostlist {spec!r}")
    elements.append(spec[start:])
    return elements


def _expand_element(element: str) -> list[str]:
    """Expand one comma-free element such as ``r[1-2]n[01-02]``."""
    # Literal text is kept as a str, each bracket becomes its list of values.
    segments: list[str | list[str]] = []
    pos = 0
    while pos < len(element):
        open_at = element.find("[", pos)
        if open_at == -1:
            segments.append(element[pos:])
            break
        if open_at > pos:
            segments.append(element[pos:open_at])
        close_at = element.index("]", open_at)  # balanced: checked by the caller
        segments.append(_expand_range(element[open_at + 1 : close_at], element))
        pos = close_at + 1
    brackets = [i for i, segment in enumerate(segments) if isinstance(segment, list)]
    total = 1
    for i in brackets:
        total *= len(segments[i])
    if total > MAX_HOSTS:
        raise ValueError(f"hostlist element {element!r} expands to {total} names, more than {MAX_HOSTS}")
    # Slurm's order (checked with scontrol show hostnames, 2 to 5 brackets):
    # the last bracket varies fastest, then the first, the second, ..., and
    # the one before the last varies slowest. For two brackets that is the
    # plain cartesian product, r[1-2]n[1-2] -> r1n1 r1n2 r2n1 r2n2, but
    # a[1-2]b[1-2]c[1-2] -> a1b1c1 a1b1c2 a2b1c1 a2b1c2 a1b2c1 ...
    # itertools.product varies its last argument fastest, so list them
    # slowest first.
    order = brackets[-2::-1] + brackets[-1:]
    names: list[str] = []
    for combo in itertools.product(*(segments[i] for i in order)):
        parts = [segment if isinstance(segment, str) else "" for segment in segments]
        for i, value in zip(order, combo, strict=True):
            parts[i] = value
        names.append("".join(parts))
    return names


def expand_hostlist(spec: str) -> list[str]:
    """Expand a Slurm hostlist expression into host names, in Slurm's order.

    Supported: plain names (``n1``), bracket ranges with zero padding kept
    (``gpu[01-04,07]``), several comma-separated elements
    (``a[1-2],b3,c[05-06]``) and several brackets in one element, expanded
    as a cartesian product in the order Slurm uses (``r[1-2]n[1-2]`` ->
    ``r1n1 r1n2 r2n1 r2n2``; see ``_expand_element`` for three or more
    brackets). Order and duplicates are kept as written, like
    ``scontrol show hostnames``. Text after a bracket (``n[1-2]-ib``) is
    also accepted, which Slurm 22.05 itself rejects unless another bracket
    follows.

    Stricter than Slurm on purpose, since ``SLURM_*`` variables never contain
    these: empty elements (``a,,b``, a trailing comma), whitespace inside the
    expression, and ranges such as ``[1-]`` or ``[+1]`` raise ``ValueError``.

    Raises:
        ValueError: if ``spec`` is empty or malformed; the message says what
            is wrong and where.
    """
    if not isinstance(spec, str):
        raise TypeError(f"hostlist must be a str, not {type(spec).__name__}")
    stripped = spec.strip()
    if not stripped:
        raise ValueError("empty hostlist")
    if any(char.isspace() for char in stripped):
        raise ValueError(f"whitespace inside hostlist {spec!r}")
    hosts: list[str] = []
    for element in _split_elements(stripped):
        if not element:
            raise ValueError(f"empty element (stray comma) in hostlist {spec!r}")
        hosts.extend(_expand_element(element))
        if len(hosts) > MAX_HOSTS:
            raise ValueError(f"hostlist {spec!r} expands to more than {MAX_HOSTS} names")
    return hosts


def _first_present(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
    """Return ``(name, value)`` of the first variable of ``names`` that is set."""
    for name in names:
        value = env.get(name)
        if value is not None:
            return name, value
    return None


def _parse_int(name: str, value: str) -> int:
    text = value.strip()
    # ASCII digits only: rejects '', '-1', '+1', '2.0' and non-ASCII digits.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{name}={value!r} is not a non-negative integer")
    return int(text)


@dataclass(frozen=True)
class SlurmAllocation:
    """Where this process sits in the Slurm job step that launched it.

    Attributes:
        job_id: ``SLURM_JOB_ID``, the same on every node of the job.
        nnodes: number of nodes in the step (one flashrun agent per node).
        node_rank: this node's index in the step, ``0 <= node_rank < nnodes``.
        first_host: ``hosts[0]``, the node every agent agrees to rendezvous on.
        hosts: the step's nodes in Slurm's order; ``hosts[node_rank]`` is
            this node.
    """

    job_id: str
    nnodes: int
    node_rank: int
    first_host: str
    hosts: tuple[str, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SlurmAllocation | None:
        """Build the allocation from ``srun``'s environment.

        Returns ``None`` when ``SLURM_JOB_ID`` is absent (not under Slurm).

        Variables read, first one present wins:

        * node count: ``SLURM_NNODES``, then ``SLURM_JOB_NUM_NODES``;
        * node rank: ``SLURM_NODEID``;
        * node list: ``SLURM_STEP_NODELIST``, then ``SLURM_JOB_NODELIST``,
          then ``SLURM_NODELIST``.

        ``SLURM_STEP_NODELIST`` comes first because in a step that uses only
        part of the job (``salloc -N4`` then ``srun -N2``) Slurm 22.05 sets
        ``SLURM_NNODES`` and ``SLURM_NODEID`` for the *step* while both
        ``SLURM_JOB_NODELIST`` and ``SLURM_NODELIST`` still list the whole
        *job*; with the job's list the first host could be a node that runs
        no agent. When the step spans the whole job the lists are equal.

        Caveat: in an ``sbatch`` batch script outside ``srun``, Slurm sets
        ``SLURM_NODEID=0`` and ``SLURM_NNODES`` to the job's node count, so
        this returns node 0 of N although only one process runs; the caller
        has to launch one flashrun per node with ``srun``.

        Raises:
            ValueError: naming the variable that is missing or malformed, or
                the variables that contradict each other.
        """
        job_id = env.get("SLURM_JOB_ID")
        if job_id is None:
            return None
        job_id = job_id.strip()
        if not job_id:
            raise ValueError("SLURM_JOB_ID is set but empty")

        found = _first_present(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
        if found is None:
            raise ValueError("SLURM_JOB_ID is set but neither SLURM_NNODES nor SLURM_JOB_NUM_NODES is")
        nnodes_var, nnodes_text = found
        nnodes = _parse_int(nnodes_var, nnodes_text)
        if nnodes < 1:
            raise ValueError(f"{nnodes_var}={nnodes_text!r} must be at least 1")

        node_id_text = env.get("SLURM_NODEID")
        if node_id_text is None:
            raise ValueError(
                "SLURM_JOB_ID is set but SLURM_NODEID is not: this does not "
                "look like a task started by srun (e.g. an salloc shell); "
                "start one launcher per node with 'srun --ntasks-per-node=1'"
            )
        node_rank = _parse_int("SLURM_NODEID", node_id_text)
        if node_rank >= nnodes:
            raise ValueError(f"SLURM_NODEID={node_id_text!r} is out of range for {nnodes_var}={nnodes_text!r}")

        found = _first_present(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
        if found is None:
            raise ValueError(
                "SLURM_JOB_ID is set but none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is"
            )
        nodelist_var, nodelist = found
        try:
            hosts = tuple(expand_hostlist(nodelist))
        except ValueError as exc:
            raise ValueError(f"{nodelist_var}={nodelist!r}: {exc}") from exc
        if len(hosts) != nnodes:
            raise ValueError(f"{nodelist_var}={nodelist!r} names {len(hosts)} node(s) but {nnodes_var}={nnodes_text!r}")

        return cls(
            job_id=job_id,
            nnodes=nnodes,
            node_rank=node_rank,
            first_host=hosts[0],
            hosts=hosts,
        )
