"""Train the demo model from scratch on the Python standard library, on a CPU.

    python -m tgi_demo.train                 # writes src/tgi_demo/model/ (about 14 min, 2 cores)
    python -m tgi_demo.train --out DIR --steps 50   # a quick try

Steps: read the corpus (``tgi_demo.corpus``), train a byte-level BPE tokenizer on the
training files, pack every document into one token stream, train transformers'
``LlamaForCausalLM`` with AdamW on random windows of it, measure the held-out loss
against a unigram baseline, and save a Hugging Face checkpoint folder (config,
generation config, safetensors weights, tokenizer, ChatML template) with a
``training_report.json`` of what was measured. Seeded: the same machine and library
versions give the same model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tgi_demo.corpus import (
    END_OF_TEXT,
    HELDOUT_EVERY,
    IM_END,
    IM_START,
    SourceFile,
    chat_examples,
    split,
    stdlib_sources,
)

MODEL_DIR = Path(__file__).resolve().parent / "model"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)  # ids 0, 1, 2
#: ChatML, as Qwen2 and SmolLM2 spell it, without tools.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
SAMPLE_PROMPTS = (
    "def fibonacci(n):\n",
    "import os\n\n\ndef list_python_files(folder):\n",
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
)


@dataclass(frozen=True, slots=True)
class TrainConfig:
    """Every setting of a training run; the defaults made the committed model."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 4
    num_heads: int = 4
    context: int = 256  # tokens per training window
    max_position_embeddings: int = 2048  # served context; rope beyond 256 is untrained
    batch_size: int = 16  # windows per step
    steps: int = 2000
    learning_rate: float = 2e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to this share of the peak
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200
    eval_windows: int = 48  # held-out windows of the progress evaluations
    seed: int = 0
    threads: int = 2
    #: use only the first N training files (and N/20 held-out ones; 0: all): quick tries
    corpus_files: int = 0
    #: the forward and backward under bf16 autocast (master weights stay float32): 2x
    #: faster on a CPU with AVX-512 BF16 or AMX; evaluations always run in float32
    bf16_autocast: bool = True


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE (GPT-2 style, newlines apart) trained on ``texts``; special tokens
    get ids 0-2."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Every newline is a token of its own, apart from the next line's indentation: a
    # prompt that ends with a newline then tokenizes as it did in training, and the
    # model goes on with the indented body (GPT-2's rule merges "\n" with the spaces
    # after it, so a prompt's final "\n" would mean "the next line starts at column 0").
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=END_OF_TEXT,
        additional_special_tokens=[IM_START],
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def pack(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """One stream of token ids: each document followed by ``<|endoftext|>`` (id 0)."""
    end = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(
        list(documents), add_special_tokens=False
    ):
        ids.extend(encoding.ids)
        ids.append(end)
    return torch.tensor(ids, dtype=torch.long)


def build_model(config: TrainConfig, tokenizer: Any) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` with tied input and output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(config.seed)
    end, im_end = (tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, IM_END))
    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=end,
        eos_token_id=[im_end, end],
        pad_token_id=end,
    )
    model = LlamaForCausalLM(hf_config)
    model.generation_config = generation_config(tokenizer)
    return model


#: The sampling a request gets when it doesn't choose (the OpenAI frontend, like vLLM,
#: takes these from generation_config.json): a 4M-parameter model loops when greedy.
SAMPLING = {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.1}


def generation_config(tokenizer: Any) -> Any:
    """Stop at ``<|im_end|>`` (chat answers) or ``<|endoftext|>`` (files); sample with
    :data:`SAMPLING` by default."""
    from transformers import GenerationConfig

    end, im_end = (tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, IM_END))
    return GenerationConfig(
        bos_token_id=end, eos_token_id=[im_end, end], pad_token_id=end, do_sample=True, **SAMPLING
    )


def window_loss(model: Any, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) over ``windows`` ``[B, context + 1]``."""
    logits = model(input_ids=windows[:, :-1]).logits  # [B, context, vocab]
    return F.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


@torch.inference_mode()
def heldout_loss(model: Any, stream: torch.Tensor, context: int, limit: int | None = None) -> float:
    """Mean loss over consecutive, non-overlapping windows of the held-out stream."""
    model.eval()
    count = (len(stream) - 1) // context
    starts = range(0, count * context, context)
    windows = torch.stack([stream[s : s + context + 1] for s in starts][:limit])
    total = 0.0
    for batch in windows.split(32):
        total += float(window_loss(model, batch)) * len(batch)
    model.train()
    return total / len(windows)


def unigram_loss(train: torch.Tensor, heldout: torch.Tensor, context: int, vocab: int) -> float:
    """Cross-entropy (nats/token) of the held-out tokens under the training set's unigram
    frequencies (add-one smoothed), over the same tokens :func:`heldout_loss` predicts."""
    counts = torch.bincount(train, minlength=vocab).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    count = (len(heldout) - 1) // context
    targets = heldout[1 : count * context + 1]
    return float(-log_probs[targets].mean())


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def train_model(
    model: Any, stream: torch.Tensor, heldout: torch.Tensor, config: TrainConfig
) -> list[dict[str, float]]:
    """AdamW on ``batch_size`` random windows per step; prints and returns progress."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(config.seed)
    offsets = torch.arange(config.context + 1)
    history: list[dict[str, float]] = []
    started, running = time.perf_counter(), 0.0
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        starts = torch.randint(
            0, len(stream) - config.context - 1, (config.batch_size,), generator=generator
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
            loss = window_loss(model, stream[starts[:, None] + offsets])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        value = loss.item()
        running = value if step == 0 else 0.95 * running + 0.05 * value
        done = step + 1
        if done % config.eval_every == 0 or done == config.steps:
            elapsed = time.perf_counter() - started
            held = heldout_loss(model, heldout, config.context, config.eval_windows)
            history.append({"step": done, "train_loss": running, "heldout_loss": held})
            eta = elapsed / done * (config.steps - done)
            print(
                f"step {done:5d}/{config.steps}  train {running:.3f}  held-out {held:.3f}  "
                f"{done * stream_tokens(config) / elapsed:,.0f} tok/s  "
                f"{elapsed / 60:.1f} min, {eta / 60:.1f} min to go",
                flush=True,
            )
    return history


def stream_tokens(config: TrainConfig) -> int:
    """Tokens predicted per step."""
    return config.batch_size * config.context


def generate(model: Any, tokenizer: Any, prompt: str, *, sample: bool, tokens: int = 80) -> str:
    """A continuation of ``prompt``: greedy, or sampled with :data:`SAMPLING` (seeded)."""
    torch.manual_seed(0)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model.eval()
    with torch.inference_mode():
        out = model.generate(
            ids,
            max_new_tokens=tokens,
            do_sample=sample,
            top_k=None,
            **(
                SAMPLING
                if sample
                else {"temperature": None, "top_p": None, "repetition_penalty": 1.0}
            ),
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def save(model: Any, tokenizer: Any, out: Path, report: dict[str, Any]) -> None:
    """Write the checkpoint folder: weights (float32), config, tokenizer, report."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")


def run(config: TrainConfig, out: Path) -> dict[str, Any]:
    """Train a model with ``config`` and save it into ``out``; returns the report."""
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    training, held_out = split(stdlib_sources())
    if config.corpus_files:
        training = training[: config.corpus_files]
        held_out = held_out[: max(1, config.corpus_files // HELDOUT_EVERY)]
    chats = chat_examples(training, seed=config.seed)
    print(
        f"corpus: {len(training)} training files ({_mb(training)} MB) and {len(chats)} "
        f"chat examples; {len(held_out)} held-out files ({_mb(held_out)} MB)",
        flush=True,
    )
    tokenizer = train_tokenizer([f.text for f in training], config.vocab_size)
    documents = [f.text for f in training] + chats
    random.Random(config.seed).shuffle(documents)
    stream = pack(tokenizer, documents)
    code_stream = pack(tokenizer, [f.text for f in training])
    heldout = pack(tokenizer, [f.text for f in held_out])
    print(
        f"tokenizer: {len(tokenizer)} tokens; training stream {len(stream):,} tokens, "
        f"held-out {len(heldout):,} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    model = build_model(config, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"model: {parameters:,} parameters; {config.steps} steps of "
        f"{stream_tokens(config):,} tokens",
        flush=True,
    )
    train_started = time.perf_counter()
    history = train_model(model, stream, heldout, config)
    train_seconds = time.perf_counter() - train_started
    final = heldout_loss(model, heldout, config.context)
    unigram = unigram_loss(code_stream, heldout, config.context, len(tokenizer))
    heldout_bytes = sum(len(f.text.encode()) for f in held_out)
    samples = {
        prompt: {
            "greedy": generate(model, tokenizer, prompt, sample=False),
            "sampled": generate(model, tokenizer, prompt, sample=True),
        }
        for prompt in SAMPLE_PROMPTS
    }
    report: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "parameters": parameters,
        "corpus": {
            "python": sys.version.split()[0],
            "training_files": len(training),
            "heldout_files": len(held_out),
            "chat_examples": len(chats),
            "training_tokens": len(stream),
            "heldout_tokens": len(heldout),
        },
        "heldout_loss": final,
        "unigram_loss": unigram,
        "heldout_bits_per_byte": final / math.log(2) * len(heldout) / heldout_bytes,
        "train_loss": history[-1]["train_loss"],
        "history": history,
        "train_seconds": round(train_seconds),
        "torch_threads": torch.get_num_threads(),
        "samples": samples,
    }
    save(model, tokenizer, out, report)
    report["total_seconds"] = round(time.perf_counter() - started)
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"held-out loss {final:.3f} nats/token (unigram baseline {unigram:.3f}); "
        f"{report['total_seconds'] / 60:.1f} min in all; saved to {out}",
        flush=True,
    )
    for prompt, sample in samples.items():
        print(f"--- greedy\n{prompt}{sample['greedy']}\n--- sampled\n{prompt}{sample['sampled']}")
    return report


def _mb(files: Sequence[SourceFile]) -> str:
    return f"{sum(len(f.text.encode()) for f in files) / 1e6:.1f}"


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() in ("true", "1", "yes")


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``--out``, and any :class:`TrainConfig` field as ``--name``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=MODEL_DIR, help="checkpoint folder to write")
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        value = getattr(defaults, field.name)
        kind = _parse_bool if isinstance(value, bool) else type(value)
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    run(TrainConfig(**args), out)


if __name__ == "__main__":
    main()
