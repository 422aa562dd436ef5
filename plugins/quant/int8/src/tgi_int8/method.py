"""Weight-only int8: ``w[o, i] = q[o, i] * scale[o]``, quantized from the float checkpoint
(the linear layers, and the embedding and LM head tables: :class:`Int8Vocabulary`).

Each output channel's scale is its largest magnitude over 127, rounded to bfloat16 (the
kernel's dtype); the int8 values are rounded against that stored scale, so every path
computes with the same weights. On a CPU with AMX, or with AVX-512 BF16 and VBMI (AMD
Zen 4), layers whose input size is a multiple of 32 run on tgi-core's packed-weight
kernel (``amx_gemm.linear_int8``: the int8 values widened to bf16 inside the kernel,
any number of rows; "amx" below names that packing). Elsewhere on CPU,
``torch.ops.aten._weight_int8pack_mm`` runs the layer for up to ``KERNEL_MAX_ROWS``
tokens with bfloat16 activations (cast in and out: with float32 activations the op falls
to a path 10-30x slower); for more tokens, other devices, or with ``kernel =
"portable"``, the layer multiplies by the int8 values converted to the activations'
dtype and scales the output, which is exact in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tgi_core.model.layers import amx_gemm, opaque
from tgi_core.model.layers.linear import LinearBase, UnquantizedLinearMethod
from tgi_core.model.quantization import QuantizerContext
from tgi_int8 import Int8Settings

#: the CPU kernel's activation and scale dtype
KERNEL_DTYPE = torch.bfloat16


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values ``[out, in]`` and bfloat16 scales ``[out]`` of a float ``weight``."""
    weight = weight.float()
    amax = weight.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax)).to(KERNEL_DTYPE)
    q = torch.round(weight / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight that int8 values and their scales stand for."""
    return q.float() * scale.float()[:, None]


def kernel_available(device: torch.device) -> bool:
    """Whether torch's int8 weight-only kernel runs on ``device``."""
    return device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm")


#: torch's int8 kernel is a matrix-vector loop: its time grows with the rows (0.22 ms at
#: 8 rows of a 576 x 3072 layer, 3.1 ms at 128), where a bf16 GEMM over the int8 values
#: takes 0.3-0.6 ms; above this many rows (prefill chunks, large decode batches), the
#: layer takes that portable path
KERNEL_MAX_ROWS = 8


def int8_matmul(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, use_kernel: bool
) -> torch.Tensor:
    """``x`` ``[rows, in]`` times the int8 weight ``[out, in]`` (or its AMX packing,
    :func:`amx_gemm.pack`) with per-output scales.

    The kernels compute in bfloat16 (``x`` cast in and out); the portable path multiplies
    by the int8 values in ``x``'s dtype (exact: they are small integers) and scales the
    product, exact in float32 and one more bf16 rounding than the kernel in bfloat16."""
    if amx_gemm.is_packed(qweight):
        # the op, compiled or not: opaque to inductor (model/compiled.py), and in eager
        # its C++ kernel skips the Python around the ctypes call (~7 us of ~10 a layer)
        if x.dtype == KERNEL_DTYPE:
            return opaque.amx_linear_int8(x, qweight, scales, None, scales.shape[0])
        out = opaque.amx_linear_int8(x.to(KERNEL_DTYPE), qweight, scales, None, scales.shape[0])
        return out.to(x.dtype)
    if use_kernel and x.shape[0] <= KERNEL_MAX_ROWS:
        out = torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), qweight, scales)
        return out.to(x.dtype)
    return F.linear(x, qweight.to(x.dtype)) * scales.to(x.dtype)


#: the CPU kernel reads input features 16 at a time: other sizes give wrong results
#: or crash (measured with torch 2.13), so such layers take the portable path
KERNEL_INPUT_MULTIPLE = 16


def amx_applies(input_size: int) -> bool:
    """Whether int8 weights with ``input_size`` inputs go to the packed-weight kernel
    (AMX or AVX-512) here."""
    return input_size % amx_gemm.K_STEP == 0 and amx_gemm.available()


class Int8LinearMethod:
    """Loads the float weight (float32, one layer at a time), then quantizes it.

    ``use_kernel``: run a CPU kernel (bfloat16 activations), else the portable path;
    ``use_amx``: the kernel is tgi-core's packed-weight one (AMX or AVX-512; the int8
    values stored in its tile layout).
    """

    def __init__(self, use_kernel: bool, use_amx: bool = False) -> None:
        self.use_kernel = use_kernel
        self.use_amx = use_kernel and use_amx

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        UnquantizedLinearMethod().create_weights(layer, torch.float32)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = layer.weight.data
        del layer.weight
        q, scale = quantize_per_channel(weight)
        if self.use_amx:
            q = amx_gemm.pack(q)
        layer.register_buffer("qweight", q, persistent=False)
        layer.register_buffer("scales", scale, persistent=False)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = int8_matmul(flat, layer.tensor("qweight"), layer.tensor("scales"), self.use_kernel)
        if bias is not None:
            out = out + bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


class Int8Vocabulary:
    """An embedding table (and the LM head tied to it) in int8, one scale per row.

    A row's scale is a vocabulary entry's, which is also an output channel of the LM
    head: the same int8 table serves the lookup (rows dequantized to the model's dtype)
    and the head (the CPU kernel, or the portable path), in half the bytes of bf16.
    """

    def __init__(self, weight: torch.Tensor, use_kernel: bool, use_amx: bool = False) -> None:
        self.dtype = weight.dtype
        self.qweight, self.scales = quantize_per_channel(weight)
        self.use_kernel = use_kernel and weight.shape[1] % KERNEL_INPUT_MULTIPLE == 0
        if use_kernel and use_amx and amx_applies(weight.shape[1]):
            # stored once, in the kernel's layout; lookups gather their rows from it
            self.qweight = amx_gemm.pack(self.qweight)

    def buffers(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales}

    def values(self) -> torch.Tensor:
        """The int8 table ``[vocab, hidden]``, whatever its stored layout."""
        if amx_gemm.is_packed(self.qweight):
            return amx_gemm.unpack(self.qweight, self.scales.shape[0])
        return self.qweight

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if amx_gemm.is_packed(self.qweight):
            values = amx_gemm.gather_rows(self.qweight, ids)
        else:
            values = F.embedding(ids, self.qweight)
        rows = values.float() * self.scales.float()[ids].unsqueeze(-1)
        return rows.to(self.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = int8_matmul(flat, self.qweight, self.scales, self.use_kernel)
        return out.view(*hidden.shape[:-1], out.shape[-1])


class Int8Quantizer:
    """Every linear layer of the model in int8, and (``vocabulary = true``, the default)
    the embedding and LM head tables."""

    def __init__(self, ctx: QuantizerContext) -> None:
        settings = ctx.section("int8", Int8Settings)
        self.use_kernel = settings.kernel == "auto" and kernel_available(ctx.device)
        self.vocabulary = settings.vocabulary

    def linear_method(self, layer: LinearBase, prefix: str) -> Int8LinearMethod:
        inputs = layer.input_size_per_partition
        if self.use_kernel and amx_applies(inputs):
            return Int8LinearMethod(use_kernel=True, use_amx=True)
        fits = inputs % KERNEL_INPUT_MULTIPLE == 0
        return Int8LinearMethod(use_kernel=self.use_kernel and fits)

    def vocabulary_method(self, weight: torch.Tensor, prefix: str) -> Int8Vocabulary | None:
        if not self.vocabulary:
            return None
        return Int8Vocabulary(weight, self.use_kernel, use_amx=True)
