"""AWQ checkpoints on the int4 runtime.

Each layer loads the checkpoint's packed tensors as they are stored, sharded like the
float weight: a column-parallel rank reads its output features (8 to an int32), a
row-parallel rank its input features' rows of ``qweight`` and every group's scales and
zero points (a rank's input features may start inside a group). Once loaded, the layer
converts them to the runtime's form (``offset = (8 - zero) * scale``, group ``i //
group_size``) and drops them.
"""

from __future__ import annotations

import torch

from tgi_awq.format import PACK, AWQConfig, unpack
from tgi_core.model.layers.linear import LinearBase, ParamLayout
from tgi_core.model.quantization import QuantizerContext
from tgi_int4 import Int4Settings
from tgi_int4.runtime import GroupwiseInt4, Int4LinearMethod, kernel_available

#: qweight ``[in, out / 8]``: 8 output features per int32
QWEIGHT = ParamLayout(output_dim=1, input_dim=0, output_pack=PACK)
#: qzeros ``[groups, out / 8]`` and scales ``[groups, out]``: every group on every rank
QZEROS = ParamLayout(output_dim=1, input_dim=None, output_pack=PACK)
SCALES = ParamLayout(output_dim=1, input_dim=None)


class AWQLinearMethod(Int4LinearMethod):
    """One layer of an AWQ checkpoint."""

    def __init__(self, config: AWQConfig, use_kernel: bool) -> None:
        super().__init__(use_kernel)
        self.config = config

    def create_weights(self, layer: LinearBase, dtype: torch.dtype) -> None:
        inputs, outputs = layer.input_size_per_partition, layer.output_size_per_partition
        if outputs % PACK:
            raise ValueError(
                f"its {outputs} output features (per rank) are not a multiple of {PACK}, "
                "AWQ's packing"
            )
        groups = -(-layer.input_size // self.config.group_size)
        # qweight [in, out / 8]: 8 output features per int32
        layer.add_weight("qweight", (inputs, outputs // PACK), torch.int32, ParamLayout(1, 0, PACK))
        # qzeros [groups, out / 8] and scales [groups, out]: every group on every rank
        layer.add_weight(
            "qzeros", (groups, outputs // PACK), torch.int32, ParamLayout(1, None, PACK)
        )
        layer.add_weight("scales", (groups, outputs), torch.float32, ParamLayout(1, None))

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        q = unpack(layer.tensor("qweight").data).T  # [out, in]
        zeros = unpack(layer.tensor("qzeros").data).T.float()  # [out, groups]
        scale = layer.tensor("scales").data.T.float()
        columns = layer.input_columns()
        first = columns[0] if columns is not None else 0
        inputs = layer.input_size_per_partition
        group_index = (torch.arange(inputs) + first) // self.config.group_size
        for name in ("qweight", "qzeros", "scales"):
            delattr(layer, name)
        offset = (8 - zeros) * scale
        self.install(layer, GroupwiseInt4(q.contiguous(), scale.contiguous(), offset, group_index))


class AWQQuantizer:
    """The linear layers of an AWQ checkpoint, but those it left in float (the LM head,
    the embeddings and ``modules_to_not_convert``)."""

    def __init__(self, ctx: QuantizerContext) -> None:
        if ctx.quantization_config is None:
            raise ValueError("it loads AWQ checkpoints, and this one is not quantized")
        self.config = AWQConfig.parse(ctx.quantization_config)
        settings = ctx.section("int4", Int4Settings)
        self.use_kernel = settings.kernel == "auto" and kernel_available(ctx.device)

    def linear_method(self, layer: LinearBase, prefix: str) -> AWQLinearMethod | None:
        if any(name in prefix for name in self.config.modules_to_not_convert):
            return None
        return AWQLinearMethod(self.config, self.use_kernel)
