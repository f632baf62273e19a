"""Who is calling the coordinator, decided before a request's bytes are read.

Every client holds a bearer token (`authorization: Bearer <token>` metadata) that names it.
With mutual TLS the token is also bound to a certificate: the tokens file says which
certificate identity (CN or a SAN; by default the client's name) must present it, so a
stolen token is useless without the matching key and one client's certificate cannot carry
another client's token.

`AuthGate` is a gRPC server interceptor. gRPC Python calls interceptors with the method
name and the call's metadata only, before any request message is received, but a unary
handler then receives and deserialises the whole message before the servicer runs. So the
gate answers a call with a bad token through a request-streaming handler that never reads
its request: the bytes of an unauthenticated call stay in HTTP/2 flow control (a bounded
window, see `server_options`) and are dropped with the stream. An authenticated call is
served by the same kind of handler, which checks the peer certificate, then reads exactly
one message as raw bytes, refuses it when it is over the size limit (counted as
`too_large`) or does not parse (`INVALID_ARGUMENT`, never gRPC's own `INTERNAL`
"Exception deserializing request!"), and only then calls the servicer.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gradcomp.config.serve import ServerSection
from gradcomp.errors import UserError

log = logging.getLogger("gradcomp.server")
SERVICE_PREFIX = "/gradcomp.v1.Coordinator/"
# gRPC's own words when server.max_concurrent_rpcs are in progress; clients retry a refusal that says them,
# and the per-client limit says them too.
BUSY_DETAILS = "Concurrent RPC limit exceeded"
# Called for every refusal the gate makes: (method, status code, rejected_total reason or None, message).
RefusalHook = Callable[[str, grpc.StatusCode, "str | None", str], None]


@dataclass(frozen=True)
class ClientIdentity:
    """A client as the coordinator knows it: its name and the certificate identity bound to its token."""

    name: str
    cert_identity: str


# --- the tokens file -------------------------------------------------------------------------
def parse_tokens_text(text: str, source: str) -> dict[str, ClientIdentity]:
    """'name token [cert-identity]' lines, or 'name=token' items separated by commas (the env var).

    A token is taken whole: an '=' in it is part of it (`Pr3fix99=...` once logged in as `Pr3fix99`
    when every '=' was read as a separator). The env form splits at the first '=' only, so it has no
    certificate identity (the name is used); give one in the tokens file."""
    out: dict[str, ClientIdentity] = {}
    for i, (name, token, ident) in enumerate(_token_entries(text, source), 1):
        if len(token) < 8:
            raise UserError(f"{source}: token of {name!r} is shorter than 8 characters")
        if token in out:
            raise UserError(f"{source}: clients {out[token].name!r} and {name!r} share a token")
        if any(c.name == name for c in out.values()):
            raise UserError(f"{source}: client {name!r} has two tokens")
        if weak_token(token):
            log.warning("%s: the token of client %r (entry %d) is weak: use %d+ random characters "
                        "(python -m gradcomp.server.tls makes some)", source, name, i, STRONG_TOKEN_CHARS)  # fmt: skip
        out[token] = ClientIdentity(name, ident or name)
    return out


def _token_entries(text: str, source: str) -> Iterator[tuple[str, str, str | None]]:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    for raw in lines:
        if len(raw.split()) > 1:  # a tokens-file line: fields separated by white space
            parts = raw.split()
            if len(parts) > 3:
                raise UserError(f"{source}: line must be 'client-name token [cert-identity]', got {len(parts)} fields")
            yield parts[0], parts[1], parts[2] if len(parts) == 3 else None
            continue
        for item in filter(None, raw.split(",")):
            name, eq, token = item.partition("=")
            if not (name and eq and token):
                raise UserError(f"{source}: an entry is neither 'client-name=token' nor 'client-name token'")
            yield name, token, None


STRONG_TOKEN_CHARS = 16


def weak_token(token: str) -> bool:
    """Short, or of few distinct characters ('aaaaaaaa'): guessable, whatever else it is."""
    return len(token) < STRONG_TOKEN_CHARS or len(set(token)) < 8


def load_tokens(server: ServerSection) -> dict[str, ClientIdentity]:
    """Tokens from server.tokens_file, else from the env var server.tokens_env."""
    if server.tokens_file is not None:
        path = Path(server.tokens_file)
        if not path.is_file():
            raise FileNotFoundError(f"server.tokens_file: {path} does not exist")
        mode = path.stat().st_mode
        if mode & 0o077:
            log.warning("server.tokens_file %s is readable by other users (mode %o): chmod 600 it", path, mode & 0o777)
        tokens = parse_tokens_text(path.read_text(), str(path))
    else:
        tokens = parse_tokens_text(os.environ.get(server.tokens_env, ""), f"${server.tokens_env}")
    if not tokens:
        raise UserError(
            f"no client tokens: set server.tokens_file (lines 'client-name token [cert-identity]') or "
            f"${server.tokens_env}='name=token,name=token' (generate some with python -m gradcomp.server.tls)"
        )
    return tokens


class TokenBook:
    """Bearer token -> client, compared in constant time against every token (no early exit)."""

    def __init__(self, entries: Mapping[str, ClientIdentity]):
        self._entries = [(token.encode(), ident) for token, ident in entries.items()]

    @classmethod
    def from_names(cls, tokens: Mapping[str, str]) -> TokenBook:
        """A book whose clients' certificate identities are their names ({token: name})."""
        return cls({t: ClientIdentity(n, n) for t, n in tokens.items()})

    @property
    def names(self) -> list[str]:
        return sorted(ident.name for _, ident in self._entries)

    def lookup(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> ClientIdentity | None:
        header = next((v for k, v in metadata or () if k == "authorization"), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if not header.startswith("Bearer "):
            return None
        given = header[len("Bearer ") :].strip().encode()
        found = None
        for token, ident in self._entries:
            if hmac.compare_digest(token, given):
                found = ident
        return found


def certificate_problem(ident: ClientIdentity, auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """Why the peer's certificate may not carry `ident`'s token, or None when it may."""
    names = [
        v.decode(errors="replace")
        for key in ("x509_common_name", "x509_subject_alternative_name")
        for v in auth_context.get(key, ())
    ]
    if not names:
        return f"client {ident.name!r} presented no client certificate (mutual TLS is required)"
    if ident.cert_identity not in names:
        return (
            f"the certificate of {', '.join(sorted(set(names)))} does not belong to the token of client "
            f"{ident.name!r} (expected {ident.cert_identity!r})"
        )
    return None


class CallCounter:
    """Calls in progress per client, at most `limit` each: one token cannot take every server slot."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def enter(self, name: str) -> bool:
        with self._lock:
            if self._open.get(name, 0) >= self.limit:
                return False
            self._open[name] = self._open.get(name, 0) + 1
            return True

    def leave(self, name: str) -> None:
        with self._lock:
            left = self._open[name] - 1
            if left:
                self._open[name] = left
            else:
                del self._open[name]

    def open(self, name: str) -> int:
        with self._lock:
            return self._open.get(name, 0)


def cancel_with_status(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread than its handler's, with `code` for the peer to see.

    The public `context.cancel()` would tell the peer only CANCELLED; gRPC core can cancel with a
    status, which grpcio reaches through the call object behind the context (not public API, so
    the plain cancel stays as the fallback)."""
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        call.cancel(code.value[0], details)  # type: ignore[union-attr]  # None or no cancel: the except below
    except (AttributeError, TypeError):
        context.cancel()


class AuthThrottle:
    """Failed authentications per peer address, as a token bucket of `burst` refilled at `rate` a second.

    Wrong tokens were answered about 2,500 times a second and nothing was logged. An address whose
    bucket is empty is refused (RESOURCE_EXHAUSTED) before any token of its is checked, valid or
    not, so its guesses run at `rate` a second and a refusal says nothing about the token. Clients
    behind the same address share the bucket. Failures are logged, once per address per
    `log_every` seconds with their count. At most `max_peers` addresses are remembered (the least
    recently failed are forgotten first), so many addresses cannot grow it without bound."""

    def __init__(self, burst: int = 30, rate: float = 2.0, max_peers: int = 4096, log_every: float = 10.0):
        self.burst, self.rate, self.max_peers, self.log_every = burst, rate, max_peers, log_every
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, list[float]] = OrderedDict()  # host -> [tokens, at, unlogged, logged at]

    def wait(self, host: str) -> float:
        """Seconds until `host` may try again (0: now)."""
        with self._lock:
            entry = self._peers.get(host)
            if entry is None:
                return 0.0
            self._refill(entry)
            return 0.0 if entry[0] >= 1 else (1 - entry[0]) / self.rate

    def failed(self, host: str, method: str) -> None:
        now = time.monotonic()
        with self._lock:
            entry = self._peers.pop(host, None) or [float(self.burst), now, 0.0, -self.log_every]
            self._refill(entry)
            entry[0] -= 1
            entry[2] += 1
            self._peers[host] = entry
            while len(self._peers) > self.max_peers:
                self._peers.popitem(last=False)
            if now - entry[3] < self.log_every:
                return
            count, entry[2], entry[3] = int(entry[2]), 0.0, now
        log.warning("unauthenticated call to %s from %s (%d failed since the last report)", method, host, count)

    def _refill(self, entry: list[float]) -> None:
        now = time.monotonic()
        entry[0] = min(float(self.burst), entry[0] + (now - entry[1]) * self.rate)
        entry[1] = now


def peer_host(context: grpc.ServicerContext) -> str:
    """The caller's address without its port ('ipv4:10.0.0.5:51234' -> 'ipv4:10.0.0.5')."""
    return (context.peer() or "unknown").rsplit(":", 1)[0]


# --- the interceptor -------------------------------------------------------------------------
class AuthGate(grpc.ServerInterceptor):
    """Authenticate coordinator calls before their request is read (see module docstring)."""

    def __init__(
        self,
        book: TokenBook,
        *,
        require_cert: bool,
        max_request_bytes: int,
        refused: RefusalHook,
        calls_per_client: int = 4,
        read_seconds: float = 30.0,
    ):
        self.book = book
        self.require_cert = require_cert
        self.max_request_bytes = max_request_bytes
        self.refused = refused
        self.calls = CallCounter(calls_per_client)
        self.read_seconds = read_seconds
        self.throttle = AuthThrottle()

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None], details: Any
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler  # unknown methods (UNIMPLEMENTED) and the health service pass untouched
        method = details.method[len(SERVICE_PREFIX) :]
        ident = self.book.lookup(details.invocation_metadata)
        if ident is None:
            return grpc.stream_unary_rpc_method_handler(self._turn_away(method))
        if handler.request_streaming or handler.response_streaming:
            return handler  # the coordinator has none; nothing to read ahead of
        return grpc.stream_unary_rpc_method_handler(
            self._guarded(method, ident, handler), response_serializer=handler.response_serializer
        )

    def _refuse(
        self, context: grpc.ServicerContext, method: str, code: grpc.StatusCode, reason: str | None, msg: str
    ) -> None:
        self.refused(method, code, reason, msg)
        context.abort(code, msg)

    def _turn_away(self, method: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], Any]:
        def behaviour(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            host = peer_host(context)
            self._check_throttle(method, host, context)
            self.throttle.failed(host, method)
            self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated",
                         "missing or unknown bearer token")  # fmt: skip

        return behaviour

    def _check_throttle(self, method: str, host: str, context: grpc.ServicerContext) -> None:
        wait = self.throttle.wait(host)
        if wait > 0:
            self._refuse(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, None,
                         f"too many failed authentications from {host}; retry in {wait:.1f} s")  # fmt: skip

    def _guarded(
        self, method: str, ident: ClientIdentity, inner: grpc.RpcMethodHandler
    ) -> Callable[[Iterator[bytes], grpc.ServicerContext], Any]:
        def behaviour(requests: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            self._check_throttle(method, peer_host(context), context)  # a valid token waits too
            # Counted here, not in intercept_service: gRPC runs the interceptor also for calls it then
            # refuses at server.max_concurrent_rpcs, and those never reach a behaviour to be uncounted.
            if not self.calls.enter(ident.name):  # refused before a byte is read, so it holds nothing
                self._refuse(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, None,
                             f"{BUSY_DETAILS} for client {ident.name!r}: {self.calls.limit} of its calls are in "
                             "progress (limits.max_calls_per_client); retry later")  # fmt: skip
            try:
                return self._serve(method, ident, inner, requests, context)
            finally:
                self.calls.leave(ident.name)

        return behaviour

    def _serve(
        self,
        method: str,
        ident: ClientIdentity,
        inner: grpc.RpcMethodHandler,
        requests: Iterator[bytes],
        context: grpc.ServicerContext,
    ) -> Any:
        if self.require_cert:
            problem = certificate_problem(ident, context.auth_context())
            if problem is not None:
                self._refuse(context, method, grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", problem)
        raw = self._read_one(method, requests, context)
        try:
            request = inner.request_deserializer(raw) if inner.request_deserializer else raw
        except Exception as err:  # protobuf's DecodeError, or anything a forged message triggers
            self._refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT, "malformed",
                         f"request is not a valid {method} message: {type(err).__name__}")  # fmt: skip
        return inner.unary_unary(request, context)

    def _read_one(self, method: str, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        """The call's one request, within `read_seconds`: a body that never arrives must not hold
        a handler thread (and a slot of server.max_concurrent_rpcs) for good."""
        late = threading.Event()

        def expire() -> None:
            late.set()
            cancel_with_status(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                               f"request body not received within {self.read_seconds:g} s "
                               "(limits.request_read_seconds)")  # fmt: skip

        timer = threading.Timer(self.read_seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            raw = next(requests)
        except StopIteration:
            self._refuse(context, method, grpc.StatusCode.INVALID_ARGUMENT, "malformed", "no request message")
        except grpc.RpcError:  # the client went away, the read deadline passed, or gRPC's own hard limit
            if late.is_set():
                self.refused(method, grpc.StatusCode.DEADLINE_EXCEEDED, None, "request body too slow")
            else:
                self.refused(method, grpc.StatusCode.CANCELLED, None, "call ended before its request arrived")
            raise
        finally:
            timer.cancel()
        if len(raw) > self.max_request_bytes:
            self._refuse(context, method, grpc.StatusCode.RESOURCE_EXHAUSTED, "too_large",
                         f"request of {len(raw)} bytes is over limits.max_message_bytes "
                         f"({self.max_request_bytes})")  # fmt: skip
        return raw
