"""The agent's side of the pre-warmed zygote: start it, ask it to fork replacement workers, learn of their exits.

A replacement forked from a process that already imported torch runs its script's first line in milliseconds
instead of paying a fresh interpreter's start (about a second here, far more on GPU nodes). The zygote is the
parent of what it forks, so it reports their exits; `ZygoteProcess` presents one of them like a `Popen`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from flashrun import descriptors

ZYGOTE_MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zygote_main.py")
SPAWN_REPLY_S = 5.0
"""How long the agent waits for the zygote to confirm a fork before falling back to a plain spawn."""
READY_WAIT_S = 30.0
"""How long a fork waits for a zygote that is still importing (a spare that takes over soon after it joined, a zygote
restarted after it broke) before falling back to a plain spawn. Waiting costs less than the fallback: a fresh
interpreter would pay the same imports from the start, competing with the zygote's for the CPU."""
MAX_MESSAGE = 1 << 20


class ZygoteProcess:
    """A worker forked by the zygote, with the parts of `subprocess.Popen` the agent uses."""

    def __init__(self, pid: int, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._exited = threading.Event()

    def _set_exit(self, code: int) -> None:
        self.returncode = code
        self._exited.set()

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise subprocess.TimeoutExpired(str(self.pid), timeout or 0)
        assert self.returncode is not None
        return self.returncode


class Zygote:
    def __init__(self, python: str, modules: Sequence[str], env: Mapping[str, str],
                 preexec: Callable[[], None]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        self._lock = threading.Lock()
        self._replies: dict[int, dict] = {}
        self._reply_ready = threading.Condition(self._lock)
        self._processes: dict[int, ZygoteProcess] = {}
        self._early_exits: dict[int, int] = {}
        self._next_id = 0
        self.ready = threading.Event()
        self.broken = threading.Event()
        self.process = subprocess.Popen(
            [python, "-u", ZYGOTE_MAIN, str(theirs.fileno()), *modules], pass_fds=[theirs.fileno()],
            env=dict(env), stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec,
        )
        descriptors.restore_inherited(self.process.pid)  # what it forks inherits it
        theirs.close()
        threading.Thread(target=self._read, name="flashrun-zygote-read", daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                data = self._control.recv(MAX_MESSAGE)
            except OSError:
                data = b""
            if not data:
                break
            message = json.loads(data)
            op = message["op"]
            if op == "ready":
                with self._lock:
                    self.ready.set()
                    self._reply_ready.notify_all()
            elif op == "spawned":
                with self._lock:
                    self._replies[message["id"]] = message
                    self._reply_ready.notify_all()
            elif op == "exited":
                with self._lock:
                    process = self._processes.pop(message["pid"], None)
                    if process is None:
                        self._early_exits[message["pid"]] = message["code"]
                if process is not None:
                    process._set_exit(message["code"])
        self.broken.set()
        with self._lock:
            orphans = list(self._processes.values())
            self._processes.clear()
            self._reply_ready.notify_all()
        for process in orphans:  # their parent is gone, so they died with it (PR_SET_PDEATHSIG)
            process._set_exit(-9)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: str) -> ZygoteProcess | None:
        """Fork a worker; None when the zygote broke, does not get ready within READY_WAIT_S or does not answer (the
        caller spawns instead)."""
        with self._lock:
            self._reply_ready.wait_for(lambda: self.ready.is_set() or self.broken.is_set(), READY_WAIT_S)
        if not self.ready.is_set() or self.broken.is_set():
            return None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        with self._lock:
            self._next_id += 1
            request_id = self._next_id
        request = {"op": "spawn", "id": request_id, "argv": list(argv), "env": dict(env), "cwd": cwd}
        try:
            socket.send_fds(self._control, [json.dumps(request).encode()], [out_w, err_w])
        except OSError:
            self.broken.set()
        finally:
            os.close(out_w)
            os.close(err_w)
        with self._lock:
            self._reply_ready.wait_for(lambda: request_id in self._replies or self.broken.is_set(), SPAWN_REPLY_S)
            reply = self._replies.pop(request_id, None)
            if reply is None:
                os.close(out_r)
                os.close(err_r)
                self.broken.set()
                return None
            process = ZygoteProcess(reply["pid"], os.fdopen(out_r, "rb"), os.fdopen(err_r, "rb"))
            early = self._early_exits.pop(process.pid, None)
            if early is None:
                self._processes[process.pid] = process
        if early is not None:
            process._set_exit(early)
        return process

    def close(self) -> None:
        self._control.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
