"""The audit of a spec on a token task: the embedding-row attack (`audit/tokens`) on each victim
batch's payload, exactly as the wire carries it (`observe`), scored as token-set precision/recall.

The image attacks do not apply to discrete tokens, and the verdict thresholds are written for
images (re-identification, PSNR against the mean image), so a token task's entry is not judged:
its verdict says so and its `token_recovery` holds the figures. Nothing here claims resistance.
"""

from __future__ import annotations

import time
from typing import Any

from torch import nn

from gradcomp.audit import metrics
from gradcomp.audit.config import AuditConfig, SpecAudit
from gradcomp.audit.observe import Setting, observe
from gradcomp.audit.tokens import embedding_name, precision_recall, token_attack, token_sets
from gradcomp.errors import UserError

NOT_JUDGED = "not judged"
IMAGE_ATTACKS_NA = "inputs are discrete tokens (the text attack runs instead)"


def audit_text(setting: Setting, spec: str, config: AuditConfig, image_attacks: list[str]) -> SpecAudit:
    """The token-set attack at every batch size on one spec; an entry shaped like the image audit's."""
    t0 = time.perf_counter()
    vocab = _vocab(setting)
    name = embedding_name(setting.model, vocab)
    if name is None:
        raise UserError(f"the text attack needs an nn.Embedding over the task's {vocab} tokens; the model has none")
    by_batch: dict[str, dict[str, Any]] = {}
    cosines: dict[str, float] = {}
    for batch in config.batch_sizes:
        obs, truth = observe(setting, spec, batch, config.seed)
        cosines[str(batch)] = truth.cosine(obs.observed)
        t = time.perf_counter()
        predicted = token_attack(obs.observed, obs.grads.offsets()[name], vocab)
        labels = obs.grads.labels
        truth_sets = token_sets(truth.victims, vocab) | token_sets(labels, vocab)
        by_batch[str(batch)] = {**precision_recall(predicted, truth_sets), "seconds": round(time.perf_counter() - t, 3)}
    worst = max(by_batch, key=lambda b: by_batch[b]["precision"] - by_batch[b]["base_rate"])
    recovery = {
        "attack": "embedding-rows (Melis et al. 2019)",
        "parameter": name,
        "batch_size": int(worst),  # where precision most exceeds its base rate
        **{k: by_batch[worst][k] for k in ("precision", "recall", "base_rate")},
        "by_batch_size": by_batch,
    }
    entry = {
        "spec": spec,
        "verdict": NOT_JUDGED,
        "verdict_reason": "the leak thresholds are defined for images; see token_recovery",
        "reidentification": None,
        "psnr_db": None,
        "worst_attack": "embedding-rows",
        "attacks": {a: {"applicable": False, "reason": IMAGE_ATTACKS_NA} for a in image_attacks},
        "token_recovery": recovery,
        "baseline_mean_image": None,
        "gradient_cosine": cosines,
        "dp": metrics.dp_epsilon(spec),
        "thresholds": metrics.THRESHOLDS,
        "setup": _setup(setting, config),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return SpecAudit(entry, setting.test_x[setting.victim_ids], {})


def _vocab(setting: Setting) -> int:
    """The token vocabulary: the model's first embedding's rows that cover every id in the test set."""
    highest = int(setting.test_x.max()) + 1
    for module in setting.model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings >= highest:
            return int(module.num_embeddings)
    return highest


def _setup(setting: Setting, config: AuditConfig) -> dict[str, Any]:
    return {
        "task": config.task,
        "task_args": config.task_args,
        "victims": len(setting.victim_ids),
        "batch_sizes": list(config.batch_sizes),
        "seed": config.seed,
    }
