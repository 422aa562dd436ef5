"""tgi-bitsandbytes: the 4-bit schemes of ``BitsAndBytesConfig(load_in_4bit=True)``
(NF4 and FP4), through the bitsandbytes library, quantized while loading.

This module is imported whenever plugins are listed, so it only declares specs;
bitsandbytes (and torch) load when a model is served with ``--quantize
bitsandbytes-nf4`` or ``bitsandbytes-fp4``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import msgspec

import tgi_core


class BitsAndBytesSettings(msgspec.Struct, forbid_unknown_fields=True):
    """The ``[plugins.bitsandbytes]`` section of a deployment file."""

    #: ``auto``: bitsandbytes' fused CPU kernel where it runs (bfloat16 inside);
    #: ``portable``: bitsandbytes dequantizes and multiplies (exact in float32).
    kernel: Literal["auto", "portable"] = "auto"


NF4 = tgi_core.QuantizerSpec(
    name="bitsandbytes-nf4",
    factory="tgi_bitsandbytes.method:BitsAndBytesQuantizer",
    description="bitsandbytes 4-bit NormalFloat, blocks of 64",
)
FP4 = tgi_core.QuantizerSpec(
    name="bitsandbytes-fp4",
    factory="tgi_bitsandbytes.method:BitsAndBytesQuantizer",
    description="bitsandbytes 4-bit float, blocks of 64",
)


@tgi_core.hookimpl
def register_quantizers(register: Callable[[tgi_core.QuantizerSpec], None]) -> None:
    register(NF4)
    register(FP4)


@tgi_core.hookimpl
def register_config_sections(register: Callable[[tgi_core.ConfigSectionSpec], None]) -> None:
    register(
        tgi_core.ConfigSectionSpec(
            name="bitsandbytes",
            schema=BitsAndBytesSettings,
            description="the bitsandbytes quantizers' kernel",
        )
    )
