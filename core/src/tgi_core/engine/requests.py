"""What frontends hand the engine, and what the engine streams back.

A frontend turns an HTTP request into one :class:`GenerateRequest` (token ids, sampling
and stopping parameters) and turns the :class:`TokenEvent` stream into its wire format.
The engine knows nothing of HTTP.
"""

from __future__ import annotations

from typing import Literal

import msgspec

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How the next token is chosen (TGI's order: penalties, temperature, top-k, top-p,
    typical-p, min-p). ``do_sample=False`` is greedy whatever the other fields say."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    typical_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # CTRL style, over prompt and generated tokens
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    #: "tgi": frequency penalty scaled by count / length; "openai": raw count and presence
    penalty_style: Literal["tgi", "openai"] = "tgi"
    seed: int | None = None
    top_n_tokens: int = 0  # alternatives reported with each token


class StoppingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_new_tokens: int = 20
    stop: tuple[str, ...] = ()  # stop sequences, matched on decoded text
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


class GenerateRequest(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    stopping: StoppingParams = StoppingParams()
    prompt_logprobs: bool = False  # report each prompt token's logprob (skips the prefix cache)
    n: int = 1  # independent samples of the same prompt (its KV is shared, copy-on-write)


class PromptToken(msgspec.Struct, frozen=True):
    id: int
    logprob: float | None  # None for the first token, which nothing predicts


class TopToken(msgspec.Struct, frozen=True):
    id: int
    text: str
    logprob: float
    special: bool


class TokenEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One generated token of one of a request's ``n`` samples (``index``).

    The last event of each sample carries ``finish_reason``; ``done`` marks the last event
    of the whole request. The first event of a request with ``prompt_logprobs`` carries
    them.
    """

    request_id: str
    index: int = 0
    token_id: int
    text: str  # the text this token adds (may be empty while a stop sequence could form)
    logprob: float
    special: bool = False
    top_tokens: tuple[TopToken, ...] = ()
    finish_reason: FinishReason | None = None
    generated_tokens: int = 0
    prompt_tokens: int = 0
    seed: int | None = None
    error: str | None = None  # set when the request failed (no token then)
    done: bool = False
    stop_sequence: str | None = None  # the stop sequence that ended the sample, if any
    prompt_logprobs: tuple[PromptToken, ...] | None = None
    queue_time: float = 0.0  # seconds from arrival to first scheduling (first event only)
