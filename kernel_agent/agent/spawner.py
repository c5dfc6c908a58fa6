"""How the agent starts kernel processes: forked from a warm fork server, or exec'd.

A kernel exec'd as `python -m kernel_agent.kernel` spends about half a second of CPU importing
(redis-py, pydantic and the models it builds, asyncio: docs/performance.md, "Kernel start-up")
before it does anything. The agent therefore keeps one fork server per agent: a process,
started once as `python -m kernel_agent.agent.spawner`, that imports the kernel's modules (and
the agent's handler and arq settings modules) and then forks each kernel from itself. A forked
kernel shares the imported pages with its siblings and starts in a few hundredths of a second of
CPU; from there on it is the same program: `runpy` runs the kernel's `__main__` with the argv
and environment the exec path would have given it, and the interpreter exits as it would.

Why a dedicated process, not `multiprocessing`'s forkserver: that one runs its children as
`multiprocessing` processes (stdin replaced by /dev/null, the agent's argv and main module
re-imported in each, the agent's exit joining them, a resource-tracker process beside it); a
kernel must stay what `python -m` makes of it.

The server is forked from no event loop, no thread and no Redis connection: it imports, then
waits in `poll` on its socket to the agent and on a SIGCHLD wake-up pipe. It speaks JSON lines
over a socketpair whose other end only the agent holds:

- agent -> server: `{"fork": id, "module": m, "argv": [...], "env": {...}}`, and
  `{"signal": pid, "sig": n}` (the server signals only children it has not reaped, so a pid
  is never reused under a signal);
- server -> agent: `{"ready": pid}` once imported (or `{"error": text}` and exit), then
  `{"forked": id, "pid": p}` (or `"error"`) per fork, and `{"exited": pid, "code": c}` when it
  reaps a kernel (`c` as `Popen.returncode`: negative for a signal).

Lifetimes: the server dies with the agent (PR_SET_PDEATHSIG, and it exits when its socket
closes), each kernel with the server (PR_SET_PDEATHSIG), so SIGKILL of the agent still takes
its kernels down. The server ignores SIGINT and SIGTERM (a terminal's Ctrl-C or a service
manager's SIGTERM to the whole group reaches the agent and the kernels, which drain; the
server stays until the agent is done); its children get the default dispositions back.

If the server cannot start (an import fails, a preloaded module started a thread, fork is not
available), the agent says so in a log line and execs kernels as before; if it dies, its
kernels die with it, the agent restarts them, and the next start brings up another server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import importlib
import json
import logging
import os
import runpy
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
#: How long the agent waits for a new fork server to import its modules, seconds.
READY_TIMEOUT = 60.0
#: Fork servers that died after starting; past this many the agent execs kernels instead.
MAX_SERVER_DEATHS = 3


class KernelHandle(Protocol):
    """What the agent uses of a kernel process (`asyncio.subprocess.Process` is one)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


def die_with_parent(parent: int) -> Callable[[], None]:
    """A `preexec_fn`: the child gets SIGKILL when the thread that forked it ends; `parent` (the
    pid of the forking process) closes the race where it ended before the child asked."""

    def arm() -> None:  # pragma: no cover - runs in the child between fork and exec
        _set_pdeathsig(parent)

    return arm


def _set_pdeathsig(parent: int) -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent is already gone: so are we
        os._exit(1)


