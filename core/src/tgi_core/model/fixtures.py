"""Tiny random-weight checkpoints saved by transformers itself, and its reference logits.

For tests and benchmarks of model plugins: nothing is downloaded. ``save_checkpoint``
builds the transformers model for a config with seeded random weights and saves it as
a real Hugging Face folder (config.json, model.safetensors, generation_config.json).
``reference_logits`` runs transformers on one sequence the way ``generate`` does: the
prompt in one forward, then one token at a time through transformers' own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(
    path: str | Path,
    config: Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    init_std: float | None = None,
) -> Path:
    """Save a random-weight model for ``config`` (a transformers config) into ``path``."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    if init_std is not None:
        config.initializer_range = init_std
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    with torch.no_grad():  # larger weights than the default init make mismatches visible
        for name, param in model.named_parameters():
            if param.dim() > 1 or "bias" in name:
                param.normal_(0.0, 0.2 if param.dim() > 1 else 0.05)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_reference(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The transformers model of a checkpoint, in eval mode with eager attention."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager"
    )
    return model.eval()


@torch.inference_mode()
def reference_logits(
    model: Any, prompt: Sequence[int], continuation: Sequence[int]
) -> torch.Tensor:
    """Logits ``[len(prompt) + len(continuation), vocab]`` as transformers computes them.

    The prompt runs in one forward; each continuation token then runs alone with the
    cache, as in ``generate``. Row ``i`` holds the logits predicting token ``i + 1``.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([list(prompt)]), cache=cache, use_cache=True)
    rows = [out.logits[0].float()]
    for token in continuation:
        out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
        rows.append(out.logits[0].float())
    return torch.cat(rows)
