"""Federated building blocks on named arrays: aggregation rules, upload screening, transport precision."""
