"""Rank FAIL_RANK raises in every attempt below FAIL_ATTEMPTS; everyone else (and later attempts) succeed.

Usage: fail_probe.py FAIL_RANK FAIL_ATTEMPTS
"""

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record


@record
def main() -> None:
    fail_rank, fail_attempts = int(sys.argv[1]), int(sys.argv[2])
    rank, attempt = int(os.environ["RANK"]), int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if rank == fail_rank and attempt < fail_attempts:
        raise ValueError(f"injected failure on rank {rank} attempt {attempt}")
    print(f"rank {rank} attempt {attempt} ok", flush=True)


main()
