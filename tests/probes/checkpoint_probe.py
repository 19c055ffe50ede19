"""A deterministic one-rank job using flashrun's checkpoint fallback (no replica can hold its state).

Usage: checkpoint_probe.py OUT_FILE STEPS CHECKPOINT_DIR|-   ('-': no checkpoint). Rank 0 writes the final
weights to OUT_FILE and prints `step <i>` per step; the step index seeds its batch, so redone steps are identical.
"""

import sys
import time

import torch

import flashrun

out_file, total, checkpoint_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
run = flashrun.init()
model = torch.nn.Linear(8, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
ddp = run.ddp(model)
run.track(model=model, optimizer=optimizer)
if checkpoint_dir != "-":
    run.checkpoint(every=5, dir=checkpoint_dir)
for step in run.steps(total):
    data = torch.Generator().manual_seed(step)
    x = torch.randn(16, 8, generator=data)
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(ddp(x), x.sum(dim=1, keepdim=True)).backward()
    optimizer.step()
    print(f"step {step}", flush=True)
    time.sleep(0.05)
torch.save(model.state_dict(), out_file)
