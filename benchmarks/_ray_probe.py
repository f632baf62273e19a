"""What a round of Ray actor calls costs on this machine: no-ops, and returning a round's request bytes.

Run by `fl_anchors.py --parts breakdown` as its own process (it starts a local Ray the way
gradcomp does, `raycluster.connect`, inline results included) and prints one RESULT line:
median milliseconds per round of calls (one per actor, concurrent, as the pool makes them; the
two kinds of round alternate) for a no-op and for returning `--kib` KiB in all as `--pieces`
bytes objects split over the actors (what pool actors send back: one serialised request per
client), and the implied MB/s.

    python benchmarks/_ray_probe.py --kib 390 --pieces 10 --actors 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ratio_to_baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kib", type=int, default=390)
    parser.add_argument("--pieces", type=int, default=10)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args()

    import ray

    from gradcomp.raycluster import connect

    connect(None, num_cpus=args.actors)

    @ray.remote(num_cpus=1)
    class Echo:
        def noop(self) -> int:
            return 0

        def payload(self, kib: int, pieces: int) -> list[bytes]:
            return [bytes(kib * 1024 // pieces) for _ in range(pieces)]

    actors = [Echo.remote() for _ in range(args.actors)]
    kib, pieces = args.kib // args.actors, max(1, args.pieces // args.actors)
    full, noop, _ = ratio_to_baseline(  # medians, the two kinds of round alternating
        lambda: ray.get([a.payload.remote(kib, pieces) for a in actors]),
        lambda: ray.get([a.noop.remote() for a in actors]),
        repeats=args.calls,
    )
    extra = (full - noop) * 1e3
    out = {
        "noop_ms": round(noop * 1e3, 3),
        "payload_ms": round(full * 1e3, 3),
        "payload_kib": args.kib,
        "pieces": args.pieces,
        "actors": args.actors,
        "mb_per_s_beyond_noop": round(args.kib * 1024 / 1e6 / (extra / 1e3), 1) if extra > 0 else None,
    }
    ray.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
