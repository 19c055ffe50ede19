"""flashrun: a torchrun-compatible launcher that recovers from failures in seconds."""

__version__ = "0.1.0"

__all__ = ["__version__"]
