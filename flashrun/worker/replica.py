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
import torch.distributed as dist

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
    transfers: tuple[tuple[int, int], ...]
    """(source, destination) pairs."""

    @property
    def best(self) -> int:
        return max(self.applied)


def plan_sync(applied: list[int]) -> SyncPlan:
    """Pure: who sends to whom. Sources are spread over the ranks behind, round robin."""
    best = max(applied)
    sources = [rank for rank, step in enumerate(applied) if step == best]
    behind = [rank for rank, step in enumerate(applied) if step < best]
    return SyncPlan(tuple(applied), tuple((sources[i % len(sources)], rank) for i, rank in enumerate(behind)))


def exchange_applied(applied_step: int, world_size: int, device: torch.device, aborter: Aborter) -> list[int] | None:
    mine = torch.tensor([applied_step], dtype=torch.int64, device=device)
    everyone = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world_size)]
    work = untracked("all_gather")(everyone, mine, async_op=True)
    if not aborter.wait_work(work):
        return None
    return [int(t.item()) for t in everyone]


def transfer(plan: SyncPlan, rank: int, blob: bytes | None, device: torch.device, aborter: Aborter) -> bytes | None:
    """Send our state to the ranks assigned to us, or receive ours; returns what we received (None if nothing)."""
    received = None
    for source, destination in plan.transfers:
        if rank == source:
            assert blob is not None
            payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
            for tensor in (torch.tensor([payload.numel()], dtype=torch.int64, device=device), payload):
                if not aborter.wait_work(dist.isend(tensor, destination)):
                    raise InterruptedError("state transfer aborted")
        elif rank == destination:
            size = torch.zeros(1, dtype=torch.int64, device=device)
            if not aborter.wait_work(dist.irecv(size, source)):
                raise InterruptedError("state transfer aborted")
            payload = torch.empty(int(size.item()), dtype=torch.uint8, device=device).cpu()
            if not aborter.wait_work(dist.irecv(payload, source)):
                raise InterruptedError("state transfer aborted")
            received = ctypes.string_at(payload.data_ptr(), payload.numel())  # a memcpy; numpy may be absent
    return received
