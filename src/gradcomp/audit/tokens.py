"""The text attack: which tokens a sender's batch contained, read off its embedding gradient.

Melis et al. (2019, "Exploiting unintended feature leakage in collaborative learning"): the
gradient of an input embedding is zero in every row whose token the batch does not contain, so
the non-zero rows are the batch's token set. With the output layer tied to the embedding (as in
the lm task's GPT) every row gets the softmax's share as well; for a token the batch lacks that
share is nearly the same vector in every row, so the attacker subtracts the median row first.
The cut between "present" and "absent" is the largest gap between consecutive row norms on a
log scale: the attacker needs no threshold from the victim, and an exactly zero row (a row a
sparsifier dropped) never counts as present.

Adversary: sees one decoded payload of a sender (as the audit's image attacks do), knows the
model and which parameter is the embedding, nothing about the text. Scored against the set of
token ids in the batch's windows (inputs and targets).
"""

from __future__ import annotations

import torch
from torch import nn

TINY = 1e-30  # the norm an all-zero row is given before the log: below any real row


def embedding_name(model: nn.Module, vocab: int) -> str | None:
    """The parameter name of the model's first `nn.Embedding` over `vocab` tokens (None: it has none)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab:
            return f"{name}.weight" if name else "weight"
    return None


def row_scores(rows: torch.Tensor) -> torch.Tensor:
    """[G, V, D] embedding-gradient rows -> [G, V] norms of each row minus the group's median row."""
    median = rows.median(dim=1, keepdim=True).values
    return torch.linalg.vector_norm(rows - median, dim=2)


def recovered(scores: torch.Tensor) -> torch.Tensor:
    """[G, V] bool: the rows above the largest log-scale gap between consecutive sorted scores."""
    logs = scores.clamp_min(TINY).log()
    ordered, order = logs.sort(dim=1, descending=True)
    keep = (ordered[:, :-1] - ordered[:, 1:]).argmax(dim=1) + 1  # rows before the biggest drop
    ranks = torch.arange(scores.shape[1]).expand_as(scores)
    picked = torch.zeros_like(scores, dtype=torch.bool)
    picked.scatter_(1, order, ranks < keep[:, None])
    return picked


def token_sets(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """[G, ...] token ids -> [G, V] bool: which ids each group contains."""
    groups = tokens.shape[0]
    present = torch.zeros(groups, vocab, dtype=torch.bool)
    present.scatter_(1, tokens.reshape(groups, -1).long(), True)
    return present


def precision_recall(predicted: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean over groups of the precision and recall of the recovered token sets, and the base rate
    (the share of the vocabulary a batch contains: the precision of guessing every token)."""
    hits = (predicted & truth).sum(dim=1).float()
    precision = hits / predicted.sum(dim=1).clamp_min(1)
    recall = hits / truth.sum(dim=1).clamp_min(1)
    return {
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "base_rate": float(truth.float().mean()),
    }


def token_attack(observed: torch.Tensor, span: tuple[int, int], vocab: int) -> torch.Tensor:
    """Recovered token sets [G, V] from decoded flat payloads [G, P]; `span` is the embedding's slice."""
    rows = observed[:, span[0] : span[1]].reshape(observed.shape[0], vocab, -1)
    return recovered(row_scores(rows.float()))
