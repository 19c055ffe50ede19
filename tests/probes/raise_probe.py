"""Imports flashrun, leaves a non-daemon thread blocked forever, registers an exit handler, then raises.

Plain Python would print the traceback and then wait on that thread for ever; a flashrun worker must still exit
with code 1 at once, after running the exit handlers (which write DIR/<rank>.atexit).

Usage: raise_probe.py DIR
"""

import atexit
import os
import sys
import threading

import flashrun  # noqa: F401  (installs the worker's crash handling under the flashrun launcher)

directory, rank = sys.argv[1], os.environ["RANK"]
atexit.register(lambda: open(os.path.join(directory, f"{rank}.atexit"), "w").close())
threading.Thread(target=threading.Event().wait, name="never-ends").start()
raise ValueError(f"injected failure on rank {rank}")
