"""DLRM from torchrec's building blocks, on top of any embedding backend.

    dense [B, 13] --DenseArch (bottom MLP)--> [B, D] --\
                                                         DotInteraction (pairwise dots) --> OverArch (top MLP) --> logit [B]
    ids (KJT) --embedding backend--> [B, F, D] ---------/

The backend runs in fp32 outside autocast (tables and TT cores keep full precision); the two MLPs
run under autocast when `precision` is bf16/fp16, which is where the FLOPs are; the
dot interaction runs in fp32 (small matrices: casting costs more than it saves).

Example::

    model = DLRM(embeddings, dense_in=13, bottom_mlp=[512, 256, 64, 16], top_mlp=[512, 256, 1])
    logits = model(batch.dense, batch.sparse)      # [B]
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, OverArch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dlrm.embeddings.base import EmbeddingBackend
from dlrm.kernels import dot_interaction, linear_relu
from dlrm.kernels.build import loads
from dlrm.options import ConfigError

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
KERNELS = ("auto", "native", "torch")  # model.kernel: who computes the dot interaction and MLP ReLUs


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 matmuls are fast. Without them (e.g. AVX2-only CPUs) oneDNN
    emulates bf16 and a DLRM step measured 16x slower than fp32 (docs/benchmarks.md)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware runs it natively (CUDA, AMX/AVX512-BF16 CPUs), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def _model_kernel(kernel: str, device: torch.device, pays: bool, library, what: str) -> str:
    """`model.kernel` resolved for one of our C kernels (`library`, its cached loader): `torch` when
    asked, or under auto on CUDA or where `pays` is False (measured no faster); else `native` if
    the kernel builds (auto without it: torch, one warning saying `what` runs PyTorch ops).

    Raises ConfigError (one line naming model.kernel) for an unknown kernel, or `native` on CUDA
    or where the C kernel does not build."""
    if kernel not in KERNELS:
        raise ConfigError(f"model.kernel={kernel!r}: choose one of {list(KERNELS)}")
    if kernel == "torch" or (kernel == "auto" and (device.type != "cpu" or not pays)):
        return "torch"
    if device.type != "cpu":
        raise ConfigError(f"model.kernel=native runs on CPU, not {device.type}: use auto or torch")
    return "native" if loads(library, "model.kernel", kernel, what) else "torch"


def interaction_kernel(kernel: str, device: torch.device, dim: int = 16, features: int = 26) -> str:
    """`model.kernel` resolved for the dot interaction: `native` (our C kernel,
    dlrm/kernels/dot_interaction.py) or `torch` (`_PairwiseDots`' batched GEMMs), for `features`
    embeddings of width `dim`. auto = native on CPU where it builds and its vector path applies
    (dim a multiple of 16, at most 31 features: the Criteo shapes; others run a scalar loop that
    measured slower than PyTorch's), torch on CUDA. Raises ConfigError (`_model_kernel`)."""
    vector_path = dim % 16 == 0 and features + 1 <= dot_interaction.MAX_VECTORS
    return _model_kernel(kernel, device, vector_path, dot_interaction.library, "the dot interaction runs")


def mlp_kernel(kernel: str, device: torch.device, precision: str) -> str:
    """`model.kernel` resolved for the MLPs' ReLU layers: `native` (their backward's mask and bias
    sum in our C kernel, dlrm/kernels/linear_relu.py) or `torch` (torchrec's Perceptron as is).
    auto = native on CPU in fp32 where it builds; torch under bf16 (measured no faster there) and
    on CUDA; torch under fp16 whatever is asked (the kernel takes fp32 and bf16: FusedPerceptron
    would run torchrec's ops). Raises ConfigError (`_model_kernel`)."""
    resolved = _model_kernel(kernel, device, precision == "fp32", linear_relu.library, "the MLPs' ReLU backward runs")
    return resolved if precision in ("fp32", "bf16") else "torch"


class _PairwiseDots(torch.autograd.Function):
    """`t [B, N, D] -> z [B, N(N-1)/2]`, the strict upper triangle of `t @ t^T`, row-major.

    Backward builds the symmetric gradient `G + G^T` `[B, N, N]` in one gather (`index_select`
    of the incoming gradient, with a leading zero column for the diagonal, by `sym_index`) and
    returns `(G + G^T) @ t`: one `bmm`, instead of autograd's advanced-index `index_put_`
    (accumulating, sort-based on CPU) plus two `bmm`s, and without zero-filling a `[B, N*N]`
    buffer and adding its transpose (bit-identical: no element of it is a sum of two).
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor, flat_index: torch.Tensor, sym_index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(t, sym_index)
        z = torch.bmm(t, t.transpose(1, 2))  # [B, N, N]
        # explicit N*N, not -1: an empty batch (B = 0, a rank's eval padding) must reshape too
        return z.view(t.shape[0], t.shape[1] ** 2).index_select(1, flat_index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        t, sym_index = ctx.saved_tensors
        b, n, _ = t.shape
        padded = torch.cat([grad.new_zeros(b, 1, dtype=t.dtype), grad.to(t.dtype)], dim=1)  # [B, 1 + P]
        g = padded.index_select(1, sym_index).view(b, n, n)  # (i, j) and (j, i): pair's gradient
        return torch.bmm(g, t), None, None


class DotInteraction(nn.Module):
    """DLRM's dot interaction: `dense [B, D], sparse [B, F, D] -> [B, D + (F+1)F/2]`.

    The same output, in the same order, as torchrec's `InteractionArch` (the dense vector, then
    the upper triangle of the pairwise dot products of the F+1 vectors, row-major; Naumov et al.
    2019, "Deep Learning Recommendation Model"), computed in fp32 outside autocast: on 27 x 16
    matrices bf16 is not faster (docs/benchmarks.md, "Where our step got faster"), and the top
    MLP casts its input anyway. `kernel` (model.kernel resolved by `interaction_kernel`): `native`
    computes the dots in our C kernel (one sample at a time, no [B, N, N] products to gather),
    `torch` as `_PairwiseDots` (its backward 2x faster than torchrec's).
    """

    def __init__(self, num_sparse_features: int, kernel: str = "torch") -> None:
        super().__init__()
        if kernel not in ("native", "torch"):
            raise ValueError(f"kernel {kernel!r}: choose native or torch (interaction_kernel resolves auto)")
        self.kernel = kernel
        n = num_sparse_features + 1
        rows, cols = torch.triu_indices(n, n, offset=1)
        self.register_buffer("flat_index", rows * n + cols, persistent=False)
        # per (i, j) of [N, N]: 1 + the index of pair {i, j} in the output, 0 on the diagonal
        sym = torch.zeros(n * n, dtype=torch.int64)
        pair = torch.arange(1, rows.numel() + 1)
        sym[rows * n + cols], sym[cols * n + rows] = pair, pair
        self.register_buffer("sym_index", sym, persistent=False)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}"

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        device = dense.device.type
        # under bf16 autocast the C kernel stores its output in bf16: the top MLP's input, as
        # autocast would cast it, without a cast forward and back
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        with torch.autocast(device_type=device, enabled=False):
            dense = dense.float()
            if self.kernel == "native":
                return dot_interaction.dot_interaction(dense, sparse.float(), bf16)
            t = torch.cat([dense.unsqueeze(1), sparse.float()], dim=1)  # [B, F+1, D]
            return torch.cat([dense, _PairwiseDots.apply(t, self.flat_index, self.sym_index)], dim=1)


class DLRM(nn.Module):
    def __init__(
        self,
        embeddings: EmbeddingBackend,
        dense_in: int,
        bottom_mlp: list[int],
        top_mlp: list[int],
        precision: str = "fp32",
        kernel: str = "torch",
        mlp_kernel: str = "torch",
    ) -> None:
        super().__init__()
        dims = set(embeddings.dims)
        if len(dims) != 1:
            raise ValueError(f"all embedding dims must be equal for the dot interaction, got {dims}")
        (dim,) = dims
        if bottom_mlp[-1] != dim:
            raise ValueError(
                f"model.bottom_mlp[-1]={bottom_mlp[-1]} must equal emb.dim={dim}: the bottom MLP's "
                "output meets the embeddings in the dot interaction"
            )
        if top_mlp[-1] != 1:
            raise ValueError(f"model.top_mlp[-1]={top_mlp[-1]} must be 1 (one click logit)")
        if precision not in AMP_DTYPES:
            raise ValueError(f"trainer.precision={precision!r}: choose one of {sorted(AMP_DTYPES)}")
        self.num_features = len(embeddings.features)
        self.dim = dim
        self.amp_dtype = AMP_DTYPES[precision]
        self.sparse_arch = embeddings
        self.dense_arch = DenseArch(dense_in, list(bottom_mlp))
        self.inter_arch = DotInteraction(self.num_features, kernel)
        f = self.num_features
        # InteractionArch emits the dense vector plus the (F + 1) choose 2 pairwise dots.
        self.over_arch = OverArch(dim + f + f * (f - 1) // 2, list(top_mlp))
        if mlp_kernel not in ("native", "torch"):
            raise ValueError(f"mlp_kernel {mlp_kernel!r}: choose native or torch (mlp_kernel() resolves auto)")
        self.mlp_kernel = mlp_kernel
        if mlp_kernel == "native":  # the same Linear modules: parameters and state_dict keys unchanged
            linear_relu.fuse_perceptrons(self.dense_arch)
            linear_relu.fuse_perceptrons(self.over_arch)
        self.compiled_dense_forward = None  # set by dlrm.compile.enable (trainer.compile)

    def dense_parameters(self) -> list[nn.Parameter]:
        """Parameters for the dense optimizer: everything but the embedding backend's."""
        sparse = {id(p) for p in self.sparse_arch.parameters()}
        return [p for p in self.parameters() if id(p) not in sparse]

    def dense_forward(self, dense: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """Everything after the embedding lookup: `dense [B, 13], embedded [B, F, D] -> logits [B]`
        (fp32). What `trainer.compile` compiles (dlrm/compile.py)."""
        with torch.autocast(
            device_type=dense.device.type,
            dtype=self.amp_dtype or torch.float32,
            enabled=self.amp_dtype is not None,
        ):
            x = self.inter_arch(self.dense_arch(dense), embedded)
            return self.over_arch(x).squeeze(1).float()

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        pooled = self.sparse_arch(sparse).values()  # [B, F * D], fp32
        embedded = pooled.view(pooled.shape[0], self.num_features, self.dim)  # B may be 0
        compiled = self.compiled_dense_forward
        # training only: evaluation stays eager rather than compile a second (no-grad) graph
        if compiled is not None and self.training:
            return compiled(dense, embedded)
        return self.dense_forward(dense, embedded)
