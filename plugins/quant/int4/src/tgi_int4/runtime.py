"""The int4 runtime: group-wise 4-bit weights in one canonical form, and their forward.

Every int4 source converts its weights to :class:`GroupwiseInt4`:

    w[o, i] = (q[o, i] - 8) * scale[o, g[i]] + offset[o, g[i]],   q in 0..15

``--quantize int4`` (offset = the group's minimum + 8 * scale), GPTQ (offset =
``(8 - zero) * scale``, ``g`` from the checkpoint's ``g_idx``, act-order included) and
AWQ (the same, ``g[i] = i // group_size``). :class:`Int4LinearMethod` then runs it:

- on CPU, torch's ``_weight_int4pack_mm_for_cpu`` kernel, which computes exactly that
  form with bfloat16 activations, scales and offsets, in uniform groups of 32 to 256
  input features. When ``g`` is not sorted (GPTQ act-order) the input features are
  permuted so that each group is contiguous, and the activations with them; a last
  group shorter than the others (input features that are not a multiple of the group
  size) is padded with zero inputs. It needs output features in multiples of 16, and
  groups whose sizes one kernel group size divides (a rank of a row-parallel act-order
  layer may hold uneven parts of groups); otherwise the layer takes the portable path;
- the portable path: 4-bit values packed two per byte, dequantized at every forward
  and multiplied in the activations' dtype (exact in float32, slow, any device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tgi_core.model.layers.linear import LinearBase

#: the CPU kernel's activation, scale and offset dtype
KERNEL_DTYPE = torch.bfloat16
#: group sizes the CPU kernel accepts, largest first
KERNEL_GROUP_SIZES = (256, 128, 64, 32)
#: the CPU kernel packs output features in tiles of 16
KERNEL_OUTPUT_MULTIPLE = 16


@dataclass
class GroupwiseInt4:
    """``w[o, i] = (q[o, i] - 8) * scale[o, group_index[i]] + offset[o, group_index[i]]``."""

    #: uint8 ``[out, in]``, values 0..15
    q: torch.Tensor
    #: float32 ``[out, groups]``
    scale: torch.Tensor
    #: float32 ``[out, groups]``
    offset: torch.Tensor
    #: int64 ``[in]``: the group of each input feature
    group_index: torch.Tensor

    def __post_init__(self) -> None:
        out, inputs = self.q.shape
        if self.scale.shape != self.offset.shape or self.scale.shape[0] != out:
            raise ValueError(
                f"scales {tuple(self.scale.shape)} and offsets {tuple(self.offset.shape)} "
                f"do not fit {out} output features"
            )
        if self.group_index.shape != (inputs,):
            raise ValueError(
                f"{tuple(self.group_index.shape)} group indices for {inputs} input features"
            )
        groups = self.scale.shape[1]
        if inputs and not 0 <= int(self.group_index.min()) <= int(self.group_index.max()) < groups:
            raise ValueError(f"group indices outside the {groups} groups of scales")

    def dequantize(self) -> torch.Tensor:
        """The float32 weight ``[out, in]``."""
        index = self.group_index
        scale = self.scale.index_select(1, index)
        return (self.q.float() - 8) * scale + self.offset.index_select(1, index)

    def compacted(self) -> GroupwiseInt4:
        """The same weight with only the groups its input features use (a rank of a
        row-parallel layer may hold every group's scales, but use a few)."""
        used, index = torch.unique(self.group_index, sorted=True, return_inverse=True)
        if used.numel() == self.scale.shape[1]:
            return self
        return GroupwiseInt4(self.q, self.scale[:, used], self.offset[:, used], index)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 ``[rows, cols]`` values 0..15 to ``[rows, ceil(cols / 2)]`` bytes: column
    ``2j`` in the low nibble of byte ``j``, column ``2j + 1`` in the high one."""
    if q.shape[1] % 2:
        q = F.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`: uint8 ``[rows, cols]`` values 0..15."""
    values = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    return values.view(packed.shape[0], -1)[:, :cols]


def kernel_available(device: torch.device) -> bool:
    """Whether torch's CPU int4 kernel runs on ``device``."""
    aten = torch.ops.aten
    return (
        device.type == "cpu"
        and hasattr(aten, "_weight_int4pack_mm_for_cpu")
        and hasattr(aten, "_convert_weight_to_int4pack_for_cpu")
    )


@dataclass(frozen=True)
class KernelPlan:
    """How the CPU kernel runs a layer's weights."""

    #: input features in kernel order (groups contiguous), or None: already in order
    perm: torch.Tensor | None
    #: the kernel's group size
    group_size: int
    #: zero input features appended so that the last group fills a kernel group
    pad: int


def kernel_plan(weights: GroupwiseInt4) -> KernelPlan | None:
    """How the CPU kernel can run ``weights``, or None when it cannot: the input
    permutation that makes each group contiguous, and a kernel group size that divides
    the share of every group but the last, whose remainder is padded with zero inputs
    (the least padding wins, then the larger group size)."""
    out, inputs = weights.q.shape
    if out % KERNEL_OUTPUT_MULTIPLE or not inputs:
        return None
    order = torch.argsort(weights.group_index, stable=True)
    identity = torch.equal(order, torch.arange(inputs))
    _, counts = torch.unique_consecutive(weights.group_index[order], return_counts=True)
    fitting = [
        (-int(counts[-1]) % size, -size)
        for size in KERNEL_GROUP_SIZES
        if bool((counts[:-1] % size == 0).all())
    ]
    if not fitting:
        return None
    pad, size = min(fitting)
    return KernelPlan(None if identity else order, -size, pad)


class Int4LinearMethod:
    """The forward of group-wise int4 weights; subclasses load them (``create_weights``)
    and convert them to :class:`GroupwiseInt4` (``process_weights_after_loading``), then
    call :meth:`install`.

    ``use_kernel``: run torch's CPU kernel where the weights allow it.
    """

    def __init__(self, use_kernel: bool) -> None:
        self.use_kernel = use_kernel
        #: set by :meth:`install`: the kernel's group size, or None on the portable path
        self.kernel_group_size: int | None = None
        #: the kernel's input features are permuted (``int4_perm``)
        self.permuted = False
        #: zero input features the kernel appends (a last group shorter than its groups)
        self.pad = 0
        self.input_features = 0

    def install(self, layer: LinearBase, weights: GroupwiseInt4) -> None:
        """Keep ``weights`` on ``layer`` in the form its forward runs."""
        weights = weights.compacted()
        self.input_features = weights.q.shape[1]
        plan = kernel_plan(weights) if self.use_kernel else None
        if plan is None:
            layer.register_buffer("int4_weight", pack_nibbles(weights.q), persistent=False)
            layer.register_buffer("int4_scale", weights.scale.float(), persistent=False)
            layer.register_buffer("int4_offset", weights.offset.float(), persistent=False)
            layer.register_buffer("int4_group_index", weights.group_index, persistent=False)
            return
        q, index = weights.q, weights.group_index
        if plan.perm is not None:
            q, index = q[:, plan.perm], index[plan.perm]
        if plan.pad:  # the padded inputs are zeros: any value, the last group's scale
            q = F.pad(q, (0, plan.pad), value=8)
            index = F.pad(index, (0, plan.pad), value=int(index[-1]))
        first = index[:: plan.group_size]  # the group of each kernel group
        scale, offset = weights.scale[:, first], weights.offset[:, first]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).contiguous(), 2
        )
        # [in / size, out, 2]: (scale, offset) per kernel group and output feature
        scales_and_zeros = torch.stack([scale.T, offset.T], dim=-1).to(KERNEL_DTYPE)
        layer.register_buffer("int4_weight", packed, persistent=False)
        layer.register_buffer("int4_scales_and_zeros", scales_and_zeros.contiguous(), False)
        if plan.perm is not None:
            layer.register_buffer("int4_perm", plan.perm, persistent=False)
        self.permuted = plan.perm is not None
        self.pad = plan.pad
        self.kernel_group_size = plan.group_size

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self.kernel_group_size is not None:
            if self.permuted:
                flat = flat.index_select(1, layer.tensor("int4_perm"))
            if self.pad:
                flat = F.pad(flat, (0, self.pad))
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                flat.to(KERNEL_DTYPE).contiguous(),
                layer.tensor("int4_weight"),
                self.kernel_group_size,
                layer.tensor("int4_scales_and_zeros"),
            ).to(x.dtype)
        else:
            out = F.linear(flat, self.dequantized(layer).to(x.dtype))
        if bias is not None:
            out = out + bias
        return out.view(*x.shape[:-1], out.shape[-1])

    def dequantized(self, layer: LinearBase) -> torch.Tensor:
        """The portable path's float32 weight ``[out, in]`` (as :meth:`GroupwiseInt4.
        dequantize` computes it)."""
        q = unpack_nibbles(layer.tensor("int4_weight"), self.input_features)
        index = layer.tensor("int4_group_index")
        scale = layer.tensor("int4_scale").index_select(1, index)
        return (q.float() - 8) * scale + layer.tensor("int4_offset").index_select(1, index)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        raise NotImplementedError
