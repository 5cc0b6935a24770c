"""The table toolkit: fused batched tables, their init, their byte accounting.

A batched-tables module looks up all tables in one call and applies SGD / (row-wise) Adagrad
inside backward, touching only the rows the batch used; a plain `nn.EmbeddingBag` with a dense
optimizer instead writes a rows-sized gradient every step (benchmarked in docs/benchmarks.md).
Two modules have that contract, chosen by `optim.sparse.kernel`: fbgemm's
`SplitTableBatchedEmbeddingBagsCodegen` (TBE, the kernel under torchrec's fused tables; the
default on CUDA) and ours, `table_kernel.BatchedTables` (the default on CPU, where fbgemm 1.8's
fused backward measured 2-3x slower), which computes in our C kernels (`native`,
table_native.py; the CPU default where a C compiler builds them) or in PyTorch ops (`torch`).
All give the same updates (tests/test_table_kernel.py).

We call TBE directly rather than through torchrec's FusedEmbeddingBagCollection: our KJT is
already key-major (the layout TBE wants), so this saves a split/concat per feature, and int64
indices measured faster than the int32 that wrapper converts to (7.6 vs 11.1 ms per step).

Every backend whose rows are plain rows uses this module: full, hashed, qr and hybrid (in front
of an id transform), mde (its blocks), cached (its cache).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    BoundsCheckMode,
    ComputeDevice,
    EmbeddingLocation,
    PoolingMode,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from omegaconf import DictConfig

from dlrm.embeddings import table_native
from dlrm.embeddings.base import POOLINGS, TableSpec
from dlrm.embeddings.table_kernel import BatchedTables
from dlrm.kernels.build import loads
from dlrm.options import ConfigError

# Optimizers fbgemm runs fused on CPU (Adam is GPU-only there).
FUSED_OPTIMIZERS = {
    "sgd": EmbOptimType.EXACT_SGD,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
}
# Optimizer state floats per row of each fused optimizer (None: one per column, = dim).
STATE_WIDTH = {"sgd": 0, "rowwise_adagrad": 1, "adagrad": None}
POOLING = dict(zip(POOLINGS, (PoolingMode.SUM, PoolingMode.MEAN)))
# emb.weights_precision: how table rows are stored; lookups return fp32 and optimizer state stays
# fp32. fbgemm's CPU kernel applies an fp16 row's update in fp16: w <- fp16(w - fp16(lr * g))
# (tests/test_fp16.py), so an update below half an fp16 ulp of the weight is lost. INT8 rows
# are left out: fbgemm 1.8 cannot even build a trainable INT8 TBE on CPU (its init fails with
# "check_uniform_bounds not implemented for 'Byte'"); int8 would need our own row quantization.
WEIGHTS_PRECISIONS = {"fp32": SparseType.FP32, "fp16": SparseType.FP16}
WEIGHT_BYTES = {"fp32": 4, "fp16": 2}
# optim.sparse.kernel: whose code runs the lookup and the fused update (table_kernel.py says why).
KERNELS = ("auto", "native", "torch", "fbgemm")
INIT_CHUNK_ROWS = 1 << 20  # rows initialized per call, so a 10M-row init stays interruptible


def init_uniform_(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """Fill `weight` ([n, dim]) in place with U(-1/sqrt(rows), 1/sqrt(rows)), chunk by chunk,
    the chunks spread over `torch.get_num_threads()` threads.

    torchrec's default init for EmbeddingBagConfig (raw TBE starts at all zeros). `rows` is the
    table's row count (a cache holding some of a table's rows still uses the table's bound).
    Chunk i draws from its own generator seeded with (one draw of the global generator) + i, so
    the values depend on the seed (`torch.manual_seed`) and not on the thread count; CPU
    `uniform_` is serial, and a Kaggle-size init (2.2 GB) took 2.4 s on one thread.
    """
    bound = 1.0 / math.sqrt(rows)
    seed = int(torch.randint(0, 2**62, (1,)))  # from the seeded global generator: reproducible

    def fill(i: int) -> None:
        chunk = weight[i * INIT_CHUNK_ROWS : (i + 1) * INIT_CHUNK_ROWS]
        gen = torch.Generator(device=chunk.device).manual_seed(seed + i)
        if chunk.dtype == torch.float32:
            chunk.uniform_(-bound, bound, generator=gen)
        else:  # fp16 rows: the fp32 draw rounded, so they start as a full table's rows rounded
            chunk.copy_(torch.empty(chunk.shape, device=chunk.device).uniform_(-bound, bound, generator=gen))

    chunks = range(-(-weight.shape[0] // INIT_CHUNK_ROWS))
    threads = min(torch.get_num_threads(), len(chunks))
    if threads <= 1 or weight.device.type != "cpu":
        for i in chunks:
            fill(i)
    else:  # uniform_ releases the GIL: the chunks fill in parallel
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fill, chunks))
    return weight


def check_fused_optimizer(optim: DictConfig) -> None:
    """A one-line error naming optim.sparse.name if fbgemm cannot run it fused on CPU."""
    if optim.name not in FUSED_OPTIMIZERS:
        raise ValueError(
            f"optim.sparse.name={optim.name!r}: fused table optimizers are {sorted(FUSED_OPTIMIZERS)}"
        )


def check_weights_precision(precision: str) -> str:
    """`emb.weights_precision` if fbgemm trains it on CPU, else a one-line error naming the key."""
    if precision not in WEIGHTS_PRECISIONS:
        raise ValueError(
            f"emb.weights_precision={precision!r}: choose one of {list(WEIGHTS_PRECISIONS)} "
            "(int8 rows do not train in fbgemm on CPU)"
        )
    return precision


def row_bytes(dim: int, optim_name: str, precision: str = "fp32") -> int:
    """Bytes one row of a fused table costs: weights in `precision` plus the fp32 state of the
    fused optimizer `optim_name` (what `tbe_bytes` counts, per row; used to plan budgets)."""
    width = STATE_WIDTH[optim_name]
    return dim * WEIGHT_BYTES[precision] + (dim if width is None else width) * 4


def table_kernel(optim: DictConfig, device: torch.device) -> str:
    """`optim.sparse.kernel` resolved: `native` (our C kernels, table_native.py), `torch` (our
    PyTorch ops, table_kernel.py) or `fbgemm`. auto = fbgemm on CUDA; on CPU, where ours measured
    2-3x faster than fbgemm's backward, native where it builds, else torch with one warning.

    Raises ConfigError (one line naming optim.sparse.kernel) for an unknown kernel, or `native`
    on CUDA or where the C kernels do not build."""
    kernel = optim.get("kernel", "auto")
    if kernel not in KERNELS:
        raise ConfigError(f"optim.sparse.kernel={kernel!r}: choose one of {list(KERNELS)}")
    if kernel == "native" and device.type != "cpu":
        raise ConfigError(f"optim.sparse.kernel=native runs on CPU, not {device.type}: use auto or fbgemm")
    if kernel == "auto" and device.type == "cuda":
        return "fbgemm"
    if kernel in ("auto", "native"):
        return "native" if loads(table_native.library, "optim.sparse.kernel", kernel, "tables run in") else "torch"
    return kernel


def table_layout(kernel: str) -> str:
    """Whose buffers a resolved `table_kernel` keeps its tables in, as checkpoints record it:
    `torch` (BatchedTables, for both our kernels) or `fbgemm`."""
    return "fbgemm" if kernel == "fbgemm" else "torch"


def fused_tables(
    tables: list[TableSpec],
    optim: DictConfig,
    pooling: str,
    device: torch.device,
    precision: str = "fp32",
    init: bool = True,
) -> SplitTableBatchedEmbeddingBagsCodegen | BatchedTables:
    """One batched-tables module for `tables` (fbgemm's TBE or ours, by `optim.sparse.kernel`),
    weights initialized by `init_uniform_` (`init=False`: left at zero, for a caller that
    initializes them itself).

    `optim` is the `optim.sparse` section (name, lr, eps, kernel); `pooling` is `sum` or `mean`;
    `precision` (`emb.weights_precision`) is how rows are stored: fp32 or fp16 (lookups return
    fp32 either way). Ids go in as key-major int64 values with offsets (`[F * B + 1]`); the
    output is `[B, sum of dims]`, fp32. Raises ValueError for an optimizer, pooling, precision or
    kernel that is not offered.
    """
    check_fused_optimizer(optim)
    check_weights_precision(precision)
    if pooling not in POOLING:
        raise ValueError(f"emb.pooling={pooling!r}: choose one of {sorted(POOLING)}")
    feature_table_map = [i for i, t in enumerate(tables) for _ in t.features]
    kernel = table_kernel(optim, device)
    if kernel != "fbgemm":
        module = BatchedTables(
            [(t.rows, t.dim) for t in tables], feature_table_map, optim.name, optim.lr,
            optim.get("eps", 1e-8), pooling, precision, device, kernel, zero_weights=not init,
        )
        if init:
            with torch.no_grad():
                for t, w in zip(tables, module.split_embedding_weights()):
                    init_uniform_(w, t.rows)
        return module
    on_cuda = device.type == "cuda"
    location = EmbeddingLocation.DEVICE if on_cuda else EmbeddingLocation.HOST
    compute = ComputeDevice.CUDA if on_cuda else ComputeDevice.CPU
    # eps only where the config gives one (SGD has none); fbgemm's own default otherwise.
    eps = {"eps": optim.eps} if "eps" in optim else {}
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(t.rows, t.dim, location, compute) for t in tables],
        feature_table_map=feature_table_map,
        optimizer=FUSED_OPTIMIZERS[optim.name],
        learning_rate=optim.lr,
        pooling_mode=POOLING[pooling],
        # Range checks happen in check_ids_in_range, which names the feature.
        bounds_check_mode=BoundsCheckMode.NONE,
        device=device,
        weights_precision=WEIGHTS_PRECISIONS[precision],
        output_dtype=SparseType.FP32,
        **eps,
    )
    if init:
        with torch.no_grad():
            for t, w in zip(tables, tbe.split_embedding_weights()):
                init_uniform_(w, t.rows)
    return tbe


def tbe_bytes(tbe: SplitTableBatchedEmbeddingBagsCodegen | BatchedTables) -> int:
    """Bytes of weights plus optimizer state held by a TBE module, from the tensors themselves."""
    weights = sum(w.numel() * w.element_size() for w in tbe.split_embedding_weights())
    states = sum(
        s.numel() * s.element_size()
        for per_table in tbe.split_optimizer_states()
        for s in per_table
    )
    return weights + states


# ---------------------------------------------------------------- checkpoints across kernels
# The two kernels keep rows and optimizer state in different buffers (ours: one [rows, dim]
# tensor per dim; fbgemm: flat weights_host / weights_dev plus offsets), so a state_dict written
# by one does not load into the other, and `optim.sparse.kernel=auto` is ours on CPU and fbgemm's
# on CUDA. Checkpoints therefore also hold every table's rows and state per table, the layout
# both kernels' split_* methods speak; a resume under the other kernel loads from those.


def fused_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Each batched-tables module (ours or fbgemm's TBE) inside `module`, by its path."""
    kinds = (BatchedTables, SplitTableBatchedEmbeddingBagsCodegen)
    return {name: m for name, m in module.named_modules() if isinstance(m, kinds)}


def portable_tables(module: torch.nn.Module) -> dict[str, dict[str, list]]:
    """Per batched-tables module inside `module` (by path): `weights`, each table's rows
    `[rows, dim]`, and `states`, each table's fused optimizer state (`[[rows]]` row-wise Adagrad,
    `[[rows, dim]]` Adagrad, none for SGD). Views of the module's own tensors: `torch.save` writes
    a storage once, so saving them beside the state_dict costs no bytes."""
    return {
        path: {"weights": list(m.split_embedding_weights()), "states": [list(s) for s in m.split_optimizer_states()]}
        for path, m in fused_modules(module).items()
    }


def with_own_table_buffers(module: torch.nn.Module, state: dict) -> dict:
    """`state` (a state_dict of `module` written under the other table kernel) with the entries
    of every batched-tables module replaced by `module`'s own: it then loads, and
    `load_portable_tables` fills the tables."""
    paths = tuple(f"{p}." if p else "" for p in fused_modules(module))
    own = {k: v for k, v in module.state_dict().items() if k.startswith(paths)}
    return {**{k: v for k, v in state.items() if not k.startswith(paths)}, **own}


@torch.no_grad()
def load_portable_tables(module: torch.nn.Module, saved: dict[str, dict[str, list]]) -> None:
    """Copy `portable_tables`' output (from either kernel) into `module`'s batched tables.
    Raises ValueError when the modules, tables or their shapes differ."""
    mine = fused_modules(module)
    if sorted(mine) != sorted(saved):
        raise ValueError(f"checkpoint holds tables of modules {sorted(saved)}, this model has {sorted(mine)}")
    for path, m in mine.items():
        weights, states = m.split_embedding_weights(), m.split_optimizer_states()
        if (len(weights), len(states)) != (len(saved[path]["weights"]), len(saved[path]["states"])):
            raise ValueError(f"{path or 'tables'}: checkpoint holds {len(saved[path]['weights'])} tables, this model {len(weights)}")
        pairs = list(zip(weights, saved[path]["weights"]))
        pairs += [(a, b) for ours, theirs in zip(states, saved[path]["states"]) for a, b in zip(ours, theirs)]
        for ours, theirs in pairs:
            if ours.shape != theirs.shape:
                raise ValueError(f"{path or 'tables'}: a table of shape {tuple(theirs.shape)} in the checkpoint, {tuple(ours.shape)} here")
            ours.copy_(theirs)
