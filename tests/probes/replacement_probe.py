"""Records how this worker process looks to itself, then trains a trivial loop with flashrun's step loop.

Usage: replacement_probe.py OUT_DIR STEPS. Each process writes OUT_DIR/<rank>-<pid>.json, so a replacement
(forked from the zygote or spawned) can be compared with the process it replaced.
"""

import json
import os
import random
import resource
import signal
import sys
import time

import torch

import flashrun

out_dir, total = sys.argv[1], int(sys.argv[2])
with open(f"/proc/{os.getppid()}/cmdline", "rb") as handle:
    parent = handle.read().replace(b"\0", b" ").decode()
with open(f"/proc/{os.getppid()}/limits") as handle:
    parent_open_files = next(int(line.split()[3]) for line in handle if line.startswith("Max open files"))
record = {
    "env": dict(os.environ),
    "argv": sys.argv,
    "executable": sys.executable,
    "path0": sys.path[0],
    "name": __name__,
    "cwd": os.getcwd(),
    "own_session": os.getsid(0) == os.getpid() and os.getpgid(0) == os.getpid(),
    "handlers": {name: str(signal.getsignal(getattr(signal, name))) for name in ("SIGINT", "SIGTERM", "SIGHUP")},
    "random": random.random(),
    "torch_seed": torch.initial_seed(),
    "stdin_is_devnull": os.path.samestat(os.fstat(0), os.stat(os.devnull)),
    "parent": parent,
    "open_files": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    "parent_open_files": parent_open_files,
}
tmp = os.path.join(out_dir, f".{os.getpid()}.tmp")
with open(tmp, "w") as handle:
    json.dump(record, handle)
os.replace(tmp, os.path.join(out_dir, f"{os.environ['RANK']}-{os.getpid()}.json"))

run = flashrun.init()
model = run.ddp(torch.nn.Linear(4, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
run.track(model=model, optimizer=optimizer)
for _step in run.steps(total):
    optimizer.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    time.sleep(0.05)
