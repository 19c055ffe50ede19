"""A flashrun-library training loop that misbehaves on request: the fault-injection probe.

Usage: fault_probe.py DIR STEPS [--fault-rank R --fault-step S --fault {loop,raise}]
Each rank writes DIR/<rank>.pid, then all-reduces once per step (the step takes ~50 ms) and writes its step to
DIR/<rank>.step. `loop` spins in Python before the step's collective; `raise` raises an exception.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

import flashrun

parser = argparse.ArgumentParser()
parser.add_argument("dir")
parser.add_argument("steps", type=int)
parser.add_argument("--fault-rank", type=int, default=-1)
parser.add_argument("--fault-step", type=int, default=-1)
parser.add_argument("--fault", choices=["loop", "raise"], default="loop")
args = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
with open(os.path.join(args.dir, f"{rank}.pid"), "w") as handle:
    handle.write(str(os.getpid()))
for step in flashrun.steps(args.steps):
    if rank == args.fault_rank and step == args.fault_step:
        if args.fault == "raise":
            raise RuntimeError(f"injected exception at step {step}")
        while True:
            pass
    value = torch.ones(1)
    dist.all_reduce(value)
    time.sleep(0.05)
    with open(os.path.join(args.dir, f"{rank}.step"), "w") as handle:
        handle.write(str(step))
dist.destroy_process_group()
