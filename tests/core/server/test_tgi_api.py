"""The TGI frontend through the assembled app: shapes, SSE framing, validation messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from litestar.testing import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgi_core.config import load_config
from tgi_core.plugins import make_plugin_manager
from tgi_core.registry import Registry
from tgi_core.server.app import build_app
from tgi_core.server.builder import build_state

VOCAB = 320


@pytest.fixture(scope="module")
def checkpoint(tiny_llama: Path) -> Path:
    return tiny_llama


@pytest.fixture(scope="module")
def client(checkpoint: Path):
    resolved = load_config(
        cli={"model_id": str(checkpoint), "max_batch_total_tokens": "4096", "dtype": "float32"},
        environ={},
    )
    registry = Registry.build(make_plugin_manager(environ={"TGI_LOAD_PLUGINS": "tgi-llama"}))
    resolved = resolved.with_registry(registry)
    app = build_app(build_state(resolved, registry), registry, resolved.plugin_sections)
    with TestClient(app) as test_client:
        yield test_client


def expected_text(checkpoint: Path, prompt: str, max_new: int) -> tuple[str, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    model = AutoModelForCausalLM.from_pretrained(str(checkpoint)).eval()
    ids = tokenizer.encode(prompt)
    out = model.generate(
        torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=1, pad_token_id=2
    )[0, len(ids) :].tolist()
    return tokenizer.decode(out, skip_special_tokens=True), out


PROMPT = "def fibonacci(n):\n    "


def test_generate_greedy_equals_transformers(client, checkpoint) -> None:
    text, ids = expected_text(checkpoint, PROMPT, 10)
    response = client.post(
        "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "details": True}}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["generated_text"] == text
    details = body["details"]
    assert [t["id"] for t in details["tokens"]] == ids
    assert details["generated_tokens"] == len(ids) and details["seed"] is None
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["prefill"] == [] and "top_tokens" not in details
    assert all(t["logprob"] <= 0 for t in details["tokens"])


def test_compat_route_returns_a_list_and_full_text(client, checkpoint) -> None:
    text, _ = expected_text(checkpoint, PROMPT, 5)
    response = client.post(
        "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "return_full_text": True}}
    )
    assert response.status_code == 200
    assert response.json() == [{"generated_text": PROMPT + text}]
    # on `/`, return_full_text defaults to true for a text-generation model, as in TGI
    response = client.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert response.json()[0]["generated_text"] == PROMPT + text
    plain = client.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert plain.json()["generated_text"] == text
    # no parameters at all: TGI's defaults (which sample), the full text still
    sampled = client.post("/", json={"inputs": PROMPT}).json()[0]["generated_text"]
    assert sampled.startswith(PROMPT) and len(sampled) > len(PROMPT)


def test_generate_stream_sse_framing(client, checkpoint) -> None:
    text, ids = expected_text(checkpoint, PROMPT, 6)
    response = client.post(
        "/generate_stream",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "details": True}},
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.content
    events = raw.split(b"\n\n")
    assert events[-1] == b""
    payloads = [json.loads(event.removeprefix(b"data:")) for event in events[:-1]]
    assert all(event.startswith(b'data:{"index":') for event in events[:-1])
    assert [p["index"] for p in payloads] == list(range(1, len(ids) + 1))
    assert [p["token"]["id"] for p in payloads] == ids
    assert all(p["generated_text"] is None and p["details"] is None for p in payloads[:-1])
    assert payloads[-1]["generated_text"] == text
    assert "".join(p["token"]["text"] for p in payloads) == text  # incremental token text
    assert payloads[-1]["details"]["input_length"] > 0


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"temperature": 0}, "`temperature` must be strictly positive"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 9}, "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
        ({"best_of": 3}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than"),
        ({"max_new_tokens": 5000}, "`inputs` tokens + `max_new_tokens` must be <= 256."),
        ({"seed": 2**64}, "`seed` must be an unsigned 64-bit integer"),
    ],
)
def test_validation_messages(client, parameters, message) -> None:
    response = client.post("/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert response.status_code == 422
    body = response.json()
    assert body["error_type"] == "validation"
    assert body["error"].startswith("Input validation error: " + message)


def test_empty_inputs_and_malformed_bodies_are_422(client) -> None:
    response = client.post("/generate", json={"inputs": ""})
    assert response.status_code == 422
    assert response.json()["error"] == "Input validation error: `inputs` cannot be empty"
    for bad in (b"{not json", b'{"inputs": 3}', b'{"parameters": {}}'):
        response = client.post(
            "/generate", content=bad, headers={"content-type": "application/json"}
        )
        assert response.status_code in (400, 422), bad
        assert response.json()["error_type"] == "validation"


def test_stream_validation_error_is_422_before_streaming(client) -> None:
    response = client.post(
        "/generate_stream", json={"inputs": PROMPT, "parameters": {"decoder_input_details": True}}
    )
    assert response.status_code == 422
    assert "not supported when streaming tokens" in response.json()["error"]


def test_info_health_models_tokenize(client, checkpoint) -> None:
    info = client.get("/info").json()
    assert info["model_id"] == str(checkpoint)
    assert info["max_total_tokens"] == 256 and info["max_input_tokens"] == 255
    assert info["model_dtype"] == "float32" and info["attention_backend"] == "sdpa"
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == str(checkpoint)
    tokens = client.post("/tokenize", json={"inputs": "def f(x):"}).json()
    assert "".join(t["text"] for t in tokens) == "def f(x):"
    assert tokens[0]["start"] == 0 and tokens[-1]["stop"] == len("def f(x):")
    assert client.get("/nope").status_code == 404


def test_seeded_sampling_reports_its_seed(client) -> None:
    body = {
        "inputs": PROMPT,
        "parameters": {"max_new_tokens": 5, "do_sample": True, "seed": 7, "details": True},
    }
    first = client.post("/generate", json=body).json()
    second = client.post("/generate", json=body).json()
    assert first["details"]["seed"] == 7
    assert first["generated_text"] == second["generated_text"]
