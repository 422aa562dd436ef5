"""GPTQ's checkpoint format (AutoGPTQ, GPTQModel), for 4-bit weights.

Per linear layer ``prefix`` with ``K`` input and ``N`` output features, ``G`` groups:

- ``prefix.qweight`` int32 ``[K / 8, N]``: input feature ``8r + j`` of output ``n`` is
  bits ``4j .. 4j + 3`` of ``qweight[r, n]``;
- ``prefix.qzeros`` int32 ``[G, N / 8]``: the zero point of group ``g``, output ``8c +
  j``, is bits ``4j .. 4j + 3`` of ``qzeros[g, c]``; AutoGPTQ's format
  (``checkpoint_format: "gptq"``, the default) stores ``zero - 1`` there, GPTQModel's
  ``"gptq_v2"`` the zero itself;
- ``prefix.scales`` float16 ``[G, N]``;
- ``prefix.g_idx`` int32 ``[K]``: the group of each input feature; ``i // group_size``
  without act-order, a permutation's groups with it (``desc_act``);
- ``prefix.bias``, when the layer has one.

``w[n, i] = scales[g_idx[i], n] * (q[i, n] - zero[g_idx[i], n])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

BITS = 4
PACK = 32 // BITS  # 4-bit values per int32
_SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int32)


def unpack_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` packing 8 values along rows to uint8 ``[8R, C]``."""
    values = (packed.unsqueeze(1) >> _SHIFTS.view(1, PACK, 1)) & 0xF
    return values.reshape(-1, packed.shape[1]).to(torch.uint8)


def unpack_columns(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C]`` packing 8 values along columns to uint8 ``[R, 8C]``."""
    values = (packed.unsqueeze(2) >> _SHIFTS.view(1, 1, PACK)) & 0xF
    return values.reshape(packed.shape[0], -1).to(torch.uint8)


@dataclass(frozen=True)
class GPTQConfig:
    """The parts of a GPTQ ``quantization_config`` that loading depends on."""

    #: input features per group; None: one group over all input features (``-1``)
    group_size: int | None
    desc_act: bool
    sym: bool
    #: added to the stored zero points (1 for AutoGPTQ's format, 0 for ``gptq_v2``)
    zero_offset: int

    @classmethod
    def parse(cls, qconfig: Mapping[str, Any]) -> GPTQConfig:
        """Read a ``quantization_config``; ``ValueError`` for what tgi does not load."""
        bits = qconfig.get("bits", BITS)
        if bits != BITS:
            raise ValueError(f"only 4-bit GPTQ checkpoints are supported, not bits={bits}")
        fmt = str(qconfig.get("checkpoint_format") or "gptq").lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"checkpoint_format {fmt!r} is not supported (only 'gptq' and 'gptq_v2')"
            )
        if qconfig.get("lm_head"):
            raise ValueError("a quantized LM head (lm_head: true) is not supported")
        group_size = qconfig.get("group_size", 128)
        if not isinstance(group_size, int) or (group_size <= 0 and group_size != -1):
            raise ValueError(f"group_size must be a positive integer or -1, not {group_size!r}")
        return cls(
            group_size=None if group_size == -1 else group_size,
            desc_act=bool(qconfig.get("desc_act", False)),
            sym=bool(qconfig.get("sym", True)),
            zero_offset=1 if fmt == "gptq" else 0,
        )

    def groups(self, input_features: int) -> int:
        """How many groups a layer with ``input_features`` has."""
        if self.group_size is None:
            return 1
        return -(-input_features // self.group_size)
