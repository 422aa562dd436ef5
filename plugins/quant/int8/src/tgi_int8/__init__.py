"""tgi-int8: weight-only int8 quantization, per output channel, done while loading.

This module is imported whenever plugins are listed, so it only declares specs; the
quantizer (and torch) loads when a model is served with ``--quantize int8``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

import tgi_core


class Int8Settings(msgspec.Struct, forbid_unknown_fields=True):
    """The ``[plugins.int8]`` section of a deployment file."""

    #: ``auto``: torch's CPU int8 kernel where it runs, else the portable path;
    #: ``portable``: always dequantize and matmul (any device, exact in float32).
    kernel: Literal["auto", "portable"] = "auto"
    #: quantize the embedding and LM head tables too (one int8 table when tied)
    vocabulary: bool = True


INT8 = tgi_core.QuantizerSpec(
    name="int8",
    factory="tgi_int8.method:Int8Quantizer",
    description="weight-only int8 per output channel, bf16 activations on the CPU kernel",
)


@tgi_core.hookimpl
def register_quantizers(register: Callable[[tgi_core.QuantizerSpec], None]) -> None:
    register(INT8)


@tgi_core.hookimpl
def register_config_sections(register: Callable[[tgi_core.ConfigSectionSpec], None]) -> None:
    register(
        tgi_core.ConfigSectionSpec(
            name="int8", schema=Int8Settings, description="the int8 quantizer's kernel"
        )
    )
