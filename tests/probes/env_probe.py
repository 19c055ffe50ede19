"""Writes the worker's environment to OUT_DIR/<RANK>.json: the launcher-parity probe."""

import json
import os
import sys

out_dir = sys.argv[1]
record = {
    "env": dict(os.environ),
    "argv": sys.argv,
    "executable": sys.executable,
    "flags_unbuffered": not sys.stdout.line_buffering,
}
with open(os.path.join(out_dir, f"{os.environ['RANK']}.json"), "w") as handle:
    json.dump(record, handle)
