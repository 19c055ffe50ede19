"""Abandoning a step in flight without an exception reaching the script.

Gloo cannot unblock a collective that waits on a dead or frozen peer (abort, shutdown and destroy all return
without waking it). What can be unblocked is a future the library owns: DDP's communication hook and the library's
own collectives hand out such futures, and an abort completes them at once. The step is then marked failed: the
optimizer step is skipped, and the step loop recovers before it yields another step.

Works are watched by a thread per generation that polls them, never through callbacks on gloo's futures nor a
blocking `wait()`: a collective of an abandoned group may complete much later, even while the interpreter shuts
down, and then a gloo callback into Python segfaults and a thread returning from `wait()` dies of SIGABRT in
pybind11 (both seen). Polling lets an abandoned generation's watcher simply stop.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

_Item = tuple[Any, Callable[[bool], None]]
POLL_FIRST_S = 0.00005
POLL_MAX_S = 0.002
"""A watched work is polled after POLL_FIRST_S, then at doubling intervals up to POLL_MAX_S: fast for the
sub-millisecond collectives of a step, cheap for a long one."""


class _Watcher:
    """Watches works in submission order on one daemon thread, reporting each as completed or failed."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._abandoned = threading.Event()
        threading.Thread(target=self._run, name="flashrun-work-watcher", daemon=True).start()

    def submit(self, work: Any, done: Callable[[bool], None]) -> None:
        self._items.put((work, done))

    def abandon(self) -> None:
        """Its generation is over: stop watching (the futures it served were completed by the abort)."""
        self._abandoned.set()
        self._items.put(None)

    def _run(self) -> None:
        while (item := self._items.get()) is not None:
            work, done = item
            pause = POLL_FIRST_S
            while not work.is_completed():
                if self._abandoned.wait(pause):
                    return
                pause = min(pause * 2, POLL_MAX_S)
            try:
                work.wait()  # completed: returns at once, raising if the collective failed
                ok = True
            except Exception:  # noqa: BLE001 - a peer's failure surfaces here; the step is redone
                ok = False
            done(ok)


class Aborter:
    def __init__(self, generation: int) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._wakers: dict[int, Callable[[], None]] = {}
        self._next_id = 0
        self.target = generation
        """The newest generation the coordinator has commanded."""
        self.failed = threading.Event()
        """Set when the step in flight cannot complete correctly: a peer failed or an abort arrived."""
        self.failed_at = 0.0
        """time.monotonic() when `failed` was set: the abort phase runs from here until the step is left."""
        self._epoch = 0
        """Advances whenever a new generation is settled: works of older epochs can no longer fail a step."""
        self._watcher = _Watcher()

    def command(self, generation: int) -> None:
        """The agent relays a new generation: abandon the step in flight."""
        with self._lock:
            if generation <= self.target:
                return
            self.target = generation
            self._fail()
            wakers = list(self._wakers.values())
            self._changed.notify_all()
        for wake in wakers:
            wake()

    def _peer_failed(self, epoch: int) -> None:
        """A collective raised (a direct peer died): the step is lost, the new generation will follow."""
        with self._lock:
            if epoch != self._epoch:
                return  # a collective of an abandoned group finally failed: old news
            self._fail()
            wakers = list(self._wakers.values())
        for wake in wakers:
            wake()

    def _fail(self) -> None:
        if not self.failed.is_set():
            self.failed_at = time.monotonic()
            self.failed.set()

    def wait_for_generation(self, newer_than: int, timeout_s: float) -> int | None:
        with self._lock:
            self._changed.wait_for(lambda: self.target > newer_than, timeout_s)
            return self.target if self.target > newer_than else None

    def settle(self, generation: int) -> bool:
        """Clear the failure once `generation` is in place, unless an even newer one was commanded meanwhile."""
        with self._lock:
            if self.target != generation:
                return False
            self.failed.clear()
            self._epoch += 1
            self._watcher.abandon()
            self._watcher = _Watcher()
            return True

    # Works --------------------------------------------------------------------------------------------------

    def own(self, work: Any, on_success: Callable[[], object], on_abort: Callable[[], object]) -> torch.futures.Future:
        """A future completed with `on_success()` when `work` completes, or with `on_abort()` when the step fails:
        never with an exception."""
        ours: torch.futures.Future = torch.futures.Future()
        lock = threading.Lock()

        def complete(value: Callable[[], object]) -> None:
            with lock:
                if not ours.done():
                    ours.set_result(value())

        with self._lock:
            epoch, watcher = self._epoch, self._watcher
        waker_id = self._add_waker(lambda: complete(on_abort))
        if self.failed.is_set():  # checked after registering, so an abort in between is not missed
            self._remove_waker(waker_id)
            complete(on_abort)
            return ours

        def finished(ok: bool) -> None:
            self._remove_waker(waker_id)
            if not ok:
                self._peer_failed(epoch)
            complete(on_success if ok else on_abort)

        if work is None:
            finished(True)
        else:
            watcher.submit(work, finished)
        return ours

    def wait_work(self, work: Any) -> bool:
        """Block until a torch.distributed Work completes (True) or the step fails (False)."""
        ours = self.own(work, lambda: True, lambda: False)
        done = threading.Event()
        ours.add_done_callback(lambda _: done.set())
        done.wait()
        return bool(ours.value()) and not self.failed.is_set()

    def _add_waker(self, wake: Callable[[], None]) -> int:
        with self._lock:
            self._next_id += 1
            self._wakers[self._next_id] = wake
            return self._next_id

    def _remove_waker(self, waker_id: int) -> None:
        with self._lock:
            self._wakers.pop(waker_id, None)
