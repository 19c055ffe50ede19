"""flashrun: a torchrun-compatible launcher that recovers from failures in seconds.

In a training script, `import flashrun` connects the worker to its flashrun agent (heartbeats, step counters,
collective tracking) when the script runs under flashrun, and does nothing otherwise.
"""

from flashrun.worker.link import attach_if_launched as _attach_if_launched
from flashrun.worker.steps import steps

__version__ = "0.1.0"

__all__ = ["__version__", "steps"]

_attach_if_launched()
