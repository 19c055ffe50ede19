from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Launcher

# torch 2.13's TCPStore looks up a peer's name (reverse DNS) when it logs about a connection: a client whose wait
# timed out, a server whose client went away. Where the resolver drops queries, as this sandbox's does, each lookup
# costs glibc's 5 s timeout, on the store server's only thread. Not what any test measures: the processes of the tests
# (and those they start, which inherit it) give up on a lookup after 1 s.
os.environ.setdefault("RES_OPTIONS", "timeout:1 attempts:1")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Starts real processes for the test; whatever survives the test is killed, pass or fail."""
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.cleanup()
