"""What a worker's heartbeat reports: progress of the step loop and whether the main thread is in a collective.

Written by the main thread, read by the heartbeat thread. Each field is a single attribute assignment, atomic under
the GIL, and a heartbeat may see a value a few microseconds late: that is all the synchronisation it needs.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class RecoveryReport:
    generation: int = 0
    abort_s: float = 0.0
    start_s: float = 0.0
    rebuild_s: float = 0.0
    sync_s: float = 0.0
    resume_step: int = -1
    source_rank: int = -1


@dataclasses.dataclass
class Progress:
    step: int = -1
    """Last completed step; -1 before the first."""
    collective: str = ""
    """The collective the main thread is inside, or "" when it is not in one."""
    collective_seq: int = 0
    """Collectives entered so far; equal on ranks that issue the same collectives."""
    generation: int = 0
    """The generation whose process group this worker has joined and synchronised with."""
    recoverable: bool = False
    """The script runs flashrun's step loop, so a failure can be recovered in place."""
    recovery: RecoveryReport | None = None
    finished: bool = False
    """The step loop is over (or the interpreter exits): the process may go quiet while it shuts down."""

    def enter(self, name: str) -> None:
        self.collective_seq += 1
        self.collective = name

    def leave(self) -> None:
        self.collective = ""


progress = Progress()
"""The one per process: the heartbeat thread and the step loop share it."""
