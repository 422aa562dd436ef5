"""``--quantize int4``: group-wise asymmetric 4-bit weights, quantized from the float
checkpoint while it loads (round to nearest, as torchao and gpt-fast do).

Per output feature and group of ``group_size`` input features (the last group shorter
when they do not divide evenly; with ``--num-shard``, groups of each rank's own slice):
``scale = (max - min) / 15`` and ``offset = min + 8 * scale``, both rounded to bfloat16
(the kernel's dtype); the 4-bit values are rounded against those stored numbers, so
every path computes with the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgi_core.model.layers.linear import LinearBase, UnquantizedLinearMethod
from tgi_core.model.quantization import QuantizerContext
from tgi_int4 import Int4Settings
from tgi_int4.runtime import KERNEL_DTYPE, GroupwiseInt4, Int4LinearMethod, kernel_available


def quantize_groupwise(weight: torch.Tensor, group_size: int) -> GroupwiseInt4:
    """The group-wise int4 form of a float ``weight`` ``[out, in]`` (a last group of
    fewer than ``group_size`` input features when they do not divide evenly)."""
    out, inputs = weight.shape
    groups = -(-inputs // group_size)
    pad = groups * group_size - inputs
    real = F.pad(torch.ones(1, inputs, dtype=torch.bool), (0, pad)).view(1, groups, group_size)
    values = F.pad(weight.float(), (0, pad)).view(out, groups, group_size)
    low = torch.where(real, values, torch.inf).amin(dim=-1)
    high = torch.where(real, values, -torch.inf).amax(dim=-1)
    spread = high - low
    scale = torch.where(spread > 0, spread / 15, torch.ones_like(spread))
    scale = scale.to(KERNEL_DTYPE).float()
    offset = (low + 8 * scale).to(KERNEL_DTYPE).float()
    q = torch.round((values - offset[..., None]) / scale[..., None]) + 8
    q = q.clamp_(0, 15).to(torch.uint8).view(out, groups * group_size)[:, :inputs]
    index = torch.arange(inputs) // group_size
    return GroupwiseInt4(q.contiguous(), scale, offset, index)


class Int4AtLoadMethod(Int4LinearMethod):
    """Loads the float weight (float32, one layer at a time), then quantizes it."""

    def __init__(self, group_size: int, use_kernel: bool) -> None:
        super().__init__(use_kernel)
        self.group_size = group_size

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        UnquantizedLinearMethod().create_weights(layer, torch.float32)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = layer.weight.data
        del layer.weight
        self.install(layer, quantize_groupwise(weight, self.group_size))


class Int4Quantizer:
    """Every linear layer of the model in int4 (the LM head and embeddings stay float)."""

    def __init__(self, ctx: QuantizerContext) -> None:
        settings = ctx.section("int4", Int4Settings)
        self.group_size = settings.group_size
        self.use_kernel = settings.kernel == "auto" and kernel_available(ctx.device)

    def linear_method(self, layer: LinearBase, prefix: str) -> Int4AtLoadMethod:
        return Int4AtLoadMethod(self.group_size, self.use_kernel)
