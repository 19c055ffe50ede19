"""The coordinator's eyes on its own store during a recovery: one thread and one client connection that wait for
each published generation's acknowledgements and for its barrier's release, and report them to the job.

So the coordinator learns "every agent acted on the new generation" and "every rank's rendezvous is done" from two
keys the store server pushes, not from a message per agent (agent/generation_notice.py). Waits end early when a
newer generation is published (it releases the older one's keys as superseded), so one thread serves every
generation in turn.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from flashrun.agent import generation_notice
from flashrun.agent.store_barrier import barrier_key

STORE_CONNECT_TIMEOUT_S = 60.0
"""How long the watch's connection to the coordinator's own store server may take."""


class RecoveryWatch:
    """`use_store` when a generation gets a new store (connects ahead of any recovery); `follow` each published
    generation. Callbacks run on the watch's thread, with the monotonic time the key arrived."""

    def __init__(self, host: str, wait_s: float, on_acknowledged: Callable[[int, float], None],
                 on_released: Callable[[int, str, float], None]) -> None:
        self._host = host
        self._wait_s = wait_s
        self._on_acknowledged = on_acknowledged
        self._on_released = on_released
        self._work: queue.SimpleQueue[tuple[int, int, bool] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="flashrun-recovery-watch", daemon=True)
        self._thread.start()

    def use_store(self, port: int) -> None:
        self._work.put((port, -1, False))

    def follow(self, port: int, generation: int, acknowledgements: bool) -> None:
        """Wait for `generation`'s acknowledgements (when any agent was told through the notice) and release."""
        self._work.put((port, generation, acknowledgements))

    def close(self) -> None:
        self._work.put(None)

    def _run(self) -> None:
        connection: Any = None
        connected_to = -1
        while (item := self._work.get()) is not None:
            port, generation, acknowledgements = item
            try:
                if port != connected_to:
                    connection, connected_to = None, -1
                    connection = generation_notice.connect_one(self._host, port, STORE_CONNECT_TIMEOUT_S)
                    connected_to = port
                if generation < 0:
                    continue
                if acknowledgements:
                    acked = generation_notice.await_value(connection, barrier_key(generation, "all_acked"),
                                                          self._wait_s)
                    if acked == generation_notice.ALL_ACKED:
                        self._on_acknowledged(generation, time.monotonic())
                released = generation_notice.await_value(connection, barrier_key(generation, "released"),
                                                         self._wait_s)
                if released is not None:
                    self._on_released(generation, released.decode(), time.monotonic())
            except Exception:  # noqa: BLE001 - the store is gone (shutdown, a full restart): agents' messages remain
                connection, connected_to = None, -1
