"""The embedded engine: every party in this process, clients one after another.

All clients and the server share one loaded SLM base model and swap adapters in and out, so
memory does not grow with the number of clients.
"""

from __future__ import annotations

from typing import Any

from fedcollm.algorithms import Algorithm
from fedcollm.parties.runtime import ClientReply, ClientRuntime, Payload, Reporter


class InProcessTransport:
    """Calls each client's `client_fit` directly, in client order."""

    def __init__(self, algorithm: Algorithm, clients: list[ClientRuntime], reporter: Reporter) -> None:
        self.algorithm = algorithm
        self.clients = clients
        self.reporter = reporter

    def fit(self, payload: Payload, rnd: int) -> list[ClientReply]:
        return [self.algorithm.client_fit(client, payload, rnd, self.reporter) for client in self.clients]

    def evaluate(self, payload: Payload, rnd: int) -> list[ClientReply]:
        return [
            self.algorithm.client_evaluate(client, payload, rnd, self.reporter) for client in self.clients
        ]

    def client_states(self) -> dict[int, dict[str, Any]]:
        """What each client keeps between rounds, for checkpoints."""
        return {client.client_id: self.algorithm.client_state(client) for client in self.clients}

    def restore_client_states(self, states: dict[int, dict[str, Any]]) -> None:
        for client in self.clients:
            self.algorithm.restore_client_state(client, states.get(client.client_id, {}))
