"""Abandoning a step in flight without an exception reaching the script.

Gloo cannot unblock a collective that waits on a dead or frozen peer (abort, shutdown and destroy all return
without waking it). What can be unblocked is a future the library owns: DDP's communication hook and the library's
own collectives hand out such futures, and an abort completes them at once. The step is then marked failed: the
optimizer step is skipped, and the step loop recovers before it yields another step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch


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

    def command(self, generation: int) -> None:
        """The agent relays a new generation: abandon the step in flight."""
        with self._lock:
            if generation <= self.target:
                return
            self.target = generation
            self.failed.set()
            wakers = list(self._wakers.values())
            self._changed.notify_all()
        for wake in wakers:
            wake()

    def peer_failed(self) -> None:
        """A collective raised (a direct peer died): the step is lost, the new generation will follow."""
        with self._lock:
            self.failed.set()
            wakers = list(self._wakers.values())
        for wake in wakers:
            wake()

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
            return True

    # Futures and waits --------------------------------------------------------------------------------------

    def own(self, work_future: torch.futures.Future, on_abort: Callable[[], object]) -> torch.futures.Future:
        """A future completed by `work_future`, or by an abort with `on_abort()`'s value: never with an exception."""
        ours: torch.futures.Future = torch.futures.Future()
        lock = threading.Lock()

        def complete(value: Callable[[], object]) -> None:
            with lock:
                if not ours.done():
                    ours.set_result(value())

        waker_id = self._add_waker(lambda: complete(on_abort))
        if self.failed.is_set():  # checked after registering, so an abort in between is not missed
            self._remove_waker(waker_id)
            complete(on_abort)
            return ours

        def finished(fut: torch.futures.Future) -> None:
            self._remove_waker(waker_id)
            try:
                result = fut.value()
            except Exception:  # noqa: BLE001 - a peer's failure surfaces here; the step is redone
                self.peer_failed()
                complete(on_abort)
                return
            complete(lambda: result)

        work_future.add_done_callback(finished)
        return ours

    def wait_work(self, work: Any) -> bool:
        """Block until a torch.distributed Work completes (True) or the step fails (False).

        Gloo's point-to-point works have no future: those are waited for on a helper thread, which an abort
        leaves behind, blocked, exactly like the collective it waits for.
        """
        try:
            work_future = work.get_future()
        except RuntimeError:
            work_future = torch.futures.Future()

            def wait_in_thread() -> None:
                try:
                    work.wait()
                    work_future.set_result(None)
                except Exception as err:  # noqa: BLE001 - handed to the future's waiter
                    work_future.set_exception(err)

            threading.Thread(target=wait_in_thread, name="flashrun-p2p-wait", daemon=True).start()
        ours = self.own(work_future, lambda: None)
        done = threading.Event()
        ours.add_done_callback(lambda _: done.set())
        done.wait()
        return not self.failed.is_set() and work_future.done() and not _raised(work_future)

    def _add_waker(self, wake: Callable[[], None]) -> int:
        with self._lock:
            self._next_id += 1
            self._wakers[self._next_id] = wake
            return self._next_id

    def _remove_waker(self, waker_id: int) -> None:
        with self._lock:
            self._wakers.pop(waker_id, None)


def _raised(future: torch.futures.Future) -> bool:
    try:
        future.value()
    except Exception:  # noqa: BLE001
        return True
    return False
