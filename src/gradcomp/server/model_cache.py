"""The per-version cache of the serialised global model, cut into chunks for `GetModel`.

A model travels as one serialised `ModelWeights` cut into chunks of `chunk_bytes`;
`ModelCache` serialises each version once, however many clients pull it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import torch

from gradcomp.protocol.codec import serialize_model


class ModelCache:
    """Serialised global model per version (the latest few), built once under a lock."""

    def __init__(self, chunk_bytes: int, keep: int = 2):
        self.chunk_bytes = chunk_bytes
        self.keep = keep
        self._data: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.serialisations = 0

    def get(self, version: int, params: Mapping[str, torch.Tensor] | None = None) -> bytes | None:
        """Bytes of `version`; serialises `params` if given and not cached; None if unknown."""
        with self._lock:
            data = self._data.get(version)
            if data is None and params is not None:
                data = self._data[version] = serialize_model(params, version)
                self.serialisations += 1
                for old in sorted(self._data)[: -self.keep]:
                    del self._data[old]
            return data

    def num_chunks(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.chunk_bytes))

    def chunk(self, data: bytes, index: int) -> bytes:
        return data[index * self.chunk_bytes : (index + 1) * self.chunk_bytes]
