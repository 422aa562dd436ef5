"""Quantized linear layers under tensor parallelism, ranks simulated one by one.

Each rank's layer is built with ``ParallelContext(rank=r, world_size=n)`` and no process
group, loads the same checkpoint tensors through its parameters' ``weight_loader`` (its
own slice only) and quantizes or converts them; the ranks' outputs, concatenated
(column-parallel) or summed (row-parallel), must equal the matmul with the weights each
rank was meant to hold. Portable paths are compared in float32 (1e-5); the CPU kernels
compute with bfloat16 activations (2e-2 of the output's magnitude: a few bf16 ulps).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tgi_core.model.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from tgi_core.model.parallel import ParallelContext
from tgi_core.model.weights import LazyTensor

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 64, 4, 2, 16, 128
KINDS = ("column", "row", "qkv", "merged")


def parts(kind: str) -> dict[Any, tuple[int, int]]:
    """The checkpoint tensors of a layer kind: shard id -> (out, in)."""
    if kind == "qkv":
        return {
            "q": (HEADS * HEAD_DIM, HIDDEN),
            "k": (KV_HEADS * HEAD_DIM, HIDDEN),
            "v": (KV_HEADS * HEAD_DIM, HIDDEN),
        }
    if kind == "merged":
        return {0: (INTER, HIDDEN), 1: (INTER, HIDDEN)}
    if kind == "row":
        return {None: (HIDDEN, INTER)}
    return {None: (INTER, HIDDEN)}


def build(kind: str, tp: ParallelContext, method: LinearMethod) -> LinearBase:
    if kind == "column":
        return ColumnParallelLinear(HIDDEN, INTER, bias=True, tp=tp, method=method)
    if kind == "row":
        return RowParallelLinear(
            INTER, HIDDEN, bias=True, tp=tp, method=method, reduce_results=False
        )
    if kind == "qkv":
        return QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=True, tp=tp, method=method)
    return MergedColumnParallelLinear(HIDDEN, [INTER, INTER], bias=True, tp=tp, method=method)


def bias_of(rows: int) -> torch.Tensor:
    """A part's bias in the checkpoint."""
    return torch.linspace(-1, 1, rows)


def rank_rows(layer: LinearBase, shard: Any) -> slice:
    """This rank's rows of a part (as the layer reads them)."""
    ((src, length, _),) = layer.output_rows(shard).ranges
    return slice(src, src + length)


def run_ranks(
    kind: str,
    world: int,
    make_method: Callable[[], LinearMethod],
    load: Callable[[LinearBase, Any], None],
    x: torch.Tensor,
) -> tuple[torch.Tensor, list[LinearBase]]:
    """The ranks' combined output, and their layers."""
    outputs, layers = [], []
    for rank in range(world):
        layer = build(kind, ParallelContext(rank=rank, world_size=world), make_method())
        for shard, (rows, _) in parts(kind).items():
            load(layer, shard)
            layer.weight_loader(layer.bias, LazyTensor.of(bias_of(rows), "bias"), shard)
        layer.method.process_weights_after_loading(layer)
        if kind == "row":
            per = INTER // world
            outputs.append(layer(x[:, rank * per : (rank + 1) * per]))
        else:
            outputs.append(layer(x))
        layers.append(layer)
    if kind == "row":  # the all-reduce, by hand (rank 0 alone adds the bias)
        return torch.stack(outputs).sum(0), layers
    return torch.cat(outputs, dim=-1), layers


