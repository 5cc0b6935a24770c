"""Evaluation metrics: AUC (torchmetrics), logloss (torch) and normalized entropy (torchrec).

Logloss is the natural-log binary cross-entropy Criteo results are quoted in; NE divides it by
the entropy of the mean label (torchrec's definition; base-independent).

AUC is undefined when the labels hold one class (no pair of a click and a non-click to rank):
`compute` then returns NaN for it (torchmetrics would say 0.0, which looks like a real score), and
`single_class` tells the caller; results.json writes it as null.

Example::

    m = EvalMetrics()
    m.update(logits, labels)
    m.compute()   # {"auc": ..., "logloss": ..., "ne": ...}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC
from torchrec.metrics.ne import compute_cross_entropy, compute_ne

ETA = 1e-12


class EvalMetrics:
    """Accumulates predictions over an eval pass; exact AUC over all of them."""

    def __init__(self) -> None:
        self.auroc = BinaryAUROC()  # thresholds=None: exact AUC, not binned
        self.ce_sum = torch.zeros((), dtype=torch.float64)  # log2 cross-entropy sum (torchrec)
        self.bce_sum = torch.zeros((), dtype=torch.float64)  # natural-log BCE sum
        self.pos = torch.zeros((), dtype=torch.float64)
        self.n = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits, labels = logits.detach().float().cpu(), labels.detach().float().cpu()
        probs = torch.sigmoid(logits)
        self.auroc.update(probs, labels.long())
        self.ce_sum += compute_cross_entropy(labels, probs, torch.ones_like(labels), ETA).sum()
        self.bce_sum += F.binary_cross_entropy_with_logits(
            logits.double(), labels.double(), reduction="sum"
        )
        self.pos += labels.sum().double()
        self.n += len(labels)

    @property
    def single_class(self) -> bool:
        """True when every label seen so far is the same (AUC undefined)."""
        return self.n > 0 and float(self.pos) in (0.0, float(self.n))

    def compute(self) -> dict[str, float]:
        """{"auc", "logloss", "ne"} over every update; auc is NaN when `single_class`.

        Raises ValueError when no sample was seen (an empty eval split)."""
        if self.n == 0:
            raise ValueError("no eval samples: the eval split is empty")
        n = torch.tensor(float(self.n), dtype=torch.float64)
        ne = compute_ne(self.ce_sum, n, self.pos, n - self.pos, ETA)
        return {
            "auc": float("nan") if self.single_class else float(self.auroc.compute()),
            "logloss": float(self.bce_sum / n),
            "ne": float(ne),
        }
