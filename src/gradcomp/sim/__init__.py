"""Federated simulation of many clients on Ray, and data partitioners."""
