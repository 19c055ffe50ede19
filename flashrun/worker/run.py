"""The fault-tolerant training loop: `flashrun.init()` and the `Run` it returns.

    run = flashrun.init()                      # instead of dist.init_process_group(...)
    model = run.ddp(model)                     # instead of DistributedDataParallel(model)
    run.track(model=model, optimizer=opt)      # what a healthy replica hands to a replaced one
    for step in run.steps(total):              # resumes at the right step after a recovery
        ...
        run.all_reduce(loss)                   # the script's own collectives, abortable

Under flashrun a failure elsewhere in the job never reaches the script as an exception: the step in flight is
abandoned (its optimizer update skipped), the process group is rebuilt in place, state comes from the most
advanced replica, and the loop yields the first step that replica had not completed. Under torchrun or plain
python the same calls fall back to ordinary torch.distributed.
"""

from __future__ import annotations

import inspect
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from flashrun.config import GENERATION_BARRIER_S
from flashrun.errors import EXIT_UNRECOVERABLE
from flashrun.worker import drills, replica
from flashrun.worker.abort import Aborter
from flashrun.worker.collectives import untracked
from flashrun.worker.group import Superseded, abandon_group, join_generation
from flashrun.worker.link import REPLACEMENT_ENV, AgentLink, attach_if_launched, beat_now, mark_finished
from flashrun.worker.progress import RecoveryReport, progress

RECOVERY_WAIT_S = 120.0
"""How long a worker whose step failed waits for the coordinator's new generation before giving up (the
coordinator escalates much sooner by replacing it)."""
CHECKPOINT_NAME = "flashrun-latest.pt"
_DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


class Unrecoverable(SystemExit):
    def __init__(self, message: str) -> None:
        print(f"flashrun: {message}", file=sys.stderr, flush=True)
        super().__init__(EXIT_UNRECOVERABLE)


class _ReplicatedModel(nn.Module):
    """What `run.ddp()` returns: DDP whose gradient all-reduce can be aborted, rebuilt after each recovery."""

    def __init__(self, run: Run, module: nn.Module, ddp_kwargs: dict[str, Any], init_sync: bool) -> None:
        super().__init__()
        self.module = module
        self._run = run
        self._ddp_kwargs = ddp_kwargs
        self._outstanding = 0
        self.rebuild(init_sync)

    def rebuild(self, init_sync: bool) -> None:
        # The old DDP (and its reducer's autograd hooks) goes with the failed generation's process group.
        self.__dict__.pop("_ddp", None)
        ddp = DistributedDataParallel(self.module, init_sync=init_sync, **self._ddp_kwargs)
        ddp.register_comm_hook(None, self._hook)
        self.__dict__["_ddp"] = ddp  # not a submodule: state_dict() keys stay those of `module`

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_ddp"](*args, **kwargs)

    # No annotations: DDP checks them at registration and `from __future__ import annotations` turns them into
    # strings it rejects.
    def _hook(self, _state, bucket):  # noqa: ANN001, ANN202
        aborter = self._run.aborter
        tensor = bucket.buffer()
        if aborter.failed.is_set():
            return aborter.own(None, lambda: tensor, lambda: tensor)
        tensor.div_(dist.get_world_size())
        if self._outstanding == 0:
            progress.enter("ddp_allreduce")
        self._outstanding += 1
        work = untracked("all_reduce")(tensor, async_op=True)

        def settled(fut: torch.futures.Future) -> torch.Tensor:
            self._outstanding -= 1
            if self._outstanding == 0:
                progress.leave()
            return fut.value()

        # On abort the bucket keeps its local values: the step is marked failed and its update is skipped.
        return aborter.own(work, lambda: tensor, lambda: tensor).then(settled)


