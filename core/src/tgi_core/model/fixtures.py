"""Tiny random-weight checkpoints saved by transformers itself, and its reference logits.

For tests and benchmarks of model plugins: nothing is downloaded. ``save_checkpoint``
builds the transformers model for a config with seeded random weights and saves it as
a real Hugging Face folder (config.json, model.safetensors, generation_config.json).
``reference_logits`` runs transformers on one sequence the way ``generate`` does: the
prompt in one forward, then one token at a time through transformers' own cache.
"""

from __future__ import annotations

import math
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
    weight_std: float = 0.2,
) -> Path:
    """Save a random-weight model for ``config`` (a transformers config) into ``path``.

    Matrices are drawn with ``weight_std`` (larger than transformers' init, so that
    mismatches show), biases with 0.05.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    if init_std is not None:
        config.initializer_range = init_std
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config, dtype=dtype)
    with torch.no_grad():  # larger weights than the default init make mismatches visible
        for name, param in model.named_parameters():
            if param.dim() > 1 or "bias" in name:
                param.normal_(0.0, weight_std if param.dim() > 1 else 0.05)
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

    cache = DynamicCache()  # the model alone decides the attention window, not the cache
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


def _load(
    path: str | Path,
    dtype: torch.dtype,
    quantize: str | None,
    plugin_sections: Any,
) -> tuple[Any, Any]:
    """The registry of the installed plugins, and the checkpoint loaded with them."""
    from tgi_core.model.base import ModelContext
    from tgi_core.model.loader import load_model
    from tgi_core.plugins import make_plugin_manager
    from tgi_core.registry import Registry

    registry = Registry.build(make_plugin_manager())
    loaded = load_model(
        str(path),
        registry,
        ctx=ModelContext(dtype=dtype),
        quantize=quantize,
        plugin_sections=plugin_sections,
    )
    return registry, loaded


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
    quantize: str | None = None,
    plugin_sections: Any = None,
    compile: bool = False,
) -> Comparison:
    """Serve ``path`` with the installed plugins and compare with transformers.

    All prompts are prefilled together in one packed batch (in chunks of
    ``prefill_chunk`` tokens if given), then ``decode_steps`` greedy tokens are decoded
    together through the paged cache; transformers runs each sequence alone, prompt then
    one token at a time through its own cache, on the tokens we chose. ``reference`` is
    the transformers model to compare with (by default, ``path``'s); ``quantize`` and
    ``plugin_sections`` are passed to the loader; ``compile`` runs the model compiled.
    """
    from tgi_core.model.runner import PagedRunner

    registry, loaded = _load(path, dtype, quantize, plugin_sections)
    from tgi_core.attention.selection import required_features, select_backend

    backend_impl = select_backend(
        loaded.spec, registry, backend, needs=required_features(loaded.model)
    ).load()()
    longest = max(len(p) for p in prompts) + decode_steps
    num_blocks = len(prompts) * (-(-longest // block_size) + 1)
    runner = PagedRunner(
        loaded.model,
        backend_impl,
        num_blocks=num_blocks,
        block_size=block_size,
        model_dtype=dtype,
        compile=compile,
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
        diff = (expected - got).abs().max().item()
        worst = max(worst, diff) if math.isfinite(diff) else math.inf  # max() drops NaN
        reference_tokens.append([int(t) for t in expected[len(prompt) - 1 :].argmax(-1)])
    return Comparison(worst, [t[: decode_steps + 1] for t in tokens], reference_tokens)


#: A Zephyr-style chat template, for test checkpoints that need one
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(
    path: str | Path, vocab_size: int = 320, chat_template: str | None = None
) -> Any:
    """Train a byte-level BPE tokenizer on Python's standard library sources; save it.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (and the chat template, if
    given, where transformers saves it) into ``path`` (a checkpoint folder) and returns
    the transformers tokenizer. Special tokens: ``<s>`` (0), ``</s>`` (1), ``<pad>`` (2).
    """
    import os

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus_dir = Path(os.__file__).parent
    texts = [
        file.read_text(encoding="utf-8", errors="ignore")
        for file in sorted(corpus_dir.glob("[a-m]*.py"))[:40]
    ]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(path))
    return fast


def word_list(count: int) -> list[str]:
    """``count`` distinct four-letter words (``aaaa``, ``baaa``, ...; at most 26**4)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    if count > 26**4:
        raise ValueError(f"at most {26**4} words, not {count}")
    return ["".join(letters[i // 26**k % 26] for k in range(4)) for i in range(count)]


def train_word_level_tokenizer(path: str | Path, vocab_size: int) -> Any:
    """Train a word-level tokenizer of exactly ``vocab_size`` tokens; save it.

    A ``WordLevel`` model behind a whitespace pre-tokenizer, trained with ``tokenizers``
    on :func:`word_list`, so every word is one token and a text of N words is N tokens
    (no special tokens are added). Special tokens: ``<s>`` (0), ``</s>`` (1), ``<pad>``
    (2), ``<unk>`` (3). Writes ``tokenizer.json`` and ``tokenizer_config.json`` into
    ``path`` and returns the transformers tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=specials)
    tokenizer.train_from_iterator(word_list(vocab_size - len(specials)), trainer)
    assert tokenizer.get_vocab_size() == vocab_size, tokenizer.get_vocab_size()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(str(path))
    return fast


def build_engine(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    backend: str = "sdpa",
    tokenizer: Any = None,
    quantize: str | None = None,
    plugin_sections: Any = None,
    compile: bool = False,
    **config: Any,
) -> Any:
    """An :class:`~tgi_core.engine.engine.Engine` over a checkpoint (tests, benchmarks).

    ``config`` holds ``EngineConfig`` fields; ``eos_token_ids`` defaults to the
    checkpoint's generation config. ``quantize`` and ``plugin_sections`` are passed to
    the loader; ``compile`` runs the model compiled.
    """
    from tgi_core.engine.engine import Engine, EngineConfig
    from tgi_core.engine.model_runner import ModelRunner

    registry, loaded = _load(path, dtype, quantize, plugin_sections)
    if "eos_token_ids" not in config:
        eos = (loaded.checkpoint.generation_config or {}).get("eos_token_id")
        config["eos_token_ids"] = tuple(
            eos if isinstance(eos, list) else ([] if eos is None else [eos])
        )
    engine_config = EngineConfig(**config)
    runner = ModelRunner(
        loaded.model,
        registry.attention_backends[backend].load()(),
        num_blocks=engine_config.num_blocks,
        block_size=engine_config.block_size,
        model_dtype=dtype,
        compile=compile,
    )
    return Engine(runner, engine_config, tokenizer)
