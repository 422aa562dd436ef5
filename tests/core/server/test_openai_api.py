"""The OpenAI frontend through the assembled app: greedy text equals transformers', the
response and chunk shapes, n, best_of, logprobs, echo, stop, and errors in OpenAI's shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from litestar.testing import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from tgi_core.testing import build_test_app

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "def fibonacci(n):"},
]
PROMPT = "import os\nimport sys\n"
OPTIONS = {"max_batch_total_tokens": "4096", "dtype": "float32"}


@pytest.fixture(scope="module")
def client(tiny_llama: Path):
    app = build_test_app(str(tiny_llama), {"TGI_LOAD_PLUGINS": "tgi-llama"}, **OPTIONS)
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def reference(tiny_llama: Path):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()

    def greedy(ids: list[int], max_new: int) -> tuple[str, list[int]]:
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=1,
            pad_token_id=2,
        )[0, len(ids) :].tolist()
        return tokenizer.decode(out, skip_special_tokens=True), out

    return tokenizer, greedy


def chat_ids(tokenizer, messages=MESSAGES) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def sse_payloads(body: str) -> list[str]:
    """The data of each SSE event, checking the framing: ``data: ...`` then a blank line."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e.removeprefix("data: ") for e in events]


def test_chat_greedy_equals_transformers(client, reference) -> None:
    tokenizer, greedy = reference
    ids = chat_ids(tokenizer)
    expected, tokens = greedy(ids, 12)
    response = client.post(
        "/v1/chat/completions",
        json={"model": "tgi", "messages": MESSAGES, "temperature": 0, "max_tokens": 12},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == ("stop" if 1 in tokens else "length")
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(tokens),
        "total_tokens": len(ids) + len(tokens),
    }
    assert int(response.headers["x-prompt-tokens"]) == len(ids)


def test_chat_stream_chunks_usage_and_done(client, reference) -> None:
    tokenizer, greedy = reference
    ids = chat_ids(tokenizer)
    expected, tokens = greedy(ids, 10)
    response = client.post(
        "/v1/chat/completions",
        json={
            "messages": MESSAGES,
            "temperature": 0,
            "max_tokens": 10,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(tokens)
    assert all(c["object"] == "chat.completion.chunk" and c["usage"] is None for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_completions_prompt_forms_agree_with_transformers(client, reference) -> None:
    tokenizer, greedy = reference
    ids = tokenizer.encode(PROMPT)
    expected, _ = greedy(ids, 8)
    as_text = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    ).json()
    assert as_text["object"] == "text_completion"
    assert as_text["choices"][0]["text"] == expected
    as_ids = client.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0}
    ).json()
    assert as_ids["choices"][0]["text"] == expected
    other = "class A:\n"
    both = client.post(
        "/v1/completions", json={"prompt": [PROMPT, other], "max_tokens": 8, "temperature": 0}
    ).json()
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert both["choices"][0]["text"] == expected
    assert both["choices"][1]["text"] == greedy(tokenizer.encode(other), 8)[0]
    lists = client.post(
        "/v1/completions",
        json={"prompt": [ids, tokenizer.encode(other)], "max_tokens": 8, "temperature": 0},
    ).json()
    assert [c["text"] for c in lists["choices"]] == [c["text"] for c in both["choices"]]


def test_ignore_eos_generates_past_the_end_of_sequence(client, reference) -> None:
    _, greedy = reference
    # a one-token prompt whose greedy continuation (transformers') ends with EOS early
    prompt, ended = next(
        ([k], out) for k in range(3, 320) if 1 in (out := greedy([k], 12)[1]) and len(out) < 12
    )
    plain = client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 16, "temperature": 0}
    ).json()
    assert plain["choices"][0]["finish_reason"] == "stop"
    assert plain["usage"]["completion_tokens"] == len(ended)
    kept_on = client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True},
    ).json()
    assert kept_on["choices"][0]["finish_reason"] == "length"
    assert kept_on["usage"]["completion_tokens"] == 16
    assert kept_on["choices"][0]["text"].startswith(plain["choices"][0]["text"])


def test_completions_default_max_tokens_is_openais_16(client) -> None:
    body = client.post(
        "/v1/completions", json={"prompt": PROMPT, "temperature": 0, "stop": []}
    ).json()
    assert body["usage"]["completion_tokens"] <= 16
    if body["choices"][0]["finish_reason"] == "length":
        assert body["usage"]["completion_tokens"] == 16


def test_completions_stream_interleaves_prompts_and_ends_with_done(client, reference) -> None:
    tokenizer, greedy = reference
    other = "class A:\n"
    response = client.post(
        "/v1/completions",
        json={"prompt": [PROMPT, other], "max_tokens": 6, "temperature": 0, "stream": True},
    )
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    texts = {0: "", 1: ""}
    for chunk in map(json.loads, payloads[:-1]):
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["text"]
    assert texts[0] == greedy(tokenizer.encode(PROMPT), 6)[0]
    assert texts[1] == greedy(tokenizer.encode(other), 6)[0]


