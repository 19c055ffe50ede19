"""The pre-warmed zygote: a process that has imported torch and waits to fork replacement workers.

Run as a plain script (`python -u zygote_main.py SOCKET_FD [MODULE ...]`), never imported: it must not load the
flashrun package, gRPC or anything that starts threads, so that a fork of it is safe and the child imports
flashrun afresh (which opens the child's own connection to the agent). It only uses the standard library.

Protocol, one SOCK_SEQPACKET message each, JSON:
  agent -> zygote: {"op": "spawn", "id": N, "argv": [...], "env": {...}, "cwd": "..."} with stdout and stderr
                   write ends attached (SCM_RIGHTS)
  zygote -> agent: {"op": "ready"} once the imports are done; {"op": "spawned", "id": N, "pid": P};
                   {"op": "exited", "pid": P, "code": C} (C < 0: killed by signal -C); {"op": "error", ...}
"""

import ctypes
import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import sys

PR_SET_PDEATHSIG = 1
MAX_MESSAGE = 1 << 20


def die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def become_worker(request: dict, out_fd: int, err_fd: int) -> None:
    """In the forked child: turn into `python -u SCRIPT ARGS` (or `-m MODULE`) as a fresh spawn would be."""
    os.setsid()
    die_with_parent()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (devnull, out_fd, err_fd):
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # A fresh interpreter seeds both generators from the OS; a fork would otherwise share the zygote's state.
    random.seed()
    sys.modules["torch"].seed()
    argv = request["argv"]  # [python, -u, script, args...] or [python, -u, -m, module, args...]
    module = argv[2] == "-m"
    target = argv[3] if module else argv[2]
    sys.argv = [target, *argv[(4 if module else 3):]]
    sys.path[0] = os.getcwd() if module else os.path.dirname(os.path.abspath(target))
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(target, run_name="__main__")


def serve(control: socket.socket) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    control.send(json.dumps({"op": "ready"}).encode())
    while True:
        readable, _, _ = select.select([control, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            control.send(json.dumps({"op": "exited", "pid": pid, "code": os.waitstatus_to_exitcode(status)}).encode())
        if control in readable:
            data, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 2)
            if not data:
                return  # the agent is gone
            request = json.loads(data)
            pid = os.fork()
            if pid == 0:
                control.close()
                os.close(wake_r)
                os.close(wake_w)
                become_worker(request, *fds)
                return  # the script ended normally: the interpreter exits with status 0
            for fd in fds:
                os.close(fd)
            control.send(json.dumps({"op": "spawned", "id": request["id"], "pid": pid}).encode())


def main() -> None:
    die_with_parent()
    control = socket.socket(fileno=int(sys.argv[1]))
    # The point of the zygote: the imports a replacement would otherwise pay for. torch.distributed and DDP are
    # what every data-parallel script loads next, and DDP's first construction imports torch._dynamo (about 800
    # modules, 0.8 s here). None of them starts a thread or touches a device on import (checked).
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch.distributed  # noqa: F401
    import torch.nn.parallel  # noqa: F401

    for name in sys.argv[2:]:
        importlib.import_module(name)
    serve(control)


if __name__ == "__main__":
    main()
