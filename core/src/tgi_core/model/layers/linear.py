"""Linear layers, tensor-parallel ready, with the seam quantizers plug into.

Every linear layer owns a :class:`LinearMethod` that creates its parameters and
computes its forward; the default is a plain ``F.linear``. A quantizer supplies its own
method (weight-only int8, int4, ...) and nothing else in the model changes.

Weights are loaded per parameter: ``param.weight_loader(param, lazy, shard_id)`` reads
only the slice that belongs to this rank (and, for packed layers, to this shard).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tgi_core.model.parallel import ParallelContext, current_parallel_context
from tgi_core.model.weights import LazyTensor


class LinearMethod(Protocol):
    """How a linear layer stores its weight and computes ``x @ W.T (+ b)``."""

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        """Register the layer's weight parameter(s), with a ``weight_loader`` attribute."""

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's local output (before any tensor-parallel reduction)."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Called once every weight is loaded (repacking, quantizing)."""


class UnquantizedLinearMethod:
    """The default: a float weight of shape ``[out, in]`` and ``F.linear``."""

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        weight = nn.Parameter(
            torch.empty(
                layer.output_size_per_partition, layer.input_size_per_partition, dtype=dtype
            ),
            requires_grad=False,
        )
        weight.weight_loader = layer.weight_loader  # type: ignore[attr-defined]
        layer.register_parameter("weight", weight)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, layer.weight, bias)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        pass


def _check_full(loaded: LazyTensor, expected: tuple[int, ...]) -> None:
    """The checkpoint tensor must have the layer's full (unsharded) shape."""
    if tuple(loaded.shape) != expected:
        raise ValueError(
            f"{loaded.name}: checkpoint shape {tuple(loaded.shape)} does not match the "
            f"model's {expected}"
        )


def _full_shape(param: nn.Parameter, rows: int, cols: int) -> tuple[int, ...]:
    return (rows,) if param.dim() == 1 else (rows, cols)


class LinearBase(nn.Module):
    """Shared state of every linear layer: sizes, rank, bias and the linear method."""

    weight: torch.Tensor

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool,
        input_size_per_partition: int,
        output_size_per_partition: int,
        dtype: torch.dtype | None,
        tp: ParallelContext | None,
        method: LinearMethod | None,
    ) -> None:
        super().__init__()
        self.tp = tp or current_parallel_context()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = input_size_per_partition
        self.output_size_per_partition = output_size_per_partition
        dtype = dtype or torch.get_default_dtype()
        self.method: LinearMethod = method or UnquantizedLinearMethod()
        self.method.create_weights(self, dtype)
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(self._bias_size(), dtype=dtype), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    def _bias_size(self) -> int:
        return self.output_size_per_partition

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        """Copy this rank's part of ``loaded`` into ``param`` (a weight or a bias)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size_per_partition}, out={self.output_size_per_partition}, "
            f"bias={self.bias is not None}, tp={self.tp.rank}/{self.tp.world_size}"
        )


class ReplicatedLinear(LinearBase):
    """A linear layer every rank holds whole."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__(
            input_size,
            output_size,
            bias=bias,
            input_size_per_partition=input_size,
            output_size_per_partition=output_size,
            dtype=dtype,
            tp=tp,
            method=method,
        )

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        loaded.copy_into(param.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; each rank returns its slice of the output."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        tp = tp or current_parallel_context()
        super().__init__(
            input_size,
            output_size,
            bias=bias,
            input_size_per_partition=input_size,
            output_size_per_partition=tp.shard(output_size, "output features"),
            dtype=dtype,
            tp=tp,
            method=method,
        )

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        _check_full(loaded, _full_shape(param, self.output_size, self.input_size))
        size = self.output_size_per_partition
        loaded.narrow(0, self.tp.rank * size, size).copy_into(param.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input packed in one GEMM (gate/up).

    Checkpoint tensors load into their part with ``shard_id`` = the index in
    ``output_sizes``.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        tp = tp or current_parallel_context()
        self.output_sizes = list(output_sizes)
        for size in self.output_sizes:
            tp.shard(size, "packed output features")
        super().__init__(
            input_size, sum(self.output_sizes), bias=bias, dtype=dtype, tp=tp, method=method
        )

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        if not isinstance(shard_id, int):
            raise ValueError(f"{loaded.name}: a packed layer loads its parts by index")
        _check_full(loaded, _full_shape(param, self.output_sizes[shard_id], self.input_size))
        world = self.tp.world_size
        offset = sum(self.output_sizes[:shard_id]) // world
        size = self.output_sizes[shard_id] // world
        loaded.narrow(0, self.tp.rank * size, size).copy_into(param.data.narrow(0, offset, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections packed in one GEMM, split by heads.

    Key/value heads are split across ranks too; when there are fewer KV heads than
    ranks, each KV head is replicated on ``world_size / num_kv_heads`` ranks. Checkpoint
    tensors load with ``shard_id`` ``"q"``, ``"k"`` or ``"v"``.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        tp = tp or current_parallel_context()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = tp.shard(num_heads, "attention heads")
        if num_kv_heads >= tp.world_size:
            self.num_kv_heads = tp.shard(num_kv_heads, "key/value heads")
            self.kv_replicas = 1
        else:
            if tp.world_size % num_kv_heads:
                raise ValueError(
                    f"tensor-parallel size {tp.world_size} is not a multiple of the "
                    f"{num_kv_heads} key/value heads"
                )
            self.num_kv_heads, self.kv_replicas = 1, tp.world_size // num_kv_heads
        output = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.world_size
        super().__init__(hidden_size, output, bias=bias, dtype=dtype, tp=tp, method=method)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        heads = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        _check_full(loaded, _full_shape(param, heads * self.head_dim, self.input_size))
        if shard_id == "q":
            offset, size, index = 0, self.q_size, self.tp.rank
        elif shard_id in ("k", "v"):
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, index = self.kv_size, self.tp.rank // self.kv_replicas
        else:
            raise ValueError(f"{loaded.name}: QKV shard_id must be 'q', 'k' or 'v'")
        loaded.narrow(0, index * size, size).copy_into(param.data.narrow(0, offset, size))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Split a packed output into q ``[T, H, D]``, k and v ``[T, Hkv, D]``."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return (
            q.view(-1, self.num_heads, self.head_dim),
            k.view(-1, self.num_kv_heads, self.head_dim),
            v.view(-1, self.num_kv_heads, self.head_dim),
        )


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed (all-reduce).

    The bias is added once, after the reduction.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        tp: ParallelContext | None = None,
        method: LinearMethod | None = None,
        reduce_results: bool = True,
    ) -> None:
        tp = tp or current_parallel_context()
        self.reduce_results = reduce_results
        super().__init__(
            input_size,
            output_size,
            bias=bias,
            input_size_per_partition=tp.shard(input_size, "input features"),
            output_size_per_partition=output_size,
            dtype=dtype,
            tp=tp,
            method=method,
        )

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        if param.dim() == 1:  # the bias is whole on every rank
            loaded.copy_into(param.data)
            return
        _check_full(loaded, (self.output_size, self.input_size))
        size = self.input_size_per_partition
        loaded.narrow(1, self.tp.rank * size, size).copy_into(param.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self.method.apply(self, x, self.bias)
        out = self.method.apply(self, x, None)
        if self.reduce_results:
            out = self.tp.all_reduce(out)
        if self.bias is not None and (self.reduce_results or self.tp.rank == 0):
            out = out + self.bias
        return out
