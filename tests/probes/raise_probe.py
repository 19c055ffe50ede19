"""Joins a gloo group (so torch.distributed wraps sys.excepthook, as in training), registers an exit handler, raises.

A flashrun worker must still print torch's "[rankN]:"-prefixed traceback, run the exit handler (it writes
DIR/<rank>.atexit), keep what the script wrote to a file it left open (DIR/<rank>.log) and exit with Python's code 1.

Usage: raise_probe.py DIR
"""

import atexit
import os
import sys

import torch.distributed as dist

import flashrun  # noqa: F401  (installs the worker's crash handling under the flashrun launcher)

directory, rank = sys.argv[1], os.environ["RANK"]
dist.init_process_group("gloo")
atexit.register(lambda: open(os.path.join(directory, f"{rank}.atexit"), "w").close())
log = open(os.path.join(directory, f"{rank}.log"), "w")  # noqa: SIM115 - left open, as scripts do
log.write("written before the crash, never flushed\n")
raise ValueError(f"injected failure on rank {rank}")
