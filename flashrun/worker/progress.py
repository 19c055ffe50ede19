"""What a worker's heartbeat reports: the last completed step and whether the main thread is in a collective.

Written by the main thread, read by the heartbeat thread. Each field is a single attribute assignment, atomic under
the GIL, and a heartbeat may see a step a few microseconds late: that is all the synchronisation it needs.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class Progress:
    step: int = -1
    """Last completed step; -1 before the first."""
    collective: str = ""
    """The collective the main thread is inside, or "" when it is not in one."""
    collective_seq: int = 0
    """Collectives entered so far; equal on ranks that issue the same collectives."""

    def enter(self, name: str) -> None:
        self.collective_seq += 1
        self.collective = name

    def leave(self) -> None:
        self.collective = ""


progress = Progress()
"""The one per process: the heartbeat thread and the step loop share it."""
