"""tgi-gptq: serve checkpoints quantized with GPTQ (4-bit, group-wise, symmetric or
not, act-order included), detected from config.json's ``quantization_config``.

This module is imported whenever plugins are listed, so it only declares specs; the
loader (and torch) loads when a GPTQ checkpoint is served.
"""

from __future__ import annotations

from collections.abc import Callable

import tgi_core

GPTQ = tgi_core.QuantizerSpec(
    name="gptq",
    factory="tgi_gptq.method:GPTQQuantizer",
    quant_methods=("gptq",),
    quantizes_at_load=False,
    description="GPTQ 4-bit checkpoints (AutoGPTQ / GPTQModel), run on the int4 runtime",
)


@tgi_core.hookimpl
def register_quantizers(register: Callable[[tgi_core.QuantizerSpec], None]) -> None:
    register(GPTQ)
