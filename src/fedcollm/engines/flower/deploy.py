"""Deployment on Flower: a SuperLink and K SuperNodes as separate processes, and runs on them.

On real machines each party runs one command (see `docs/deployment.md` and `scripts/`):

    server:    flower-superlink --ssl-certfile ... --host 0.0.0.0 --port 9093
    client k:  flower-supernode --superlink SERVER:9093 --root-certificates ca.pem \
                   --node-config 'partition-id=k num-partitions=K'
    anyone:    flwr run . fedcollm --run-config 'experiment="/abs/config.toml" ...'

`LocalFederation` does the same on 127.0.0.1 (for `fedcollm deploy`, the tests and the bench):
every process in its own process group with its own `FLWR_HOME` under the work folder,
telemetry and runtime dependency installation off, and everything it started — including the
SuperExec, ServerApp and ClientApp processes Flower spawns detached — stopped on exit, also
when the run fails.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcollm.engines.flower.options import FlowerEngineError
from fedcollm.engines.supervision import Managed, alive, descendants, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[4]
SCRIPTS = REPO / "scripts"


def app_dir() -> Path:
    """The folder whose `pyproject.toml` declares the Flower App (the repository root)."""
    if (REPO / "pyproject.toml").is_file() and "[tool.flwr.app]" in (REPO / "pyproject.toml").read_text():
        return REPO
    raise FlowerEngineError(
        f"no Flower App found at {REPO} (pyproject.toml with [tool.flwr.app]); run from a "
        "checkout of the fedcollm repository"
    )


def flower_env(home: Path) -> dict[str, str]:
    """Environment for one Flower process: own FLWR_HOME, no telemetry, no dependency installs."""
    home.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(home.resolve()),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        # SuperExec checks for new ServerApp/ClientApp tasks every second by default.
        FLWR_SUPEREXEC_TASK_POLL_INTERVAL="0.2",
        # Flower starts `flower-superexec`, `flwr-serverapp` and `flwr-clientapp` by name.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


# --------------------------------------------------------------------------------------------


@dataclass
class RunStatus:
    run_id: int
    status: str
    """Flower's status string, e.g. 'finished:completed', 'finished:failed', 'running'."""

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class LocalFederation:
    """A SuperLink and K SuperNodes on this machine, each a separate process (group).

    `tls` makes a local CA and certificates with `scripts/make_certs.sh` and uses them between
    the SuperNodes, the CLI and the SuperLink; `auth` (needs `tls`) also gives every SuperNode
    a key pair, registers the public keys with the SuperLink (`flwr supernode register`) and
    starts the SuperLink with `--enable-supernode-auth`, so only those SuperNodes may connect.
    """

    def __init__(
        self,
        workdir: Path,
        num_clients: int,
        *,
        tls: bool = False,
        auth: bool = False,
        host: str = "127.0.0.1",
        startup_timeout: float = 60.0,
        site_config: Mapping[int, Mapping[str, str]] | None = None,
        threads: int | None = None,
        warm_clientapps: bool = True,
    ) -> None:
        """`site_config`: node-config entries for some SuperNodes beyond which client they are,
        e.g. `{0: {"data-path": "/data/site-0.jsonl"}}` (each site's own file). `threads`: CPU
        threads per SuperNode (node config `threads`); default: this machine's cores shared out
        among the SuperNodes, at least one each, as on separate machines none would compete.
        `warm_clientapps`: each SuperNode's ClientApps are forked from a warm executor
        (`clientapp_executor`); off, Flower's SuperExec starts a fresh process per message."""
        if auth and not tls:
            raise FlowerEngineError("SuperNode authentication needs TLS (Flower refuses it otherwise)")
        self.workdir = workdir.resolve()
        self.num_clients = num_clients
        self.tls = tls
        self.auth = auth
        self.host = host
        self.startup_timeout = startup_timeout
        self.site_config = {int(k): dict(v) for k, v in (site_config or {}).items()}
        self.warm_clientapps = warm_clientapps
        self.threads = threads or max(1, (os.cpu_count() or 1) // max(1, num_clients))
        self.port = 0
        self.superlink: Managed | None = None
        self.supernodes: dict[int, Managed] = {}
        self.certs = self.workdir / "certificates"
        self.keys = self.workdir / "keys"
        self.logs = self.workdir / "logs"
        self.homes = self.workdir / ".flwr"

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.tls and not (self.certs / "ca.crt").is_file():
            run_script("make_certs.sh", str(self.certs), self.host)
        self.port = free_port(self.host)
        self.start_superlink()
        self._write_cli_config()
        if self.auth:
            self._register_supernodes()
        for k in range(self.num_clients):
            self.start_supernode(k)

    def stop(self) -> None:
        """Stop every process this federation started (SuperNodes first, then the SuperLink)."""
        for managed in [*self.supernodes.values(), *([self.superlink] if self.superlink else [])]:
            managed.stop()

    def leftover_pids(self) -> list[int]:
        """Processes started by this federation that are still alive (should be none after stop)."""
        managed = [*self.supernodes.values(), *([self.superlink] if self.superlink else [])]
        return sorted(p for m in managed for p, start in m.known.items() if alive(p, start))

    # -- processes -----------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> Managed:
        log = self.logs / f"{name}.log"
        handle = log.open("ab")
        proc = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=flower_env(self.homes / name),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        return Managed(name, proc, log)

    def superlink_command(self) -> list[str]:
        return superlink_command(self.host, self.port, self.certs if self.tls else None, auth=self.auth)

    def start_superlink(self) -> None:
        self.superlink = self._spawn("superlink", self.superlink_command())
        wait_for_port(self.host, self.port, self.startup_timeout, self.superlink.proc)
        self.superlink.remember()

    def start_supernode(self, client: int) -> None:
        runtime_port = free_port(self.host)
        args = supernode_command(
            f"{self.host}:{self.port}",
            client,
            self.num_clients,
            runtime_port=runtime_port,
            warm_clientapps=self.warm_clientapps,
            ca=self.certs / "ca.crt" if self.tls else None,
            private_key=self.keys / f"supernode-{client}" if self.auth else None,
            extra={"threads": self.threads, **self.site_config.get(client, {})},
        )
        node = self._spawn(f"supernode-{client}", args)
        self.supernodes[client] = node
        if self.warm_clientapps:
            node.adopt(self._start_executor(node, runtime_port).pid)

    def _start_executor(self, node: Managed, runtime_port: int) -> subprocess.Popen[bytes]:
        """The SuperNode's ClientApp executor (`clientapp_executor`); adopted by the node's
        `Managed`, so that signals to the node reach it and the ClientApps it forks (its group)."""
        handle = node.log.open("ab")
        proc = subprocess.Popen(
            [sys.executable, *clientapp_executor_command(runtime_port), "--parent-pid", str(node.proc.pid)],
            cwd=self.workdir,
            env=flower_env(self.homes / node.name),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        return proc

    def kill_supernode(self, client: int) -> None:
        """Kill a SuperNode and what it spawned at once (SIGKILL), as a crashing machine would."""
        node = self.supernodes[client]
        node.signal(signal.SIGKILL)
        node.proc.wait(timeout=10)

    # -- the flwr CLI --------------------------------------------------------------------------

    def _write_cli_config(self) -> None:
        home = self.homes / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            cli_config(f"{self.host}:{self.port}", self.certs / "ca.crt" if self.tls else None),
            encoding="utf-8",
        )

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a `flwr` CLI command against this federation's SuperLink."""
        result = subprocess.run(
            [str(Path(sys.executable).parent / "flwr"), *args],
            cwd=self.workdir,
            env=flower_env(self.homes / "cli"),
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
        if result.returncode != 0:
            raise FlowerEngineError(
                f"flwr {' '.join(args[:2])} failed ({result.returncode}): "
                f"{result.stdout[-2000:]}{result.stderr[-2000:]}"
            )
        return result

    def _register_supernodes(self) -> None:
        self.keys.mkdir(parents=True, exist_ok=True)
        for k in range(self.num_clients):
            key = self.keys / f"supernode-{k}"
            if not key.is_file():
                subprocess.run(
                    [
                        "ssh-keygen",
                        "-q",
                        "-t",
                        "ecdsa",
                        "-b",
                        "384",
                        "-N",
                        "",
                        "-f",
                        str(key),
                        "-C",
                        f"supernode-{k}",
                    ],
                    check=True,
                    capture_output=True,
                )
            self.flwr("supernode", "register", str(key.with_suffix(".pub")), "fedcollm")

    def submit(self, run_config: Mapping[str, Any], app: Path | None = None) -> int:
        """Start a run of the Flower App; returns its run id."""
        result = self.flwr(
            "run",
            str(app or app_dir()),
            "fedcollm",
            "--run-config",
            run_config_arg(run_config),
            "--format",
            "json",
        )
        payload = _last_json(result.stdout)
        if not payload.get("success"):
            raise FlowerEngineError(f"flwr run did not start the run: {result.stdout[-2000:]}")
        return int(payload["run-id"])

    def status(self, run_id: int) -> RunStatus:
        result = self.flwr("ls", "fedcollm", "--run-id", str(run_id), "--format", "json")
        payload = _last_json(result.stdout)
        runs = payload.get("runs", [])
        if not runs:
            raise FlowerEngineError(f"the SuperLink does not know run {run_id}: {result.stdout[-500:]}")
        return RunStatus(run_id, str(runs[0].get("status", "")))

    def serverapp_pids(self) -> list[int]:
        """The ServerApp processes the SuperLink runs now (read from /proc; [] elsewhere)."""
        if self.superlink is None:
            return []
        found = []
        for pid in descendants(self.superlink.proc.pid):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "flwr-serverapp" in command:
                found.append(pid)
        return found

    def wait(
        self, run_id: int, timeout: float = 3600.0, poll: float = 2.0, check_every: float = 30.0
    ) -> RunStatus:
        """Wait until the run finishes; raise if it fails, times out or the SuperLink dies.

        The run's status comes from `flwr ls`, a process that costs about a CPU-second: it is
        asked while no ServerApp process runs (the run is starting or has ended) and otherwise
        every `check_every` seconds only, so waiting does not take the CPU from the run it waits
        for (asked every 2 s it took half a core of this 2-core machine)."""
        deadline = time.monotonic() + timeout
        checked = -math.inf
        while True:
            if self.superlink is None or not self.superlink.running():
                raise FlowerEngineError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
            self.superlink.remember()
            for node in self.supernodes.values():
                if node.running():
                    node.remember()
            if self.serverapp_pids() and time.monotonic() - checked < check_every:
                time.sleep(poll)
                continue
            checked = time.monotonic()
            state = self.status(run_id)
            if state.finished:
                if not state.ok:
                    raise FlowerEngineError(
                        f"run {run_id} ended as {state.status}:\n{self.run_log(run_id)[-4000:]}"
                    )
                return state
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), "fedcollm")
                raise FlowerEngineError(f"run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(poll)

    def run_log(self, run_id: int) -> str:
        """The ServerApp's log of a run (`flwr log`)."""
        try:
            result = self.flwr("log", str(run_id), "fedcollm", "--show", timeout=30)
        except (FlowerEngineError, subprocess.TimeoutExpired) as exc:
            return f"(no log: {exc})"
        return result.stdout + result.stderr


def _last_json(text: str) -> dict[str, Any]:
    start = text.find("{")
    if start < 0:
        raise FlowerEngineError(f"expected JSON from flwr, got: {text[-1000:]}")
    return json.loads(text[start:])


# --------------------------------------------------------------------------------------------
# Commands, the same the scripts in `scripts/` and docs/deployment.md spell out.


def superlink_command(host: str, port: int, certs: Path | None, *, auth: bool = False) -> list[str]:
    args = [
        "flower-superlink",
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        args.append("--insecure")
    else:
        args += [
            "--ssl-ca-certfile",
            str(certs / "ca.crt"),
            "--ssl-certfile",
            str(certs / "server.pem"),
            "--ssl-keyfile",
            str(certs / "server.key"),
        ]
    if auth:
        args.append("--enable-supernode-auth")
    return args


def supernode_command(
    superlink: str,
    client: int,
    num_clients: int,
    *,
    runtime_port: int,
    ca: Path | None = None,
    private_key: Path | None = None,
    extra: Mapping[str, Any] | None = None,
    warm_clientapps: bool = True,
) -> list[str]:
    """`flower-supernode`'s command line; `extra`: further node-config entries (`data-path`).

    `warm_clientapps`: the node hands its ClientApp tasks to a `clientapp_executor` started beside
    it (`--isolation process`; `clientapp_executor_command`) instead of Flower's SuperExec."""
    node_config = {"partition-id": client, "num-partitions": num_clients, **(extra or {})}
    args = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--port",
        str(runtime_port),
        "--node-config",
        run_config_arg(node_config),
    ]
    args += ["--insecure"] if ca is None else ["--root-certificates", str(ca)]
    if private_key is not None:
        args += ["--auth-supernode-private-key", str(private_key)]
    if warm_clientapps:
        args += ["--isolation", "process"]
    return args


def clientapp_executor_command(runtime_port: int) -> list[str]:
    """The arguments after the Python interpreter that start a SuperNode's ClientApp executor
    (`clientapp_executor`) for the node whose Runtime API listens on `runtime_port` here; the
    caller adds `--parent-pid` (the SuperNode's), so the executor stops with its node."""
    return [
        "-m",
        "fedcollm.engines.flower.clientapp_executor",
        "--runtime-api-address",
        f"127.0.0.1:{runtime_port}",
        "--insecure",
    ]


def cli_config(address: str, ca: Path | None) -> str:
    """`$FLWR_HOME/config.toml` naming this SuperLink as connection `fedcollm` (the default)."""
    lines = ["[superlink]", 'default = "fedcollm"', "", "[superlink.fedcollm]", f'address = "{address}"']
    lines += ["insecure = true"] if ca is None else [f'root-certificates = "{ca}"']
    return "\n".join(lines) + "\n"


def run_config_arg(values: Mapping[str, Any]) -> str:
    """`--run-config` value: space-separated key=TOML-value pairs."""
    import tomli_w

    parts = []
    for key, value in values.items():
        rendered = tomli_w.dumps({"v": str(value) if isinstance(value, Path) else value})
        parts.append(f"{key}={rendered.split('=', 1)[1].strip()}")
    return " ".join(parts)


def run_script(name: str, *args: str) -> None:
    script = SCRIPTS / name
    result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise FlowerEngineError(f"{script} failed: {result.stderr[-2000:]}")


def describe(federation: LocalFederation) -> str:
    link = shlex.join(federation.superlink_command())
    return f"SuperLink: {link}\nlogs: {federation.logs}"


def deploy_experiment(
    config_path: Path,
    overrides: list[str],
    out: Path,
    *,
    num_clients: int,
    tls: bool = True,
    auth: bool = False,
    options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    timeout: float = 24 * 3600.0,
    on_status: Any = None,
    site_data: Mapping[int, Path] | None = None,
    site_eval: Mapping[int, Path] | None = None,
    warm_clientapps: bool = True,
) -> RunStatus:
    """Run an experiment on a SuperLink and `num_clients` SuperNodes started here (127.0.0.1).

    Flower's files (homes, logs, certificates) go to `<out>/flower`; every process is stopped
    when the run ends or fails. `site_data`: client -> its own training file, given to that
    client's SuperNode as `--node-config data-path=...` (experiments with client files);
    `site_eval`: client -> its own evaluation file, as `eval-path=...` (`task.client_eval`).
    `warm_clientapps`: fork each ClientApp from a warm executor (default) rather than letting
    Flower start a fresh process per message (`LocalFederation`).
    """
    out = out.resolve()
    run_config: dict[str, Any] = {
        "experiment": str(config_path.resolve()),
        "set": shlex.join(overrides),
        "out": str(out),
        "overwrite": overwrite,
        **(options or {}),
    }
    sites: dict[int, dict[str, str]] = {}
    for key, files in (("data-path", site_data), ("eval-path", site_eval)):
        for k, path in (files or {}).items():
            sites.setdefault(k, {})[key] = str(Path(path).resolve())
    federation = LocalFederation(
        out / "flower", num_clients, tls=tls, auth=auth, site_config=sites, warm_clientapps=warm_clientapps
    )
    with federation:
        run_id = federation.submit(run_config)
        if on_status is not None:
            on_status(f"run {run_id} submitted; logs in {federation.logs}")
        return federation.wait(run_id, timeout=timeout)
