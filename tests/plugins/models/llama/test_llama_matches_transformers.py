"""tgi-llama's logits equal transformers' on the same checkpoints, variant by variant.

Each checkpoint is saved by transformers itself with random weights. Four prompts of
different lengths are prefilled in one packed batch, then 16 tokens are decoded
together through the paged cache (block size 4, so every sequence crosses block
boundaries); transformers runs each sequence alone through its own cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, Qwen2Config

from tgi_core.model.fixtures import compare_with_transformers, load_reference, save_checkpoint

BACKENDS = ("sdpa", "reference")
SMALL = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (7, 3, 30, 12)]


VARIANTS = {
    "llama-gqa": lambda: LlamaConfig(**SMALL),
    "llama-mha-tied": lambda: LlamaConfig(
        **{**SMALL, "num_key_value_heads": 4}, tie_word_embeddings=True
    ),
    "llama-mqa-head-dim-biases": lambda: LlamaConfig(
        **{**SMALL, "num_key_value_heads": 1}, head_dim=32, attention_bias=True, mlp_bias=True
    ),
    "llama-rope-linear": lambda: LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "llama-rope-dynamic": lambda: LlamaConfig(
        **{**SMALL, "max_position_embeddings": 24},
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    ),
    "llama-rope-llama3": lambda: LlamaConfig(
        **SMALL,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
            "rope_theta": 500000.0,
        },
    ),
    "llama-rope-yarn": lambda: LlamaConfig(
        **SMALL,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "llama-stray-sliding-window-key": lambda: LlamaConfig(**SMALL, sliding_window=4),
    "mistral-sliding-window": lambda: MistralConfig(**SMALL, sliding_window=6),
    "qwen2-bias": lambda: Qwen2Config(**SMALL),
    "qwen2-sliding-layers": lambda: Qwen2Config(
        **SMALL, use_sliding_window=True, sliding_window=6, max_window_layers=1
    ),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama-family")
    return {name: save_checkpoint(root / name, make()) for name, make in VARIANTS.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_float32_logits_match(checkpoints, variant: str, backend: str) -> None:
    result = compare_with_transformers(checkpoints[variant], prompts(), backend=backend)
    assert result.max_abs_diff <= 1e-4
    assert result.tokens == result.reference_tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_prefill_matches(checkpoints, backend: str) -> None:
    result = compare_with_transformers(
        checkpoints["llama-gqa"], prompts(1), backend=backend, prefill_chunk=5
    )
    assert result.max_abs_diff <= 1e-4
    assert result.tokens == result.reference_tokens


def test_hub_spelling_of_rope_settings(checkpoints, tmp_path: Path) -> None:
    """rope_theta + rope_scaling as published on the Hub, not transformers 5's spelling."""
    source = checkpoints["llama-rope-linear"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "model.safetensors").symlink_to(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config.pop("rope_parameters")
    config["rope_theta"] = 10000.0
    config["rope_scaling"] = {"type": "linear", "factor": 2.0}
    (legacy / "config.json").write_text(json.dumps(config))
    reference = load_reference(source)  # the same weights, rope in the new spelling
    result = compare_with_transformers(legacy, prompts(), reference=reference)
    assert result.max_abs_diff <= 1e-4


def test_dynamic_rope_really_scales(checkpoints) -> None:
    """The dynamic variant's sequences run past max_position_embeddings (24)."""
    assert max(len(p) for p in prompts()) + 16 > 24


@pytest.mark.parametrize("variant", ["llama-gqa", "qwen2-bias"])
def test_bfloat16_within_tolerance(checkpoints, variant: str) -> None:
    """bf16 keeps 8 mantissa bits: logits differ from transformers' bf16 by rounding alone.

    Both implementations are compared with transformers in float32; ours may not be
    worse than twice transformers' own bf16 error, plus 0.05 (a few bf16 ulps of logits
    of magnitude ~5).
    """
    path = checkpoints[variant]
    exact = load_reference(path, torch.float32)
    reference_bf16 = compare_with_transformers(
        path, prompts(), dtype=torch.bfloat16, reference=exact, decode_steps=4
    )
    hf_bf16 = load_reference(path, torch.bfloat16)
    hf_error = compare_with_transformers(
        path, prompts(), dtype=torch.float32, reference=hf_bf16, decode_steps=4
    )
    assert reference_bf16.max_abs_diff <= 2 * hf_error.max_abs_diff + 0.05
