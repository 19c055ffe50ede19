"""All-reduces rank+1 over gloo and prints `rank <r> world <w> sum <s>`: proof that a world formed."""

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
value = torch.tensor([rank + 1.0])
dist.all_reduce(value)
print(f"rank {rank} world {world} sum {value.item():g}", flush=True)
dist.destroy_process_group()