def test_n_samples_are_seeded_and_distinct_choices(client) -> None:
    body = {
        "messages": MESSAGES,
        "n": 3,
        "temperature": 1.0,
        "seed": 7,
        "max_tokens": 8,
        "logprobs": True,
    }
    first = client.post("/v1/chat/completions", json=body).json()
    again = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    contents = [c["message"]["content"] for c in first["choices"]]
    assert contents == [c["message"]["content"] for c in again["choices"]]
    assert len(set(contents)) > 1  # three seeds, three samples
    assert first["usage"]["completion_tokens"] == sum(
        len(c["logprobs"]["content"]) for c in first["choices"]
    )


def test_best_of_returns_n_choices(client) -> None:
    body = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "n": 1, "best_of": 3, "temperature": 1.0, "max_tokens": 5},
    ).json()
    assert len(body["choices"]) == 1
    assert body["usage"]["completion_tokens"] <= 15
    error = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "n": 2, "best_of": 1, "max_tokens": 5},
    )
    assert error.status_code == 422 and error.json()["error"]["param"] == "best_of"


def test_chat_logprobs_and_top_logprobs(client) -> None:
    body = client.post(
        "/v1/chat/completions",
        json={
            "messages": MESSAGES,
            "temperature": 0,
            "max_tokens": 5,
            "logprobs": True,
            "top_logprobs": 3,
        },
    ).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] <= 0
        # greedy: the chosen token is the most likely one
        assert entry["logprob"] == pytest.approx(max(t["logprob"] for t in entry["top_logprobs"]))
        if "\ufffd" not in entry["token"]:  # (a partial character keeps its own bytes)
            assert entry["bytes"] == list(entry["token"].encode())


def test_completions_echo_and_prompt_logprobs(client, reference) -> None:
    tokenizer, greedy = reference
    ids = tokenizer.encode(PROMPT)
    body = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 2},
    ).json()
    (choice,) = body["choices"]
    assert choice["text"] == PROMPT + greedy(ids, 4)[0]
    logprobs = choice["logprobs"]
    generated = body["usage"]["completion_tokens"]
    assert len(logprobs["tokens"]) == len(ids) + generated
    assert logprobs["token_logprobs"][0] is None  # nothing predicts the first token
    assert all(lp <= 0 for lp in logprobs["token_logprobs"][1:])
    # a dict keyed by token text: two alternatives that decode alike (partial UTF-8) merge
    assert all(1 <= len(top) <= 2 for top in logprobs["top_logprobs"][len(ids) :])
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])


def test_stop_sequence_ends_with_stop_and_is_cut(client) -> None:
    free = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    ).json()["choices"][0]["text"]
    stop = free[3:5]
    if not stop.strip():
        pytest.fail(f"pick another prompt: the greedy text {free!r} has no usable stop")
    body = client.post(
        "/v1/completions",
        json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0, "stop": stop},
    ).json()
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == free[: free.index(stop)]


