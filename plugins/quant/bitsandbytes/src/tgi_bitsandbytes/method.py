"""bitsandbytes 4-bit: each linear weight quantized while loading, as transformers'
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=...)`` does.

Blocks of 64 consecutive weights of a row share one float32 absmax (no double
quantization, uint8 storage: transformers' defaults); bitsandbytes computes the layer
(``matmul_4bit``: its fused CPU kernel for a single bfloat16 row, else dequantize and
matmul in the activations' dtype, exact in float32). Each rank quantizes its own slice.
"""

from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any

import torch

from tgi_core.model.layers.linear import LinearBase, UnquantizedLinearMethod
from tgi_core.model.quantization import QuantizerContext

BLOCK_SIZE = 64
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
        out = bnb.matmul_4bit(torch.ones(1, BLOCK_SIZE, device=device), packed.t(), state)
        expected = bnb.functional.dequantize_4bit(packed, state).sum(dim=1)
        if not torch.allclose(out.flatten(), expected, rtol=1e-3, atol=1e-3):
            raise RuntimeError("a test matmul gave wrong results")
    except Exception as exc:
        raise RuntimeError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit {quant_type} "
            f"on {device.type} here ({type(exc).__name__}: {exc})"
        ) from None
    return bnb


class BitsAndBytesLinearMethod:
    """Loads the float weight (float32, one layer at a time), then quantizes it."""

    def __init__(self, bnb: Any, quant_type: str) -> None:
        self.bnb, self.quant_type = bnb, quant_type
        self.state: Any = None

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        UnquantizedLinearMethod().create_weights(layer, torch.float32)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        weight = layer.weight.data
        del layer.weight
        packed, self.state = self.bnb.functional.quantize_4bit(
            weight,
            blocksize=BLOCK_SIZE,
            quant_type=self.quant_type,
            compress_statistics=False,
            quant_storage=torch.uint8,
        )
        layer.register_buffer("bnb_weight", packed, persistent=False)
        # the absmax lives in the quant state; a buffer too, so weight bytes count it
        layer.register_buffer("bnb_absmax", self.state.absmax, persistent=False)

    def dequantized(self, layer: LinearBase) -> torch.Tensor:
        """The float32 weight ``[out, in]`` that bitsandbytes computes with."""
        return self.bnb.functional.dequantize_4bit(layer.tensor("bnb_weight"), self.state).float()

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = self.bnb.matmul_4bit(x, layer.tensor("bnb_weight").t(), quant_state=self.state)
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

    def linear_method(self, layer: LinearBase, prefix: str) -> BitsAndBytesLinearMethod:
        return BitsAndBytesLinearMethod(self.bnb, self.quant_type)
