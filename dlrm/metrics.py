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
        """{"auc", "logloss", "ne"} over every update, of every rank when torch.distributed runs
        several processes (sums all-reduced; torchmetrics gathers the AUC's predictions itself), so a
        sharded eval gives the numbers one process gives over the same predictions. auc is NaN when
        every label (over all ranks) is the same class.

        Raises ValueError when no sample was seen (an empty eval split)."""
        totals = torch.stack([self.ce_sum, self.bce_sum, self.pos, torch.tensor(float(self.n), dtype=torch.float64)])
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(totals)
        ce_sum, bce_sum, pos, n = totals.unbind()
        if n == 0:
            raise ValueError("no eval samples: the eval split is empty")
        ne = compute_ne(ce_sum, n, pos, n - pos, ETA)
        return {
            "auc": float("nan") if float(pos) in (0.0, float(n)) else float(self.auroc.compute()),
            "logloss": float(bce_sum / n),
            "ne": float(ne),
        }
