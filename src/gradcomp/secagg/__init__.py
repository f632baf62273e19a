"""Secure aggregation (SecAgg+, Bell et al. 2020, after Bonawitz et al. 2017): the coordinator
learns the modular sum of the surviving clients' integer updates and nothing about any one of them.

Pure state machines over explicit messages (`messages`), no I/O, so a gRPC transport and an
in-process simulation (`simulate`) drive the same code: `client.SecAggClient` and
`server.SecAggServer` run one round; `params` holds and bounds its settings; `quantise` turns a
float update into a ring element whose sum cannot wrap; `shamir`, `crypto`, `graph` and `masks`
are the primitives. What it protects, and against whom, is in docs/security.md.
"""
