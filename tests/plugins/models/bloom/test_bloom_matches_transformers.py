"""tgi-bloom's logits equal transformers' on the same checkpoints, variant by variant.

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
from safetensors.torch import load_file, save_file
from transformers import BloomConfig

from tgi_core.model.fixtures import compare_with_transformers, load_reference, save_checkpoint

BACKENDS = ("sdpa", "reference")
SMALL = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4)


def prompts(seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=generator).tolist() for n in (7, 3, 30, 12)]


VARIANTS = {
    "bloom-4-heads": lambda: BloomConfig(**SMALL),
    # not powers of two: the slopes of 4 (8) heads, then every other one of 8 (16)
    "bloom-6-heads": lambda: BloomConfig(**{**SMALL, "hidden_size": 96, "n_head": 6}),
    "bloom-12-heads": lambda: BloomConfig(**{**SMALL, "hidden_size": 96, "n_head": 12}),
    "bloom-residual-post-layernorm": lambda: BloomConfig(
        **SMALL, apply_residual_connection_post_layernorm=True, layer_norm_epsilon=1e-3
    ),
    "bloom-untied": lambda: BloomConfig(**SMALL, tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bloom")
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
        checkpoints["bloom-6-heads"], prompts(1), backend=backend, prefill_chunk=5
    )
    assert result.max_abs_diff <= 1e-4
    assert result.tokens == result.reference_tokens


def test_hub_spelling_of_tensor_names(checkpoints, tmp_path: Path) -> None:
    """The Hub's BLOOM checkpoints name tensors without ``transformer.``; some add lm_head."""
    source = checkpoints["bloom-4-heads"]
    tensors = load_file(source / "model.safetensors")
    renamed = {name.removeprefix("transformer."): tensor for name, tensor in tensors.items()}
    assert "h.0.self_attention.query_key_value.weight" in renamed
    renamed["lm_head.weight"] = renamed["word_embeddings.weight"].clone()  # tied, saved twice
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file(renamed, str(hub / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["n_embed"] = config.pop("hidden_size")  # the Hub's older spelling
    (hub / "config.json").write_text(json.dumps(config))
    result = compare_with_transformers(hub, prompts(), reference=load_reference(source))
    assert result.max_abs_diff <= 1e-4
    assert result.tokens == result.reference_tokens


@pytest.mark.parametrize("variant", ["bloom-4-heads", "bloom-6-heads"])
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
