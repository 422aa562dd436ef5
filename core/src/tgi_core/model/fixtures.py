"""Tiny random-weight checkpoints saved by transformers itself, and its reference logits.

For tests and benchmarks of model plugins: nothing is downloaded. ``save_checkpoint``
builds the transformers model for a config with seeded random weights and saves it as
a real Hugging Face folder (config.json, model.safetensors, generation_config.json).
``reference_logits`` runs transformers on one sequence the way ``generate`` does: the
prompt in one forward, then one token at a time through transformers' own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass
class Comparison:
    """How a served model's logits compare with transformers' on the same checkpoint."""

    max_abs_diff: float  # over every prompt position and decode step of every sequence
    tokens: list[list[int]]  # greedy tokens, ours
    reference_tokens: list[list[int]]  # greedy tokens, transformers (teacher-forced on ours)


def compare_with_transformers(
    path: str | Path,
    prompts: Sequence[Sequence[int]],
    *,
    backend: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    decode_steps: int = 16,
    block_size: int = 4,
    prefill_chunk: int | None = None,
    reference: Any = None,
) -> Comparison:
    """Serve ``path`` with the installed plugins and compare with transformers.

    All prompts are prefilled together in one packed batch (in chunks of
    ``prefill_chunk`` tokens if given), then ``decode_steps`` greedy tokens are decoded
    together through the paged cache; transformers runs each sequence alone, prompt then
    one token at a time through its own cache, on the tokens we chose.
    """
    from tgi_core.model.base import ModelContext
    from tgi_core.model.loader import load_model
    from tgi_core.model.runner import PagedRunner
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry

    registry = Registry.build(make_plugin_manager())
    loaded = load_model(str(path), registry, ctx=ModelContext(dtype=dtype))
    backend_impl = registry.attention_backends[backend].load()()
    longest = max(len(p) for p in prompts) + decode_steps
    num_blocks = len(prompts) * (-(-longest // block_size) + 1)
    runner = PagedRunner(
        loaded.model, backend_impl, num_blocks=num_blocks, block_size=block_size, model_dtype=dtype
    )
    ids = [runner.add(prompt) for prompt in prompts]
    prompt_logits: list[list[torch.Tensor]] = [[] for _ in ids]
    while any(runner.sequences[i].num_cached < len(prompts[n]) for n, i in enumerate(ids)):
        pending = [i for n, i in enumerate(ids) if runner.sequences[i].num_cached < len(prompts[n])]
        outs = runner.step(pending, max_tokens=prefill_chunk, all_logits=True)
        for seq_id, out in zip(pending, outs, strict=True):
            prompt_logits[ids.index(seq_id)].append(out)
    ours = [torch.cat(rows) for rows in prompt_logits]
    tokens = [[int(rows[-1].argmax())] for rows in ours]
    decoded: list[list[torch.Tensor]] = [[] for _ in ids]
    for _ in range(decode_steps):
        for n, seq_id in enumerate(ids):
            runner.append(seq_id, [tokens[n][-1]])
        for n, last in enumerate(runner.step(ids)):
            decoded[n].append(last)
            tokens[n].append(int(last.argmax()))
    model = reference if reference is not None else load_reference(path, dtype)
    worst, reference_tokens = 0.0, []
    for n, prompt in enumerate(prompts):
        expected = reference_logits(model, prompt, tokens[n][:decode_steps])
        got = torch.cat([ours[n], *(row[None] for row in decoded[n])])
        worst = max(worst, (expected - got).abs().max().item())
        reference_tokens.append([int(t) for t in expected[len(prompt) - 1 :].argmax(-1)])
    return Comparison(worst, [t[: decode_steps + 1] for t in tokens], reference_tokens)
