"""`gradcomp client`: the federated participant over gRPC, mirroring `server/`.

- `grpc_client`: the transport loop (join, pull tasks, fetch models, submit, heartbeat, retries)
  around the shared client runtime in `fedclient/`.
- `answers`: the bounds a client holds its coordinator's answers to before acting on them.
"""
