"""Fixtures shared by the integration tests."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest

STORE_TIMEOUT = datetime.timedelta(seconds=30)


@pytest.fixture
def server() -> Iterator[Any]:
    """A real TCPStore server in this process (the job's store, as the coordinator hosts it)."""
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    yield store
    del store
