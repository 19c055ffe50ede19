"""The coordinator's eyes on its own store during a recovery: for each published generation, wait for its
acknowledgements and for its barrier's release, and report them to the job.

So the coordinator learns "every agent acted on the new generation" and "every rank's rendezvous is done" from two
keys the store server pushes, not from a message per agent (agent/generation_notice.py); in a sharded job from one
acknowledgement key per shard and the root's release. Each key has a thread and a
client connection of its own (a blocking get holds its connection), so a late acknowledgement (the agents told
again by a Recover message) does not hide a release. Waits end early when a newer generation is published (it
releases the older one's keys as superseded), so one thread per key serves every generation in turn.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from flashrun.agent import generation_notice, store_barrier
from flashrun.agent.store_barrier import barrier_key, shard_key

STORE_CONNECT_TIMEOUT_S = 60.0
"""How long the watch's connection to the coordinator's own store server may take."""


class _KeyWatch:
    """One thread, one connection per store server: wait for the keys of each generation handed to it, in turn."""

    def __init__(self, host: str, name: str, wait_s: float, report: Callable[[int, list[bytes], float], None]) -> None:
        self._host = host
        self._wait_s = wait_s
        self._report = report
        self._work: queue.SimpleQueue[tuple[Sequence[int]] | tuple[list[tuple[int, str]], int] | None] = \
            queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"flashrun-watch-{name}", daemon=True).start()

    def use(self, ports: Sequence[int]) -> None:
        """Connect to these store servers now (ahead of any recovery), and drop the connections to any other."""
        self._work.put((ports,))

    def put(self, keys: list[tuple[int, str]], generation: int) -> None:
        """Wait for each (port, key) of `keys`, then report `generation` with their values."""
        self._work.put((keys, generation))

    def close(self) -> None:
        self._work.put(None)

    def _run(self) -> None:
        connections: dict[int, Any] = {}

        def connection(port: int) -> Any:
            if connections.get(port) is None:
                connections[port] = store_barrier.connect_one(self._host, port, STORE_CONNECT_TIMEOUT_S)
            return connections[port]

        while (item := self._work.get()) is not None:
            try:
                if len(item) == 1:
                    (ports,) = item
                    connections = {port: connections.get(port) for port in ports}
                    for port in ports:
                        connection(port)
                    continue
                keys, generation = item
                values = []
                for port, key in keys:
                    value = store_barrier.await_value(connection(port), key, self._wait_s)
                    if value is None:
                        break
                    values.append(value)
                else:
                    self._report(generation, values, time.monotonic())
            except Exception:  # noqa: BLE001 - the store is gone (shutdown, a full restart): agents' messages remain
                connections = {}


class RecoveryWatch:
    """`use_store` when a generation gets new stores (connects ahead of any recovery); `follow` each published
    generation. Callbacks run on the watch's threads, with the monotonic time the (last) key arrived."""

    def __init__(self, host: str, wait_s: float, on_acknowledged: Callable[[int, float], None],
                 on_released: Callable[[int, str, float], None]) -> None:
        def acknowledged(generation: int, values: list[bytes], now: float) -> None:
            if all(value == generation_notice.ALL_ACKED for value in values):  # none superseded
                on_acknowledged(generation, now)

        self._acknowledgements = _KeyWatch(host, "all_acked", wait_s, acknowledged)
        self._releases = _KeyWatch(host, "released", wait_s,
                                   lambda generation, values, now: on_released(generation, values[0].decode(), now))

    def use_store(self, port: int, shard_ports: Sequence[int] = ()) -> None:
        """The job's store is at `port`, its shards' (the first may be the job's) at `shard_ports`."""
        self._acknowledgements.use(shard_ports or [port])
        self._releases.use([port])

    def follow(self, port: int, generation: int, acknowledging: Sequence[tuple[int, int]] = ((0, 0),),
               shards: int = 1) -> None:
        """Wait for `generation`'s acknowledgements on each (store port, shard index) of `acknowledging` (the shards
        any agent was told through the notice on: none, when `acknowledging` is empty; one shard, at `port`, by
        default), then for its release on the job's store at `port`."""
        if acknowledging:
            self._acknowledgements.put(
                [(shard_port or port, shard_key(generation, "all_acked", index, shards))
                 for shard_port, index in acknowledging], generation)
        self._releases.put([(port, barrier_key(generation, "released"))], generation)

    def close(self) -> None:
        self._acknowledgements.close()
        self._releases.close()
