"""flashrun's example training script: a small, deterministic DDP job that runs unchanged under torchrun and flashrun.

An MLP (32 -> 64 -> 1) learns a fixed random linear target. Each step's global batch is generated from
(--seed, step), and every rank trains on its own slice of it, so a run's losses and final weights depend only on
the seed, the step count and the world size. Rank 0 prints `step <i> loss <value>` per step (the mean over ranks)
and, with --out, saves the final `state_dict()` of the unwrapped model.

With --checkpoint-dir and --checkpoint-every N, rank 0 atomically saves {model, optimizer, step} every N steps,
and a (re)started job resumes from the step after the latest checkpoint, giving the same result as an
uninterrupted run.

    torchrun --standalone --nproc-per-node 4 scripts/examples/train_ddp.py --steps 20
    flashrun --standalone --nproc-per-node 4 scripts/examples/train_ddp.py --steps 20
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import flashrun

IN_FEATURES, HIDDEN, GLOBAL_BATCH = 32, 64, 64
CHECKPOINT_NAME = "latest.pt"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="number of optimizer steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, the target and the data")
    parser.add_argument("--step-time", type=float, default=0.0, help="seconds to sleep per step (emulate work)")
    parser.add_argument("--out", default=None, help="rank 0 saves the final model state_dict here")
    parser.add_argument("--checkpoint-dir", default=None, help="where rank 0 keeps the latest checkpoint")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    parser.add_argument("--inject-hang", default=None, metavar="RANK:STEP",
                        help="fault drill: RANK spins forever in Python at STEP, before the loss all-reduce")
    parser.add_argument("--inject-exception", default=None, metavar="RANK:STEP",
                        help="fault drill: RANK raises at STEP, after its backward pass")
    return parser.parse_args()


def batch(seed: int, step: int, rank: int, world_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of step `step`'s global batch: the same numbers on every launcher and every run."""
    target = torch.Generator().manual_seed(seed)
    true_weight = torch.randn(IN_FEATURES, 1, generator=target)
    data = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(GLOBAL_BATCH, IN_FEATURES, generator=data)
    y = x @ true_weight + 0.01 * torch.randn(GLOBAL_BATCH, 1, generator=data)
    shard = torch.tensor_split(torch.arange(GLOBAL_BATCH), world_size)[rank]
    return x[shard].to(device), y[shard].to(device)


def drill(spec: str | None, rank: int) -> int:
    """The step at which this rank misbehaves, from RANK:STEP; -1 when the drill is for another rank."""
    if not spec:
        return -1
    drill_rank, drill_step = (int(part) for part in spec.split(":"))
    return drill_step if drill_rank == rank else -1


def save_checkpoint(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Write to a temporary file, then rename: a crash mid-save never leaves a torn checkpoint behind."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CHECKPOINT_NAME)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
    os.replace(tmp, path)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # needed by deterministic cuBLAS
    run = flashrun.init()  # the process group: nccl with CUDA, else gloo
    device = run.device
    torch.use_deterministic_algorithms(True)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(IN_FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first_step = 0
    if args.checkpoint_dir and os.path.exists(os.path.join(args.checkpoint_dir, CHECKPOINT_NAME)):
        # Every rank loads before DDP's first collective, so rank 0 cannot overwrite the file meanwhile.
        state = torch.load(os.path.join(args.checkpoint_dir, CHECKPOINT_NAME), map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first_step = state["step"] + 1
        if rank == 0:
            print(f"resumed from step {state['step']}", flush=True)
    ddp = run.ddp(model)
    run.track(model=model, optimizer=optimizer)

    # Drills fire in the first process only: a replacement started after the fault runs normally.
    first_process = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    hang_at = drill(args.inject_hang, rank) if first_process else -1
    raise_at = drill(args.inject_exception, rank) if first_process else -1
    # Under flashrun the loop recovers from failures in place; under torchrun it is a plain range().
    for step in run.steps(args.steps, start=first_step):
        x, y = batch(args.seed, step, rank, world_size, device)
        loss = nn.functional.mse_loss(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == raise_at:
            raise RuntimeError(f"injected exception on rank {rank} at step {step}")
        mean_loss = loss.detach().clone()
        while step == hang_at:
            pass  # a hang in Python: the peers wait in the all-reduce below
        run.all_reduce(mean_loss)
        if rank == 0:
            print(f"step {step} loss {mean_loss.item() / world_size:.6f}", flush=True)
        if args.step_time > 0:
            time.sleep(args.step_time)
        if rank == 0 and args.checkpoint_dir and args.checkpoint_every > 0 and (step + 1) % args.checkpoint_every == 0:
            save_checkpoint(args.checkpoint_dir, model, optimizer, step)

    if rank == 0 and args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save(model.state_dict(), args.out)
    # DDP holds the process group; destroying the group first lets gloo's threads be torn down during interpreter
    # exit, which aborts the process now and then ("terminate called without an active exception", torch 2.13).
    del ddp
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
