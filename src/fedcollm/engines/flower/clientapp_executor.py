"""A SuperNode's ClientApp executor that forks each ClientApp from a warm process.

Flower 1.42's SuperExec starts every ClientApp as a fresh `flwr-clientapp` process (its
`SubprocessExecutor`): Python, Flower's SuperNode packages and this project's ClientApp module are
imported again for every message, seconds of CPU each on a small machine, four at once when four
SuperNodes share it (bench/README.md, "Engines"). Flower offers warm pools only for AgentApps on
Kubernetes and no executor hook for ClientApps, so this module is the SuperExec loop of
`flwr.supercore.superexec.run_superexec` with one change: a task is run by
`flwr.supernode.runtime.run_clientapp` in a child forked from this process, which imported all of
that once. Everything else is Flower's: the SuperNode (started with `--isolation process`) hands
out the tasks and their tokens, the child talks to the SuperNode's Runtime API exactly as
`flwr-clientapp` would, and the process isolation between messages stays (one child per message).

The warm process imports no torch (the ClientApp module does not), so forking it is safe; what
is heavy lives in the node worker (`node_worker`), which the children hand their work to.

    python -m fedcollm.engines.flower.clientapp_executor --runtime-api-address 127.0.0.1:9094 \
        --insecure --parent-pid <SuperNode pid>
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.executor import ExecutionSpec, LaunchResult, SubprocessExecutor

DEFAULT_POLL_INTERVAL = 0.2
"""Seconds between asking the SuperNode for a task (Flower's SuperExec default: 1 s)."""


class ForkingExecutor:
    """Flower's `Executor` contract: ClientApp tasks run in forked children, others as Flower does."""

    def __init__(self) -> None:
        self._fallback = SubprocessExecutor()
        self.children: set[int] = set()

    def get_eligible_capacity(
        self,
        supported_task_types: set[TaskType],
        *,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> tuple[set[TaskType], set[str]]:
        """Every task type, at any time (no capacity gate, as Flower's subprocess executor)."""
        return set(supported_task_types), set()

    def wait_for_capacity(
        self,
        task_type: TaskType | None = None,
        *,
        fab_hash: str | None = None,
        insecure: bool = False,
        root_certificates_path: str | None = None,
    ) -> None:
        """No capacity gate: one child per task."""

    def launch(self, spec: ExecutionSpec) -> LaunchResult:
        """Fork a child for a ClientApp task; hand any other task type to Flower's executor."""
        if spec.task_type != TaskType.CLIENT_APP:
            return self._fallback.launch(spec)
        path = spec.root_certificates_path
        certificates = None if path is None else Path(path).read_bytes()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os._exit(_run_clientapp_child(spec, certificates))
        self.children.add(pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap the children that finished."""
        for pid in list(self.children):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.children.discard(pid)

    def close(self) -> None:
        """Children finish their message on their own; nothing to release here."""


def _run_clientapp_child(spec: ExecutionSpec, certificates: bytes | None) -> int:
    """In the forked child: run one ClientApp task as `flwr-clientapp` would; its exit code."""
    from flwr.supernode.runtime.run_clientapp import run_clientapp

    try:
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=certificates,
            parent_pid=spec.parent_pid,
        )
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:  # a child must never return into the parent's loop
        import traceback

        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


def _warm_imports() -> None:
    """What every ClientApp process would import: Flower's ClientApp runtime and our ClientApp."""
    import flwr.supernode.runtime.run_clientapp  # noqa: F401

    import fedcollm.engines.flower.client_app  # noqa: F401


def serve(
    runtime_api_address: str,
    *,
    insecure: bool,
    root_certificates_path: str | None,
    parent_pid: int | None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> None:
    """Acquire the SuperNode's tasks and launch them until the SuperNode goes away."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.superexec.plugin import AutoExecPlugin
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    _warm_imports()
    executor = ForkingExecutor()
    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates_path, insecure),
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    plugin = AutoExecPlugin(
        runtime_api_address=runtime_api_address,
        insecure=insecure,
        root_certificates_path=root_certificates_path,
        runtime_dependency_install=False,
        executor=executor,
    )
    print(
        f"fedcollm: ClientApp executor {os.getpid()} for {runtime_api_address}", file=sys.stderr, flush=True
    )
    if parent_pid is not None:
        # As Flower's SuperExec: a thread that interrupts this loop once the SuperNode is gone
        # (the Runtime API client retries a vanished node for ever). Forked children do not
        # inherit it; each watches this process instead (`parent_pid` of its spec).
        start_parent_process_monitor(parent_pid)
    try:
        while True:
            executor.reconcile()
            supported, fab_hashes = executor.get_eligible_capacity(set(plugin.supported_task_types))
            reply = client.AcquireTask(
                AcquireTaskRequest(supported_task_types=supported, agentapp_fab_hashes=fab_hashes)
            )
            if reply.HasField("task") and reply.token:
                plugin.launch_task(token=reply.token, task=reply.task)
                continue
            time.sleep(poll_interval)
    except KeyboardInterrupt:
        print(f"fedcollm: ClientApp executor {os.getpid()} stopped", file=sys.stderr, flush=True)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (see the module's docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", default=None)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument("--poll-interval", type=float, default=DEFAULT_POLL_INTERVAL)
    args = parser.parse_args(argv)
    serve(
        args.runtime_api_address,
        insecure=args.insecure,
        root_certificates_path=args.root_certificates,
        parent_pid=args.parent_pid,
        poll_interval=args.poll_interval,
    )


if __name__ == "__main__":
    main()
