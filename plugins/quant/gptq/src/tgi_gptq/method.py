"""GPTQ checkpoints on the int4 runtime.

Each layer loads the checkpoint's packed tensors as they are stored, sharded like the
float weight: a column-parallel rank reads its output features, a row-parallel rank its
input features' rows of ``qweight`` and ``g_idx`` (8 to an int32 row) and every group's
scales and zero points (act-order may send any input feature to any group). Once
loaded, the layer converts them to the runtime's form (``offset = (8 - zero) * scale``,
the checkpoint's ``g_idx`` as the group index) and drops them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tgi_core.model.layers.linear import LinearBase, ParamLayout, set_layout
from tgi_core.model.quantization import QuantizerContext
from tgi_core.model.weights import LazyTensor
from tgi_gptq.format import PACK, GPTQConfig, unpack_columns, unpack_rows
from tgi_int4 import Int4Settings
from tgi_int4.runtime import GroupwiseInt4, Int4LinearMethod, kernel_available

#: qweight ``[in / 8, out]``: 8 input features per int32
QWEIGHT = ParamLayout(output_dim=1, input_dim=0, input_pack=PACK)
#: qzeros ``[groups, out / 8]`` and scales ``[groups, out]``: every group on every rank
QZEROS = ParamLayout(output_dim=1, input_dim=None, output_pack=PACK)
SCALES = ParamLayout(output_dim=1, input_dim=None)
#: g_idx ``[in]``: input features only
G_IDX = ParamLayout(output_dim=None, input_dim=0)


class GPTQLinearMethod(Int4LinearMethod):
    """One layer of a GPTQ checkpoint."""

    def __init__(self, config: GPTQConfig, use_kernel: bool) -> None:
        super().__init__(use_kernel)
        self.config = config

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        inputs, outputs = layer.input_size_per_partition, layer.output_size_per_partition
        for count, what in ((inputs, "input"), (outputs, "output")):
            if count % PACK:
                raise ValueError(
                    f"its {count} {what} features (per rank) are not a multiple of "
                    f"{PACK}, GPTQ's packing"
                )
        groups = self.config.groups(layer.input_size)
        # qweight [in / 8, out]: 8 input features per int32
        layer.add_weight(
            "qweight", (inputs // PACK, outputs), torch.int32, ParamLayout(1, 0, 1, PACK)
        )
        # qzeros [groups, out / 8] and scales [groups, out]: every group on every rank
        layer.add_weight(
            "qzeros", (groups, outputs // PACK), torch.int32, ParamLayout(1, None, PACK)
        )
        layer.add_weight("scales", (groups, outputs), torch.float32, ParamLayout(1, None))
        g_idx = layer.add_weight("g_idx", (inputs,), torch.int32, G_IDX)
        g_idx.weight_loader = self._g_idx_loader(layer)  # type: ignore[attr-defined]

    @staticmethod
    def _g_idx_loader(layer: LinearBase) -> Any:
        """The parts of a fused layer (q, k, v) share their input, so GPTQ gives them one
        act-order permutation; a checkpoint where they differ is refused."""
        loaded_once = False

        def load(param: nn.Parameter, loaded: LazyTensor, shard_id: Any = None) -> None:
            nonlocal loaded_once
            if not loaded_once:
                layer.weight_loader(param, loaded, shard_id)
                loaded_once = True
                return
            scratch = set_layout(nn.Parameter(torch.empty_like(param), requires_grad=False), G_IDX)
            layer.weight_loader(scratch, loaded, shard_id)
            if not torch.equal(scratch.data, param.data):
                raise ValueError(
                    "its g_idx differs from the other parts of the fused layer it loads into"
                )

        return load

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q = unpack_rows(layer.tensor("qweight").data).T  # [out, in]
        zeros = (unpack_columns(layer.tensor("qzeros").data).long() + self.config.zero_offset) & 0xF
        scale = layer.tensor("scales").data.T.float()  # [out, groups]
        offset = (8 - zeros.T.float()) * scale
        group_index = layer.tensor("g_idx").data.long()
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            delattr(layer, name)
        self.install(layer, GroupwiseInt4(q.contiguous(), scale.contiguous(), offset, group_index))


class GPTQQuantizer:
    """Every linear layer of a GPTQ checkpoint (the LM head and embeddings are float)."""

    def __init__(self, ctx: QuantizerContext) -> None:
        if ctx.quantization_config is None:
            raise ValueError("it loads GPTQ checkpoints, and this one is not quantized")
        self.config = GPTQConfig.parse(ctx.quantization_config)
        settings = ctx.section("int4", Int4Settings)
        self.use_kernel = settings.kernel == "auto" and kernel_available(ctx.device)

    def linear_method(self, layer: LinearBase, prefix: str) -> GPTQLinearMethod:
        return GPTQLinearMethod(self.config, self.use_kernel)
