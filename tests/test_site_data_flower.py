"""Each site's own file on Flower: nothing private leaves a site, and a site whose file does not fit
is left out before the first round with file, line and field in the server's record.

Three SuperNodes on 127.0.0.1, each started with `--node-config data-path=... eval-path=...`
naming its own training and evaluation files, every question of which carries a canary string
unique to that site and file. After a FedCoLLM run under SecAgg+, no file the server side holds
(the run folder, the SuperLink's and the CLI's Flower homes, the SuperLink's log with the
ServerApp's output, whatever the SuperLink wrote in its working folder) contains any site's
canary, the server's recorded example counts are the training files' sizes, and each site's
scores on its own evaluation file (only those) reached the run's record.
Slow (processes per message); CI runs it.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fedcollm.config import build_config
from fedcollm.engines import run_experiment
from fedcollm.engines.flower import FlowerOptions
from fedcollm.engines.flower.deploy import LocalFederation
from tests.helpers import assert_no_processes_left, read_metrics, tiny_config
from tests.test_site_data import RECORDS, write_jsonl

pytestmark = pytest.mark.slow

SIZES = (5, 8, 6)


def _canary_sites(
    folder: Path, name: str = "site", sizes: tuple[int, ...] = SIZES
) -> tuple[list[Path], list[str]]:
    folder.mkdir(exist_ok=True)
    files, canaries = [], []
    for k, size in enumerate(sizes):
        canary = f"CANARY-{name}-{k}-{uuid.uuid4().hex}"
        records = [
            {
                "id": f"{name}{k}-{i}",
                "question": f"{canary}: which number follows {i}?",
                "choices": [str(i + 1), f"{canary}-{i}", str(i + 3)],
                "gold": 0,
            }
            for i in range(size)
        ]
        files.append(write_jsonl(folder / f"{name}-{k}.jsonl", records))
        canaries.append(canary)
    return files, canaries


def _files_holding(root: Path, needle: str, skip: tuple[str, ...] = ()) -> tuple[int, list[Path]]:
    """How many files under `root` were read (outside `skip`), and those containing `needle`."""
    read, found = 0, []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(skip) for part in path.relative_to(root).parts):
            continue
        read += 1
        if needle.encode() in path.read_bytes():
            found.append(path)
    return read, found


def test_no_site_canary_reaches_the_server_side_and_each_site_trains_on_its_own_file(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    files, canaries = _canary_sites(tmp_path / "sites")
    eval_files, eval_canaries = _canary_sites(tmp_path / "sites", "eval", (4, 4, 4))
    data = tiny_config(tiny_llama, tiny_llama_big, federation={"rounds": 1, "num_clients": 3})
    data["task"] = {**data["task"], "client_source": "files", "client_eval": True}
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(build_config(data).to_toml(), encoding="utf-8")
    out = tmp_path / "run"
    sites = {k: {"data-path": str(path), "eval-path": str(eval_files[k])} for k, path in enumerate(files)}
    federation = LocalFederation(tmp_path / "federation", 3, tls=True, site_config=sites)
    try:
        federation.start()
        run_id = federation.submit({"experiment": experiment, "out": out, "secagg": True, "min-clients": 3})
        status = federation.wait(run_id, timeout=900)
    finally:
        federation.stop()
    assert status.ok, federation.run_log(run_id)
    assert federation.leftover_pids() == []
    assert_no_processes_left(tmp_path / "federation" / ".flwr" / "superlink")

    metrics = read_metrics(out)
    sizes = {m["client"]: m["value"] for m in metrics if m["metric"] == "num_examples"}
    assert sizes == {k: float(size) for k, size in enumerate(SIZES)}
    local = {(m["round"], m["client"]) for m in metrics if m["metric"] == "local_n"}
    assert local == {(r, k) for r in (0, 1) for k in (None, 0, 1, 2)}, "each site scored its own file"
    assert all(m["value"] == 4.0 for m in metrics if m["metric"] == "local_n")
    site_side = ("supernode-",)  # each SuperNode's own home and log stay at its site
    for canary, path in zip(canaries + eval_canaries, files + eval_files, strict=True):
        assert _files_holding(path.parent, canary)[1] == [path], "the canary scan finds what is there"
        for root in (out, tmp_path / "federation"):
            read, found = _files_holding(root, canary, skip=site_side)
            assert read > 0, root
            assert found == [], f"{canary} reached the server side: {found}"


def test_a_site_whose_file_does_not_fit_is_left_out_before_the_first_round(
    tiny_llama: Path, tiny_llama_big: Path, tmp_path: Path
) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", RECORDS)
    bad = write_jsonl(tmp_path / "bad.jsonl", [RECORDS[0], {**RECORDS[1], "choices": ["SECRET-CHOICE"]}])
    data = tiny_config(
        tiny_llama,
        tiny_llama_big,
        algorithm="fedavg",
        federation={"rounds": 1, "num_clients": 3},
        robustness={"min_clients": 2},
    )
    data["task"] = {**data["task"], "client_source": "files", "client_data": [str(good), str(bad), str(good)]}
    out = tmp_path / "run"
    run_experiment(build_config(data), out, engine="flower", flower=FlowerOptions(secagg=True, min_clients=2))
    metrics = read_metrics(out)
    errors = [m for m in metrics if m["metric"] == "data_error"]
    assert [(m["round"], m["client"]) for m in errors] == [(0, 1)]
    assert "bad.jsonl:2: field 'choices' must be a list of >= 2 strings" in errors[0]["note"]
    assert "SECRET-CHOICE" not in (out / "metrics.jsonl").read_text(encoding="utf-8")
    assert {m["client"]: m["value"] for m in metrics if m["metric"] == "num_examples"} == {0: 3.0, 2: 3.0}
