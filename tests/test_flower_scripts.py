"""The deployment scripts run the same commands the Python deployment helper does."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from fedcollm.engines.flower.deploy import (
    SCRIPTS,
    cli_config,
    clientapp_executor_command,
    superlink_command,
    supernode_command,
)


def dry_run(script: str, *args: str, home: Path) -> list[str]:
    env = {**os.environ, "DRY_RUN": "1", "FLWR_HOME": str(home)}
    out = subprocess.run(
        ["bash", str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, check=True
    )
    return shlex.split(out.stdout)


def supernode_dry_run(home: Path, *options: str) -> list[str]:
    """What `start_supernode.sh` would run for client 0 of 3 (and `options`)."""
    args = ("--superlink", "10.0.0.1:9093", "--partition-id", "0", "--num-partitions", "3", *options)
    return dry_run("start_supernode.sh", *args, home=home)


def test_superlink_script(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    got = dry_run(
        "start_superlink.sh",
        "--certs",
        str(certs),
        "--host",
        "0.0.0.0",
        "--port",
        "9093",
        "--auth",
        "--home",
        str(tmp_path / "home"),
        home=tmp_path,
    )
    assert got == superlink_command("0.0.0.0", 9093, certs, auth=True)
    insecure = dry_run("start_superlink.sh", "--port", "9100", "--home", str(tmp_path / "h"), home=tmp_path)
    assert insecure == superlink_command("127.0.0.1", 9100, None)


def test_supernode_script(tmp_path: Path) -> None:
    got = dry_run(
        "start_supernode.sh",
        "--superlink",
        "10.0.0.1:9093",
        "--ca",
        "ca.crt",
        "--partition-id",
        "2",
        "--num-partitions",
        "3",
        "--key",
        "keys/supernode-2",
        "--port",
        "9096",
        home=tmp_path,
    )
    node = supernode_command(
        "10.0.0.1:9093", 2, 3, runtime_port=9096, ca=Path("ca.crt"), private_key=Path("keys/supernode-2")
    )
    assert got[: len(node)] == node
    assert "partition-id=2 num-partitions=3" in got
    # The node hands its ClientApps to the warm executor started beside it, on its Runtime API.
    assert node[-2:] == ["--isolation", "process"]
    assert Path(got[len(node)]).name.startswith("python")
    assert got[len(node) + 1 :] == clientapp_executor_command(9096)


def test_supernode_script_can_leave_the_clientapps_to_flower(tmp_path: Path) -> None:
    got = supernode_dry_run(tmp_path, "--flower-executor")
    assert got == supernode_command("10.0.0.1:9093", 0, 3, runtime_port=9094, warm_clientapps=False)
    assert "--isolation" not in got


def test_supernode_script_names_the_sites_own_file_as_the_python_helper_does(tmp_path: Path) -> None:
    data = tmp_path / "site a.jsonl"
    data.write_text("{}\n")
    got = supernode_dry_run(tmp_path, "--data", str(data))
    extra = {"data-path": str(data.resolve())}
    node = supernode_command("10.0.0.1:9093", 0, 3, runtime_port=9094, extra=extra)
    assert got[: len(node)] == node
    assert f'data-path="{data.resolve()}"' in got[got.index("--node-config") + 1]


def test_submit_script_writes_the_connection_and_runs_flwr(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    config = tmp_path / "experiment.toml"
    config.write_text("name = 'x'\n")
    got = dry_run(
        "submit_run.sh",
        "--superlink",
        "10.0.0.1:9093",
        "--ca",
        str(ca),
        str(config),
        "secagg=true",
        home=tmp_path / "cli",
    )
    assert got[:4] == ["flwr", "run", str(SCRIPTS.parent), "fedcollm"]
    assert got[got.index("--run-config") + 1] == f'experiment="{config.resolve()}" secagg=true'
    assert (tmp_path / "cli" / "config.toml").read_text() == cli_config("10.0.0.1:9093", ca.resolve())


def test_make_certs_signs_a_server_certificate_for_the_given_hosts(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(SCRIPTS / "make_certs.sh"), str(tmp_path), "10.0.0.5", "link.example.org"],
        check=True,
        capture_output=True,
    )
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "server.pem")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(tmp_path / "server.pem"), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for san in ("IP Address:127.0.0.1", "IP Address:10.0.0.5", "DNS:link.example.org", "DNS:localhost"):
        assert san in text


def test_cli_offers_the_flower_engine_and_deploy() -> None:
    from typer.testing import CliRunner

    from fedcollm.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["run", "configs/smoke.toml", "--engine", "bogus"])
    assert bad.exit_code == 2 and "unknown --engine 'bogus'" in bad.output
    assert "--engine" in runner.invoke(app, ["run", "--help"]).output
    deploy = runner.invoke(app, ["deploy", "--help"]).output
    for option in ("--secagg", "--tls", "--auth"):
        assert option in deploy
