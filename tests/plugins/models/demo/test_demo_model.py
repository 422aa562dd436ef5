"""tgi-demo: the packaged checkpoint, its quality, and serving it by default.

The checkpoint under test is the committed one (``tgi_demo.model_dir()``), trained by
``python -m tgi_demo.train``; the training script itself is smoke-tested on a few files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from litestar.testing import TestClient
from transformers import AutoTokenizer

import tgi_demo
from tgi_core.model.checkpoint import Checkpoint
from tgi_core.model.fixtures import compare_with_transformers, load_reference
from tgi_core.model.sources import resolve_model_id
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry
from tgi_core.testing import build_test_app
from tgi_demo.corpus import split, stdlib_sources
from tgi_demo.train import TrainConfig, run

MODEL = tgi_demo.model_dir()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(MODEL))


def test_the_checkpoint_is_packaged_small_and_complete() -> None:
    names = {p.name for p in MODEL.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert (MODEL / "model.safetensors").stat().st_size <= 30 * 2**20
    checkpoint = Checkpoint.open(MODEL)
    assert checkpoint.config["architectures"] == ["LlamaForCausalLM"]
    report = json.loads((MODEL / "training_report.json").read_text())
    assert 2e6 <= report["parameters"] <= 10e6


def test_chatml_template_and_stop_tokens(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((MODEL / "generation_config.json").read_text())
    stops = {tokenizer.convert_ids_to_tokens(i) for i in generation["eos_token_id"]}
    assert stops == {"<|im_end|>", "<|endoftext|>"}


def test_logits_match_transformers(tokenizer) -> None:
    prompts = [
        tokenizer.encode(text)
        for text in ("import os\n", "def fibonacci(n):\n    ", "class Stack:\n    def push(self")
    ]
    result = compare_with_transformers(MODEL, prompts, decode_steps=8, block_size=4)
    assert result.max_abs_diff <= 1e-4
    assert result.tokens == result.reference_tokens


def test_held_out_python_is_predicted_far_better_than_unigram(tokenizer) -> None:
    """On standard-library files the model never saw (one 256-token window, its training
    length, from each of the four longest), the loss is well under the unigram baseline
    of the training report (random weights would give about ln(4096) = 8.3)."""
    report = json.loads((MODEL / "training_report.json").read_text())
    _, held_out = split(stdlib_sources())
    longest = sorted(held_out, key=lambda f: len(f.text))[-4:]
    windows = torch.tensor([tokenizer.encode(f.text)[:257] for f in longest])
    model = load_reference(MODEL)
    with torch.inference_mode():
        logits = model(windows[:, :-1]).logits
    loss = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()))
    assert loss < report["unigram_loss"] - 2.0


def test_the_demo_is_the_default_model() -> None:
    registry = Registry.build(make_plugin_manager())
    assert resolve_model_id(None, registry) == (str(MODEL), "default", "demo")
    assert resolve_model_id("demo", registry) == (str(MODEL), "source", "demo")


def test_served_without_a_model_id(tokenizer) -> None:
    """The README's request against an app built with no ``--model-id``: the chat stream
    carries text, greedy text equals transformers', and the model is named ``demo``."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Return the number of lines in a file."},
    ]
    app = build_test_app(None, dtype="float32")
    with TestClient(app) as client:
        assert client.get("/info").json()["model_id"] == "demo"
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "tgi", "messages": messages, "stream": True, "max_tokens": 20},
        ) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line[5:]) for line in lines[:-1]]
        streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert streamed.strip()
        prompt = "def read_lines(path):\n"
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 24}}
        served = client.post("/generate", json=body).json()["generated_text"]
    model = load_reference(MODEL)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected = model.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
    expected = expected[0, ids.shape[1] :]
    assert served == tokenizer.decode(expected, skip_special_tokens=True)


def test_training_script_makes_a_servable_checkpoint(tmp_path: Path) -> None:
    """A quick try of ``python -m tgi_demo.train`` (few files, few steps): the folder it
    writes loads in transformers and in tgi-core, with its report."""
    config = TrainConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
        context=32, batch_size=2, steps=4, warmup_steps=2, eval_every=2, eval_windows=2,
        corpus_files=8,
    )  # fmt: skip
    report = run(config, tmp_path / "out")
    assert report["history"][-1]["step"] == 4
    assert math.isfinite(report["heldout_loss"]) and report["unigram_loss"] > 0
    result = compare_with_transformers(tmp_path / "out", [[5, 6, 7]], decode_steps=2)
    assert result.max_abs_diff <= 1e-4


@pytest.mark.slow
def test_serve_without_a_model_id_streams_the_readme_request(start_server) -> None:
    """``tgi-core serve`` alone (what ``make serve`` runs) serves the demo model on a real
    port, says so in its log, and answers the README's curl request with an SSE stream."""
    import re

    import httpx

    readme = (Path(__file__).resolve().parents[4] / "README.md").read_text()
    body = re.search(r"curl localhost:8080/v1/chat/completions.*?-d '(\{.*?\})'", readme, re.S)
    assert body, "README.md has no curl example of /v1/chat/completions"
    request = json.loads(body.group(1))
    assert request["stream"] is True
    server = start_server(None)
    with httpx.stream(
        "POST", f"{server.base}/v1/chat/completions", json=request, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text.strip() and len(chunks) > 2
    log = [json.loads(line) for line in server.log.read_text().splitlines() if line[:1] == "{"]
    assert any("serving the demo model" in line["event"] for line in log)
