"""The federated client runtime: one implementation of a client's round, whatever carries it.

`gradcomp client` (client/grpc_client.py, over gRPC), the in-process simulation and the `--grpc`
simulation (sim/) all build their updates here, so for the same job, seed, client, round and
client noise key they send byte-identical `SubmitUpdateRequest` messages (tests/test_client_drift.py).

- `config.LocalTrainingConfig`: what the coordinator's `TrainingConfig` says (task, local SGD,
  client compression spec, job seed); `checks` run on it before anything trains.
- `data.ClientData`: a client's examples as tensors; `iid_shard` for a real client's shard.
- `train.LocalTrainer` / `train.SGDTrainer`: local training, `train(params, data, cfg, seed) ->
  TrainResult`; the one place a vectorised cohort trainer replaces.
- `runtime.ClientRuntime`: the global model once per version, then train -> update = local -
  global -> compression with the client's error-feedback memory -> the protobuf request.
- `runtime.ClientMemory`: what a client carries between rounds (residuals, last round trained).
- `seeds.round_seed`: the seed of a client's public randomness in a round (batch order, selection).
- `noisekey`: the client's secret key (a 0600 key file) and the per-release key its local-DP noise
  is drawn from; the coordinator, which sends the job seed, cannot regenerate that noise.
- `ledger.ClientLedger`: the client's own record of its local-DP releases and its epsilon over them
  (`gradcomp client --max-epsilon` refuses a release past it, whatever the coordinator asks).

Nothing here imports `server/` or `sim/`; both sides share only `protocol/`.
"""