async def exec_kernel(cmd: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    """The plain path: fork the agent and exec `cmd` (the kernel imports everything itself)."""
    return await asyncio.create_subprocess_exec(*cmd, env=env, preexec_fn=die_with_parent(os.getpid()))


# ------------------------------------------------------------------ the agent's side
class ForkServerError(OSError):
    """The fork server could not start, or was lost while it forked."""


class ForkedKernel:
    """A kernel forked by the fork server: a `KernelHandle` whose exit the server reports."""

    def __init__(self, server: ForkServer, pid: int) -> None:
        self._server = server
        self._pid = pid
        self._returncode: int | None = None
        self._exited = asyncio.Event()

    @property
    def pid(self) -> int:
        return self._pid

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def _exit(self, code: int) -> None:
        if self._returncode is None:
            self._returncode = code
            self._exited.set()

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._returncode is not None
        return self._returncode

    def send_signal(self, sig: int) -> None:
        if self._returncode is None:
            self._server.send({"signal": self._pid, "sig": int(sig)})

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """One running fork server; `ForkServer.start(preload, optional)` waits until it imported."""

    def __init__(
        self, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proc = proc
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[ForkedKernel]] = {}
        self._kernels: dict[int, ForkedKernel] = {}
        self.lost = False
        self._task = asyncio.get_running_loop().create_task(self._read(), name="kcp-fork-server")

    @classmethod
    async def start(cls, preload: Sequence[str], optional: Sequence[str] = ()) -> ForkServer:
        """Start a server that imports `preload` (all of them, or it fails) and, best effort,
        `optional` (the user's modules: one that fails to import fails in the kernel, as ever)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        cmd = [sys.executable, "-m", __name__, "--fd", str(theirs.fileno()), "--parent", str(os.getpid())]
        cmd += [arg for module in preload for arg in ("--preload", module)]
        cmd += [arg for module in optional for arg in ("--optional", module)]
        try:
            # no preexec_fn (not safe beside the agent's threads): the server arms its own
            # PR_SET_PDEATHSIG first thing, and exits if the agent is already gone by then
            proc = await asyncio.create_subprocess_exec(*cmd, pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            line = await asyncio.wait_for(reader.readline(), READY_TIMEOUT)
            hello = json.loads(line) if line else {"error": f"it exited ({await proc.wait()})"}
        except (TimeoutError, ValueError, OSError) as exc:
            hello = {"error": f"no answer ({exc!r})"}
        if "ready" not in hello:
            writer.close()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ForkServerError(str(hello.get("error", hello)))
        return cls(proc, reader, writer)

    def send(self, message: dict[str, Any]) -> None:
        if not self.lost:
            self._writer.write(json.dumps(message).encode() + b"\n")

    async def fork(self, module: str, argv: list[str], env: dict[str, str]) -> ForkedKernel:
        """Fork a kernel that runs `module` as `__main__` with `argv` and `env`."""
        if self.lost:
            raise ForkServerError("the fork server is gone")
        self._next_id += 1
        forked: asyncio.Future[ForkedKernel] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = forked
        self.send({"fork": self._next_id, "module": module, "argv": argv, "env": env})
        return await forked

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                self._on(json.loads(line))
        except (OSError, ValueError) as exc:  # pragma: no cover - a broken server: as if it died
            logger.warning("fork server pid %d: unreadable reply (%r)", self.proc.pid, exc)
        finally:
            self._on_lost()

    def _on(self, message: dict[str, Any]) -> None:
        if "forked" in message:
            future = self._pending.pop(message["forked"])
            if "pid" in message:  # registered here, before any "exited" of it is read
                forked = self._kernels[message["pid"]] = ForkedKernel(self, message["pid"])
                future.set_result(forked)
            else:
                future.set_exception(ForkServerError(f"the fork server could not fork: {message['error']}"))
        elif "exited" in message:
            kernel = self._kernels.pop(message["exited"], None)
            if kernel is not None:
                kernel._exit(message["code"])

    def _on_lost(self) -> None:
        """The server is gone: its kernels died with it (PR_SET_PDEATHSIG, SIGKILL)."""
        self.lost = True
        self._writer.close()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ForkServerError("the fork server exited while forking"))
        self._pending.clear()
        for kernel in self._kernels.values():
            kernel._exit(-signal.SIGKILL)
        self._kernels.clear()

    async def close(self) -> None:
        """Close the socket: the server exits, and any kernel still running with it."""
        self._writer.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5.0)
        except TimeoutError:  # pragma: no cover - it exits on EOF
            self.proc.kill()
            await self.proc.wait()
        await asyncio.gather(self._task, return_exceptions=True)


class Spawner:
    """Starts the agent's kernels: forked from its fork server while one runs, else exec'd.

    The server starts at the first kernel; `enabled=False` (or a server that cannot start, or
    one that died `MAX_SERVER_DEATHS` times) leaves the agent on the exec path, said in a log line."""

    def __init__(self, preload: Sequence[str], optional: Sequence[str] = (), *, enabled: bool = True) -> None:
        self.preload = list(preload)
        self.optional = list(optional)
        self.enabled = enabled
        self.server: ForkServer | None = None
        self.deaths = 0
        self._lock = asyncio.Lock()

    async def start(self, cmd: list[str], env: dict[str, str]) -> KernelHandle:
        """Start `cmd` (`python -m MODULE ARGS...`) with `env` as its whole environment."""
        if self.enabled and len(cmd) >= 3 and cmd[:2] == [sys.executable, "-m"]:
            server = await self._server()
            if server is not None:
                with contextlib.suppress(ForkServerError):  # lost meanwhile: this one is exec'd
                    return await server.fork(cmd[2], cmd[3:], env)
        return await exec_kernel(cmd, env)

    async def _server(self) -> ForkServer | None:
        async with self._lock:
            if self.server is not None and not self.server.lost:
                return self.server
            if self.server is not None:  # it died (and its kernels with it)
                self.deaths += 1
                await self.server.close()
                code = self.server.proc.returncode
                self.server = None
                if self.deaths >= MAX_SERVER_DEATHS:
                    logger.warning(
                        "fork server died %d times (last exit %s): kernels start with exec from now on",
                        self.deaths,
                        code,
                    )
                    self.enabled = False
                    return None
                logger.warning("fork server exited with %s; starting another", code)
            try:
                self.server = await ForkServer.start(self.preload, self.optional)
            except (ForkServerError, OSError) as exc:
                logger.warning("fork server could not start (%s): kernels start with exec", exc)
                self.enabled = False
                return None
            logger.info("fork server started (pid %d): kernels are forked from it", self.server.proc.pid)
            return self.server

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None


# ------------------------------------------------------------------ the fork server's side
@dataclass(frozen=True, slots=True)
class _Job:
    """What a freshly forked child runs: `module` as `__main__`."""

    module: str
    argv: list[str]
    env: dict[str, str]


class _Zygote:
    """The fork server's loop. `serve()` returns only in a forked child (its job) or at EOF."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.pid = os.getpid()
        self.children: set[int] = set()
        self._buffer = b""
        self._wake_r, self._wake_w = -1, -1

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps(message).encode() + b"\n")

    def serve(self, preload: Sequence[str], optional: Sequence[str]) -> _Job | None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for module in preload:
                importlib.import_module(module)
        except BaseException as exc:  # anything (SystemExit too): reported, and the agent execs
            self.send({"error": f"cannot import {module}: {exc!r}"})
            return None
        for module in optional:
            with contextlib.suppress(Exception):
                importlib.import_module(module)
        if threading.active_count() > 1:
            self.send({"error": "a preloaded module started a thread: forking it is not safe"})
            return None
        gc.freeze()  # what was imported stays in shared pages: no collection in a child touches it
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler: the wake-up fd gets written
        self.send({"ready": self.pid})
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        while os.read(self._wake_r, 4096):
                            pass
                    self._reap()
                    continue
                data = self.sock.recv(1 << 16)
                if not data:  # the agent is gone (or closed us): so are we, and our children
                    return None
                self._buffer += data
                while b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    job = self._handle(json.loads(line))
                    if job is not None:
                        return job

    def _handle(self, message: dict[str, Any]) -> _Job | None:
        if "signal" in message:
            if message["signal"] in self.children:  # not reaped yet: the pid is still that kernel
                with contextlib.suppress(ProcessLookupError):
                    os.kill(message["signal"], message["sig"])
            return None
        job = _Job(message["module"], list(message["argv"]), dict(message["env"]))
        try:
            pid = os.fork()
        except OSError as exc:
            self.send({"forked": message["fork"], "error": repr(exc)})
            return None
        if pid == 0:  # pragma: no cover - the child: measured by the integration tests
            self._become_child()
            return job
        self.children.add(pid)
        self.send({"forked": message["fork"], "pid": pid})
        return None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                self.send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def _become_child(self) -> None:  # pragma: no cover - runs in the forked child
        """Leave nothing of the server in the kernel: its fds, its signal dispositions."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.sock.close()
        _set_pdeathsig(self.pid)


def _run(job: _Job) -> None:  # pragma: no cover - runs in the forked child
    """Run the kernel as `python -m job.module job.argv...` would, in this interpreter."""
    os.environ.clear()
    os.environ.update(job.env)
    sys.argv = [job.module, *job.argv]  # run_module puts the module's path in argv[0]
    runpy.run_module(job.module, run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kcp-fork-server", description="(started by kcp agent)")
    parser.add_argument("--fd", type=int, required=True, help="the socket to the agent")
    parser.add_argument("--parent", type=int, required=True, help="the agent's pid")
    parser.add_argument("--preload", action="append", default=[])
    parser.add_argument("--optional", action="append", default=[])
    args = parser.parse_args(argv)
    _set_pdeathsig(args.parent)
    job = _Zygote(socket.socket(fileno=args.fd)).serve(args.preload, args.optional)
    if job is not None:  # a forked child: the kernel, then this interpreter's normal exit
        _run(job)


if __name__ == "__main__":
    main()
