"""A SuperNode's worker: one process per client and run that keeps the model and data loaded.

Flower 1.42's deployment runs every message in a fresh `flwr-clientapp` process, which serves
that one task and exits (`flwr.supernode.runtime.run_clientapp`); its isolation modes only change
who starts those processes. Loading the model stack, the data and the SLM again for every message
cost a deployment round about ×2.3 the embedded engine's (`bench/README.md`, "Engines"). So the
ClientApp, still one process per message and free of torch, hands each heavy request (`query.data`,
`train.local`, `evaluate`) to a worker it starts on first use and finds again afterwards: a
process of its own session, listening on a Unix socket only its user can open, running
`client_work.handle` — the very function the ClientApp would run itself — and keeping what it
builds for the next message. What the client answers is unchanged, bit for bit.

A worker stops when the server ends the run (`query.release`, sent after the last round), when
the SuperNode that started it goes away (it watches the ClientApp's parent, Flower's SuperExec,
which lives as long as its SuperNode), or after `worker-idle-timeout` seconds without a request
(node config; default one hour). A stopped worker costs nothing but the next message's reload:
the client's state between rounds is checkpointed on the node's disk, never only in the worker.
Set node config `worker=false` (or run config `node-worker=false`) to answer every message in
its own ClientApp process instead.

Frames on the socket: a 4-byte big-endian length and a JSON header, then an 8-byte length and the
body, a `RecordDict` in Flower's own protobuf encoding.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from flwr.app import RecordDict

from fedcollm.engines.flower import client_work
from fedcollm.engines.flower.options import FlowerEngineError

DEFAULT_IDLE_TIMEOUT = 3600.0
"""Seconds a worker waits for its next request before it exits (node config `worker-idle-timeout`)."""
START_TIMEOUT = 120.0
"""Seconds a ClientApp waits for a worker it started to listen."""


class NodeWorkerError(FlowerEngineError):
    """The node's worker failed a request or could not be started; the message says why."""


def available(node_config: Mapping[str, Any]) -> bool:
    """Whether this node may keep a worker: Unix sockets exist here and the node allows it."""
    allowed = str(node_config.get("worker", "true")).strip().lower() not in {"0", "false", "no", "off"}
    return allowed and hasattr(socket, "AF_UNIX") and hasattr(os, "getuid")


def _socket_dir() -> Path:
    """A folder only this user may enter, for the workers' sockets (short: a socket path is
    limited to about 100 bytes, too few for a node's state folder under a deep FLWR_HOME)."""
    folder = Path(tempfile.gettempdir()) / f"fedcollm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    info = folder.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise NodeWorkerError(f"{folder} must belong to this user and be closed to others (mode 700)")
    return folder


# ------------------------------------------------------------------------------------------
# Frames


def _send(conn: socket.socket, header: Mapping[str, Any], body: bytes = b"") -> None:
    head = json.dumps(dict(header)).encode()
    conn.sendall(struct.pack(">I", len(head)) + head + struct.pack(">Q", len(body)) + body)


def _receive_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], bytes]:
    (head_size,) = struct.unpack(">I", _receive_exactly(conn, 4))
    header = json.loads(_receive_exactly(conn, head_size))
    (body_size,) = struct.unpack(">Q", _receive_exactly(conn, 8))
    return header, _receive_exactly(conn, body_size)


def _encode(content: RecordDict) -> bytes:
    from flwr.common.serde import recorddict_to_proto

    return bytes(recorddict_to_proto(content).SerializeToString())


def _decode(body: bytes) -> RecordDict:
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.ParseFromString(body)
    return recorddict_from_proto(proto)


# ------------------------------------------------------------------------------------------
# The ClientApp's side


