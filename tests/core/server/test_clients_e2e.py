"""The real clients, unchanged, against one real ``tgi-core serve`` process.

``openai``, ``huggingface_hub.InferenceClient`` and TGI's own ``text-generation``
client, plus the README's examples. Greedy outputs are compared with transformers'
``generate`` on the same prompt token ids. The ``server`` fixture is in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import openai
import pytest
import text_generation
import torch
from huggingface_hub import InferenceClient
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

pytestmark = [
    pytest.mark.slow,
    # text-generation 0.7.0 calls pydantic's deprecated `.dict()`
    pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning"),
]

EOS = 1
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is deep learning?"},
]
PROMPT = "def fibonacci(n):\n    "


class Greedy(NamedTuple):
    prompt_ids: list[int]
    ids: list[int]  # generated, the EOS included if it came
    text: str  # decoded without special tokens

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason for this output."""
        return "stop" if self.ids[-1] == EOS else "length"


class Reference:
    """transformers' float32 model and tokenizer for the served checkpoint."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModelForCausalLM.from_pretrained(str(path)).eval()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int) -> Greedy:
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                eos_token_id=EOS,
                pad_token_id=2,
            )
        ids = out[0, len(prompt_ids) :].tolist()
        return Greedy(prompt_ids, ids, self.tokenizer.decode(ids, skip_special_tokens=True))

    def chat(self, messages: list[dict[str, str]], max_new_tokens: int) -> Greedy:
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.greedy(ids, max_new_tokens)

    def completion(self, prompt: str, max_new_tokens: int) -> Greedy:
        return self.greedy(self.tokenizer.encode(prompt), max_new_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's raw bytes (byte-level BPE: may be part of a UTF-8 character)."""
        return bytes(BYTE_DECODER[c] for c in self.tokenizer.convert_ids_to_tokens(token_id))


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: each printable stand-in back to its byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


BYTE_DECODER = _byte_decoder()


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> Reference:
    return Reference(tiny_llama)


@pytest.fixture(scope="module")
def base(server: Any) -> str:
    return str(server.base)


@pytest.fixture(scope="module")
def oai(base: str) -> OpenAI:
    return OpenAI(base_url=f"{base}/v1/", api_key="-")


# -- openai -------------------------------------------------------------------------------


def test_openai_chat_greedy_equals_transformers(oai: OpenAI, reference: Reference) -> None:
    expected = reference.chat(MESSAGES, 12)
    completion = oai.chat.completions.create(
        model="tgi", messages=MESSAGES, temperature=0, max_tokens=12
    )
    assert completion.object == "chat.completion"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(expected.prompt_ids)
    assert completion.usage.completion_tokens == len(expected.ids)
    assert completion.usage.total_tokens == len(expected.prompt_ids) + len(expected.ids)