def expected(
    kind: str,
    world: int,
    weights: dict[Any, torch.Tensor],
    x: torch.Tensor,
    per_rank: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """What the ranks must compute together: each rank's float slice, dequantized by
    ``per_rank``, times its input."""
    outputs = []
    for rank in range(world):
        layer = build(kind, ParallelContext(rank=rank, world_size=world), _Unquantized())
        if kind == "row":
            per = INTER // world
            local = per_rank(weights[None][:, rank * per : (rank + 1) * per])
            outputs.append(x[:, rank * per : (rank + 1) * per] @ local.T)
            continue
        mine = {s: rank_rows(layer, s) for s in parts(kind)}
        rows = [per_rank(weights[s][mine[s]]) for s in parts(kind)]
        bias = torch.cat([bias_of(weights[s].shape[0])[mine[s]] for s in parts(kind)])
        outputs.append(x @ torch.cat(rows).T + bias)
    if kind == "row":
        return torch.stack(outputs).sum(0) + bias_of(HIDDEN)
    return torch.cat(outputs, dim=-1)


class _Unquantized:
    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        pass

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        pass


def float_weights(kind: str, seed: int = 0) -> dict[Any, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {s: torch.randn(shape, generator=generator) * 0.2 for s, shape in parts(kind).items()}


def load_float(weights: dict[Any, torch.Tensor]) -> Callable[[LinearBase, Any], None]:
    def load(layer: LinearBase, shard: Any) -> None:
        layer.weight_loader(layer.weight, LazyTensor.of(weights[shard], "weight"), shard)

    return load


def close(got: torch.Tensor, want: torch.Tensor, kernel: bool) -> None:
    if kernel:
        torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


X = torch.randn(5, INTER, generator=torch.Generator().manual_seed(1))


def x_for(kind: str) -> torch.Tensor:
    return X if kind == "row" else X[:, :HIDDEN]


# -- quantized while loading: each rank quantizes the slice it read --------------------


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_int8_ranks_quantize_their_slices(
    kind: str, world: int, kernel: bool, formats: Any
) -> None:
    from tgi_int8.method import Int8LinearMethod

    weights = float_weights(kind)
    got, _ = run_ranks(
        kind, world, lambda: Int8LinearMethod(kernel), load_float(weights), x_for(kind)
    )
    close(got, expected(kind, world, weights, x_for(kind), formats.int8_reference), kernel)


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_int4_ranks_quantize_their_slices(
    kind: str, world: int, kernel: bool, formats: Any
) -> None:
    from tgi_int4.method import Int4AtLoadMethod

    weights = float_weights(kind)
    x = x_for(kind)
    got, layers = run_ranks(
        kind, world, lambda: Int4AtLoadMethod(32, kernel), load_float(weights), x
    )
    reference = expected(kind, world, weights, x, lambda w: formats.int4_reference(w, 32))
    close(got, reference, kernel)
    assert all((layer.method.kernel_group_size == 32) == kernel for layer in layers)
    if kind in ("column", "row"):  # (fused layers interleave their parts per rank)
        # groups never straddle ranks, so sharding does not change the quantization
        unsharded = expected(kind, 1, weights, x, lambda w: formats.int4_reference(w, 32))
        close(got, unsharded, kernel)


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_bitsandbytes_ranks_quantize_their_slices(
    kind: str, world: int, kernel: bool, formats: Any
) -> None:
    """A row-parallel rank of 128 inputs over 4 holds 32: padded to a block of 64."""
    from tgi_bitsandbytes.method import (
        CPU_PACK_OUTPUTS,
        BitsAndBytesLinearMethod,
        import_bitsandbytes,
    )

    bnb = import_bitsandbytes()
    layer = build(kind, ParallelContext(0, world), _Unquantized())
    pack = kernel and layer.output_size_per_partition % CPU_PACK_OUTPUTS == 0
    pad = -layer.input_size_per_partition % 64
    assert pad == (32 if (kind, world) == ("row", 4) else 0)
    weights = float_weights(kind)
    make = lambda: BitsAndBytesLinearMethod(bnb, "nf4", pack, pad)  # noqa: E731
    got, _ = run_ranks(kind, world, make, load_float(weights), x_for(kind))
    reference = expected(
        kind, world, weights, x_for(kind), lambda w: formats.bnb_reference(w, "nf4")
    )
    close(got, reference, kernel=pack)


# -- pre-quantized: each rank reads its slice of the packed tensors ---------------------


def packed_loader(tensors: dict[Any, dict[str, torch.Tensor]]) -> Callable[[LinearBase, Any], None]:
    def load(layer: LinearBase, shard: Any) -> None:
        for name, tensor in tensors[shard].items():
            param = getattr(layer, name)
            param.weight_loader(param, LazyTensor.of(tensor, name), shard)

    return load


def prequantized(
    kind: str, write: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]
) -> tuple[dict, dict]:
    """Each part's checkpoint tensors and dequantized float weight."""
    tensors, dequantized = {}, {}
    for shard, weight in float_weights(kind).items():
        tensors[shard], dequantized[shard] = write(weight)
    return tensors, dequantized


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", ["sym", "asym-act-order", "per-channel"], ids=lambda v: v)
def test_gptq_ranks_load_their_slices(
    kind: str, world: int, kernel: bool, variant: str, formats: Any
) -> None:
    from tgi_gptq.format import GPTQConfig
    from tgi_gptq.method import GPTQLinearMethod

    group_size = -1 if variant == "per-channel" else 32
    sym, desc_act = variant == "sym", variant == "asym-act-order"
    tensors, dequantized = prequantized(
        kind,
        # one seed: parts of a fused layer share their act-order permutation
        lambda w: formats.gptq_layer(w, group_size, sym=sym, desc_act=desc_act, seed=3),
    )
    config = GPTQConfig(None if group_size == -1 else group_size, desc_act, sym, zero_offset=1)
    x = x_for(kind)
    got, layers = run_ranks(
        kind, world, lambda: GPTQLinearMethod(config, kernel), packed_loader(tensors), x
    )
    close(got, expected(kind, world, dequantized, x, lambda w: w), kernel)
    if kernel and kind == "row" and desc_act:
        # act-order scatters a group's features over the ranks: uneven shares, portable
        assert all(layer.method.kernel_group_size is None for layer in layers)
    elif kernel:
        assert all(layer.method.kernel_group_size is not None for layer in layers)


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_awq_ranks_load_their_slices(kind: str, world: int, kernel: bool, formats: Any) -> None:
    from tgi_awq.format import AWQConfig
    from tgi_awq.method import AWQLinearMethod

    tensors, dequantized = prequantized(kind, lambda w: formats.awq_layer(w, 32))
    config = AWQConfig(32, ())
    x = x_for(kind)
    got, layers = run_ranks(
        kind, world, lambda: AWQLinearMethod(config, kernel), packed_loader(tensors), x
    )
    close(got, expected(kind, world, dequantized, x, lambda w: w), kernel)
    assert all((layer.method.kernel_group_size is not None) == kernel for layer in layers)