class NodeWorker:
    """The ClientApp's handle on the worker of client `client` in run `instance` on this node."""

    def __init__(self, node_config: Mapping[str, Any], instance: str, client: int) -> None:
        self.node_config = dict(node_config)
        self.folder = client_work.client_state_dir(node_config, instance, client)
        self.watch_pid = os.getppid()
        """The SuperExec that started this ClientApp: it lives as long as its SuperNode."""
        identity = f"{client_work.state_root(node_config).resolve()}|{instance}|{client}|{self.watch_pid}"
        self.socket = _socket_dir() / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.sock"
        self.log = self.folder / "worker.log"

    def call(self, kind: client_work.WorkKind, content: RecordDict) -> RecordDict:
        """`client_work.handle(kind, content, node_config)`, computed by the worker.

        A worker that goes away before it answers (killed, or dying just as it was reached) is
        started again and asked once more: a request's answer depends only on the request and
        the client's checkpoints of earlier rounds, so asking twice gives the same answer.
        """
        request = _encode(content)
        for attempt in (1, 2):
            with self._connection(start=True) as conn:
                assert conn is not None
                try:
                    _send(conn, {"kind": kind, "node_config": self.node_config}, request)
                    header, body = _receive(conn)
                    break
                except (EOFError, OSError) as exc:
                    if attempt == 2:
                        raise NodeWorkerError(
                            f"the node's worker stopped during a {kind!r} request ({exc}); its log: "
                            f"{self.log}{self._log_tail()}"
                        ) from None
        if not header.get("ok"):
            raise NodeWorkerError(str(header.get("error", "the node's worker failed the request")))
        return _decode(body)

    def release(self) -> bool:
        """Stop the worker if it runs (the run is over); whether there was one."""
        with self._connection(start=False) as conn:
            if conn is None:
                return False
            with contextlib.suppress(EOFError, OSError):
                _send(conn, {"kind": "stop"})
                _receive(conn)
        return True

    @contextlib.contextmanager
    def _connection(self, start: bool) -> Iterator[socket.socket | None]:
        conn = _connect(self.socket)
        if conn is None and start:
            with _locked(self.socket.with_suffix(".lock")):
                conn = _connect(self.socket) or self._start()
        try:
            yield conn
        finally:
            if conn is not None:
                conn.close()

    def _start(self) -> socket.socket:
        self.socket.unlink(missing_ok=True)  # a worker that died without cleaning up
        self.folder.mkdir(parents=True, exist_ok=True)
        idle = float(self.node_config.get("worker-idle-timeout", DEFAULT_IDLE_TIMEOUT))
        command = [
            sys.executable,
            "-m",
            "fedcollm.engines.flower.node_worker",
            "--socket",
            str(self.socket),
            "--watch-pid",
            str(self.watch_pid),
            "--idle-timeout",
            str(idle),
        ]
        with self.log.open("ab") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            conn = _connect(self.socket)
            if conn is not None:
                return conn
            if proc.poll() is not None:
                raise NodeWorkerError(
                    f"the node's worker exited at start (code {proc.returncode}); its log: {self.log}"
                    f"{self._log_tail()}"
                )
            time.sleep(0.05)
        proc.kill()
        raise NodeWorkerError(
            f"the node's worker did not listen within {START_TIMEOUT:.0f} s; its log: {self.log}"
        )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n" + "\n".join(tail) if tail else ""


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:  # no socket file, or nobody listening on it any more
        conn.close()
        return None
    return conn


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (two ClientApps of one node never start two workers)."""
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------
# The worker's side


def _alive(pid: int) -> bool:
    from fedcollm.engines.supervision import alive

    if Path("/proc").is_dir():
        return alive(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def serve(path: Path, watch_pid: int, idle_timeout: float) -> None:
    """Answer requests on `path` one at a time until released, orphaned or idle for too long."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path.unlink(missing_ok=True)
    old_mask = os.umask(0o177)  # the socket is created 0600: only this user may connect
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_mask)
    listener.listen(8)
    listener.settimeout(1.0)
    print(f"worker {os.getpid()} listening on {path} (watching {watch_pid})", flush=True)
    last = time.monotonic()
    try:
        while _alive(watch_pid) and time.monotonic() - last < idle_timeout:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                if not _answer(conn):
                    print(f"worker {os.getpid()} released", flush=True)
                    return
            last = time.monotonic()
        print(f"worker {os.getpid()} stops: its SuperNode is gone or it was idle", flush=True)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


def _answer(conn: socket.socket) -> bool:
    """Answer one request; False when it was the request to stop."""
    from fedcollm.errors import FedcollmError

    try:
        header, body = _receive(conn)
    except (EOFError, OSError, ValueError):
        return True  # a client that went away before asking
    kind = header.get("kind")
    if kind == "stop":
        with contextlib.suppress(OSError):
            _send(conn, {"ok": True})
        return False
    started, received = time.perf_counter(), time.strftime("%H:%M:%S")
    try:
        if kind not in client_work.WORK_KINDS:
            raise NodeWorkerError(f"unknown request kind {kind!r}")
        reply = client_work.handle(kind, _decode(body), header.get("node_config", {}))
        answer: tuple[dict[str, Any], bytes] = ({"ok": True}, _encode(reply))
        took = time.perf_counter() - started
        print(f"worker {os.getpid()}: {kind} received {received}, answered in {took:.2f} s", flush=True)
    except FedcollmError as exc:
        answer = ({"ok": False, "error": str(exc)}, b"")
    except Exception as exc:  # reported to the ClientApp, which raises it as Flower's error reply
        traceback.print_exc()
        answer = ({"ok": False, "error": f"{type(exc).__name__}: {exc}"}, b"")
    sys.stdout.flush()
    with contextlib.suppress(OSError):  # the ClientApp died meanwhile: nobody to tell
        _send(conn, *answer)
    return True


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="A fedcollm SuperNode's worker (started by its ClientApp).")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--watch-pid", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so the socket file is removed
    serve(args.socket, args.watch_pid, args.idle_timeout)


if __name__ == "__main__":
    main()