def test_openai_chat_stream(oai: OpenAI, reference: Reference) -> None:
    expected = reference.chat(MESSAGES, 12)
    chunks = list(
        oai.chat.completions.create(
            model="tgi", messages=MESSAGES, temperature=0, max_tokens=12, stream=True
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason
    assert len(chunks) == len(expected.ids)  # one chunk per token


def test_openai_chat_stream_include_usage(oai: OpenAI, reference: Reference) -> None:
    expected = reference.chat(MESSAGES, 12)
    chunks = list(
        oai.chat.completions.create(
            model="tgi",
            messages=MESSAGES,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *tokens, last = chunks
    assert all(c.usage is None and len(c.choices) == 1 for c in tokens)
    assert "".join(c.choices[0].delta.content or "" for c in tokens) == expected.text
    assert tokens[-1].choices[0].finish_reason == expected.finish_reason
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == len(expected.prompt_ids)
    assert last.usage.completion_tokens == len(expected.ids)
    assert last.usage.total_tokens == len(expected.prompt_ids) + len(expected.ids)


def test_openai_completions_greedy_and_stream(oai: OpenAI, reference: Reference) -> None:
    expected = reference.completion(PROMPT, 10)
    completion = oai.completions.create(model="tgi", prompt=PROMPT, temperature=0, max_tokens=10)
    assert completion.object == "text_completion"
    (choice,) = completion.choices
    assert choice.text == expected.text
    assert choice.finish_reason == expected.finish_reason
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(expected.prompt_ids)
    assert completion.usage.completion_tokens == len(expected.ids)

    chunks = list(
        oai.completions.create(
            model="tgi", prompt=PROMPT, temperature=0, max_tokens=10, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_openai_completions_stop_sequence(oai: OpenAI, reference: Reference) -> None:
    expected = reference.completion(PROMPT, 10)
    pieces = [reference.tokenizer.decode([i]) for i in expected.ids[1:]]
    stop = next(p for p in pieces if p.isascii() and p.isalnum())  # a clean token to stop at
    text = expected.text[: expected.text.index(stop)]
    completion = oai.completions.create(
        model="tgi", prompt=PROMPT, temperature=0, max_tokens=10, stop=[stop]
    )
    assert (completion.choices[0].text, completion.choices[0].finish_reason) == (text, "stop")
    chunks = list(
        oai.completions.create(
            model="tgi", prompt=PROMPT, temperature=0, max_tokens=10, stop=[stop], stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_openai_n_sampled_choices(oai: OpenAI) -> None:
    def create() -> Any:
        return oai.chat.completions.create(
            model="tgi", messages=MESSAGES, temperature=1, max_tokens=8, n=2, seed=1234
        )

    completion = create()
    assert [c.index for c in completion.choices] == [0, 1]
    assert all(c.finish_reason in ("length", "stop") for c in completion.choices)
    assert completion.usage is not None
    assert 2 <= completion.usage.completion_tokens <= 16
    # the same seed samples the same choices
    again = create()
    assert [c.message.content for c in again.choices] == [
        c.message.content for c in completion.choices
    ]


def test_openai_chat_logprobs(oai: OpenAI, reference: Reference) -> None:
    expected = reference.chat(MESSAGES, 6)
    completion = oai.chat.completions.create(
        model="tgi", messages=MESSAGES, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2
    )
    (choice,) = completion.choices
    assert choice.message.content == expected.text
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == len(expected.ids)
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 2
        first, second = entry.top_logprobs
        assert first.logprob >= second.logprob
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(first.logprob, abs=1e-4)


def test_openai_chat_logprobs_bytes_are_the_tokens_bytes(oai: OpenAI, reference: Reference) -> None:
    """OpenAI's ``bytes``: the token's own bytes, so that tokens holding part of a UTF-8
    character can be joined back into it (``token`` alone can't: it shows U+FFFD)."""
    expected = reference.chat(MESSAGES, 12)
    assert any(
        b"\xef\xbf\xbd" not in reference.token_bytes(i)
        and "\ufffd" in reference.tokenizer.decode([i])
        for i in expected.ids
    ), "no partial token to check"
    completion = oai.chat.completions.create(
        model="tgi", messages=MESSAGES, temperature=0, max_tokens=12, logprobs=True, top_logprobs=1
    )
    (choice,) = completion.choices
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    expected_bytes = [reference.token_bytes(i) for i in expected.ids]
    assert [bytes(e.bytes or []) for e in content] == expected_bytes
    assert [bytes(e.top_logprobs[0].bytes or []) for e in content] == expected_bytes
    joined = b"".join(expected_bytes).decode("utf-8", "replace")
    assert joined == choice.message.content


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"temperature": 5}, "`temperature` must be >= 0.0 and <= 2.0. Given: 5"),
        ({"max_tokens": 10**6}, "`inputs` tokens + `max_new_tokens` must be <= 256"),
    ],
)
def test_openai_errors_carry_the_servers_message(
    oai: OpenAI, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        oai.chat.completions.create(model="tgi", messages=MESSAGES, **fields)
    error = caught.value
    assert isinstance(error, openai.UnprocessableEntityError)
    assert error.status_code == 422
    assert message in error.message
    assert isinstance(error.body, dict) and message in error.body["message"]


def test_openai_models_list(oai: OpenAI, tiny_llama: Path) -> None:
    (model,) = oai.models.list().data
    assert model.id == str(tiny_llama)


# -- huggingface_hub ----------------------------------------------------------------------


def test_hub_chat_stream_equals_transformers(base: str, reference: Reference) -> None:
    expected = reference.chat(MESSAGES, 12)
    client = InferenceClient(base_url=f"{base}/v1/")
    chunks = list(
        client.chat.completions.create(
            model="tgi", messages=MESSAGES, stream=True, max_tokens=12, temperature=0
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_hub_text_generation_details(base: str, reference: Reference) -> None:
    expected = reference.completion(PROMPT, 10)
    client = InferenceClient(base)
    output = client.text_generation(
        PROMPT, max_new_tokens=10, details=True, do_sample=False, return_full_text=False
    )
    assert output.generated_text == expected.text
    assert output.details is not None
    assert [t.id for t in output.details.tokens] == expected.ids
    assert output.details.generated_tokens == len(expected.ids) <= 10
    assert output.details.finish_reason in ("length", "eos_token")


def test_hub_text_generation_full_text_by_default_on_compat_route(
    base: str, reference: Reference
) -> None:
    """``/`` defaults ``return_full_text`` to true for a model without a pipeline tag (TGI)."""
    expected = reference.completion(PROMPT, 10)
    text = InferenceClient(base).text_generation(PROMPT, max_new_tokens=10, do_sample=False)
    assert text == PROMPT + expected.text


def test_hub_text_generation_stream_details(base: str, reference: Reference) -> None:
    expected = reference.completion(PROMPT, 10)
    client = InferenceClient(base)
    responses = list(
        client.text_generation(
            PROMPT, max_new_tokens=10, details=True, stream=True, do_sample=False
        )
    )
    assert [r.token.id for r in responses] == expected.ids
    text = "".join(r.token.text for r in responses if not r.token.special)
    assert text == expected.text
    last = responses[-1]
    assert last.details is not None
    assert last.details.generated_tokens == len(expected.ids)
    assert all(r.details is None and r.generated_text is None for r in responses[:-1])


# -- text-generation ----------------------------------------------------------------------


def test_text_generation_client_generate(base: str, reference: Reference) -> None:
    expected = reference.completion(PROMPT, 10)
    response = text_generation.Client(base).generate(PROMPT, max_new_tokens=10)
    assert response.generated_text == expected.text
    assert response.details is not None
    assert [t.id for t in response.details.tokens] == expected.ids
    assert response.details.generated_tokens == len(expected.ids)
    assert response.details.seed is None
    assert all(t.logprob is not None and t.logprob <= 0 for t in response.details.tokens)


def test_text_generation_client_stream(base: str, reference: Reference) -> None:
    expected = reference.completion(PROMPT, 10)
    responses = list(text_generation.Client(base).generate_stream(PROMPT, max_new_tokens=10))
    assert [r.token.id for r in responses] == expected.ids
    assert "".join(r.token.text for r in responses if not r.token.special) == expected.text
    last = responses[-1]
    assert last.generated_text == expected.text
    assert last.details is not None
    assert last.details.finish_reason.value in ("length", "eos_token")
    assert last.details.generated_tokens == len(expected.ids)


def test_text_generation_async_client(base: str, reference: Reference) -> None:
    expected = reference.completion(PROMPT, 10)

    async def run() -> tuple[Any, list[Any]]:
        client = text_generation.AsyncClient(base)
        response = await client.generate(PROMPT, max_new_tokens=10)
        stream = [r async for r in client.generate_stream(PROMPT, max_new_tokens=10)]
        return response, stream

    response, stream = asyncio.run(run())
    assert response.generated_text == expected.text
    assert [t.id for t in response.details.tokens] == expected.ids
    assert [r.token.id for r in stream] == expected.ids
    assert stream[-1].generated_text == expected.text


def test_text_generation_validation_error(base: str) -> None:
    with pytest.raises(text_generation.errors.ValidationError) as caught:
        text_generation.Client(base).generate(PROMPT, max_new_tokens=10_000)
    assert "`inputs` tokens + `max_new_tokens` must be <= 256" in str(caught.value)
    with pytest.raises(text_generation.errors.ValidationError):
        list(text_generation.Client(base).generate_stream(PROMPT, max_new_tokens=10_000))


# -- the README's examples ----------------------------------------------------------------

README_CURL_BODY = """{
  "model": "tgi",
  "messages": [
    {
      "role": "system",
      "content": "You are a helpful assistant."
    },
    {
      "role": "user",
      "content": "What is deep learning?"
    }
  ],
  "stream": true,
  "max_tokens": 20
}"""


def sse_events(text: str) -> list[str]:
    return [line[len("data:") :].strip() for line in text.splitlines() if line.startswith("data:")]


def test_readme_curl_example(base: str) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    host = base.removeprefix("http://")  # the README writes localhost:8080, without a scheme
    result = subprocess.run(
        [
            curl,
            "-sS",
            "--fail-with-body",
            f"{host}/v1/chat/completions",
            "-X",
            "POST",
            "-d",
            README_CURL_BODY,
            "-H",
            "Content-Type: application/json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    *events, done = sse_events(result.stdout)
    assert done == "[DONE]"
    chunks = [json.loads(event) for event in events]
    assert 1 <= len(chunks) <= 20
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all(c["choices"][0]["delta"]["role"] == "assistant" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_readme_huggingface_hub_example(base: str, capsys: pytest.CaptureFixture[str]) -> None:
    client = InferenceClient(
        base_url=f"{base}/v1/",
    )

    output = client.chat.completions.create(
        model="tgi",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Count to 10"},
        ],
        stream=True,
        max_tokens=20,  # the README's 1024 is more than the tiny model's 256-token context
    )

    chunks = []
    for chunk in output:
        print(chunk.choices[0].delta.content)
        chunks.append(chunk)

    assert 1 <= len(chunks) <= 20
    assert capsys.readouterr().out == "".join(f"{c.choices[0].delta.content}\n" for c in chunks)
    assert all(isinstance(c.choices[0].delta.content, str) for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_readme_huggingface_hub_example_max_tokens_too_large(base: str) -> None:
    """As written (``max_tokens=1024``) the tiny model refuses it with a clear 422."""
    from huggingface_hub.errors import HfHubHTTPError

    client = InferenceClient(base_url=f"{base}/v1/")
    with pytest.raises(HfHubHTTPError) as caught:
        list(
            client.chat.completions.create(
                model="tgi",
                messages=[{"role": "user", "content": "Count to 10"}],
                stream=True,
                max_tokens=1024,
            )
        )
    assert caught.value.response is not None
    assert caught.value.response.status_code == 422
    assert "must be <= 256" in str(caught.value)


def test_readme_openai_example(base: str, capsys: pytest.CaptureFixture[str]) -> None:
    # init the client but point it to TGI
    client = OpenAI(base_url=f"{base}/v1/", api_key="-")

    chat_completion = client.chat.completions.create(
        model="tgi",
        messages=[
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is deep learning?"},
        ],
        stream=True,
    )

    # iterate and print stream
    messages = []
    for message in chat_completion:
        print(message)
        messages.append(message)

    assert capsys.readouterr().out.count("ChatCompletionChunk(") == len(messages) >= 1
    assert messages[-1].choices[0].finish_reason in ("length", "stop")
