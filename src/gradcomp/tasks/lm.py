"""The byte-level language-model task: a GPT on the standard library's source (or synthetic tokens).

Sizes: `tiny` (a ~200 kB slice of the corpus and a 1-layer model: seconds, for tests and CI),
`small` (about 1M parameters on the whole corpus: minutes on a laptop CPU) and `large` (about 38M
parameters: a GPU or cluster configuration). Any size's fields can be overridden by argument.
`corpus: synthetic` trains on uniformly random tokens (nothing to learn): for step-time benchmarks
of a model size without reading the corpus.
"""

from __future__ import annotations

import sys

import torch

from gradcomp.tasks.base import Task, TaskError
from gradcomp.tasks.corpus import build_corpus
from gradcomp.tasks.gpt import GPT, GPTConfig, count_parameters
from gradcomp.tasks.objective import NextToken
from gradcomp.tasks.tokens import TokenWindows

SIZES: dict[str, dict[str, int | None]] = {
    "tiny": {"block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32, "max_bytes": 200_000},
    "small": {"block_size": 128, "n_layer": 5, "n_head": 4, "n_embd": 128, "max_bytes": None},
    "large": {"block_size": 256, "n_layer": 12, "n_head": 8, "n_embd": 512, "max_bytes": None},
}
VOCAB = 256


def _sized(size: str, overrides: dict[str, int | None]) -> dict[str, int | None]:
    if size not in SIZES:
        raise TaskError(f"lm: unknown size {size!r}; use one of {', '.join(SIZES)}")
    fields = dict(SIZES[size])
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return fields


def _dim(fields: dict[str, int | None], key: str) -> int:
    """A model dimension: every size sets it (only max_bytes may be left open)."""
    value = fields[key]
    if value is None:
        raise TaskError(f"lm: {key} is not set")
    return int(value)


def _synthetic_sets(block_size: int, examples: int, seed: int) -> tuple[TokenWindows, TokenWindows, dict]:
    """Uniform random bytes: train and test windows over one tensor, one group per 64 windows."""
    n_test = max(examples // 10, 1)
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, ((examples + n_test) * block_size + 1,), generator=gen, dtype=torch.uint8)
    starts = torch.arange(examples + n_test, dtype=torch.int64) * block_size
    groups = torch.arange(examples, dtype=torch.int64) // 64
    train = TokenWindows(data, starts[:examples], block_size, groups)
    test = TokenWindows(data, starts[examples:], block_size)
    return train, test, {"corpus": "synthetic-uniform", "corpus_seed": seed, "corpus_groups": int(groups.max()) + 1}


def _stdlib_sets(
    block_size: int, max_bytes: int | None, test_percent: float
) -> tuple[TokenWindows, TokenWindows, dict]:
    corpus = build_corpus(max_bytes=max_bytes, test_percent=test_percent)
    train_starts, train_groups = corpus.windows(block_size, held_out=False)
    test_starts, _ = corpus.windows(block_size, held_out=True)
    if not len(train_starts) or not len(test_starts):
        raise TaskError(f"lm: the corpus has no {block_size + 1}-byte window in one split; raise max_bytes")
    info = dict(corpus.info, corpus_python=sys.version.split()[0], corpus_group_names=list(corpus.groups))
    return (
        TokenWindows(corpus.data, train_starts, block_size, train_groups),
        TokenWindows(corpus.data, test_starts, block_size),
        info,
    )


def lm(
    size: str = "tiny",
    corpus: str = "stdlib",
    block_size: int | None = None,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    max_bytes: int | None = None,
    test_percent: float = 10.0,
    tie_weights: bool = True,
    synthetic_examples: int = 4096,
    seed: int = 0,
) -> Task:
    """A byte-level GPT task; `max_bytes` caps the corpus (default: the size's cap)."""
    fields = _sized(size, {"block_size": block_size, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd})
    if max_bytes is not None:
        fields["max_bytes"] = max_bytes
    try:
        cfg = GPTConfig(VOCAB, _dim(fields, "block_size"), _dim(fields, "n_layer"), _dim(fields, "n_head"),
                        _dim(fields, "n_embd"), bool(tie_weights))  # fmt: skip
    except ValueError as err:
        raise TaskError(f"lm: {err}") from err
    if corpus == "stdlib":
        train, test, info = _stdlib_sets(cfg.block_size, fields["max_bytes"], test_percent)
    elif corpus == "synthetic":
        train, test, info = _synthetic_sets(cfg.block_size, synthetic_examples, seed)
    else:
        raise TaskError(f"lm: unknown corpus {corpus!r}; use stdlib or synthetic")
    info.update(size=size, model=cfg.as_dict(), parameters=count_parameters(GPT(cfg)), tokens="bytes")
    return Task(
        f"lm-{size}",
        lambda: GPT(cfg),
        train,
        test,
        num_classes=VOCAB,
        info=info,
        objective=NextToken(unit="byte"),
        groups=train.groups,
    )
