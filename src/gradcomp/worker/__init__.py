"""Data-parallel training (DDP hook, collectives, Ray Train loop) and the federated client."""
