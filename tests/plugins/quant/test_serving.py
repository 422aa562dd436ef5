"""Every quantizer served through the HTTP API: the app built as ``tgi-core serve``
builds it, then real requests. The exact (portable, float32) paths generate what
``transformers.generate`` generates on the dequantized float model; the fast paths (CPU
kernels, bfloat16) choose tokens the float32 reference ranks first within three times
bfloat16's own error (see test_models.py); a real ``tgi-core serve --quantize`` process
serves and logs its quantizer; unsupported combinations stop it with one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from litestar.testing import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from tgi_core.model.fixtures import (
    CHAT_TEMPLATE,
    load_reference,
    reference_logits,
    save_checkpoint,
    train_tokenizer,
)
from tgi_core.testing import build_test_app

PROMPT = "def fibonacci(n):\n    "
NEW_TOKENS = 12
METHODS = ["int8", "int4", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq"]
PORTABLE = """
[plugins.int8]
kernel = "portable"
[plugins.int4]
kernel = "portable"
group_size = 32
[plugins.bitsandbytes]
kernel = "portable"
"""
FAST = """
[plugins.int4]
group_size = 32
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with a tokenizer; every input size a multiple of 64 (bitsandbytes)."""
    path = tmp_path_factory.mktemp("served") / "llama"
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
    )
    save_checkpoint(path, config)
    train_tokenizer(path, 320, chat_template=CHAT_TEMPLATE)
    return path


@pytest.fixture
def served(llama: Path, tmp_path: Path, formats: Any, gptq_checkpoint: Any, awq_checkpoint: Any):
    """``(model dir, --quantize, reference dir)`` for a method."""

    def make(method: str) -> tuple[Path, str | None, Path]:
        if method == "gptq":
            quantized, reference = gptq_checkpoint(llama, group_size=32, sym=False, desc_act=True)
            return quantized, None, reference
        if method == "awq":
            quantized, reference = awq_checkpoint(llama, group_size=32)
            return quantized, None, reference
        dequantize = {
            "int8": formats.int8_reference,
            "int4": lambda w: formats.int4_reference(w, 32),
            "bitsandbytes-nf4": lambda w: formats.bnb_reference(w, "nf4"),
            "bitsandbytes-fp4": lambda w: formats.bnb_reference(w, "fp4"),
        }[method]
        reference = formats.dequantized_copy(
            llama, tmp_path / "reference", dequantize, tables=method == "int8"
        )
        return llama, method, reference

    return make


def generate(
    model_dir: Path, quantize: str | None, settings: str, dtype: str, tmp_path: Path
) -> dict[str, Any]:
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(settings)
    options = {"dtype": dtype, "max_batch_total_tokens": "1024"}
    if quantize is not None:
        options["quantize"] = quantize
    app = build_test_app(str(model_dir), config_file=str(deploy), **options)
    with TestClient(app) as client:
        response = client.post(
            "/generate",
            json={"inputs": PROMPT, "parameters": {"max_new_tokens": NEW_TOKENS, "details": True}},
        )
        assert response.status_code == 200, response.text
        chat = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["completion_tokens"] >= 1
    return response.json()


@pytest.mark.parametrize("method", METHODS)
def test_exact_path_generates_what_transformers_generates(
    method: str, served: Any, tmp_path: Path
) -> None:
    model_dir, quantize, reference = served(method)
    body = generate(model_dir, quantize, PORTABLE, "float32", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(reference)).eval()
    ids = tokenizer.encode(PROMPT)
    expected = model.generate(
        torch.tensor([ids]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=1,
        pad_token_id=2,
    )[0, len(ids) :].tolist()
    assert [t["id"] for t in body["details"]["tokens"]] == expected
    assert body["generated_text"] == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("method", METHODS)
def test_fast_path_chooses_tokens_the_reference_ranks_first(
    method: str, served: Any, tmp_path: Path
) -> None:
    model_dir, quantize, reference = served(method)
    body = generate(model_dir, quantize, FAST, "bfloat16", tmp_path)
    tokens = [t["id"] for t in body["details"]["tokens"]]
    assert len(tokens) == NEW_TOKENS or body["details"]["finish_reason"] == "eos_token"
    ids = AutoTokenizer.from_pretrained(str(model_dir)).encode(PROMPT)
    fp32, bf16 = load_reference(reference), load_reference(reference, torch.bfloat16)
    logits = reference_logits(fp32, ids, tokens[:-1])[len(ids) - 1 :]
    tolerance = 3 * (reference_logits(bf16, ids, tokens[:-1])[len(ids) - 1 :] - logits).abs().max()
    chosen = logits[torch.arange(len(tokens)), torch.tensor(tokens)]
    assert bool((chosen >= logits.max(dim=-1).values - tolerance).all())


def environ() -> dict[str, str]:
    """The host's environment without the variables tgi or torch.distributed read."""
    from tgi_core.config import FIELDS

    names = {info.env for info in FIELDS.values() if info.env}
    names |= {"TGI_LOAD_PLUGINS", "TGI_CONFIG", "TGI_TRACE_PLUGINS", "OMP_NUM_THREADS"}
    names |= {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    return {key: value for key, value in os.environ.items() if key not in names}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(model_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "tgi_core.cli", "serve", "--model-id", str(model_dir), *flags]


@contextmanager
def running_server(model_dir: Path, log: Path, *flags: str) -> Iterator[str]:
    """`tgi-core serve` in its own session, healthy; stopped with SIGTERM, then its whole
    session (rank 0 and any ranks it started) killed."""
    port = free_port()
    command = serve_command(
        model_dir,
        *("--hostname", "127.0.0.1", "--port", str(port), "--max-batch-total-tokens", "1024"),
        "--json-output",
        *flags,
    )
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, env=environ(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def log_lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_tgi_core_serve_with_quantize_over_http(llama: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with running_server(llama, log, "--quantize", "int8") as base:
        response = httpx.post(
            f"{base}/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}}
        )
        assert response.status_code == 200 and isinstance(response.json()["generated_text"], str)
    quantized = next(line for line in log_lines(log) if line["event"] == "model quantized")
    assert quantized["quantizer"] == "int8" and quantized["linear_layers"] == 4 * 2
    assert quantized["weight_mib"] >= 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int4", "gptq", "awq"])
def test_two_quantized_shards_generate_what_one_does(
    method: str, served: Any, tmp_path: Path
) -> None:
    """`--num-shard 2`: each rank quantizes (int4) or reads (GPTQ with act-order, AWQ)
    only its slices; in float32 on the portable paths, greedy tokens equal one shard's
    and logprobs agree within 1e-4 (the ranks' partial sums add up in another order)."""
    model_dir, quantize, _ = served(method)
    deploy = tmp_path / "deploy.toml"
    deploy.write_text(PORTABLE)
    options = {"quantize": quantize} if quantize else {}
    request = {
        "inputs": PROMPT,
        "parameters": {
            "max_new_tokens": NEW_TOKENS,
            "details": True,
            "decoder_input_details": True,
        },
    }
    app = build_test_app(
        str(model_dir),
        config_file=str(deploy),
        dtype="float32",
        max_batch_total_tokens="1024",
        enable_prefill_logprobs="true",
        **options,
    )
    with TestClient(app) as client:
        expected = client.post("/generate", json=request).json()
    flags = ["--dtype", "float32", "--config", str(deploy), "--enable-prefill-logprobs"]
    flags += ["--quantize", quantize] if quantize else []
    flags += ["--num-shard", "2", "--master-port", str(free_port())]
    log = tmp_path / "sharded.log"
    with running_server(model_dir, log, *flags) as base:
        got = httpx.post(f"{base}/generate", json=request, timeout=60).json()
    mine, theirs = got["details"], expected["details"]
    assert [t["id"] for t in mine["tokens"]] == [t["id"] for t in theirs["tokens"]]
    for ours, reference in zip(
        mine["tokens"] + mine["prefill"][1:], theirs["tokens"] + theirs["prefill"][1:], strict=True
    ):
        assert abs(ours["logprob"] - reference["logprob"]) <= 1e-4
    loaded = {line["rank"]: line for line in log_lines(log) if line["event"] == "shard loaded"}
    assert set(loaded) == {0, 1}
    quantized = next(line for line in log_lines(log) if line["event"] == "model quantized")
    assert quantized["quantizer"] == method and quantized["linear_layers"] == 4 * 2


@pytest.mark.slow
def test_an_unsupported_combination_stops_serve_in_one_line(llama: Path) -> None:
    result = subprocess.run(
        serve_command(llama, "--quantize", "gptq"),
        env=environ(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert errors == [
        f"Error: --quantize gptq loads checkpoints already quantized with gptq, but {llama}/"
        "config.json has no quantization_config; to quantize a float checkpoint while "
        "loading use one of: bitsandbytes-fp4, bitsandbytes-nf4, int4, int8"
    ], result.stderr
