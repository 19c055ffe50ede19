"""The state a data-parallel replica hands over, and the transfer from up-to-date replicas to the ones behind.

After a failure, ranks may disagree by one step: some applied the step's optimizer update before the failure hit,
some did not, and a replacement has nothing. Every rank shares the index of its last applied step; the most
advanced ones are the sources, and each rank behind them receives a source's state point to point.
"""

from __future__ import annotations

import ctypes
import dataclasses
import io
import random
from typing import Any

import torch

from flashrun.worker.abort import Aborter
from flashrun.worker.collectives import untracked


@dataclasses.dataclass
class Tracked:
    """What `run.track()` registered: every object with `state_dict()`/`load_state_dict()` (model, optimizer,
    scheduler, sampler, ...)."""

    objects: dict[str, Any] = dataclasses.field(default_factory=dict)


def capture(tracked: Tracked, applied_step: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({
        "applied_step": applied_step,
        "objects": {name: obj.state_dict() for name, obj in tracked.objects.items()},
        "rng": rng_state(),
    }, buffer)
    return buffer.getvalue()


def restore(tracked: Tracked, blob: bytes, take_rng: bool) -> int:
    state = torch.load(io.BytesIO(blob), weights_only=False)
    for name, obj in tracked.objects.items():
        obj.load_state_dict(state["objects"][name])
    if take_rng:
        set_rng_state(state["rng"])
    return int(state["applied_step"])


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    applied: tuple[int, ...]
    """Each rank's last applied step (-1: no state)."""
    source: int
    """The replica whose state is used: the lowest rank among the most advanced."""
    behind: tuple[int, ...]
    """The ranks that must take the source's state."""

    @property
    def best(self) -> int:
        return max(self.applied)


def plan_sync(applied: list[int]) -> SyncPlan:
    """Pure: whose state wins, and who needs it."""
    best = max(applied)
    return SyncPlan(tuple(applied), applied.index(best), tuple(r for r, step in enumerate(applied) if step < best))


def exchange_applied(applied_step: int, world_size: int, device: torch.device, aborter: Aborter) -> list[int] | None:
    mine = torch.tensor([applied_step], dtype=torch.int64, device=device)
    everyone = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    work = untracked("all_gather")(everyone, mine, async_op=True)
    if not aborter.wait_work(work):
        return None
    return [int(t.item()) for t in everyone]


def transfer(plan: SyncPlan, rank: int, blob: bytes | None, device: torch.device, aborter: Aborter) -> bytes | None:
    """Broadcast the source's state; returns it on the ranks behind (None elsewhere).

    A broadcast rather than point-to-point sends: gloo's send/recv can only be waited for by blocking, which a
    second failure could turn into a wait forever; a collective can be watched and abandoned like any other.
    """
    if not plan.behind:
        return None
    size = torch.tensor([len(blob) if rank == plan.source and blob is not None else 0], dtype=torch.int64,
                        device=device)
    if not aborter.wait_work(untracked("broadcast")(size, plan.source, async_op=True)):
        raise InterruptedError("state transfer aborted")
    if rank == plan.source:
        assert blob is not None
        payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    else:
        payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    if not aborter.wait_work(untracked("broadcast")(payload, plan.source, async_op=True)):
        raise InterruptedError("state transfer aborted")
    if rank not in plan.behind:
        return None
    payload = payload.cpu()
    return ctypes.string_at(payload.data_ptr(), payload.numel())  # a memcpy; numpy may be absent
