"""Linear layers, tensor-parallel ready, with the seam quantizers plug into.

Every linear layer owns a :class:`LinearMethod` that creates its parameters and
computes its forward; the default is a plain ``F.linear``. A quantizer supplies its own
method (weight-only int8, int4, GPTQ, ...) and nothing else in the model changes. A
layer built without a ``method`` while :func:`deferred_linear_methods` is active (the
loader does this when a quantizer is in use) creates no weights until the loader calls
:meth:`LinearBase.bind_method` with the method the quantizer chose for it.

Weights are loaded per parameter: ``param.weight_loader(param, lazy, shard_id)`` reads
only the slice that belongs to this rank (and, for packed layers, to this shard). A
layer says which slice that is in logical units (:meth:`LinearBase.output_rows`: rows
of the output features; :meth:`LinearBase.input_columns`: columns of the input
features), and each parameter's :class:`ParamLayout` says where its tensor keeps those
features: on which dimension, and how many features one stored element covers (8 for
int4 values packed in int32, the group size for group-wise scales). So quantized
parameters shard exactly like the float weight they replace.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tgi_core.model.layers import cpu_gemm
from tgi_core.model.parallel import ParallelContext, current_parallel_context
from tgi_core.model.weights import LazyTensor


class LinearMethod(Protocol):
    """How a linear layer stores its weight and computes ``x @ W.T (+ b)``."""

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        """Register the layer's weight parameter(s) (:meth:`LinearBase.add_weight`: each
        with the layer's ``weight_loader`` and, unless it is a plain ``[out, in]``
        matrix, a :class:`ParamLayout`). ``dtype`` is the model's dtype; the bias is the
        layer's own business."""

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The layer's local output (before any tensor-parallel reduction), in ``x``'s dtype."""

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Called once every weight of the layer is loaded (repacking, quantizing)."""


class UnquantizedLinearMethod:
    """The default: a float weight of shape ``[out, in]`` and ``F.linear``; on a CPU with
    native bf16, a bf16 weight is packed once loaded, for the AMX kernel or oneDNN
    (``cpu_gemm``)."""

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        shape = (layer.output_size_per_partition, layer.input_size_per_partition)
        layer.add_weight("weight", shape, dtype)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.weight_packed:  # not weight.is_mkldnn: a compiled graph cannot see it
            return cpu_gemm.packed_linear(x, layer.weight, bias, layer.output_size_per_partition)
        return F.linear(x, layer.weight, bias)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        if cpu_gemm.can_pack(layer.weight):
            layer.weight = nn.Parameter(cpu_gemm.pack(layer.weight), requires_grad=False)
            layer.weight_packed = True


class _UnboundLinearMethod:
    """The method of a layer waiting for :meth:`LinearBase.bind_method`."""

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        raise RuntimeError("an unbound linear layer has no weights")

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise RuntimeError(
            f"linear layer ({layer.extra_repr()}) was built for a quantizer but never bound "
            "to a method: build models through tgi_core.model.loader"
        )

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        pass


_UNBOUND = _UnboundLinearMethod()
_deferring: ContextVar[bool] = ContextVar("tgi_deferred_linear_methods", default=False)


@contextmanager
def deferred_linear_methods() -> Iterator[None]:
    """While active, layers built without a ``method`` wait for ``bind_method``."""
    token = _deferring.set(True)
    try:
        yield
    finally:
        _deferring.reset(token)


@dataclass(frozen=True, slots=True)
class ParamLayout:
    """Where a linear layer's parameter keeps the layer's output and input features.

    ``output_dim`` / ``input_dim``: the tensor dimension indexed by output / input
    features, or None when the tensor does not vary along them (a bias has no input
    dimension; a ``g_idx`` no output dimension; group scales every rank holds whole
    have ``input_dim=None``). ``output_pack`` / ``input_pack``: how many features one
    element along that dimension covers (8 for 4-bit values packed in int32, the group
    size for group-wise scales). A rank's slice must fall on element boundaries.
    """

    output_dim: int | None = 0
    input_dim: int | None = 1
    output_pack: int = 1
    input_pack: int = 1

    def full_shape(self, param: torch.Tensor, outputs: int, inputs: int) -> tuple[int, ...]:
        """The stored shape of the whole checkpoint tensor: ``outputs`` by ``inputs``."""
        shape = list(param.shape)
        if self.output_dim is not None:
            shape[self.output_dim] = _elements(outputs, self.output_pack, "output features")
        if self.input_dim is not None:
            shape[self.input_dim] = _elements(inputs, self.input_pack, "input features")
        return tuple(shape)


