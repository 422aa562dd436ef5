"""bitsandbytes 4-bit: each linear weight quantized while loading, as transformers'
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...)`` does.

Blocks of 64 consecutive weights share one float32 absmax (no double quantization,
uint8 storage: transformers' defaults); bitsandbytes computes the layer. On a CPU with
AVX-512 BF16, the weight is then repacked for bitsandbytes' fused CPU kernel, as its
``Linear4bit`` does for inference (bfloat16 activations inside, any batch size);
elsewhere, or with ``kernel = "portable"``, bitsandbytes dequantizes and multiplies in
the activations' dtype (exact in float32).

Measured with bitsandbytes 0.50.2: its CPU kernels handle input features only in
multiples of the block size (64); other shapes dequantize to wrong values (blocks that
straddle rows) or crash. On CPU such a layer's weight is padded with zero input features
to whole blocks (and its input with zeros at every forward), so its blocks never
straddle rows; transformers' bitsandbytes layers would straddle them (and fail on CPU).
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from tgi_bitsandbytes import BitsAndBytesSettings
from tgi_core.model.layers.linear import LinearBase, UnquantizedLinearMethod
from tgi_core.model.quantization import QuantizerContext

BLOCK_SIZE = 64
#: the fused CPU kernel's packing takes output features in tiles of 32
CPU_PACK_OUTPUTS = 32
QUANT_TYPES = {"bitsandbytes-nf4": "nf4", "bitsandbytes-fp4": "fp4"}


def import_bitsandbytes() -> Any:
    """Import bitsandbytes, without its warnings about an optional kernel it would fetch
    from the Hugging Face Hub (tgi downloads nothing) and torch.jit's deprecation."""
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module("bitsandbytes")
    finally:
        noisy.setLevel(level)


def check_bitsandbytes(device: torch.device, quant_type: str) -> Any:
    """bitsandbytes, once a tiny 4-bit matmul has run on ``device``; raises
    RuntimeError saying why it cannot run here."""
    try:
        bnb = import_bitsandbytes()
    except Exception as exc:  # a missing package, or a native library that fails to load
        raise RuntimeError(
            f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc}); install it with "
            "pip install bitsandbytes"
        ) from None
    try:
        weight = torch.linspace(-1, 1, 2 * BLOCK_SIZE, device=device).view(2, BLOCK_SIZE)
        packed, state = bnb.functional.quantize_4bit(
            weight, blocksize=BLOCK_SIZE, quant_type=quant_type, compress_statistics=False
        )
        out = bnb.matmul_4bit(torch.ones(3, BLOCK_SIZE, device=device), packed, state)
        expected = bnb.functional.dequantize_4bit(packed, state).sum(dim=1)
        if not torch.allclose(out, expected.expand(3, -1), rtol=1e-3, atol=1e-3):
            raise RuntimeError("a test matmul gave wrong results")
    except Exception as exc:
        raise RuntimeError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit {quant_type} "
            f"on {device.type} here ({type(exc).__name__}: {exc})"
        ) from None
    return bnb


def cpu_kernel_available(bnb: Any) -> bool:
    """Whether bitsandbytes has its fused CPU kernel here (AVX-512 BF16, and the weight
    repacking its ``Linear4bit`` uses)."""
    functional = bnb.functional
    return hasattr(functional, "_convert_weight_packed_for_cpu") and bool(
        getattr(functional, "has_avx512bf16", lambda: False)()
    )


class BitsAndBytesLinearMethod:
    """Loads the float weight (float32, one layer at a time), then quantizes it.

    ``pack_for_cpu``: repack for bitsandbytes' fused CPU kernel; ``pad``: zero input
    features appended to the weight (and to every input).
    """

    def __init__(self, bnb: Any, quant_type: str, pack_for_cpu: bool, pad: int = 0) -> None:
        self.bnb, self.quant_type, self.pack_for_cpu = bnb, quant_type, pack_for_cpu
        self.pad = pad
        self.state: Any = None

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        UnquantizedLinearMethod().create_weights(layer, torch.float32)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = F.pad(layer.weight.data, (0, self.pad))
        del layer.weight
        functional = self.bnb.functional
        packed, self.state = functional.quantize_4bit(
            weight,
            blocksize=BLOCK_SIZE,
            quant_type=self.quant_type,
            compress_statistics=False,
            quant_storage=torch.uint8,
        )
        if self.pack_for_cpu:
            packed, self.state = functional._convert_weight_packed_for_cpu(packed, self.state)
        layer.register_buffer("bnb_weight", packed, persistent=False)
        # the absmax lives in the quant state; a buffer too, so weight bytes count it
        layer.register_buffer("bnb_absmax", self.state.absmax, persistent=False)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.pad:
            x = F.pad(x, (0, self.pad))
        out = self.bnb.matmul_4bit(x, layer.tensor("bnb_weight"), quant_state=self.state)
        if bias is not None:
            out = out + bias
        return out


class BitsAndBytesQuantizer:
    """Every linear layer in bitsandbytes 4-bit (the LM head and embeddings stay float)."""

    def __init__(self, ctx: QuantizerContext) -> None:
        if ctx.quantization_config is not None:
            raise ValueError("it quantizes float checkpoints while loading")
        self.quant_type = QUANT_TYPES[ctx.name]
        self.bnb = check_bitsandbytes(ctx.device, self.quant_type)
        self.on_cpu = ctx.device.type == "cpu"
        settings = ctx.section("bitsandbytes", BitsAndBytesSettings)
        self.cpu_kernel = (
            self.on_cpu and settings.kernel == "auto" and cpu_kernel_available(self.bnb)
        )

    def linear_method(self, layer: LinearBase, prefix: str) -> BitsAndBytesLinearMethod:
        inputs, outputs = layer.input_size_per_partition, layer.output_size_per_partition
        pad = -inputs % BLOCK_SIZE if self.on_cpu else 0
        pack = self.cpu_kernel and outputs % CPU_PACK_OUTPUTS == 0
        return BitsAndBytesLinearMethod(self.bnb, self.quant_type, pack, pad)
