"""tgi-gptq: the published packing (checked on known values), unpacking round trips,
zero-point conventions, act-order layers, and the checkpoints it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tgi_core.errors import ConfigError
from tgi_core.model.base import ModelContext
from tgi_core.model.checkpoint import CheckpointError
from tgi_core.model.layers.linear import QKVParallelLinear, ReplicatedLinear
from tgi_core.model.loader import load_model
from tgi_core.model.weights import LazyTensor
from tgi_gptq.format import GPTQConfig, unpack_columns, unpack_rows
from tgi_gptq.method import GPTQLinearMethod

GENERATOR = torch.Generator().manual_seed(0)


def test_registered_for_gptq_checkpoints(tgi_registry: Any) -> None:
    spec = tgi_registry.quantizers["gptq"]
    assert spec.quant_methods == ("gptq",) and not spec.quantizes_at_load


def test_the_writer_packs_as_autogptq_does(formats: Any) -> None:
    """Input feature 8r + j in bits 4j of row r; symmetric zero points (8) stored minus
    one: every qzeros word of a symmetric checkpoint is 0x77777777."""
    values = np.arange(8, dtype=np.uint32)[:, None]  # input features 0..7 of one output
    assert formats.gptq_pack_qweight(values).tolist() == [[0x76543210]]
    tensors, _ = formats.gptq_layer(
        torch.randn(16, 64, generator=GENERATOR), 32, sym=True, desc_act=False
    )
    assert bool((tensors["qzeros"] == 0x77777777).all())
    assert tensors["qweight"].shape == (8, 16) and tensors["qzeros"].shape == (2, 2)
    assert (
        tensors["scales"].dtype == torch.float16
        and tensors["g_idx"].tolist() == [0] * 32 + [1] * 32
    )


def test_unpacking_round_trips(formats: Any) -> None:
    values = torch.randint(0, 16, (64, 24), generator=GENERATOR, dtype=torch.int64)
    rows = torch.from_numpy(formats.gptq_pack_qweight(values.numpy().astype(np.uint32)))
    assert torch.equal(unpack_rows(rows).long(), values)
    columns = torch.from_numpy(formats.gptq_pack_qzeros(values.numpy().astype(np.uint32)))
    assert torch.equal(unpack_columns(columns).long(), values)


def load_layer(layer: Any, tensors: dict[str, torch.Tensor], shard: Any = None) -> None:
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, LazyTensor.of(tensor, name), shard)


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize(
    ("group_size", "sym", "desc_act", "v2"),
    [
        (32, True, False, False),
        (32, False, True, False),
        (-1, False, False, True),
        (16, False, True, True),
    ],
)
def test_layer_equals_matmul_with_dequantized_weights(
    group_size: int, sym: bool, desc_act: bool, v2: bool, kernel: bool, formats: Any
) -> None:
    """Portable: exact in float32. Kernel: bfloat16 activations, scales and output
    (float16 scales lose three bits), within 1% of the output's magnitude. Groups of
    16 are smaller than the kernel's: such layers run portable."""
    weight = torch.randn(32, 128, generator=GENERATOR)
    tensors, dequantized = formats.gptq_layer(
        weight, group_size, sym=sym, desc_act=desc_act, v2=v2, seed=5
    )
    config = GPTQConfig(None if group_size == -1 else group_size, desc_act, sym, 0 if v2 else 1)
    method = GPTQLinearMethod(config, use_kernel=kernel)
    layer = ReplicatedLinear(128, 32, method=method)
    load_layer(layer, tensors)
    method.process_weights_after_loading(layer)
    assert not any(hasattr(layer, name) for name in ("qweight", "qzeros", "scales", "g_idx"))
    on_kernel = kernel and group_size != 16
    assert (method.kernel_group_size is not None) == on_kernel
    assert method.permuted == (on_kernel and desc_act)
    x = torch.randn(3, 128, generator=GENERATOR)
    expected = (x.bfloat16().float() if on_kernel else x) @ dequantized.T
    if on_kernel:
        atol = 1e-2 * float(expected.abs().max())
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=atol)
    else:
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_zero_points_follow_the_checkpoint_format(formats: Any) -> None:
    """The same stored words mean zero + 1 in AutoGPTQ's format, zero in gptq_v2."""
    weight = torch.randn(16, 32, generator=GENERATOR)
    tensors, dequantized = formats.gptq_layer(weight, 32, sym=False, desc_act=False, v2=False)
    outputs = {}
    for offset in (1, 0):
        method = GPTQLinearMethod(GPTQConfig(32, False, False, offset), use_kernel=False)
        layer = ReplicatedLinear(32, 16, method=method)
        load_layer(layer, tensors)
        method.process_weights_after_loading(layer)
        outputs[offset] = layer(torch.eye(32)).T
    torch.testing.assert_close(outputs[1], dequantized, rtol=1e-6, atol=1e-6)
    scales = tensors["scales"].float().T.repeat_interleave(32, dim=1)
    torch.testing.assert_close(outputs[1] - outputs[0], -scales, rtol=1e-6, atol=1e-6)


