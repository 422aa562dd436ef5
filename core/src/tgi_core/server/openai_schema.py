"""The OpenAI API's request bodies, as msgspec structs (the OpenAPI schema comes from them).

Unknown fields are ignored, as OpenAI-compatible servers do. Fields beyond OpenAI's
(``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``) are accepted as in vLLM and
TGI.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tgi_core.server.chat import ChatMessage


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class SamplingFields(msgspec.Struct, kw_only=True):
    """What both endpoints share."""

    model: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    max_tokens: int | None = None
    n: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    ignore_eos: bool = False
    user: str | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, a list of
    token ids, or a list of token-id lists."""

    prompt: str | list[Any]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
