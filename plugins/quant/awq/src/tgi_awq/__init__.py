"""tgi-awq: serve checkpoints quantized with AWQ (4-bit, AutoAWQ's GEMM format),
detected from config.json's ``quantization_config``.

This module is imported whenever plugins are listed, so it only declares specs; the
loader (and torch) loads when an AWQ checkpoint is served.
"""

from __future__ import annotations

from collections.abc import Callable

import tgi_core

AWQ = tgi_core.QuantizerSpec(
    name="awq",
    factory="tgi_awq.method:AWQQuantizer",
    quant_methods=("awq",),
    quantizes_at_load=False,
    description="AWQ 4-bit checkpoints (AutoAWQ GEMM), run on the int4 runtime",
)


@tgi_core.hookimpl
def register_quantizers(register: Callable[[tgi_core.QuantizerSpec], None]) -> None:
    register(AWQ)
