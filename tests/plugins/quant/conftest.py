"""Checkpoints for the quantizer tests, written here independently of the loaders.

- ``dequantized_copy(source, target, dequantize, tables=False)``: a float checkpoint
  whose linear weights (and vocabulary tables) are replaced by ``dequantize(weight)``:
  the float model a quantized one must equal (transformers runs it as the reference).
- ``gptq_checkpoint`` / ``awq_checkpoint``: a float checkpoint quantized (round to
  nearest) and saved in the published format, packed with the loops AutoGPTQ's
  ``QuantLinear.pack`` and AutoAWQ's ``WQLinear_GEMM.from_linear`` use, plus the
  dequantized float checkpoint it stands for.
"""

from __future__ import annotations

import json
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

#: 2-D tensors that are not linear layers' weights
NOT_LINEAR = ("embed_tokens", "lm_head", "word_embeddings", "shared", "relative_attention_bias")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    return name.endswith(".weight") and tensor.dim() == 2 and not any(n in name for n in NOT_LINEAR)


def _copy_folder(source: Path, target: Path) -> dict[str, torch.Tensor]:
    shutil.copytree(source, target)
    return load_file(target / "model.safetensors")


def _save(target: Path, tensors: dict[str, torch.Tensor], qconfig: dict | None = None) -> Path:
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    if qconfig is not None:
        config = json.loads((target / "config.json").read_text())
        config["quantization_config"] = qconfig
        (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


#: 2-D tensors that are vocabulary tables (embeddings, LM heads)
VOCABULARY = ("embed_tokens", "lm_head", "word_embeddings", "shared")


def dequantized_copy(
    source: Path,
    target: Path,
    dequantize: Callable[[torch.Tensor], torch.Tensor],
    *,
    tables: bool = False,
) -> Path:
    """``source`` with its linear weights (and, with ``tables``, its embedding and LM
    head tables) replaced by ``dequantize(weight)``."""
    tensors = _copy_folder(source, target)
    for name, tensor in tensors.items():
        table = tables and tensor.dim() == 2 and any(n in name for n in VOCABULARY)
        if is_linear_weight(name, tensor) or table:
            tensors[name] = dequantize(tensor.float()).to(tensor.dtype).contiguous()
    return _save(target, tensors)


def int8_reference(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel, symmetric, the scale (max |w| / 127, 1 for a zero channel)
    rounded to bfloat16."""
    amax = weight.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127, 1.0).bfloat16().float()
    return torch.round(weight / scale[:, None]).clamp(-127, 127) * scale[:, None]


def int4_reference(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per output feature and group (the last one shorter if the inputs do not divide
    evenly): scale (max - min) / 15 (1 for a constant group) and offset min + 8 * scale,
    both rounded to bfloat16; w = (q - 8) * scale + offset."""
    columns = []
    for start in range(0, weight.shape[1], group_size):
        group = weight[:, start : start + group_size]
        low, high = group.amin(dim=1, keepdim=True), group.amax(dim=1, keepdim=True)
        scale = torch.where(high > low, (high - low) / 15, 1.0).bfloat16().float()
        offset = (low + 8 * scale).bfloat16().float()
        q = (torch.round((group - offset) / scale) + 8).clamp(0, 15)
        columns.append((q - 8) * scale + offset)
    return torch.cat(columns, dim=1)


def bnb_reference(weight: torch.Tensor, quant_type: str) -> torch.Tensor:
    """bitsandbytes' own quantize and dequantize of ``weight`` padded with zero input
    features to whole blocks of 64 (as tgi-bitsandbytes does on CPU)."""
    from tgi_bitsandbytes.method import import_bitsandbytes

    functional = import_bitsandbytes().functional
    inputs = weight.shape[1]
    padded = torch.nn.functional.pad(weight, (0, -inputs % 64)).contiguous()
    packed, state = functional.quantize_4bit(
        padded, blocksize=64, quant_type=quant_type, compress_statistics=False
    )
    return functional.dequantize_4bit(packed, state)[:, :inputs]


def rtn(
    weight: torch.Tensor, groups: list[torch.Tensor], sym: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit as AutoGPTQ's quantizer computes scales and zero points:
    int values ``[out, in]``, float16 scales and integer zeros ``[groups, out]``."""
    q = torch.zeros(weight.shape, dtype=torch.int64)
    scales, zeros = [], []
    for columns in groups:
        w = weight[:, columns]
        low = w.amin(dim=1).clamp(max=0)
        high = w.amax(dim=1).clamp(min=0)
        if sym:
            high = torch.maximum(low.abs(), high)
            low = -high
        scale = ((high - low) / 15).clamp(min=1e-5)
        zero = torch.full_like(scale, 8) if sym else torch.round(-low / scale).clamp(1, 15)
        scale = scale.half()
        q[:, columns] = (
            (torch.round(w / scale.float()[:, None]) + zero[:, None]).clamp(0, 15).long()
        )
        scales.append(scale)
        zeros.append(zero.long())
    return q, torch.stack(scales), torch.stack(zeros)


def gptq_pack_qweight(intweight: np.ndarray) -> np.ndarray:
    """AutoGPTQ's loop: ``[in, out]`` 4-bit values, 8 input rows per int32 row (its
    ``in // 32 * bits`` rows, written so that sizes that are not multiples of 32 work)."""
    qweight = np.zeros((intweight.shape[0] * 4 // 32, intweight.shape[1]), dtype=np.uint32)
    i, row = 0, 0
    while row < qweight.shape[0]:
        for j in range(i, i + 8):
            qweight[row] |= intweight[j] << (4 * (j - i))
        i += 8
        row += 1
    return qweight.astype(np.int32)


def gptq_pack_qzeros(zeros: np.ndarray) -> np.ndarray:
    """AutoGPTQ's loop: ``[groups, out]`` 4-bit values, 8 columns per int32 column."""
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] * 4 // 32), dtype=np.uint32)
    i, col = 0, 0
    while col < qzeros.shape[1]:
        for j in range(i, i + 8):
            qzeros[:, col] |= zeros[:, j] << (4 * (j - i))
        i += 8
        col += 1
    return qzeros.astype(np.int32)


def awq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's loop: ``[rows, out]`` 4-bit values, 8 columns per int32, interleaved."""
    packed = torch.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].to(torch.int32) << (i * 4)
    return packed


def act_order_seed(name: str) -> int:
    """Layers that share their input share GPTQ's act-order permutation (it sorts the
    input features by the Hessian of the inputs): q/k/v, gate/up."""
    for parts, shared in (
        (("q_proj", "k_proj", "v_proj"), "qkv"),
        (("gate_proj", "up_proj"), "gu"),
    ):
        for part in parts:
            name = name.replace(part, shared)
    return zlib.crc32(name.encode())


def gptq_layer(
    weight: torch.Tensor,
    group_size: int,
    *,
    sym: bool,
    desc_act: bool,
    v2: bool = False,
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One layer's GPTQ tensors and the float32 weight they stand for."""
    inputs = weight.shape[1]
    size = inputs if group_size == -1 else group_size
    # act-order: features quantized in a permuted order; g_idx[i] = position of i // size
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(inputs, generator=generator) if desc_act else torch.arange(inputs)
    groups = [order[start : start + size] for start in range(0, inputs, size)]
    q, scales, zeros = rtn(weight, groups, sym)
    g_idx = torch.empty(inputs, dtype=torch.int32)
    for index, columns in enumerate(groups):
        g_idx[columns] = index
    stored_zeros = zeros if v2 else zeros - 1  # AutoGPTQ stores zero - 1
    tensors = {
        "qweight": torch.from_numpy(gptq_pack_qweight(q.T.numpy().astype(np.uint32))),
        "qzeros": torch.from_numpy(gptq_pack_qzeros(stored_zeros.numpy().astype(np.uint32))),
        "scales": scales,
        "g_idx": g_idx,
    }
    dequantized = scales.float()[g_idx.long()].T * (q - zeros[g_idx.long()].T).float()
    return tensors, dequantized


def awq_layer(
    weight: torch.Tensor, group_size: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One layer's AWQ (GEMM) tensors and the float32 weight they stand for."""
    inputs = weight.shape[1]
    groups = [torch.arange(start, start + group_size) for start in range(0, inputs, group_size)]
    q, scales, zeros = rtn(weight, groups, sym=False)
    tensors = {"qweight": awq_pack(q.T), "qzeros": awq_pack(zeros), "scales": scales}
    index = torch.arange(inputs) // group_size
    dequantized = scales.float()[index].T * (q - zeros[index].T).float()
    return tensors, dequantized


def quantized_checkpoints(
    source: Path,
    target: Path,
    quantize_layer: Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]],
    qconfig: dict,
) -> tuple[Path, Path]:
    """``(quantized, dequantized)`` checkpoints of the float checkpoint ``source``."""
    quantized = _copy_folder(source, target / "quantized")
    dequantized = _copy_folder(source, target / "dequantized")
    for name in list(quantized):
        tensor = quantized[name]
        if not is_linear_weight(name, tensor):
            continue
        tensors, float_weight = quantize_layer(name, tensor.float())
        del quantized[name]
        prefix = name.removesuffix(".weight")
        quantized.update({f"{prefix}.{key}": value for key, value in tensors.items()})
        dequantized[name] = float_weight.to(tensor.dtype).contiguous()
    return _save(target / "quantized", quantized, qconfig), _save(
        target / "dequantized", dequantized
    )


@pytest.fixture
def gptq_checkpoint(
    tmp_path: Path,
) -> Callable[..., tuple[Path, Path]]:
    def write(
        source: Path, *, group_size: int, sym: bool, desc_act: bool, v2: bool = False
    ) -> tuple[Path, Path]:
        qconfig = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": group_size,
            "desc_act": desc_act,
            "sym": sym,
            "damp_percent": 0.01,
            "true_sequential": True,
            "static_groups": False,
            "checkpoint_format": "gptq_v2" if v2 else "gptq",
        }
        return quantized_checkpoints(
            source,
            tmp_path / "gptq",
            lambda name, w: gptq_layer(
                w, group_size, sym=sym, desc_act=desc_act, v2=v2, seed=act_order_seed(name)
            ),
            qconfig,
        )

    return write


@pytest.fixture
def awq_checkpoint(tmp_path: Path) -> Callable[..., tuple[Path, Path]]:
    def write(source: Path, *, group_size: int) -> tuple[Path, Path]:
        qconfig = {
            "quant_method": "awq",
            "bits": 4,
            "group_size": group_size,
            "zero_point": True,
            "version": "gemm",
            "modules_to_not_convert": None,
        }
        return quantized_checkpoints(
            source, tmp_path / "awq", lambda name, w: awq_layer(w, group_size), qconfig
        )

    return write


@pytest.fixture
def formats() -> object:
    """This module: the writers and reference quantizers above, for tests to call."""
    import sys

    return sys.modules[__name__]
