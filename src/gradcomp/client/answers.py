"""What a coordinator's answers must satisfy before `gradcomp client` acts on them.

A client does not trust its coordinator (it may be malicious, or anyone answering on its address):
every number it sends is checked here, so a bad one ends the client with a `ClientError` (exit 3)
naming the field, instead of a traceback, a busy loop, a hang or a huge allocation. The bounds are
the job file's own (`config.fed`): an honest coordinator never sends anything outside them.
"""

from __future__ import annotations

import math

from gradcomp._proto import fed_pb2
from gradcomp.config.serve import HEARTBEAT_SECONDS, MIN_CHUNK_BYTES
from gradcomp.errors import GradcompError, UserError

MAX_WAIT_SECONDS = 30.0  # a longer WAIT is cut short: the client asks again (the coordinator may answer WAIT)
ACTIONS = (fed_pb2.PullTaskResponse.WAIT, fed_pb2.PullTaskResponse.TRAIN, fed_pb2.PullTaskResponse.DONE)


class ClientError(GradcompError, RuntimeError):
    """A non-retryable failure (bad token, protocol mismatch, a coordinator answer the client refuses,
    retries exhausted)."""


def heartbeat_seconds(join: fed_pb2.JoinResponse) -> float:
    """The heartbeat interval the coordinator asks for, within `config.serve.HEARTBEAT_SECONDS`."""
    low, high = HEARTBEAT_SECONDS
    every = join.heartbeat_seconds
    if not low <= every <= high:  # NaN fails too
        raise ClientError(f"coordinator's heartbeat_seconds={every} is outside [{low:g}, {high:g}]")
    return every


def assigned_shard(join: fed_pb2.JoinResponse) -> tuple[int, int]:
    """The data shard (index, count) the coordinator assigns."""
    if not 0 <= join.shard_index < join.num_shards:
        raise ClientError(f"coordinator assigned shard {join.shard_index} of {join.num_shards}; need 0 <= I < N")
    return join.shard_index, join.num_shards


def wait_seconds(task: fed_pb2.PullTaskResponse) -> float:
    """How long to wait before asking again: the coordinator's retry_after, within [0.02, MAX_WAIT_SECONDS]."""
    after = task.retry_after_seconds
    if not (math.isfinite(after) and after >= 0):
        raise ClientError(f"coordinator's retry_after_seconds={after} is not a finite number >= 0")
    return min(max(0.02, after), MAX_WAIT_SECONDS)


def check_action(task: fed_pb2.PullTaskResponse) -> None:
    if task.action not in ACTIONS:
        raise ClientError(f"coordinator's task action {task.action} is none of WAIT (0), TRAIN (1), DONE (2)")


def check_download(task: fed_pb2.PullTaskResponse, max_bytes: int) -> None:
    """The announced model size and chunk count of a TRAIN task, bounded by the task's model size
    (`max_bytes`) and the smallest chunk a job may use (`config.serve.MIN_CHUNK_BYTES`)."""
    size, chunks, what = task.model_bytes, task.num_chunks, f"model v{task.model_version}"
    if not 0 < size <= max_bytes:
        raise ClientError(f"{what}: announced {size} bytes; the task's model takes 1 to {max_bytes}")
    most = math.ceil(size / MIN_CHUNK_BYTES)
    if not 1 <= chunks <= most:
        raise ClientError(
            f"{what}: announced {chunks} chunks for {size} bytes; "
            f"chunks of at least {MIN_CHUNK_BYTES} bytes make 1 to {most}"
        )


def check_chunk(chunk: fed_pb2.ModelChunk, task: fed_pb2.PullTaskResponse, index: int, have: int) -> None:
    """Chunk `index` of the task's model; `have`: the bytes received with it."""
    what = f"model v{task.model_version} chunk {index}"
    if (chunk.version, chunk.chunk) != (task.model_version, index):
        raise ClientError(f"{what}: the coordinator sent chunk {chunk.chunk} of v{chunk.version}")
    if (chunk.num_chunks, chunk.total_bytes) != (task.num_chunks, task.model_bytes):
        raise ClientError(
            f"{what}: says {chunk.num_chunks} chunks of {chunk.total_bytes} bytes; the task announced "
            f"{task.num_chunks} of {task.model_bytes}"
        )
    if have > task.model_bytes:
        raise ClientError(f"{what}: {have} bytes received, more than the {task.model_bytes} announced")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--shard must look like I/N (e.g. 0/3), got {text!r}") from None
    if not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= I < N")
    return i, n
