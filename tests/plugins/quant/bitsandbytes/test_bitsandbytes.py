"""tgi-bitsandbytes: NF4 and FP4 through bitsandbytes, against transformers' own
``BitsAndBytesConfig(load_in_4bit=True)`` model, and clear errors where it cannot run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from tgi_bitsandbytes import BitsAndBytesSettings
from tgi_bitsandbytes.method import (
    BitsAndBytesLinearMethod,
    BitsAndBytesQuantizer,
    cpu_kernel_available,
    import_bitsandbytes,
)
from tgi_core.errors import ConfigError
from tgi_core.model.base import ModelContext
from tgi_core.model.fixtures import compare_with_transformers, save_checkpoint
from tgi_core.model.layers.linear import ReplicatedLinear
from tgi_core.model.loader import load_model
from tgi_core.model.quantization import QuantizerContext
from tgi_core.model.weights import LazyTensor

GENERATOR = torch.Generator().manual_seed(0)
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7]]
BNB = import_bitsandbytes()


def test_both_schemes_are_registered(tgi_registry: Any) -> None:
    for name in ("bitsandbytes-nf4", "bitsandbytes-fp4"):
        assert tgi_registry.quantizers[name].quantizes_at_load
        assert tgi_registry.quantizers.owner(name).distribution == "tgi-bitsandbytes"
    assert tgi_registry.config_sections["bitsandbytes"].schema is BitsAndBytesSettings


def test_this_cpu_runs_the_fused_kernel() -> None:
    """This machine has AVX-512 BF16: the fused CPU kernel is what `auto` runs."""
    assert cpu_kernel_available(BNB)
    quantizer = BitsAndBytesQuantizer(QuantizerContext(name="bitsandbytes-nf4"))
    assert quantizer.linear_method(ReplicatedLinear(64, 32), "a").pack_for_cpu
    assert not quantizer.linear_method(ReplicatedLinear(64, 48), "b").pack_for_cpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_layer_equals_matmul_with_dequantized_weights(
    quant_type: str, kernel: bool, dtype: torch.dtype, formats: Any
) -> None:
    """Portable in float32: exact (1e-5). The fused kernel, or bfloat16 activations:
    within 1% of the output's magnitude."""
    weight, bias = torch.randn(64, 128, generator=GENERATOR), torch.randn(64, generator=GENERATOR)
    method = BitsAndBytesLinearMethod(BNB, quant_type, pack_for_cpu=kernel)
    layer = ReplicatedLinear(128, 64, bias=True, method=method, dtype=dtype)
    layer.weight_loader(layer.weight, LazyTensor.of(weight, "w"))
    layer.weight_loader(layer.bias, LazyTensor.of(bias, "b"))
    method.process_weights_after_loading(layer)
    assert not hasattr(layer, "weight") and layer.tensor("bnb_weight").dtype == torch.uint8
    dequantized = formats.bnb_reference(weight, quant_type)
    # a sanity bound on 4-bit: half the widest step of the code (FP4: 1/6 of the absmax)
    absmax = weight.view(-1, 64).abs().amax(dim=1).repeat_interleave(64).view(64, 128)
    assert bool(((dequantized - weight).abs() <= absmax / 6 + 1e-6).all())
    for rows in (1, 5):
        x = torch.randn(rows, 128, generator=GENERATOR).to(dtype)
        out = layer(x)
        assert out.dtype == dtype
        expected = x.float() @ dequantized.T + bias.to(dtype).float()
        exact = dtype == torch.float32 and not kernel
        tolerance = 1e-5 if exact else 1e-2 * float(expected.abs().max())
        torch.testing.assert_close(out.float(), expected, rtol=1e-5 if exact else 0, atol=tolerance)


@pytest.fixture(scope="module")
def llama_64(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama whose layers all have inputs in multiples of 64."""
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return save_checkpoint(tmp_path_factory.mktemp("llama64") / "llama", config)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_model_equals_transformers_bitsandbytes_model(quant_type: str, llama_64: Path) -> None:
    """transformers quantizes q, k, v (and gate, up) one by one, tgi their fused weight:
    with blocks of 64 and 64 input features, the blocks are the same rows. Both run
    bitsandbytes' fused CPU kernel, which rounds its float32 inputs to bfloat16: where
    the two models' float32 activations differ in the last bits (their norms and
    attention are different code; on an AMD EPYC the fp4 model's logits came out 4.9e-3
    apart, on a Sapphire Rapids 1e-6), one input can round the other way, which moves
    logits of magnitude ~6 by up to ~1e-2. The tokens must be the same."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    reference = AutoModelForCausalLM.from_pretrained(
        str(llama_64),
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant_type,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    ).eval()
    assert type(reference.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    result = compare_with_transformers(
        llama_64, PROMPTS, reference=reference, quantize=f"bitsandbytes-{quant_type}"
    )
    assert result.max_abs_diff <= 2e-2, result.max_abs_diff
    assert result.tokens == result.reference_tokens


@pytest.mark.parametrize("kernel", [False, True], ids=["portable", "kernel"])
def test_inputs_off_whole_blocks_are_padded(kernel: bool, formats: Any) -> None:
    """bitsandbytes 0.50's CPU kernels get blocks that straddle rows wrong: a layer of
    96 inputs is padded to 128 with zero inputs, so each row is two whole blocks."""
    quantizer = BitsAndBytesQuantizer(QuantizerContext(name="bitsandbytes-nf4"))
    layer = ReplicatedLinear(96, 64, dtype=torch.bfloat16 if kernel else torch.float32)
    method = quantizer.linear_method(layer, "down_proj")
    assert method.pad == 32 and method.pack_for_cpu
    method.pack_for_cpu = kernel
    weight = torch.randn(64, 96, generator=GENERATOR)
    layer = ReplicatedLinear(96, 64, method=method, dtype=layer.params_dtype)
    layer.weight_loader(layer.weight, LazyTensor.of(weight, "w"))
    method.process_weights_after_loading(layer)
    x = torch.randn(3, 96, generator=GENERATOR).to(layer.params_dtype)
    dequantized = formats.bnb_reference(weight, "nf4")
    expected = x.float() @ dequantized.T
    if kernel:
        atol = 1e-2 * float(expected.abs().max())
        torch.testing.assert_close(layer(x).float(), expected, rtol=0, atol=atol)
    else:
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_a_bitsandbytes_that_cannot_import_is_a_clear_startup_error(
    llama_64: Path, tgi_registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tgi_bitsandbytes.method as method

    def broken() -> Any:
        raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")

    monkeypatch.setattr(method, "import_bitsandbytes", broken)
    with pytest.raises(
        ConfigError,
        match=r"^quantizer 'bitsandbytes-nf4' cannot serve .*: bitsandbytes cannot be imported "
        r"\(OSError: libbitsandbytes_cpu.so: cannot open shared object file\); install it "
        r"with pip install bitsandbytes$",
    ):
        load_model(str(llama_64), tgi_registry, ctx=ModelContext(), quantize="bitsandbytes-nf4")


def test_a_device_it_cannot_run_on_is_named() -> None:
    with pytest.raises(RuntimeError, match=r"cannot run 4-bit nf4 on meta here"):
        BitsAndBytesQuantizer(
            QuantizerContext(name="bitsandbytes-nf4", device=torch.device("meta"))
        )
