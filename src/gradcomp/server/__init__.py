"""Federated coordinator: gRPC service, rounds, strategies, validation, persistence."""
