"""Fault drills in the worker (`flashrun inject`): faults the agent relays, fired by the step loop.

The link's thread arms a drill; the main thread fires it when the step loop is about to run the drill's step (or
the next step), so a hang or an exception happens where the script's own code would have one: inside a step,
before its collectives.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import threading
import time

HANG_SLEEP_S = 0.05
"""A hung rank sleeps in a loop this long at a time: its heartbeats go on, its steps do not."""


class InjectedFault(RuntimeError):
    """Raised by `flashrun inject exception`, as if the training script had raised it."""


@dataclasses.dataclass(frozen=True)
class Drill:
    kind: str
    """kill, stop, hang or exception."""
    at_step: int
    """Fire when about to run this step (or a later one, if the loop got past it first); -1: the next step."""


_lock = threading.Lock()
_armed: list[Drill] = []


def arm(kind: str, at_step: int) -> None:
    """Called on the link's thread for each drill the agent relays."""
    with _lock:
        _armed.append(Drill(kind, at_step))


def fire_due(step: int, rank: int) -> None:
    """Called by the step loop before it runs `step`: fire the drills due by now, in the order they came."""
    if not _armed:
        return
    with _lock:
        due = [drill for drill in _armed if drill.at_step < 0 or step >= drill.at_step]
        _armed[:] = [drill for drill in _armed if drill not in due]
    for drill in due:
        _fire(drill.kind, step, rank)


def _fire(kind: str, step: int, rank: int) -> None:
    print(f"flashrun: fault drill: {kind} on rank {rank} at step {step}", file=sys.stderr, flush=True)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "hang":
        while True:  # never returns: the coordinator finds the job stalled and replaces this process
            time.sleep(HANG_SLEEP_S)
    elif kind == "exception":
        raise InjectedFault(f"fault drill: injected exception on rank {rank} at step {step}")
