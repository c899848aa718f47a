"""The embedded engine: every party in this process, clients one after another.

All clients and the server share one loaded SLM base model and swap adapters in and out, so
memory does not grow with the number of clients.
"""

from __future__ import annotations

from fedcollm.algorithms import Algorithm
from fedcollm.runtime import ClientReply, ClientRuntime, Payload, Reporter


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