def test_fused_parts_with_different_act_order_are_refused(formats: Any) -> None:
    layer = QKVParallelLinear(
        64, 16, 2, 2, method=GPTQLinearMethod(GPTQConfig(32, True, False, 1), False)
    )
    for shard, seed in (("q", 1), ("k", 2)):
        tensors, _ = formats.gptq_layer(
            torch.randn(32, 64, generator=GENERATOR), 32, sym=False, desc_act=True, seed=seed
        )
        if shard == "k":
            with pytest.raises(ValueError, match="its g_idx differs from the other parts"):
                load_layer(layer, tensors, shard)
        else:
            load_layer(layer, tensors, shard)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"bits": 8}, r"only 4-bit GPTQ checkpoints are supported, not bits=8"),
        ({"checkpoint_format": "marlin"}, r"checkpoint_format 'marlin' is not supported"),
        ({"lm_head": True}, r"a quantized LM head \(lm_head: true\) is not supported"),
        ({"group_size": 0}, r"group_size must be a positive integer or -1, not 0"),
    ],
)
def test_unsupported_checkpoints_are_refused_at_startup(
    changes: dict[str, Any],
    message: str,
    tiny_llama: Path,
    tmp_path: Path,
    tgi_registry: Any,
    gptq_checkpoint: Any,
) -> None:
    quantized, _ = gptq_checkpoint(tiny_llama, group_size=32, sym=True, desc_act=False)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"].update(changes)
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ConfigError, match=rf"^quantizer 'gptq' cannot serve {quantized}: {message}"
    ):
        load_model(str(quantized), tgi_registry, ctx=ModelContext())


def test_gptq_on_a_float_checkpoint_points_to_int4(tiny_llama: Path, tgi_registry: Any) -> None:
    with pytest.raises(
        ConfigError,
        match=r"--quantize gptq loads checkpoints already quantized with gptq, but .* has no "
        r"quantization_config; to quantize a float checkpoint while loading use one of: .*int4",
    ):
        load_model(str(tiny_llama), tgi_registry, ctx=ModelContext(), quantize="gptq")


def test_a_layer_left_in_float_is_a_clear_loading_error(
    tiny_llama: Path, tmp_path: Path, tgi_registry: Any, gptq_checkpoint: Any
) -> None:
    """A checkpoint whose quantizer skipped a layer: the loader names the tensors."""
    from safetensors.torch import load_file, save_file

    quantized, _ = gptq_checkpoint(tiny_llama, group_size=32, sym=True, desc_act=False)
    tensors = load_file(quantized / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj"
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        del tensors[f"{prefix}.{name}"]
    tensors[f"{prefix}.weight"] = torch.zeros(64, 96)
    save_file(tensors, quantized / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=rf"the checkpoint has tensors the model does not: {prefix}.weight"
    ):
        load_model(str(quantized), tgi_registry, ctx=ModelContext())
    shutil.rmtree(quantized)
