"""A real text corpus that is on every machine: the running interpreter's standard library source.

No package on the index ships a comparable real text corpus inside its wheel (NLTK's corpora and
the Shakespeare/Penn Treebank sets are downloads), so the `.py` files under
`sysconfig.get_paths()["stdlib"]` are the text. Byte level: each byte is a token (vocabulary 256).

Every choice is a pure function of the file's path relative to the stdlib root, so two machines with
the same interpreter build the same corpus and the digest says whether they did:
- held out: SHA-256 of "split:<path>" below `test_percent` percent (a whole file, never a position);
- under a byte cap: files taken in the order of SHA-256 of "order:<path>", each split filling its share;
- group (the natural federated client): the top-level module or package name.
Third-party packages (site-packages, dist-packages) and test suites (which distributions ship apart,
so their presence differs between machines) are left out.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gradcomp.tasks.base import TaskError

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
SEPARATOR = 0  # byte written after each file: never in Python source, so the model learns file ends
RULE = "stdlib-py-v1"  # names the selection, split and grouping rules; part of the digest


@dataclass(frozen=True)
class SourceFile:
    """One file of the corpus: its path relative to the root, its group and its side of the split."""

    rel: str
    group: str
    held_out: bool
    size: int


def stdlib_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def _hash(salt: str, rel: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{salt}:{rel}".encode()).digest()[:8], "big")


def is_held_out(rel: str, test_percent: float) -> bool:
    """The fixed by-file split: a file is held out when its path hashes below `test_percent`."""
    return _hash("split", rel) % 10_000 < round(test_percent * 100)


def group_of(rel: str) -> str:
    """The top-level module or package a file belongs to (`json/decoder.py` -> `json`)."""
    first = rel.split("/", 1)[0]
    return first[:-3] if first.endswith(".py") else first


def list_sources(root: Path, test_percent: float) -> list[SourceFile]:
    """Every non-empty `.py` file under `root` outside the excluded directories, sorted by path."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            path = Path(dirpath, name)
            if name.endswith(".py") and path.is_file() and (size := path.stat().st_size):
                rel = path.relative_to(root).as_posix()
                files.append(SourceFile(rel, group_of(rel), is_held_out(rel, test_percent), size))
    return sorted(files, key=lambda f: f.rel)


def select(files: list[SourceFile], max_bytes: int | None, test_percent: float) -> list[SourceFile]:
    """Under a cap, each split fills its share of `max_bytes` with whole files in hash order."""
    if max_bytes is None:
        return list(files)
    budget = {True: max_bytes * test_percent / 100, False: max_bytes * (1 - test_percent / 100)}
    used = {True: 0, False: 0}
    chosen = []
    for f in sorted(files, key=lambda f: _hash("order", f.rel)):
        if used[f.held_out] + f.size <= budget[f.held_out]:
            used[f.held_out] += f.size
            chosen.append(f)
    return sorted(chosen, key=lambda f: f.rel)


@dataclass(frozen=True)
class Corpus:
    """All text in one uint8 tensor, laid out as runs of one (split, group) each.

    `segments` rows are (start, end, group index, held out) with end exclusive; windows are cut
    inside a segment only, so no example crosses the split or mixes two clients' text.
    """

    data: torch.Tensor
    segments: np.ndarray
    groups: tuple[str, ...]
    digest: str
    info: dict

    def windows(self, block_size: int, held_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Start offsets of non-overlapping (block_size + 1)-byte windows of one split, and each one's group."""
        starts, groups = [], []
        for start, end, group, side in self.segments:
            if bool(side) != held_out:
                continue
            s = np.arange(start, end - block_size, block_size, dtype=np.int64)
            starts.append(s)
            groups.append(np.full(s.size, group, dtype=np.int64))
        if not starts:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        return torch.from_numpy(np.concatenate(starts)), torch.from_numpy(np.concatenate(groups))


def build_corpus(root: Path | None = None, max_bytes: int | None = None, test_percent: float = 10.0) -> Corpus:
    """Read the selected files once into one tensor; the digest covers every path, split bit and byte."""
    if not 0 < test_percent < 100:
        raise TaskError(f"corpus: test_percent must be in (0, 100), got {test_percent}")
    if max_bytes is not None and max_bytes < 1:
        raise TaskError(f"corpus: max_bytes must be positive, got {max_bytes}")
    root = Path(root) if root is not None else stdlib_root()
    files = select(list_sources(root, test_percent), max_bytes, test_percent)
    if not any(f.held_out for f in files) or all(f.held_out for f in files):
        raise TaskError(f"corpus under {root}: {len(files)} files leave a split empty; raise max_bytes")
    files.sort(key=lambda f: (f.held_out, f.group, f.rel))
    groups = tuple(sorted({f.group for f in files}))
    index = {g: i for i, g in enumerate(groups)}
    digest = hashlib.sha256(f"{RULE}|test_percent={test_percent:g}|max_bytes={max_bytes}".encode())
    chunks: list[bytes] = []
    segments: list[list[int]] = []
    offset = 0
    for f in files:
        text = (root / f.rel).read_bytes() + bytes([SEPARATOR])
        digest.update(f"{f.rel}|{int(f.held_out)}|{len(text)}|".encode())
        digest.update(text)
        chunks.append(text)
        if segments and segments[-1][2:] == [index[f.group], int(f.held_out)]:
            segments[-1][1] = offset + len(text)
        else:
            segments.append([offset, offset + len(text), index[f.group], int(f.held_out)])
        offset += len(text)
    data = torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)
    held = sum(f.size + 1 for f in files if f.held_out)
    hexdigest = digest.hexdigest()
    info: dict[str, object] = {
        "corpus": RULE,
        "corpus_digest": hexdigest,
        "corpus_files": len(files),
        "corpus_groups": len(groups),
        "corpus_train_bytes": offset - held,
        "corpus_test_bytes": held,
        "corpus_test_percent": test_percent,
    }
    return Corpus(data, np.asarray(segments, dtype=np.int64), groups, hexdigest, info)
