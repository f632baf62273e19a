"""The federated wire protocol, shared by the coordinator (`server/`), the client runtime
(`fedclient/`) and the simulator (`sim/`); none of those imports another for it.

- `codec`: tensors and models <-> protobuf, without pickle.
- `messages`: `PROTOCOL_VERSION`, the `TrainingConfig` a job hands its clients, building and
  reading `SubmitUpdateRequest`.
- `model`: which tensors of a model travel (the float entries of its state dict) and the seeded
  initial global model.
- `received`: a global model from the coordinator, checked against the client's own task model
  before anything is built from a shape the coordinator declared.
- `channel`: gRPC message limits and client TLS credentials.
"""
