"""Every quantizer with every model plugin: the quantized model computes what the float
model of its dequantized weights computes, with transformers running that float model.

Portable paths in float32 are exact: logits within 1e-4 and the same greedy tokens.
The fast paths (CPU kernels in a bfloat16 model) are held to what bfloat16 itself
costs: within three times the difference between transformers' own bfloat16 and float32
runs of the same float model on the same tokens (0.2 to 0.4 on these tiny models, whose
0.2-std weights make large logits). The kernels round scales, offsets and their outputs
to bfloat16 too (per layer, 2 to 3 times the error of bfloat16 activations alone); the
quantized models measured 0.8 to 2.1 times the yardstick.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM, BloomConfig, LlamaConfig, T5Config

from tgi_bitsandbytes import BitsAndBytesSettings
from tgi_core.engine.requests import GenerateRequest, StoppingParams
from tgi_core.model.fixtures import (
    build_engine,
    compare_with_transformers,
    load_reference,
    reference_logits,
    save_checkpoint,
)
from tgi_int4 import Int4Settings
from tgi_int8 import Int8Settings

PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [20, 30, 40, 50, 60]]
CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,  # not a multiple of 64: bitsandbytes pads, int4 has a short group
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "bloom": lambda: BloomConfig(vocab_size=320, hidden_size=64, n_layer=2, n_head=4),
    "t5": lambda: T5Config(
        vocab_size=320,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    ),
}
PORTABLE = {
    "int8": Int8Settings(kernel="portable"),
    "int4": Int4Settings(group_size=64, kernel="portable"),
    "bitsandbytes": BitsAndBytesSettings(kernel="portable"),
}
FAST = {"int4": Int4Settings(group_size=64)}


@pytest.fixture(scope="module")
def float_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A tiny float checkpoint per model plugin, saved once."""
    saved: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in saved:
            path = tmp_path_factory.mktemp(model) / "float"
            # T5 does not scale attention scores: smaller weights keep softmaxes unsaturated
            std = 0.1 if model == "t5" else 0.2
            saved[model] = save_checkpoint(path, CONFIGS[model](), weight_std=std)
        return saved[model]

    return get


@dataclass
class Served:
    """A checkpoint served with a quantizer, and the float checkpoint it stands for."""

    path: Path
    reference: Path
    quantize: str | None
    sections: dict[str, Any] = field(default_factory=dict)


METHODS = ["int8", "int4", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "gptq-sym", "awq"]


@pytest.fixture
def serve(
    float_checkpoints: Callable[[str], Path],
    tmp_path: Path,
    formats: Any,
    gptq_checkpoint: Any,
    awq_checkpoint: Any,
) -> Callable[[str, str, bool], Served]:
    def make(model: str, method: str, fast: bool) -> Served:
        float_checkpoint = float_checkpoints(model)
        sections = FAST if fast else PORTABLE
        if method == "gptq":  # asymmetric with act-order
            q, d = gptq_checkpoint(float_checkpoint, group_size=32, sym=False, desc_act=True)
            return Served(q, d, None, sections)
        if method == "gptq-sym":  # symmetric, one group per output (GPTQModel's v2 format)
            q, d = gptq_checkpoint(
                float_checkpoint, group_size=-1, sym=True, desc_act=False, v2=True
            )
            return Served(q, d, None, sections)
        if method == "awq":
            q, d = awq_checkpoint(float_checkpoint, group_size=32)
            return Served(q, d, None, sections)
        dequantize = {
            "int8": formats.int8_reference,
            "int4": lambda w: formats.int4_reference(w, 64),
            "bitsandbytes-nf4": lambda w: formats.bnb_reference(w, "nf4"),
            "bitsandbytes-fp4": lambda w: formats.bnb_reference(w, "fp4"),
        }[method]
        reference = formats.dequantized_copy(
            float_checkpoint, tmp_path / "reference", dequantize, tables=method == "int8"
        )
        return Served(float_checkpoint, reference, method, sections)

    return make


def t5_greedy(served: Served, dtype: torch.dtype) -> tuple[list[list[int]], list[list[int]]]:
    """Our greedy tokens for a few sources through the engine, and transformers'."""
    engine = build_engine(
        served.path,
        dtype=dtype,
        quantize=served.quantize,
        plugin_sections=served.sections,
        num_blocks=128,
        block_size=4,
        decoder_start_token_id=0,
    )
    requests = [
        GenerateRequest(
            request_id=str(n), prompt_token_ids=tuple(p), stopping=StoppingParams(max_new_tokens=10)
        )
        for n, p in enumerate(PROMPTS)
    ]
    streams = engine.run(requests)
    ours = [[e.token_id for e in streams[r.request_id] if e.error is None] for r in requests]
    model = AutoModelForSeq2SeqLM.from_pretrained(str(served.reference)).eval()
    theirs = []
    for prompt, tokens in zip(PROMPTS, ours, strict=True):
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=10, do_sample=False, use_cache=False
        )[0, 1:].tolist()
        theirs.append(out[: len(tokens)] if 1 in tokens else out)
    return ours, theirs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model", sorted(CONFIGS))
def test_quantized_model_equals_its_dequantized_float_model(
    model: str, method: str, serve: Callable[[str, str, bool], Served]
) -> None:
    served = serve(model, method, False)
    if model == "t5":
        ours, theirs = t5_greedy(served, torch.float32)
        assert ours == theirs
        return
    result = compare_with_transformers(
        served.path,
        PROMPTS,
        reference=load_reference(served.reference),
        quantize=served.quantize,
        plugin_sections=served.sections,
    )
    assert result.max_abs_diff <= 1e-4, result.max_abs_diff
    assert result.tokens == result.reference_tokens


@pytest.mark.parametrize("method", METHODS)
def test_fast_paths_stay_within_bfloat16_error(
    method: str, serve: Callable[[str, str, bool], Served]
) -> None:
    """CPU kernels in a bfloat16 Llama, against the float32 reference."""
    served = serve("llama", method, True)
    reference = load_reference(served.reference)
    result = compare_with_transformers(
        served.path,
        PROMPTS,
        dtype=torch.bfloat16,
        reference=reference,
        quantize=served.quantize,
        plugin_sections=served.sections,
    )
    bf16 = load_reference(served.reference, torch.bfloat16)
    yardstick = max(  # on the same prompts and continuations
        (reference_logits(bf16, p, t[:-1]) - reference_logits(reference, p, t[:-1]))
        .abs()
        .max()
        .item()
        for p, t in zip(PROMPTS, result.tokens, strict=True)
    )
    assert result.max_abs_diff <= 3 * yardstick, (result.max_abs_diff, yardstick)
