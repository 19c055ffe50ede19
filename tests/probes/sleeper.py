"""Announces itself in DIR/<rank>.pid, then sleeps until signalled; records the signal in DIR/<rank>.signal.

Usage: sleeper.py DIR [--ignore-term]   (with --ignore-term it survives SIGTERM, so only SIGKILL stops it)
"""

import os
import signal
import sys
import threading

directory = sys.argv[1]
rank = os.environ["RANK"]
stop = threading.Event()


def record(signum: int, _frame: object) -> None:
    with open(os.path.join(directory, f"{rank}.signal"), "w") as handle:
        handle.write(signal.Signals(signum).name)
    if "--ignore-term" not in sys.argv:
        stop.set()


for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, record)
tmp = os.path.join(directory, f"{rank}.pid.tmp")
with open(tmp, "w") as handle:
    handle.write(str(os.getpid()))
os.replace(tmp, os.path.join(directory, f"{rank}.pid"))
print(f"rank {rank} sleeping", flush=True)
while not stop.wait(0.1):
    pass
sys.exit(0 if "--ignore-term" in sys.argv else 143)
