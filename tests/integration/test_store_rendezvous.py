"""The generation barrier against a real TCPStore server, with real threads and connections per rank.

Ranks run in threads of this process (each with its own two client connections, as a worker has), so the test
can count every store operation a rank issues: a thin counting wrapper forwards to the real client.
"""

from __future__ import annotations

import collections
import datetime
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist

from flashrun.worker import group as group_module
from flashrun.worker.abort import Aborter
from flashrun.worker.group import Superseded, abandon_group, await_peers, connect_waiter, join_generation
from tests.helpers import wait_for

STORE_TIMEOUT = datetime.timedelta(seconds=30)
JOIN_DEADLINE_S = 30.0
"""Generous for a loaded 2-core machine: a barrier that passes does so in milliseconds."""
PROMPT_S = 2.0
"""A superseded rank must be released well within this (typically milliseconds); the deadline is far beyond."""


class CountingStore:
    """Forwards to a real store client, counting the operations each call issues."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.ops: collections.Counter[str] = collections.Counter()
        self.host, self.port = store.host, store.port

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.ops[name] += 1
            return method(*args, **kwargs)

        return counted


@pytest.fixture
def server() -> Iterator[Any]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    yield store
    del store


def client(server: Any) -> CountingStore:
    return CountingStore(dist.TCPStore(server.host, server.port, is_master=False, wait_for_workers=False,
                                       timeout=STORE_TIMEOUT))


class Rank(threading.Thread):
    def __init__(self, server: Any, generation: int, world_size: int, deadline_s: float = JOIN_DEADLINE_S) -> None:
        super().__init__(daemon=True)
        self.store = client(server)
        self.waiter = CountingStore(connect_waiter(self.store, deadline_s))
        self.aborter = Aborter(generation)
        self.generation, self.world_size, self.deadline_s = generation, world_size, deadline_s
        self.outcome: BaseException | str | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            await_peers(self.store, self.waiter, self.generation, self.world_size, self.aborter, self.deadline_s)
            self.outcome = "passed"
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            self.outcome = err
        self.finished_at = time.monotonic()

    def ops(self) -> dict[str, int]:
        return dict(self.store.ops + self.waiter.ops)


def run_ranks(ranks: list[Rank], timeout_s: float = 60.0) -> None:
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout_s)
        assert not rank.is_alive(), "a rank is still blocked in the barrier"


@pytest.mark.parametrize("world_size", [2, 16, 64])
def test_all_ranks_pass_with_a_constant_number_of_store_operations(server: Any, world_size: int) -> None:
    ranks = [Rank(server, generation=1, world_size=world_size) for _ in range(world_size)]
    run_ranks(ranks)
    assert [rank.outcome for rank in ranks] == ["passed"] * world_size
    per_rank = [rank.ops() for rank in ranks]
    # Every rank: one add, one blocking get; exactly one rank (the last to arrive) also releases the barrier.
    assert sorted(ops.get("compare_set", 0) for ops in per_rank) == [0] * (world_size - 1) + [1]
    for ops in per_rank:
        assert ops["add"] == 1 and ops["get"] == 1 and ops["set_timeout"] == 1, ops
        assert sum(ops.values()) - ops["set_timeout"] <= 3, ops  # set_timeout is local to the client


def test_waiting_longer_costs_no_store_operations(server: Any) -> None:
    early = Rank(server, generation=2, world_size=2)
    early.start()
    wait_for(lambda: int(server.add("flashrun/g2/arrived", 0)) == 1, 30, "the first rank to arrive")
    idle_until = time.monotonic() + 1.0
    # The early rank's wait must not poll: its op count stays the same however long it waits.
    wait_for(lambda: time.monotonic() >= idle_until, 5, "a second of waiting")
    assert early.is_alive() and early.ops() == {"add": 1, "set_timeout": 1, "get": 1}
    late = Rank(server, generation=2, world_size=2)
    run_ranks([late])
    early.join(30)
    assert (early.outcome, late.outcome) == ("passed", "passed")
    assert early.ops() == {"add": 1, "set_timeout": 1, "get": 1}


def test_a_newer_generation_releases_every_waiting_rank_promptly(server: Any) -> None:
    ranks = [Rank(server, generation=3, world_size=4) for _ in range(3)]  # the fourth rank never comes
    for rank in ranks:
        rank.start()
    wait_for(lambda: int(server.add("flashrun/g3/arrived", 0)) == 3, 30, "three ranks waiting")
    commanded_at = time.monotonic()
    ranks[0].aborter.command(4)  # the first rank to hear of generation 4 releases the others' barrier too
    ranks[0].join(PROMPT_S)
    assert isinstance(ranks[0].outcome, Superseded)
    assert ranks[0].finished_at - commanded_at < PROMPT_S
    for rank in ranks[1:]:  # released, but they raise only once their own command arrives
        assert rank.is_alive()
        rank.aborter.command(4)
    for rank in ranks[1:]:
        rank.join(PROMPT_S)
        assert isinstance(rank.outcome, Superseded), rank.outcome
    assert server.get("flashrun/g3/released") == b"superseded"


def test_a_rank_commanded_before_it_arrives_does_not_wait(server: Any) -> None:
    rank = Rank(server, generation=5, world_size=2)
    rank.aborter.command(6)
    run_ranks([rank])
    assert isinstance(rank.outcome, Superseded)
    assert "get" not in rank.ops()


def test_a_missing_peer_meets_the_deadline_with_a_clear_error(server: Any) -> None:
    ranks = [Rank(server, generation=7, world_size=3, deadline_s=1.0) for _ in range(2)]
    started = time.monotonic()
    run_ranks(ranks)
    for rank in ranks:
        assert isinstance(rank.outcome, TimeoutError), rank.outcome
        assert str(rank.outcome) == "only 2 of 3 ranks reached generation 7 within 1.0 s"
        assert rank.finished_at - started >= 1.0


def test_join_generation_forms_a_working_gloo_group(server: Any) -> None:
    """One rank per process is torch's rule for the default group: the test process is rank 0 of a world of 1."""
    store = dist.TCPStore(server.host, server.port, is_master=False, wait_for_workers=False, timeout=STORE_TIMEOUT)
    join_generation(store, 8, 0, 1, "gloo", Aborter(8), JOIN_DEADLINE_S)
    try:
        assert dist.get_world_size() == 1
        assert server.get("flashrun/g8/released") == b"complete"
    finally:
        dist.destroy_process_group()


def test_a_rejoining_rank_keeps_one_rank_prefix_on_its_tracebacks(server: Any, capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """torch prefixes tracebacks on every init_process_group; a survivor rejoins once per recovery."""
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # restored after the test, wrappers and all
    monkeypatch.setattr(group_module, "_excepthook_prefixed", False)
    store = dist.TCPStore(server.host, server.port, is_master=False, wait_for_workers=False, timeout=STORE_TIMEOUT)
    graveyard: list[Any] = []
    for generation in (11, 12, 13):
        abandon_group(graveyard)
        join_generation(store, generation, 0, 1, "gloo", Aborter(generation), JOIN_DEADLINE_S)
    try:
        try:
            raise ValueError("after three generations")
        except ValueError:
            sys.excepthook(*sys.exc_info())
        printed = capsys.readouterr().err
        assert "[rank0]: ValueError: after three generations" in printed, printed
        assert "[rank0]: [rank0]:" not in printed, printed
    finally:
        dist.destroy_process_group()
