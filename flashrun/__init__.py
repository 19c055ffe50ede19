"""flashrun: a torchrun-compatible launcher that recovers from failures in seconds.

In a training script, `import flashrun` connects the worker to its flashrun agent (heartbeats, step counters,
collective tracking) when the script runs under flashrun, and does nothing otherwise. `flashrun.init()` returns
the `Run` whose step loop recovers from failures in place (see flashrun/worker/run.py).
"""

from typing import TYPE_CHECKING, Any

from flashrun.worker.link import attach_if_launched as _attach_if_launched
from flashrun.worker.steps import steps

if TYPE_CHECKING:
    from flashrun.worker.run import Run

__version__ = "0.1.0"

__all__ = ["Run", "__version__", "init", "steps"]


def init(backend: str | None = None) -> "Run":
    """Create the process group and return the fault-tolerant `Run` (imports torch on first use)."""
    from flashrun.worker.run import init as _init

    return _init(backend)


def __getattr__(name: str) -> Any:
    if name == "Run":
        from flashrun.worker.run import Run

        return Run
    raise AttributeError(name)

_attach_if_launched()
