"""Marks every torch.distributed collective the script calls, so a hang can be pinned on the rank that never
arrived: its peers report they wait inside collective #N, it reports it is not in one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from flashrun.worker.progress import progress

TRACKED = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "broadcast", "broadcast_object_list", "gather", "reduce", "reduce_scatter", "reduce_scatter_tensor",
    "scatter", "monitored_barrier",
)
_MARK = "__flashrun_tracked__"
_originals: dict[str, Callable[..., Any]] = {}


def _tracked(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        progress.enter(name)
        try:
            return function(*args, **kwargs)
        finally:
            progress.leave()

    setattr(wrapper, _MARK, True)
    return wrapper


def track_collectives() -> None:
    """Wrap torch.distributed's collectives in place; calling it twice wraps nothing twice."""
    import torch.distributed as dist

    for name in TRACKED:
        function = getattr(dist, name, None)
        if function is not None and not getattr(function, _MARK, False):
            _originals[name] = function
            setattr(dist, name, _tracked(name, function))


def untracked(name: str) -> Callable[..., Any]:
    """The collective itself, for the library's own calls that mark themselves."""
    import torch.distributed as dist

    return _originals.get(name) or getattr(dist, name)
