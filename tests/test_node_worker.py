"""The SuperNode's worker (`fedcollm.engines.flower.node_worker`): in deployment one process per
client and run keeps the SLM and the data loaded across messages, answers exactly what the
ClientApp would answer itself, comes back when it died, and goes away when the run ends, its
SuperNode goes away or it idles."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedcollm.config import build_config
from fedcollm.engines.flower import FlowerEngineError, FlowerOptions, client_work, node_worker
from fedcollm.engines.flower.transport import FlowerTransport
from fedcollm.engines.supervision import alive
from fedcollm.protocol import ClientReply, Payload
from tests.helpers import NodesGrid, nodes, tiny_config


def _config(tiny_llama: Path):  # type: ignore[no-untyped-def]
    return build_config(
        tiny_config(
            tiny_llama, tiny_llama, algorithm="standalone", federation={"rounds": 2, "num_clients": 2}
        )
    )


def _grid(home: Path, **extra: object) -> NodesGrid:
    return NodesGrid(
        [{**cfg, "state-dir": str(home / f"node-{k}"), **extra} for k, cfg in enumerate(nodes(0, 1, total=2))]
    )


def _log(flower: FlowerTransport, grid: NodesGrid, client: int) -> str:
    node_config = grid.contexts[200 + client].node_config
    return (client_work.client_state_dir(node_config, flower.instance, client) / "worker.log").read_text()


def _pids(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker (\d+) listening", log)]


def _same(a: list[ClientReply], b: list[ClientReply]) -> bool:
    return [r.client for r in a] == [r.client for r in b] and all(
        x.metrics == y.metrics
        and sorted(x.arrays) == sorted(y.arrays)
        and all(np.array_equal(x.arrays[k], y.arrays[k]) for k in x.arrays)
        for x, y in zip(a, b, strict=True)
    )


def _wait_gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def _rounds(flower: FlowerTransport, start: dict, between=None) -> list[list[ClientReply]]:  # type: ignore[no-untyped-def,type-arg]
    flower.connect()
    assert flower.client_data_errors() == {}
    first = flower.fit(Payload(start, {"round": 1}), 1)
    if between is not None:
        between()
    second = flower.fit(Payload({}, {"round": 2}), 2)
    return [first, second, flower.evaluate(Payload({}, {"round": 2}), 2)]


@pytest.fixture
def reference(tiny_llama: Path, tmp_path: Path, server_identity: None):  # type: ignore[no-untyped-def]
    """Standalone's two rounds and its client evaluation, answered in the ClientApp's own process."""
    from fedcollm.lm.lora import get_adapter
    from fedcollm.parties.loading import load_models

    config = _config(tiny_llama)
    start = get_adapter(load_models(config, with_llm=False)[0].model)
    in_process = FlowerTransport(_grid(tmp_path / "in-process"), config, FlowerOptions(node_worker=False))  # type: ignore[arg-type]
    return config, start, _rounds(in_process, start)


def test_a_node_worker_answers_as_the_clientapp_would_and_keeps_the_model_loaded(
    reference,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config, start, expected = reference
    grid = _grid(tmp_path / "workers")
    flower = FlowerTransport(grid, config, FlowerOptions())  # type: ignore[arg-type]
    got = _rounds(flower, start)
    assert all(_same(a, b) for a, b in zip(expected, got, strict=True)), "the worker's replies differ"
    pids = []
    for client in (0, 1):
        log = _log(flower, grid, client)
        # One process served the data check, both rounds and the evaluation, loading once.
        assert len(_pids(log)) == 1, log
        assert log.count("loading the data") == 1 and log.count(f"for client {client}") == 1, log
        assert log.count("answered in") == 4, log
        pids += _pids(log)
    assert len(set(pids)) == 2 and all(alive(pid) for pid in pids), "one worker per client, alive"
    flower.release()
    assert all(_wait_gone(pid) for pid in pids), "the end of the run stops every worker"
    assert all("released" in _log(flower, grid, client) for client in (0, 1))


def test_a_worker_that_died_is_started_again_and_the_round_comes_out_the_same(
    reference,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    config, start, expected = reference
    grid = _grid(tmp_path / "workers")
    flower = FlowerTransport(grid, config, FlowerOptions())  # type: ignore[arg-type]

    def kill_client_0_worker() -> None:
        pid = _pids(_log(flower, grid, 0))[0]
        os.kill(pid, signal.SIGKILL)
        assert _wait_gone(pid)

    try:
        got = _rounds(flower, start, between=kill_client_0_worker)
    finally:
        flower.release()
    assert all(_same(a, b) for a, b in zip(expected, got, strict=True))
    assert len(_pids(_log(flower, grid, 0))) == 2, "client 0's worker was started again"
    assert len(_pids(_log(flower, grid, 1))) == 1


def test_a_worker_error_reaches_the_server_with_its_message(
    tiny_llama: Path, tmp_path: Path, server_identity: None
) -> None:
    grid = _grid(tmp_path / "workers", threads=0)
    flower = FlowerTransport(grid, _config(tiny_llama), FlowerOptions())  # type: ignore[arg-type]
    flower.connect()
    try:
        with pytest.raises(FlowerEngineError, match=r"client 0: .*node config threads=0: must be at least 1"):
            flower.fit(Payload({}, {"round": 1}), 1)
    finally:
        flower.release()


def test_a_node_may_refuse_workers(tiny_llama: Path, tmp_path: Path, server_identity: None) -> None:
    assert not node_worker.available({"worker": "false"}) and not node_worker.available({"worker": False})
    assert node_worker.available({})
    grid = _grid(tmp_path / "nodes", worker="false")
    flower = FlowerTransport(grid, _config(tiny_llama), FlowerOptions())  # type: ignore[arg-type]
    flower.connect()
    assert flower.client_data_errors() == {}
    assert not list((tmp_path / "nodes").rglob("worker.log")), "answered in the ClientApp, no worker"


def _worker(socket: Path, watch: int, idle: float) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "fedcollm.engines.flower.node_worker", "--socket", str(socket)]
    proc = subprocess.Popen([*command, "--watch-pid", str(watch), "--idle-timeout", str(idle)])
    deadline = time.monotonic() + 30
    while not socket.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    return proc


def test_a_worker_stops_when_its_supernode_is_gone_or_it_idles(tmp_path: Path) -> None:
    supernode = subprocess.Popen(["sleep", "60"])
    orphaned = _worker(tmp_path / "a.sock", supernode.pid, idle=600)
    supernode.kill()
    supernode.wait()
    assert orphaned.wait(timeout=15) == 0
    assert not (tmp_path / "a.sock").exists(), "a stopped worker removes its socket"

    idle = _worker(tmp_path / "b.sock", os.getpid(), idle=0.5)
    assert idle.wait(timeout=15) == 0
    assert not (tmp_path / "b.sock").exists()


def test_only_its_user_may_open_a_worker_socket(tmp_path: Path) -> None:
    proc = _worker(tmp_path / "c.sock", os.getpid(), idle=600)
    try:
        assert (tmp_path / "c.sock").stat().st_mode & 0o777 == 0o600
        assert node_worker._socket_dir().stat().st_mode & 0o777 == 0o700
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _fake_worker(path: Path, answers: list[bool]) -> None:
    """Listen on `path`; per connection, answer (echo the request) or hang up, as `answers` says."""
    import socket
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)

    def serve() -> None:
        for answer in answers:
            conn, _ = listener.accept()
            with conn:
                _, body = node_worker._receive(conn)
                if answer:
                    node_worker._send(conn, {"ok": True}, body)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()


@pytest.mark.parametrize("answers", [[False, True], [False, False]])
def test_a_worker_that_hangs_up_before_answering_is_asked_once_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answers: list[bool]
) -> None:
    from flwr.app import ConfigRecord, RecordDict

    worker = node_worker.NodeWorker({"partition-id": 0, "state-dir": str(tmp_path)}, "0" * 32, 0)
    monkeypatch.setattr(worker, "socket", tmp_path / "w.sock")
    _fake_worker(worker.socket, answers)
    request = RecordDict({"fedcollm": ConfigRecord({"round": 3})})
    if answers[-1]:
        assert worker.call("fit", request)["fedcollm"]["round"] == 3
    else:
        with pytest.raises(node_worker.NodeWorkerError, match="stopped during a 'fit' request"):
            worker.call("fit", request)
