"""The seed of a client's public randomness in a round (batch order, random selection).

Keyed by (job seed, client name, round), never by a counter the client keeps, so a restarted
client, a simulated one and a real one draw the same numbers for the same round. The coordinator
knows all three, so nothing that protects data may come from it: DP noise comes from the
client's secret key (`noisekey`).
"""

from __future__ import annotations

import zlib


def round_seed(job_seed: int, client: str, round: int) -> int:
    """A 31-bit seed for `client`'s local training and compression in `round`."""
    return zlib.crc32(f"{job_seed}/{client}/{round}".encode()) & 0x7FFFFFFF
