"""gradcomp: distributed and federated training with gradient compression and privacy."""

__version__ = "0.1.0"