@pytest.mark.parametrize(
    ("route", "body", "param", "message"),
    [
        ("chat", {"temperature": 3}, "temperature", "`temperature` must be >= 0.0 and <= 2.0"),
        ("chat", {"top_p": 0}, "top_p", "`top_p` must be > 0 and <= 1"),
        ("chat", {"n": 0}, "n", "`n` must be >= 1 and <= 128"),
        ("chat", {"max_tokens": 0}, "max_tokens", "`max_tokens` must be strictly positive"),
        ("chat", {"max_tokens": 10**6}, "max_tokens", "`max_new_tokens` must be <="),
        ("chat", {"presence_penalty": -3}, "presence_penalty", "must be >= -2.0"),
        ("chat", {"logprobs": True, "top_logprobs": 30}, "top_logprobs", "<= 20"),
        ("chat", {"top_logprobs": 2}, "top_logprobs", "requires `logprobs`"),
        ("chat", {"tools": [{"type": "function"}]}, "tools", "`tools` are not supported"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format", "not supported"),
        ("chat", {"logit_bias": {"5": 1.0}}, "logit_bias", "`logit_bias` is not supported"),
        ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4 stop sequences"),
        ("chat", {"messages": []}, "messages", "`messages` cannot be empty"),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content",
            "image_url parts are not supported",
        ),
        (
            "chat",
            {"messages": [{"role": "user"}]},
            "messages[0].content",
            "`messages[0].content` is required",
        ),
        ("completions", {"prompt": "x " * 300}, "prompt", "must have less than 255 tokens"),
        ("completions", {"suffix": "x"}, "suffix", "Suffix is not supported"),
        ("completions", {"prompt": ["a"] * 5}, "prompt", "maximum allowed batch size of 4"),
        ("completions", {"prompt": [5, 999]}, "prompt", "token ids must be >= 0 and < 320"),
        ("completions", {"prompt": ""}, "prompt", "`prompt` cannot be empty"),
        ("completions", {"prompt": [1, "a"]}, "prompt", "`prompt` must be a string"),
        ("completions", {"logprobs": 6}, "logprobs", "`logprobs` must be >= 0 and <= 5"),
        ("completions", {"best_of": 2, "stream": True}, "best_of", "not supported when stream"),
    ],
)
def test_validation_errors_in_openais_shape(client, route, body, param, message) -> None:
    base = {"messages": MESSAGES} if route == "chat" else {"prompt": PROMPT}
    response = client.post(f"/v1/{'chat/' if route == 'chat' else ''}completions", json=base | body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert message in error["message"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error" and error["code"]


def test_malformed_bodies_are_4xx_in_openais_shape(client) -> None:
    bad_json = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "message" in bad_json.json()["error"]
    missing = client.post("/v1/chat/completions", json={"model": "tgi"})
    assert missing.status_code == 422 and "messages" in missing.json()["error"]["message"]
    wrong_type = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": "many"})
    assert wrong_type.status_code == 422 and wrong_type.json()["error"]["param"] == "max_tokens"
    nan = client.post(
        "/v1/completions",
        content=b'{"prompt": "x", "temperature": NaN}',
        headers={"content-type": "application/json"},
    )
    assert nan.status_code == 400


def test_final_assistant_message_is_continued(client) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "    return"}]
    body = client.post("/chat_tokenize", json={"messages": messages}).json()
    assert body["templated_text"].endswith("<|assistant|>\n    return")
    ids = [t["id"] for t in body["tokenize_response"]]
    assert "".join(t["text"] for t in body["tokenize_response"]) == body["templated_text"]
    assert ids[0] == 0  # the template writes the BOS token itself
    response = client.post(
        "/v1/chat/completions", json={"messages": messages, "temperature": 0, "max_tokens": 3}
    )
    assert response.status_code == 200


@pytest.fixture(scope="module")
def untemplated(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("untemplated") / "llama"
    shutil.copytree(tiny_llama, path)
    (path / "chat_template.jinja").unlink()
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_no_chat_template_is_a_clear_422(untemplated: Path) -> None:
    app = build_test_app(str(untemplated), {"TGI_LOAD_PLUGINS": "tgi-llama"}, **OPTIONS)
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "template_error" and "template not found" in error["message"]
        tgi_shape = client.post("/chat_tokenize", json={"messages": MESSAGES})
        assert tgi_shape.json()["error_type"] == "template_error"
        assert client.post("/v1/completions", json={"prompt": PROMPT}).status_code == 200


def test_tokenizer_config_path_overrides_the_template(untemplated: Path, tmp_path: Path) -> None:
    override = tmp_path / "tokenizer_config.json"
    override.write_text(json.dumps({"chat_template": "[{{ messages[-1]['content'] }}]"}))
    app = build_test_app(
        str(untemplated),
        {"TGI_LOAD_PLUGINS": "tgi-llama"},
        tokenizer_config_path=str(override),
        **OPTIONS,
    )
    with TestClient(app) as client:
        body = client.post("/chat_tokenize", json={"messages": MESSAGES}).json()
        assert body["templated_text"] == "[def fibonacci(n):]"


def test_generation_config_sampling_defaults(tiny_llama: Path, tmp_path: Path, reference) -> None:
    """Fields a request leaves out take generation_config.json's sampling settings (as in
    vLLM): top_k 1 there makes a request without any sampling field greedy; a request's
    own value wins."""
    from tgi_core.server.builder import sampling_defaults

    assert sampling_defaults({"do_sample": True, "top_k": 1, "temperature": 0.5}) == {
        "top_k": 1.0,
        "temperature": 0.5,
    }
    assert sampling_defaults({"top_k": 1}) == {}  # not a sampling config
    assert sampling_defaults({"do_sample": True, "top_p": float("nan"), "min_p": True}) == {}
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(
        json.dumps({**config, "do_sample": True, "top_k": 1})
    )
    tokenizer, greedy = reference
    ids = tokenizer.encode(PROMPT)
    expected, _ = greedy(ids, 10)
    app = build_test_app(str(model), {"TGI_LOAD_PLUGINS": "tgi-llama"}, **OPTIONS)
    with TestClient(app) as client:

        def complete(**fields: object) -> str:
            body = {"model": "tgi", "prompt": PROMPT, "max_tokens": 10, "seed": 1, **fields}
            return client.post("/v1/completions", json=body).json()["choices"][0]["text"]

        assert complete() == expected
        assert complete(top_k=50) != expected  # the request's own top_k samples
