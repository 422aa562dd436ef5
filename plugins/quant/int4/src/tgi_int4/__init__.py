"""tgi-int4: weight-only group-wise int4 quantization done while loading, and the int4
runtime that the GPTQ and AWQ loaders run on.

This module is imported whenever plugins are listed, so it only declares specs; the
quantizer (and torch) loads when a model is served with ``--quantize int4``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

import tgi_core


class Int4Settings(msgspec.Struct, forbid_unknown_fields=True):
    """The ``[plugins.int4]`` section of a deployment file."""

    #: input features that share one scale and offset (``--quantize int4`` only)
    group_size: Literal[32, 64, 128, 256] = 64
    #: ``auto``: torch's CPU int4 kernel where it runs, else the portable path;
    #: ``portable``: always dequantize and matmul (any device, exact in float32).
    #: Applies to every int4 layer: int4, gptq and awq.
    kernel: Literal["auto", "portable"] = "auto"


INT4 = tgi_core.QuantizerSpec(
    name="int4",
    factory="tgi_int4.method:Int4Quantizer",
    description="weight-only group-wise int4 (asymmetric), bf16 activations on the CPU kernel",
)


@tgi_core.hookimpl
def register_quantizers(register: Callable[[tgi_core.QuantizerSpec], None]) -> None:
    register(INT4)


@tgi_core.hookimpl
def register_config_sections(register: Callable[[tgi_core.ConfigSectionSpec], None]) -> None:
    register(
        tgi_core.ConfigSectionSpec(
            name="int4",
            schema=Int4Settings,
            description="int4 group size and kernel (also for gptq and awq)",
        )
    )
