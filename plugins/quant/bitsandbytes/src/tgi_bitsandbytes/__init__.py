"""tgi-bitsandbytes: the 4-bit schemes of ``BitsAndBytesConfig(load_in_4bit=True)``
(NF4 and FP4), through the bitsandbytes library, quantized while loading.

This module is imported whenever plugins are listed, so it only declares specs;
bitsandbytes (and torch) load when a model is served with ``--quantize
bitsandbytes-nf4`` or ``bitsandbytes-fp4``.
"""

from __future__ import annotations

from collections.abc import Callable

import tgi_core

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
