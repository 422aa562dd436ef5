"""AWQ's checkpoint format (AutoAWQ's ``WQLinear_GEMM``, ``version: "gemm"``), 4-bit.

Per linear layer ``prefix`` with ``K`` input and ``N`` output features, ``G = K /
group_size`` groups:

- ``prefix.qweight`` int32 ``[K, N / 8]`` and ``prefix.qzeros`` int32 ``[G, N / 8]``:
  eight 4-bit values of consecutive output features per int32, interleaved: bits
  ``4j .. 4j + 3`` of column ``c`` hold output feature ``8c + ORDER[j]``;
- ``prefix.scales`` float16 ``[G, N]``; no ``g_idx`` (group ``i // group_size``);
- ``prefix.bias``, when the layer has one.

``w[n, i] = scales[i // group_size, n] * (q[i, n] - zero[i // group_size, n])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

BITS = 4
PACK = 32 // BITS
#: the output feature (within its 8) that each nibble of an int32 holds
ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
#: the nibble that holds each output feature (the inverse of ORDER)
REVERSE_ORDER = tuple(ORDER.index(feature) for feature in range(PACK))
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` in AWQ's interleaved order to uint8 ``[R, 8C]``."""
    nibbles = (packed.unsqueeze(2) >> _SHIFTS.view(1, 1, PACK)) & 0xF  # [R, C, nibble]
    values = nibbles[:, :, list(REVERSE_ORDER)]  # [R, C, feature]
    return values.reshape(packed.shape[0], -1).to(torch.uint8)


@dataclass(frozen=True)
class AWQConfig:
    """The parts of an AWQ ``quantization_config`` that loading depends on."""

    group_size: int
    #: substrings of layer names AWQ left in float
    modules_to_not_convert: tuple[str, ...]

    @classmethod
    def parse(cls, qconfig: Mapping[str, Any]) -> AWQConfig:
        """Read a ``quantization_config``; ``ValueError`` for what tgi does not load."""
        bits = qconfig.get("bits", qconfig.get("w_bit", BITS))
        if bits != BITS:
            raise ValueError(f"only 4-bit AWQ checkpoints are supported, not bits={bits}")
        version = str(qconfig.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (only 'gemm')")
        if not qconfig.get("zero_point", True):
            raise ValueError("AWQ checkpoints without zero points are not supported")
        group_size = qconfig.get("group_size", qconfig.get("q_group_size", 128))
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, not {group_size!r}")
        skipped = qconfig.get("modules_to_not_convert") or ()
        return cls(group_size, tuple(str(name) for name in skipped))
