"""Processes this machine started, supervised: start-up waits, liveness, and a clean stop.

Generic, with no Flower in it: the Flower deployment (`fedcollm.engines.flower.deploy`) uses it
for the SuperLink, the SuperNodes and everything they spawn. Process trees are read from Linux's
/proc; elsewhere only the process groups are signalled.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedcollm.errors import FedcollmError


class SupervisionError(FedcollmError, RuntimeError):
    """A supervised process did not start (it exited, or never listened on its port)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SupervisionError(f"process {proc.args!r} exited with code {proc.returncode}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise SupervisionError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, grandchildren, ...)."""
    if not Path("/proc").is_dir():
        return []
    tree, out, todo = _children(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot): with the pid, a unique identity."""
    fields = _stat(pid)
    return fields[19] if fields else None


def alive(pid: int, start: str | None = None) -> bool:
    """Whether `pid` runs (not a zombie) and, if `start` is given, is still the same process."""
    fields = _stat(pid)
    if fields is None or fields[0] == "Z":
        return False
    return start is None or fields[19] == start


@dataclass
class Managed:
    """A process we started, in its own process group, with what it spawned.

    Spawned processes are remembered with their start times, so a pid the system has since
    reused for someone else's process is never signalled.
    """

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    known: dict[int, str | None] = field(default_factory=dict)

    def remember(self) -> None:
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            if pid not in self.known:
                self.known[pid] = _start_time(pid)

    def adopt(self, pid: int) -> None:
        """Count a process started beside this one (not its descendant) as part of it."""
        self.known.setdefault(pid, _start_time(pid))

    def live(self) -> list[int]:
        self.remember()
        return [pid for pid, start in self.known.items() if alive(pid, start)]

    def signal(self, sig: int) -> None:
        pids = self.live()
        own_group = os.getpgid(0)
        groups = set()
        for pid in pids:
            with contextlib.suppress(OSError):
                groups.add(os.getpgid(pid))
        for group in groups - {own_group}:
            with contextlib.suppress(OSError):
                os.killpg(group, sig)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    def stop(self, grace: float = 5.0) -> None:
        self.signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.live():
            self.proc.poll()
            time.sleep(0.1)
        if self.live():
            self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def running(self) -> bool:
        return self.proc.poll() is None
