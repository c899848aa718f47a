"""The embedded engine: every party in this process, clients one after another.

All clients and the server share one loaded SLM base model and swap adapters in and out, so
memory does not grow with the number of clients. It is the default engine (`fedcollm run`).
"""

from __future__ import annotations

from pathlib import Path

from fedcollm.algorithms import Algorithm
from fedcollm.config import ExperimentConfig
from fedcollm.data import DataError
from fedcollm.evaluation.baselines import BaselineStore
from fedcollm.experiment.loop import run_rounds
from fedcollm.experiment.recording import RunRecorder
from fedcollm.experiment.setup import prepare_server
from fedcollm.parties.client import ClientRuntime
from fedcollm.parties.loading import load_client_models
from fedcollm.parties.resources import SharedResources
from fedcollm.protocol import ClientReply, ClientStates, Payload, Reporter, SecureAggregate


class InProcessTransport:
    """Calls each client's `client_fit` directly, in client order (the loop's `Transport`)."""

    secure = False
    """No secure aggregation: every party is in this process, the server sees every upload."""

    clients_checkpoint_themselves = False
    """The clients' state is in this process: the server's checkpoint holds it."""

    def __init__(
        self,
        algorithm: Algorithm,
        clients: list[ClientRuntime],
        reporter: Reporter,
        recorder: RunRecorder | None = None,
        data_errors: dict[int, str] | None = None,
    ) -> None:
        self.algorithm = algorithm
        self.clients = clients
        self.data_errors = dict(data_errors or {})
        """Clients left out because their data did not fit (`ExperimentData.client_records`)."""
        self.reporter = reporter
        self.fit_reporters = {client.client_id: reporter for client in clients}
        """The reporter of each client's training: with a `recorder`, its optimiser steps also go to
        the run's trackers (`report_to`) as `client-K`'s."""
        if recorder is not None:
            self.fit_reporters = {k: recorder.reporter(reporter, f"client-{k}") for k in self.fit_reporters}

    def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
        return [
            self.algorithm.client_fit(client, payload, rnd, self.fit_reporters[client.client_id])
            for client in self.clients
        ]

    def fit_aggregate(self, payload: Payload, rnd: int) -> SecureAggregate:
        raise NotImplementedError("the embedded engine has no secure aggregation (`secure` is False)")

    def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]:
        return [
            self.algorithm.client_evaluate(client, payload, rnd, self.reporter) for client in self.clients
        ]

    def client_data_errors(self) -> dict[int, str]:
        return dict(self.data_errors)

    def client_states(self) -> ClientStates:
        """What each client keeps between rounds, for checkpoints."""
        return {client.client_id: self.algorithm.client_state(client) for client in self.clients}

    def restore_client_states(self, states: ClientStates) -> None:
        for client in self.clients:
            self.algorithm.restore_client_state(client, states.get(client.client_id, {}))


def run_local(
    config: ExperimentConfig,
    out: Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    reporter: Reporter | None = None,
    baselines: BaselineStore | None = None,
) -> RunRecorder:
    """Run `config` with every party in this process; write its run folder to `out`.

    `baselines`: where base-model evaluations are kept across runs (a comparison's store).
    """
    reporter = reporter or Reporter()
    resources = SharedResources(baselines=baselines)
    algorithm, server, recorder = prepare_server(
        config, out, overwrite=overwrite, resume=resume, reporter=reporter, resources=resources
    )
    client_models = load_client_models(config, server.slm)
    clients, data_errors = [], {}
    for k, lm in enumerate(client_models if algorithm.uses_clients else []):
        try:
            clients.append(ClientRuntime.create(config, server.data, k, lm, resources))
        except DataError as exc:
            data_errors[k] = str(exc)
    transport = InProcessTransport(algorithm, clients, reporter, recorder, data_errors)
    run_rounds(algorithm, server, transport, recorder, reporter, resume=resume)
    return recorder
