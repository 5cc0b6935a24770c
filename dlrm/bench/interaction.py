"""The dot interaction alone, forward + backward: torchrec's InteractionArch against ours (PyTorch
ops, `model.kernel=torch`; our C kernel, `model.kernel=native`).

Inputs as in a bf16 step: the bottom MLP's output in bf16, the embeddings in fp32, under bf16
autocast (or all fp32 with --precision fp32). Interleaved, min and median over the repeats.

    python scripts/bench_interaction.py                 # B=2048, 26 features, D=16, 2 threads
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchrec.models.dlrm import InteractionArch

from dlrm.model import DotInteraction


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--features", type=int, default=26)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=40)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bf16 = args.precision == "bf16"
    dense = torch.randn(args.batch_size, args.dim, requires_grad=True)
    sparse = torch.randn(args.batch_size, args.features, args.dim, requires_grad=True)
    arches = {
        "torchrec InteractionArch": InteractionArch(args.features),
        "ours, PyTorch ops": DotInteraction(args.features, "torch"),
        "ours, C kernel": DotInteraction(args.features, "native"),
    }
    times: dict[str, list[float]] = {k: [] for k in arches}
    grad = None
    for i in range(args.repeats):
        for name in list(arches) if i % 2 else list(arches)[::-1]:
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                d = dense.bfloat16() if bf16 else dense
                out = arches[name](d, sparse)
            if grad is None:
                grad = torch.randn(out.shape)
            out.backward(grad.to(out.dtype))  # the top MLP's gradient, in the output's dtype
            times[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name, ts in times.items():
        ts = ts[min(5, len(ts) // 2) :]  # the first repeats warm up (allocator, caches)
        out[name] = {"min_ms": min(ts), "median_ms": statistics.median(ts)}
        print(f"{name:26s} {args.precision}  min {min(ts):6.2f} ms  median {statistics.median(ts):6.2f} ms", flush=True)
    return out


if __name__ == "__main__":
    main()
