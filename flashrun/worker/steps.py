"""The step loop: `for step in flashrun.steps(total)` counts completed steps with no extra call per step."""

from __future__ import annotations

from collections.abc import Iterator

from flashrun.worker.link import mark_finished
from flashrun.worker.progress import progress


def steps(total: int, start: int = 0) -> Iterator[int]:
    """Yield start..total-1; asking for the next step marks the previous one completed."""
    for step in range(start, total):
        yield step
        progress.step = step
    mark_finished()