MATRIX = ParamLayout()
VECTOR = ParamLayout(output_dim=0, input_dim=None)


def layout_of(param: torch.Tensor) -> ParamLayout:
    """A parameter's layout: its ``feature_layout`` attribute (set with
    :func:`set_layout`), else ``[out, in]`` for a matrix and ``[out]`` for a vector."""
    layout = getattr(param, "feature_layout", None)
    if layout is not None:
        return layout
    return MATRIX if param.dim() == 2 else VECTOR


def set_layout(param: nn.Parameter, layout: ParamLayout) -> nn.Parameter:
    """Record where ``param`` keeps its features (``torch.Tensor.layout`` is taken)."""
    param.feature_layout = layout  # type: ignore[attr-defined]
    return param


def _elements(features: int, pack: int, what: str) -> int:
    if features % pack:
        raise ValueError(f"{features} {what} do not fall on elements of {pack}")
    return features // pack


class OutputRows(NamedTuple):
    """Which rows (output features) of a checkpoint tensor this rank holds."""

    #: output features of the whole checkpoint tensor
    total: int
    #: ``(source, length, destination)`` ranges: checkpoint rows to the layer's rows
    ranges: Sequence[tuple[int, int, int]]
    #: said after a shape mismatch, e.g. how a fused tensor is laid out
    hint: str = ""


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
        #: the model's dtype: the bias's and, unless the method says otherwise, the weight's
        self.params_dtype = dtype or torch.get_default_dtype()
        #: the weight is oneDNN-packed (``cpu_gemm``); set by the unquantized method
        self.weight_packed = False
        self.method: LinearMethod = _UNBOUND
        if method is not None or not _deferring.get():
            self.bind_method(method or UnquantizedLinearMethod())
        if bias:
            self.bias: nn.Parameter | None = nn.Parameter(
                torch.empty(self._bias_size(), dtype=self.params_dtype), requires_grad=False
            )
            self.bias.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        else:
            self.register_parameter("bias", None)

    @property
    def method_pending(self) -> bool:
        """True while the layer waits for :meth:`bind_method` (built for a quantizer)."""
        return self.method is _UNBOUND

    def bind_method(self, method: LinearMethod) -> None:
        """Give the layer its method, which creates the weight parameters (once)."""
        if not self.method_pending:
            raise RuntimeError("this linear layer already has a method")
        method.create_weights(self, self.params_dtype)
        self.method = method

    def add_weight(
        self,
        name: str,
        shape: Sequence[int],
        dtype: torch.dtype,
        layout: ParamLayout | None = None,
    ) -> nn.Parameter:
        """Register a parameter the checkpoint fills through this layer's
        ``weight_loader`` (for linear methods' ``create_weights``); ``layout`` says where
        it keeps its features (default: ``[out, in]`` for a matrix, ``[out]`` for a vector)."""
        param = nn.Parameter(torch.empty(tuple(shape), dtype=dtype), requires_grad=False)
        param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        if layout is not None:
            set_layout(param, layout)
        self.register_parameter(name, param)
        return param

    def tensor(self, name: str) -> torch.Tensor:
        """The parameter or buffer ``name`` (what a linear method registered), typed."""
        value = getattr(self, name)
        if not isinstance(value, torch.Tensor):
            raise AttributeError(f"{name} of this layer is not a tensor")
        return value

    def _bias_size(self) -> int:
        return self.output_size_per_partition

    def output_rows(self, shard_id: Any) -> OutputRows:
        """The output rows of the checkpoint tensor loaded with ``shard_id`` that this
        rank holds, and where they go; the default is every row, in place."""
        if shard_id is not None:
            raise ValueError(f"this layer loads whole tensors, not shard {shard_id!r}")
        return OutputRows(self.output_size, [(0, self.output_size, 0)])

    def input_columns(self) -> tuple[int, int] | None:
        """``(start, length)`` of the input features this rank holds; None: all of them."""
        return None

    def weight_loader(self, param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
        """Copy this rank's part of ``loaded`` into ``param`` (any parameter of the layer),
        as :meth:`output_rows`, :meth:`input_columns` and the parameter's layout say."""
        layout = layout_of(param)
        rows = self.output_rows(shard_id)
        expected = layout.full_shape(param, rows.total, self.input_size)
        if tuple(loaded.shape) != expected:
            hint = f" ({rows.hint})" if rows.hint else ""
            raise ValueError(
                f"{loaded.name}: checkpoint shape {tuple(loaded.shape)} does not match the "
                f"model's {expected}{hint}"
            )
        columns = self.input_columns()
        if columns is not None and layout.input_dim is not None:
            start, length = columns
            pack = layout.input_pack
            loaded = loaded.narrow(
                layout.input_dim,
                _elements(start, pack, "input features before this rank"),
                _elements(length, pack, "input features of this rank"),
            )
        if layout.output_dim is None:
            loaded.copy_into(param.data)
            return
        _copy_rows(param.data, loaded, layout.output_dim, layout.output_pack, rows.ranges)

    def extra_repr(self) -> str:
        return (
            f"in={self.input_size_per_partition}, out={self.output_size_per_partition}, "
            f"bias={self.bias is not None}, tp={self.tp.rank}/{self.tp.world_size}"
        )


def _copy_rows(
    target: torch.Tensor,
    loaded: LazyTensor,
    dim: int,
    pack: int,
    ranges: Sequence[tuple[int, int, int]],
) -> None:
    """Copy ``(source, length, destination)`` feature ranges of ``loaded`` along ``dim``.

    One range is copied a few MiB at a time; several ranges that tile one contiguous
    span of the checkpoint (a fused tensor regrouped) are read in one go and scattered.
    """
    spans = [
        (
            _elements(src, pack, "output features before a slice"),
            _elements(length, pack, "output features of a slice"),
            _elements(dst, pack, "output features before a slice"),
        )
        for src, length, dst in ranges
    ]
    if len(spans) == 1:
        src, length, dst = spans[0]
        loaded.narrow(dim, src, length).copy_into(target.narrow(dim, dst, length))
        return
    first = min(src for src, _, _ in spans)
    covered = max(src + length for src, length, _ in spans) - first
    if covered == sum(length for _, length, _ in spans):
        block = loaded.narrow(dim, first, covered).load()
        for src, length, dst in spans:
            target.narrow(dim, dst, length).copy_(block.narrow(dim, src - first, length))
        return
    for src, length, dst in spans:
        loaded.narrow(dim, src, length).copy_into(target.narrow(dim, dst, length))


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

    def output_rows(self, shard_id: Any) -> OutputRows:
        if shard_id is not None:
            raise ValueError(f"this layer loads whole tensors, not shard {shard_id!r}")
        size = self.output_size_per_partition
        return OutputRows(self.output_size, [(self.tp.rank * size, size, 0)])

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

    def output_rows(self, shard_id: Any) -> OutputRows:
        if not isinstance(shard_id, int) or not 0 <= shard_id < len(self.output_sizes):
            raise ValueError(
                f"a packed layer loads its {len(self.output_sizes)} parts by index, "
                f"not {shard_id!r}"
            )
        world = self.tp.world_size
        offset = sum(self.output_sizes[:shard_id]) // world
        size = self.output_sizes[shard_id] // world
        return OutputRows(self.output_sizes[shard_id], [(self.tp.rank * size, size, offset)])


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

    def output_rows(self, shard_id: Any) -> OutputRows:
        if shard_id == "q":
            total, offset, size, index = self.total_num_heads, 0, self.q_size, self.tp.rank
        elif shard_id in ("k", "v"):
            total = self.total_num_kv_heads
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            size, index = self.kv_size, self.tp.rank // self.kv_replicas
        else:
            raise ValueError(f"QKV shard_id must be 'q', 'k' or 'v', not {shard_id!r}")
        return OutputRows(total * self.head_dim, [(index * size, size, offset)])

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

    def input_columns(self) -> tuple[int, int] | None:
        size = self.input_size_per_partition
        return self.tp.rank * size, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self.method.apply(self, x, self.bias)
        out = self.method.apply(self, x, None)
        if self.reduce_results:
            out = self.tp.all_reduce(out)
        if self.bias is not None and (self.reduce_results or self.tp.rank == 0):
            out = out + self.bias
        return out
