"""The load generator's two wire formats: request bodies and stream events."""

from __future__ import annotations

import json

import pytest

from tgi_core.bench.wire import Sampling, StreamEvent, parse_event, request_body
from tgi_core.bench.workload import PlannedRequest

PLANNED = PlannedRequest("one two three", 3, 16, seed=1234)


def test_tgi_bodies() -> None:
    assert request_body("tgi", PLANNED, Sampling()) == {
        "inputs": "one two three",
        "parameters": {"max_new_tokens": 16, "details": True, "do_sample": False},
    }
    sampled = request_body("tgi", PLANNED, Sampling(temperature=0.7))
    assert sampled["parameters"] == {
        "max_new_tokens": 16,
        "details": True,
        "do_sample": True,
        "temperature": 0.7,
        "seed": 1234,
    }


def test_openai_bodies() -> None:
    body = request_body("openai", PLANNED, Sampling(ignore_eos=True, model="m"))
    assert body == {
        "prompt": "one two three",
        "max_tokens": 16,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "model": "m",
    }
    assert request_body("openai", PLANNED, Sampling(temperature=1.0))["seed"] == 1234


def test_token_id_prompts_go_to_the_openai_api_only() -> None:
    ids = PlannedRequest((5, 6, 7), 3, 4, seed=0)
    assert request_body("openai", ids, Sampling())["prompt"] == [5, 6, 7]
    with pytest.raises(ValueError, match="text prompts"):
        request_body("tgi", ids, Sampling())


def test_tgi_events() -> None:
    token = {"index": 1, "token": {"id": 5, "text": "a"}, "generated_text": None, "details": None}
    assert parse_event("tgi", json.dumps(token)) == StreamEvent(tokens=1)
    last = token | {
        "generated_text": "a b",
        "details": {"finish_reason": "length", "generated_tokens": 2, "input_length": 3},
    }
    assert parse_event("tgi", json.dumps(last)) == StreamEvent(
        tokens=1, finish_reason="length", server_output_tokens=2, server_prompt_tokens=3
    )
    plain_last = token | {"generated_text": "a b"}  # details not asked for
    assert parse_event("tgi", json.dumps(plain_last)).finish_reason == "unknown"
    error = {"error": "Request failed during generation", "error_type": "generation"}
    assert parse_event("tgi", json.dumps(error)).error == "Request failed during generation"


def test_openai_events() -> None:
    chunk = {"choices": [{"index": 0, "text": "a", "finish_reason": None}], "usage": None}
    assert parse_event("openai", json.dumps(chunk)) == StreamEvent(tokens=1)
    final = {"choices": [{"index": 0, "text": "b", "finish_reason": "length"}], "usage": None}
    assert parse_event("openai", json.dumps(final)).finish_reason == "length"
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    assert parse_event("openai", json.dumps(usage)) == StreamEvent(
        server_output_tokens=2, server_prompt_tokens=3
    )
    assert parse_event("openai", "[DONE]").done
    error = {"error": {"message": "boom", "type": "server_error"}}
    assert parse_event("openai", json.dumps(error)).error == "boom"
    assert parse_event("openai", "{not json").error is not None
