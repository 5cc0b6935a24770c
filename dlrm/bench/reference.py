"""A baseline in the style of the public reference DLRM, for side-by-side step timing.

Modelled on the published description of facebookresearch/dlrm's `dlrm_s_pytorch.py` (our own
code, not a copy): one `nn.EmbeddingBag(mode="sum", sparse=True)` per table initialised
U(-sqrt(1/n), sqrt(1/n)); bottom and top MLPs as plain `nn.Sequential(Linear, ReLU, ...)` with
N(0, sqrt(2/(m+n))) weights and a sigmoid after the last top layer; the dot interaction as one
`bmm` of the `[B, F+1, D]` features with themselves, then a gather of the strictly lower triangle
(`Z[:, li, lj]`) concatenated to the dense vector; BCE on the probability; eager fp32; one
`torch.optim.SGD` over all parameters, the tables' sparse gradients included.

Its step is what the reference times per iteration ("step only": zero_grad, forward, loss,
backward, SGD step); loading and converting batches are outside it.

    model = ReferenceDLRM(cards, dim=16, bottom=[13, 512, 256, 64, 16], top=[512, 256, 1])
    step = ReferenceStep(model, lr=0.1)
    inputs = reference_inputs(kjt, num_tables=26)   # per-table (indices, offsets), once per batch
    loss = step(dense, inputs, labels)              # dense [B, 13], labels [B] -> scalar
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def _mlp(sizes: list[int], sigmoid_last: bool, rng: np.random.Generator) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n, m) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(n, m)
        with torch.no_grad():  # the reference's init: Glorot-like normal weights, N(0, 1/m) bias
            lin.weight.copy_(torch.from_numpy(rng.normal(0, np.sqrt(2 / (m + n)), (m, n)).astype(np.float32)))
            lin.bias.copy_(torch.from_numpy(rng.normal(0, np.sqrt(1 / m), m).astype(np.float32)))
        layers += [lin, nn.Sigmoid() if sigmoid_last and i == len(sizes) - 2 else nn.ReLU()]
    return nn.Sequential(*layers)


class ReferenceDLRM(nn.Module):
    """Reference-style DLRM. `forward(dense [B, 13], inputs) -> click probability [B]`, where
    `inputs` is one `(indices [n_t], offsets [B])` pair per table (see `reference_inputs`).

    Args:
        cards: rows per table (26 for Criteo).
        dim: embedding dim D (= bottom[-1]).
        bottom: bottom MLP sizes including the input width, e.g. [13, 512, 256, 64, 16].
        top: top MLP sizes after the interaction, e.g. [512, 256, 1]; its input width
            D + (F+1) choose 2 is computed here.
    """

    def __init__(self, cards: list[int], dim: int, bottom: list[int], top: list[int], seed: int = 0) -> None:
        super().__init__()
        if bottom[-1] != dim:
            raise ValueError(f"bottom[-1]={bottom[-1]} must equal dim={dim}")
        rng = np.random.default_rng(seed)
        self.emb = nn.ModuleList()
        for n in cards:
            bag = nn.EmbeddingBag(n, dim, mode="sum", sparse=True)
            with torch.no_grad():
                bag.weight.uniform_(-np.sqrt(1 / n), np.sqrt(1 / n))
            self.emb.append(bag)
        f = len(cards) + 1
        # strictly lower triangle of the (F+1) x (F+1) dot matrix, as the reference's li/lj
        self.register_buffer("li", torch.tensor([i for i in range(f) for j in range(i)]), persistent=False)
        self.register_buffer("lj", torch.tensor([j for i in range(f) for j in range(i)]), persistent=False)
        self.bot = _mlp(list(bottom), sigmoid_last=False, rng=rng)
        self.top = _mlp([dim + f * (f - 1) // 2, *top], sigmoid_last=True, rng=rng)

    def forward(self, dense: torch.Tensor, inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = self.bot(dense)  # [B, D]
        ly = [bag(idx, off) for bag, (idx, off) in zip(self.emb, inputs)]  # F x [B, D]
        b, d = x.shape
        t = torch.cat([x, *ly], dim=1).view(b, -1, d)  # [B, F+1, D]
        z = torch.bmm(t, t.transpose(1, 2))  # [B, F+1, F+1]
        r = torch.cat([x, z[:, self.li, self.lj]], dim=1)  # [B, D + (F+1)F/2]
        return self.top(r).squeeze(1)


class ReferenceStep:
    """One reference training iteration: zero_grad, forward, BCE, backward, SGD (sparse grads on
    the tables, dense on the MLPs). `__call__(dense, inputs, labels) -> loss` (a detached scalar)."""

    def __init__(self, model: ReferenceDLRM, lr: float) -> None:
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=lr)
        self.loss = nn.BCELoss(reduction="mean")

    def __call__(self, dense: torch.Tensor, inputs, labels: torch.Tensor) -> torch.Tensor:
        self.opt.zero_grad()
        loss = self.loss(self.model(dense, inputs), labels)
        loss.backward()
        self.opt.step()
        return loss.detach()


def reference_inputs(kjt: KeyedJaggedTensor, num_tables: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A KJT (keys in table order, B bags per key) -> one `(indices, offsets [B])` pair per table,
    the reference loader's `lS_i` / `lS_o` layout. Done outside the timed step, as there."""
    b = kjt.stride()
    offsets = kjt.offsets()
    values = kjt.values()
    out = []
    for t in range(num_tables):
        lo, hi = int(offsets[t * b]), int(offsets[(t + 1) * b])
        out.append((values[lo:hi].contiguous(), (offsets[t * b : (t + 1) * b] - lo).contiguous()))
    return out


def compare(ours_step, batches, lr: float, dim: int, bottom: list[int], top: list[int], cards: list[int],
            warmup: int) -> dict:
    """Time the reference step and `ours_step(Batch)` on the same batches, interleaved (each
    batch: one step of each, alternating which goes first), so load on a shared machine hits
    both alike. Returns medians (ms) after `warmup` pairs and `ratio` = median over batches of
    reference / ours (> 1: ours is faster).

    batches: `(dense [B, 13], kjt, labels [B])` tuples (dlrm.bench.steps.make_batches).
    """
    from dlrm.data.loader import Batch

    torch.manual_seed(0)
    ref = ReferenceStep(ReferenceDLRM(cards, dim, [13, *bottom], top), lr=lr)
    ref_in = [reference_inputs(kjt, len(cards)) for _, kjt, _ in batches]  # the reference's loader
    ref_ms, ours_ms = [], []
    for i, (dense, kjt, labels) in enumerate(batches):
        runs = [("ref", lambda: ref(dense, ref_in[i], labels)), ("ours", lambda: ours_step(Batch(dense, kjt, labels)))]
        for name, fn in runs if i % 2 else runs[::-1]:
            t0 = time.perf_counter()
            fn()
            (ref_ms if name == "ref" else ours_ms).append((time.perf_counter() - t0) * 1e3)
    ref_ms, ours_ms = ref_ms[warmup:], ours_ms[warmup:]
    return {
        "reference_ms": statistics.median(ref_ms),
        "ours_ms": statistics.median(ours_ms),
        "reference_min_ms": min(ref_ms),
        "ours_min_ms": min(ours_ms),
        "ratio": statistics.median(r / o for r, o in zip(ref_ms, ours_ms)),
        "pairs": len(ref_ms),
    }
