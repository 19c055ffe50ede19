"""The coordinator's eyes on its own store during a recovery: for each published generation, wait for its
acknowledgements and for its barrier's release, and report them to the job.

So the coordinator learns "every agent acted on the new generation" and "every rank's rendezvous is done" from two
keys the store server pushes, not from a message per agent (agent/generation_notice.py). Each key has a thread and a
client connection of its own (a blocking get holds its connection), so a late acknowledgement (the agents told
again by a Recover message) does not hide a release. Waits end early when a newer generation is published (it
releases the older one's keys as superseded), so one thread per key serves every generation in turn.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from flashrun.agent import generation_notice, store_barrier
from flashrun.agent.store_barrier import barrier_key

STORE_CONNECT_TIMEOUT_S = 60.0
"""How long the watch's connection to the coordinator's own store server may take."""


class _KeyWatch:
    """One thread, one connection: wait for `flashrun/g{G}/{name}` of each generation handed to it, in turn."""

    def __init__(self, host: str, name: str, wait_s: float, report: Callable[[int, bytes, float], None]) -> None:
        self._host = host
        self._name = name
        self._wait_s = wait_s
        self._report = report
        self._work: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"flashrun-watch-{name}", daemon=True).start()

    def put(self, item: tuple[int, int] | None) -> None:
        self._work.put(item)

    def _run(self) -> None:
        connection: Any = None
        connected_to = -1
        while (item := self._work.get()) is not None:
            port, generation = item
            try:
                if port != connected_to:
                    connection, connected_to = None, -1
                    connection = store_barrier.connect_one(self._host, port, STORE_CONNECT_TIMEOUT_S)
                    connected_to = port
                if generation < 0:
                    continue
                value = store_barrier.await_value(connection, barrier_key(generation, self._name), self._wait_s)
                if value is not None:
                    self._report(generation, value, time.monotonic())
            except Exception:  # noqa: BLE001 - the store is gone (shutdown, a full restart): agents' messages remain
                connection, connected_to = None, -1


class RecoveryWatch:
    """`use_store` when a generation gets a new store (connects ahead of any recovery); `follow` each published
    generation. Callbacks run on the watch's threads, with the monotonic time the key arrived."""

    def __init__(self, host: str, wait_s: float, on_acknowledged: Callable[[int, float], None],
                 on_released: Callable[[int, str, float], None]) -> None:
        def acknowledged(generation: int, value: bytes, now: float) -> None:
            if value == generation_notice.ALL_ACKED:  # not superseded
                on_acknowledged(generation, now)

        self._acknowledgements = _KeyWatch(host, "all_acked", wait_s, acknowledged)
        self._releases = _KeyWatch(host, "released", wait_s,
                                   lambda generation, value, now: on_released(generation, value.decode(), now))

    def use_store(self, port: int) -> None:
        self._acknowledgements.put((port, -1))
        self._releases.put((port, -1))

    def follow(self, port: int, generation: int, acknowledgements: bool) -> None:
        """Wait for `generation`'s acknowledgements (when any agent was told through the notice) and release."""
        if acknowledgements:
            self._acknowledgements.put((port, generation))
        self._releases.put((port, generation))

    def close(self) -> None:
        self._acknowledgements.put(None)
        self._releases.put(None)