class Run:
    def __init__(self, backend: str, managed: bool) -> None:
        self.backend = backend
        self.managed = managed
        """True under flashrun: failures are recovered in place. False: plain torch.distributed."""
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" \
            else torch.device("cpu")
        self.generation = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self.aborter = Aborter(self.generation)
        self.tracked = replica.Tracked()
        self.models: list[_ReplicatedModel] = []
        self.applied_step = -1
        """The last step whose optimizer update this process applied."""
        self._current_step = -1
        self._graveyard: list[Any] = []
        self._replacement_spawned_at = float(os.environ.get(REPLACEMENT_ENV, "0") or 0)
        self._store: Any = None
        self._link: AgentLink | None = None
        self._checkpoint: tuple[int, str] | None = None
        self._resumed_at = -1

    # Set-up -------------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        if not self.managed:
            dist.init_process_group(self.backend)
            return
        self._store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), self.world_size,
                                    is_master=False, wait_for_workers=False)
        link = attach_if_launched()
        assert link is not None
        link.set_command_handler(self.aborter.command)
        self._link = link
        while True:
            try:
                join_generation(self._store, link, self.generation, self.rank, self.world_size, self.backend,
                                self.aborter, GENERATION_BARRIER_S)
                break
            except Superseded:
                # A replacement can be spawned for a generation that another failure supersedes before it formed:
                # it joins the newer one, as every other rank does. (Exiting counted as a crash and started yet
                # another recovery, which superseded the next replacement in turn: a crash loop, seen in CI.)
                if not self._replacement_spawned_at:
                    raise
                self.generation = self._newer_generation(self.generation)
        if not self._replacement_spawned_at:
            progress.generation = self.generation

    def ddp(self, module: nn.Module, **ddp_kwargs: Any) -> nn.Module:
        """Wrap `module` for data-parallel training: DDP underneath, with an abortable gradient all-reduce."""
        if not self.managed:
            return DistributedDataParallel(module, **ddp_kwargs)
        # Buffers are not re-broadcast each forward: that collective could not be aborted.
        quiet = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMETERS else "broadcast_buffers"
        ddp_kwargs.setdefault(quiet, False)
        if self.device.type == "cuda":
            ddp_kwargs.setdefault("device_ids", [self.device.index])
        model = _ReplicatedModel(self, module, ddp_kwargs, init_sync=not self._replacement_spawned_at)
        self.models.append(model)
        return model

    def track(self, **objects: Any) -> None:
        """Register what a replica hands over: anything with state_dict()/load_state_dict(). An optimizer's
        step() is wrapped so that the update of a failed step is skipped."""
        for name, obj in objects.items():
            self.tracked.objects[name] = obj.module if isinstance(obj, _ReplicatedModel) else obj
            if isinstance(obj, torch.optim.Optimizer) and self.managed:
                self._guard_optimizer(obj)

    def checkpoint(self, every: int, dir: str) -> None:  # noqa: A002 - the documented keyword
        """Fallback for when no replica survives (world size 1, or every replica lost): rank 0 saves the tracked
        state every `every` steps under `dir`, atomically."""
        self._checkpoint = (every, dir)

    def _guard_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        original = optimizer.step

        def step(*args: Any, **kwargs: Any) -> Any:
            if self.aborter.failed.is_set():
                return None  # gradients of a failed step were not averaged: never apply them
            result = original(*args, **kwargs)
            self.applied_step = self._current_step
            return result

        optimizer.step = step  # type: ignore[method-assign]

    # The loop -----------------------------------------------------------------------------------------------

    def steps(self, total: int, start: int = 0) -> Iterator[int]:
        """Yield step numbers from `start` (or where the job stands) to `total` - 1, recovering in between."""
        if not self.managed:
            yield from range(start, total)
            return
        progress.recoverable = True
        step = start
        if self._replacement_spawned_at:
            step = self._recover(replacement=True)
        elif self.generation > 0 and self._checkpoint:
            step = self._restore_checkpoint(start)
        while step < total:
            self._current_step = step
            drills.fire_due(step, self.rank)  # `flashrun inject`: a fault as if this step's code had one
            rng = replica.rng_state()
            yield step
            if self.aborter.failed.is_set():
                replica.set_rng_state(rng)  # the step is redone (or skipped) from where it began
                step = self._recover(replacement=False)
                continue
            progress.step = step
            self.applied_step = max(self.applied_step, step)
            self._maybe_checkpoint(step)
            if step == self._resumed_at:
                beat_now()  # the recovery timeline ends with this step
            step += 1
        mark_finished()

    def all_reduce(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> bool:
        """torch.distributed.all_reduce that a failure elsewhere cannot block: False if the step failed."""
        if not self.managed:
            dist.all_reduce(tensor, op)
            return True
        if self.aborter.failed.is_set():
            return False
        progress.enter("all_reduce")
        try:
            return self.aborter.wait_work(untracked("all_reduce")(tensor, op, async_op=True))
        finally:
            progress.leave()

    # Recovery -----------------------------------------------------------------------------------------------

    def _recover(self, replacement: bool) -> int:
        """Move to the newest generation: rebuild the process group, take state from a replica; returns the step
        to run next."""
        left_step = time.monotonic()
        # The abort phase: from the failure (a peer's error or the coordinator's command) to leaving the step.
        abort_s = left_step - self.aborter.failed_at if self.aborter.failed.is_set() else 0.0
        report = RecoveryReport()
        if replacement:
            report.start_s = max(0.0, time.time() - self._replacement_spawned_at)
        attempted = self.generation if not replacement else self.generation - 1
        while True:
            target = self._newer_generation(attempted) if not replacement else self.generation
            attempted = target
            report.abort_s = 0.0 if replacement else abort_s
            began = time.monotonic()
            try:
                if not replacement:
                    abandon_group(self._graveyard)
                    join_generation(self._store, self._link, target, self.rank, self.world_size, self.backend,
                                    self.aborter, GENERATION_BARRIER_S)
                if not self.aborter.settle(target):
                    raise Superseded
                self.generation = target
                for model in self.models:
                    model.rebuild(init_sync=False)
                report.rebuild_s = time.monotonic() - began
                began = time.monotonic()
                resume, source = self._sync(replacement)
                report.sync_s = time.monotonic() - began
            except (Superseded, InterruptedError, RuntimeError) as err:
                # A second failure while recovering: wait for the generation that answers it, like any other rank.
                if not isinstance(err, Superseded):
                    print(f"flashrun: rank {self.rank}: recovery to generation {target} failed ({err}); waiting "
                          "for the next one", file=sys.stderr, flush=True)
                replacement = False
                continue
            for group in self.tracked.objects.values():
                if isinstance(group, torch.optim.Optimizer):
                    group.zero_grad(set_to_none=True)
            report.generation, report.resume_step, report.source_rank = target, resume, source
            progress.recovery = report
            progress.generation = target
            progress.step = resume - 1
            self._resumed_at = resume
            beat_now()
            return resume

    def _newer_generation(self, than: int) -> int:
        """The generation the coordinator commands after `than` (a failure or a superseded one), once it comes."""
        newer = self.aborter.wait_for_generation(than, RECOVERY_WAIT_S)
        if newer is None:
            raise Unrecoverable(f"rank {self.rank}: no generation newer than {than} came within {RECOVERY_WAIT_S:g} s")
        return newer

    def _sync(self, replacement: bool) -> tuple[int, int]:
        applied = -1 if replacement else self.applied_step
        everyone = replica.exchange_applied(applied, self.world_size, self.device, self.aborter)
        if everyone is None:
            raise InterruptedError("applied-step exchange aborted")
        plan = replica.plan_sync(everyone)
        if plan.best < 0:
            if not self._checkpoint:
                raise Unrecoverable("no replica holds the lost state and the script set no run.checkpoint(): "
                                    "the job cannot continue; relaunch it")
            return self._restore_checkpoint(0), -1
        sends = plan.behind and plan.source == self.rank
        blob = replica.capture(self.tracked, self.applied_step) if sends else None
        received = replica.transfer(plan, self.rank, blob, self.device, self.aborter)
        if received is not None:
            self.applied_step = replica.restore(self.tracked, received, take_rng=replacement)
        return plan.best + 1, plan.source

    def _maybe_checkpoint(self, step: int) -> None:
        if not self._checkpoint or self.rank != 0 or (step + 1) % self._checkpoint[0]:
            return
        directory = self._checkpoint[1]
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, CHECKPOINT_NAME)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(replica.capture(self.tracked, step))
        os.replace(tmp, path)

    def _restore_checkpoint(self, start: int) -> int:
        assert self._checkpoint is not None
        path = os.path.join(self._checkpoint[1], CHECKPOINT_NAME)
        if not os.path.exists(path):
            return start
        with open(path, "rb") as handle:
            self.applied_step = replica.restore(self.tracked, handle.read(), take_rng=True)
        return self.applied_step + 1


def init(backend: str | None = None) -> Run:
    """Create the process group (gloo on CPU, nccl with CUDA) and return the run that steps the training loop."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    managed = attach_if_launched() is not None
    run = Run(backend, managed)
    if backend == "nccl":
        torch.cuda.set_device(run.device)
    run._connect()
    return run
