"""The coordinator's `server:` and `limits:` sections of a federated job file (`config.fed.FedJob`).

The bounds on what a peer can hold on the coordinator and on what it sends live here together;
docs/security.md ("Bounds") lists them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from gradcomp.config.common import StrictModel

# Limits a client holds its coordinator to as well (client/answers.py): a job outside them is refused
# here, and a coordinator's answer outside them is refused by the client.
MIN_CHUNK_BYTES = 1024  # smallest limits.chunk_bytes: bounds the chunk count of a model of known size
HEARTBEAT_SECONDS = (0.1, 3600.0)  # server.heartbeat_seconds: faster is a busy loop, slower is not a heartbeat


class LimitsSection(StrictModel):
    """Bounds on what clients may send and claim (both ends hold the message limits)."""

    max_message_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="gRPC send/receive limit, both ends")
    max_update_bytes: int = Field(32 * 1024 * 1024, ge=64, description="largest compressed update accepted")
    chunk_bytes: int = Field(
        2 * 1024 * 1024, ge=MIN_CHUNK_BYTES, description="global model is sent in chunks of this size"
    )
    stream_window_bytes: int = Field(
        1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="HTTP/2 receive window per call: bytes a peer may send ahead of the coordinator reading them "
        "(bounds what unauthenticated calls can make it buffer; larger helps uploads over high-latency links)",
    )
    rpc_timeout_seconds: float = Field(30.0, gt=0, description="deadline of every RPC a client makes")
    # What one peer can hold on the coordinator (docs/security.md, "Bounds").
    max_calls_per_client: int = Field(4, ge=2, description="calls one token may have in progress at once")
    request_read_seconds: float = Field(30.0, gt=0, description="an authenticated call's body must arrive by then")
    max_connections: int = Field(
        1000, ge=8, description="open connections accepted; at most the soft file limit minus 64 (raised to the hard)"
    )
    handshake_seconds: float = Field(10.0, gt=0, description="a connection's TLS/HTTP/2 handshake must end by then")
    connection_idle_seconds: float = Field(120.0, gt=0, description="a connection with no call this long is closed")
    connection_age_seconds: float = Field(3600.0, gt=0, description="every connection is closed (GOAWAY) this old")
    max_health_watchers: int = Field(16, ge=0, description="grpc.health.v1 Watch streams open at once (no token)")
    max_examples: int = Field(
        10_000,
        ge=1,
        description="largest num_examples one update may claim: FedAvg weights by it, so an unbounded claim "
        "would let one client outweigh the rest (a digits client holds a few hundred; raise it for larger shards)",
    )
    max_weight_share: float = Field(
        0.5,
        gt=0,
        le=1,
        description="largest share of a round's weighted mean one client gets, whatever it claims (the excess "
        "goes to the others in proportion; uniform weights when the round is too small to meet it)",
    )
    max_update_norm: float = Field(
        10.0,
        gt=0,
        description="L2 bound on every accepted update, in every privacy mode: a larger one is scaled down to it "
        "(counted in gradcomp_fed_updates_clipped_total) rather than refused, so an honest client with a large "
        "step still counts (digits-MLP updates are 0.5 to 5; raise it for larger models)",
    )


class ServerSection(StrictModel):
    """The coordinator's address, TLS, tokens and timings."""

    host: str | None = Field(
        None,
        description="bind address; default 127.0.0.1 without TLS, 0.0.0.0 with it; an address other than "
        "loopback without TLS is refused unless insecure_plaintext is true",
    )
    insecure_plaintext: bool = Field(
        False,
        description="allow serving without TLS on an address other than loopback (gradcomp serve --insecure): "
        "tokens, updates and the model then cross the network in clear text",
    )
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free port)")
    metrics_port: int | None = Field(None, ge=0, le=65535, description="Prometheus /metrics port (off if unset)")
    metrics_host: str = Field(
        "127.0.0.1", description="/metrics bind address (plain HTTP even under TLS: widen it only on purpose)"
    )
    tls_cert: Path | None = Field(None, description="server certificate (PEM); with tls_key turns TLS on")
    tls_key: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca: Path | None = Field(None, description="require client certificates signed by this CA")
    tokens_file: Path | None = Field(
        None, description="lines 'client-name token [cert-identity]' (identity: CN/SAN required with mutual TLS)"
    )
    tokens_env: str = Field("GRADCOMP_TOKENS", description="env var 'name=token,name=token' (used if no file)")
    max_concurrent_rpcs: int = Field(
        64, ge=4, description="calls served at once; more are refused with RESOURCE_EXHAUSTED (clients retry)"
    )
    heartbeat_seconds: float = Field(
        5.0, ge=HEARTBEAT_SECONDS[0], le=HEARTBEAT_SECONDS[1], description="how often clients call Heartbeat"
    )
    liveness_seconds: float | None = Field(
        None,
        gt=0,
        description="a client counts as connected (and selectable) this long after its last authenticated call; "
        "default 3 x heartbeat_seconds",
    )
    linger_seconds: float = Field(10.0, ge=0, description="keep answering 'done' this long after the last round")
    metrics_linger_seconds: float = Field(
        0.0, ge=0, description="keep /metrics up this long after the job ends, so the last values get scraped"
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerSection:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("server.tls_cert and server.tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("server.tls_client_ca (mutual TLS) needs server.tls_cert and server.tls_key")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def liveness_window(self) -> float:
        """Seconds since its last call after which a client no longer counts as connected."""
        return self.liveness_seconds if self.liveness_seconds is not None else 3 * self.heartbeat_seconds
