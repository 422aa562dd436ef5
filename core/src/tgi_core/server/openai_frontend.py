"""The OpenAI frontend (a built-in plugin): ``/v1/chat/completions`` and ``/v1/completions``.

OpenAI's semantics where TGI departs from them (documented in docs/api.md):
temperature 0 is greedy and anything else (absent included, which means 1) samples;
sampling fields a request leaves out take the values of the checkpoint's
``generation_config.json`` when it samples (``do_sample``), as vLLM does;
presence and frequency penalties are OpenAI's (raw counts over the generated tokens);
``n`` > 1 returns ``n`` choices; a stop sequence ends a choice with ``"stop"`` and is not
in its text; ``echo`` and prompt logprobs work on completions; errors come in OpenAI's
``{"error": {...}}`` shape. Streams are SSE ``data: {json}`` events ending with
``data: [DONE]``; an error after the stream started is sent in-band before ``[DONE]``.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Body
from litestar.response import Stream

from tgi_core.context import FrontendContext
from tgi_core.engine.requests import GenerateRequest, SamplingParams, StoppingParams, TokenEvent
from tgi_core.server.chat import render_prompt
from tgi_core.server.errors import (
    OPENAI_EXCEPTION_HANDLERS,
    APIError,
    as_api_error,
    unsupported,
    validation_error,
)
from tgi_core.server.generation import (
    RequestTrace,
    admitted_stream,
    collect,
    merged,
    token_events,
    traced,
)
from tgi_core.server.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from tgi_core.server.state import ServerState, Slot
from tgi_core.server.token_bytes import TokenBytes

#: OpenAI's limits
MAX_N = 128
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
#: OpenAI's default ``max_tokens`` for ``/v1/completions`` (chat: what the context allows)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
FINISH_REASONS = {"length": "length", "eos_token": "stop", "stop_sequence": "stop"}


def _range(name: str, value: float | None, low: float, high: float) -> None:
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        raise validation_error(f"`{name}` must be >= {low} and <= {high}. Given: {value}", name)


def _stops(state: ServerState, stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    limit = state.config.max_stop_sequences
    if len(stops) > limit:
        raise validation_error(
            f"`stop` supports up to {limit} stop sequences. Given: {len(stops)}", "stop"
        )
    if any(not s for s in stops):
        raise validation_error("`stop` sequences cannot be empty", "stop")
    return tuple(stops)


@dataclass
class Plan:
    """A validated request: engine parameters and what the response needs."""

    sampling: SamplingParams
    stop: tuple[str, ...]
    max_tokens: int | None
    n: int
    samples: int  # generated per prompt (``best_of`` may ask for more than ``n``)
    include_usage: bool
    ignore_eos: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def plan_sampling(
    state: ServerState, f: SamplingFields, *, top_n: int, best_of: int | None
) -> Plan:
    """Check the fields both endpoints share (OpenAI's ranges) and map them to the engine."""
    _range("temperature", f.temperature, 0.0, 2.0)
    _range("top_p", f.top_p, 0.0, 1.0)
    if f.top_p is not None and f.top_p == 0.0:
        raise validation_error("`top_p` must be > 0 and <= 1. Given: 0.0", "top_p")
    _range("min_p", f.min_p, 0.0, 1.0)
    _range("frequency_penalty", f.frequency_penalty, -2.0, 2.0)
    _range("presence_penalty", f.presence_penalty, -2.0, 2.0)
    if f.repetition_penalty is not None and not (
        math.isfinite(f.repetition_penalty) and f.repetition_penalty > 0
    ):
        raise validation_error(
            "`repetition_penalty` must be strictly positive", "repetition_penalty"
        )
    if f.top_k is not None and f.top_k < -1:
        raise validation_error("`top_k` must be -1 (off), 0 (off) or positive", "top_k")
    n = 1 if f.n is None else f.n
    if not 1 <= n <= MAX_N:
        raise validation_error(f"`n` must be >= 1 and <= {MAX_N}. Given: {n}", "n")
    samples = n if best_of is None else best_of
    if not n <= samples <= MAX_N:
        raise validation_error(
            f"`best_of` must be >= `n` and <= {MAX_N}. Given: {best_of}", "best_of"
        )
    if f.stream and samples != n:
        raise validation_error("`best_of` != `n` is not supported when streaming", "best_of")
    if f.max_tokens is not None and f.max_tokens <= 0:
        raise validation_error("`max_tokens` must be strictly positive", "max_tokens")
    if f.logit_bias:
        raise unsupported("`logit_bias` is not supported", "logit_bias")
    model_default = state.model.sampling_defaults.get
    temperature = model_default("temperature", 1.0) if f.temperature is None else f.temperature
    greedy = temperature == 0.0
    seed = None
    if not greedy:
        seed = f.seed % 2**64 if f.seed is not None else random.getrandbits(63)
    top_k = int(model_default("top_k", 0)) if f.top_k is None else f.top_k
    sampling = SamplingParams(
        do_sample=not greedy,
        temperature=temperature if not greedy else 1.0,
        top_k=max(0, top_k),
        top_p=model_default("top_p", 1.0) if f.top_p is None else f.top_p,
        min_p=model_default("min_p", 0.0) if f.min_p is None else f.min_p,
        repetition_penalty=(
            model_default("repetition_penalty", 1.0)
            if f.repetition_penalty is None
            else f.repetition_penalty
        ),
        frequency_penalty=f.frequency_penalty or 0.0,
        presence_penalty=f.presence_penalty or 0.0,
        penalty_style="openai",
        seed=seed,
        top_n_tokens=top_n,
    )
    include_usage = bool(f.stream_options and f.stream_options.include_usage)
    return Plan(
        sampling,
        _stops(state, f.stop),
        f.max_tokens,
        n,
        samples,
        include_usage,
        ignore_eos=f.ignore_eos,
    )


def engine_request(
    state: ServerState,
    plan: Plan,
    prompt_ids: list[int],
    *,
    prompt_logprobs: bool = False,
    prompt_field: str = "prompt",
) -> GenerateRequest:
    """The engine request for one prompt; checks the prompt against the context limits
    (``prompt_field`` names the request field an error points at)."""
    max_input, max_total = state.model.max_input_tokens, state.model.max_total_tokens
    if not prompt_ids:
        raise validation_error("the prompt cannot be empty", prompt_field)
    if len(prompt_ids) > max_input:
        raise validation_error(
            f"`inputs` must have less than {max_input} tokens. Given: {len(prompt_ids)}",
            prompt_field,
        )
    max_new = plan.max_tokens if plan.max_tokens is not None else max_total - len(prompt_ids)
    if len(prompt_ids) + max_new > max_total:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
            f"Given: {len(prompt_ids)} `inputs` tokens and {max_new} `max_new_tokens`",
            "max_tokens",
        )
    return GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt_ids),
        sampling=plan.sampling,
        stopping=StoppingParams(max_new_tokens=max_new, stop=plan.stop, ignore_eos=plan.ignore_eos),
        prompt_logprobs=prompt_logprobs,
        n=plan.samples,
    )


def _token_text(state: ServerState, token_id: int) -> str:
    return str(state.tokenizer.decode([token_id], skip_special_tokens=False))


def _encode(state: ServerState, text: str, *, special: bool) -> list[int]:
    try:
        return list(state.tokenizer.encode(text, add_special_tokens=special))
    except Exception as exc:  # a lone surrogate, for one
        raise validation_error(f"the prompt cannot be tokenized: {exc}", "prompt") from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _fingerprint() -> str:
    from tgi_core.server.app import version

    return f"tgi-core-{version()}"


@dataclass
class Choice:
    """One sample's text, tokens and finish, accumulated from its events."""

    text: str = ""
    events: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        self.events.append(event)
        self.text += event.text
        if event.finish_reason is not None:
            self.finish_reason = FINISH_REASONS[event.finish_reason]

    @property
    def mean_logprob(self) -> float:
        return sum(e.logprob for e in self.events) / max(1, len(self.events))


def _choices(events: list[TokenEvent], samples: int) -> list[Choice]:
    choices = [Choice() for _ in range(samples)]
    for event in events:
        choices[event.index].add(event)
    return choices


def _best(choices: list[Choice], n: int) -> list[Choice]:
    """The ``n`` choices with the highest mean token logprob (OpenAI's ``best_of``)."""
    if len(choices) == n:
        return choices
    return sorted(choices, key=lambda c: c.mean_logprob, reverse=True)[:n]


# -- chat ---------------------------------------------------------------------------------


def _chat_logprobs(
    state: ServerState, token_bytes: TokenBytes, event: TokenEvent, wanted: bool
) -> dict[str, Any] | None:
    if not wanted:
        return None
    return {
        "content": [
            {
                "token": _token_text(state, event.token_id),
                "logprob": event.logprob,
                "bytes": list(token_bytes(event.token_id)),
                "top_logprobs": [
                    {"token": t.text, "logprob": t.logprob, "bytes": list(token_bytes(t.id))}
                    for t in event.top_tokens
                ],
            }
        ]
    }


def _check_chat_fields(body: ChatCompletionRequest) -> int:
    """Fields that only chat has; returns the number of top logprobs wanted."""
    if body.tools:
        raise unsupported(
            "`tools` are not supported yet: they need structured output (grammars)", "tools"
        )
    if body.tool_choice not in (None, "none", "auto"):
        raise unsupported("`tool_choice` is not supported yet", "tool_choice")
    if body.response_format is not None and body.response_format.get("type") != "text":
        raise unsupported(
            "`response_format` is not supported yet: it needs structured output (grammars)",
            "response_format",
        )
    if body.max_completion_tokens is not None:
        if body.max_tokens is not None and body.max_tokens != body.max_completion_tokens:
            raise validation_error(
                "`max_tokens` and `max_completion_tokens` disagree", "max_completion_tokens"
            )
        body.max_tokens = body.max_completion_tokens
    top = body.top_logprobs or 0
    if not 0 <= top <= MAX_CHAT_TOP_LOGPROBS:
        raise validation_error(
            f"`top_logprobs` must be >= 0 and <= {MAX_CHAT_TOP_LOGPROBS}. Given: {top}",
            "top_logprobs",
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise validation_error("`top_logprobs` requires `logprobs` to be true", "top_logprobs")
    return top


class ChatCall:
    """One ``/v1/chat/completions`` request, validated."""

    def __init__(
        self,
        state: ServerState,
        body: ChatCompletionRequest,
        trace: RequestTrace,
        token_bytes: TokenBytes,
    ):
        self.state, self.body, self.token_bytes = state, body, token_bytes
        top = _check_chat_fields(body)
        self.plan = plan_sampling(state, body, top_n=top, best_of=None)
        prompt = render_prompt(state, body.messages)
        self.prompt_ids = _encode(state, prompt, special=False)
        self.request = engine_request(state, self.plan, self.prompt_ids, prompt_field="messages")
        self.id = f"chatcmpl-{self.request.request_id}"
        self.model = state.model.model_id
        trace.validated(
            self.request.request_id, len(self.prompt_ids), self.request.stopping.max_new_tokens
        )

    def _envelope(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.plan.created,
            "model": self.model,
            "system_fingerprint": _fingerprint(),
        }

    def response(self, events: list[TokenEvent]) -> dict[str, Any]:
        choices = _choices(events, self.plan.samples)
        logprobs = bool(self.body.logprobs)
        result = self._envelope("chat.completion")
        result["choices"] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {
                    "content": [
                        entry
                        for e in c.events
                        for entry in (_chat_logprobs(self.state, self.token_bytes, e, True) or {})[
                            "content"
                        ]
                    ]
                }
                if logprobs
                else None,
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(choices)
        ]
        generated = sum(len(c.events) for c in choices)
        result["usage"] = _usage(len(self.prompt_ids), generated)
        return result

    async def stream(self, trace: RequestTrace) -> AsyncIterator[bytes]:
        generated = 0
        try:
            async for event in token_events(self.state, self.request):
                trace.observe(event)
                generated += 1
                chunk = self._envelope("chat.completion.chunk")
                chunk["choices"] = [
                    {
                        "index": event.index,
                        "delta": {"role": "assistant", "content": event.text},
                        "logprobs": _chat_logprobs(
                            self.state, self.token_bytes, event, bool(self.body.logprobs)
                        ),
                        "finish_reason": FINISH_REASONS.get(event.finish_reason or ""),
                    }
                ]
                if self.plan.include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            if self.plan.include_usage:
                chunk = self._envelope("chat.completion.chunk")
                chunk["choices"] = []
                chunk["usage"] = _usage(len(self.prompt_ids), generated)
                yield _sse(chunk)
            trace.succeeded()
        except Exception as exc:  # after the stream started, errors go in-band
            trace.failed(exc)
            yield _sse(as_api_error(exc).openai_body())
        except BaseException as exc:  # cancelled: the client went away
            trace.failed(exc)
            raise
        yield DONE


# -- completions --------------------------------------------------------------------------


def _prompts(state: ServerState, prompt: str | list[Any]) -> list[tuple[str | None, list[int]]]:
    """Each prompt as (its text if given as text, its token ids)."""
    vocab = state.model.vocab_size
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise validation_error("`prompt` cannot be empty", "prompt")
    limit = state.config.max_client_batch_size
    if len(items) > limit:
        raise APIError(
            422,
            f"Number of prompts exceeds the maximum allowed batch size of {limit}",
            "batch size exceeded",
            "prompt",
        )
    result: list[tuple[str | None, list[int]]] = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise validation_error("`prompt` cannot be empty", "prompt")
            result.append((item, _encode(state, item, special=True)))
        elif (
            isinstance(item, list)
            and item
            and all(isinstance(t, int) and not isinstance(t, bool) for t in item)
        ):
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise validation_error(
                    f"`prompt` token ids must be >= 0 and < {vocab}. Given: {bad}", "prompt"
                )
            result.append((None, list(item)))
        else:
            raise validation_error(
                "`prompt` must be a string, a list of strings, a list of token ids or a "
                "list of token-id lists, none of them empty",
                "prompt",
            )
    return result


class CompletionCall:
    """One ``/v1/completions`` request (one or more prompts), validated."""

    def __init__(
        self,
        state: ServerState,
        body: CompletionRequest,
        trace: RequestTrace,
        token_bytes: TokenBytes,
    ):
        self.state, self.body, self.token_bytes = state, body, token_bytes
        if body.suffix is not None:
            raise APIError(
                422,
                "Suffix is not supported and can be achieved by preprocessing the prompt.",
                "suffix not supported",
                "suffix",
            )
        top = body.logprobs
        if top is not None and not 0 <= top <= MAX_COMPLETION_LOGPROBS:
            raise validation_error(
                f"`logprobs` must be >= 0 and <= {MAX_COMPLETION_LOGPROBS}. Given: {top}",
                "logprobs",
            )
        if body.max_tokens is None:
            body.max_tokens = COMPLETIONS_DEFAULT_MAX_TOKENS
        self.plan = plan_sampling(state, body, top_n=top or 0, best_of=body.best_of)
        self.prompts = _prompts(state, body.prompt)
        prompt_logprobs = body.echo and top is not None
        self.requests = [
            engine_request(state, self.plan, ids, prompt_logprobs=prompt_logprobs)
            for _, ids in self.prompts
        ]
        self.id = f"cmpl-{self.requests[0].request_id}"
        self.prompt_tokens = sum(len(ids) for _, ids in self.prompts)
        trace.validated(
            self.requests[0].request_id,
            self.prompt_tokens,
            self.requests[0].stopping.max_new_tokens,
        )

    def _envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.plan.created,
            "model": self.state.model.model_id,
            "system_fingerprint": _fingerprint(),
        }

    def _echo(self, position: int) -> str:
        text, ids = self.prompts[position]
        if text is not None:
            return text
        return str(self.state.tokenizer.decode(ids, skip_special_tokens=False))

    def _prompt_logprobs(self, position: int, first: TokenEvent | None) -> LogprobsBuilder:
        builder = LogprobsBuilder(self.state, self.token_bytes)
        if first is not None and first.prompt_logprobs is not None:
            for token in first.prompt_logprobs:
                builder.add(token.id, token.logprob, ())
        return builder

    def response(self, per_prompt: list[list[TokenEvent]]) -> dict[str, Any]:
        result = self._envelope()
        choices: list[dict[str, Any]] = []
        generated = 0
        for position, events in enumerate(per_prompt):
            samples = _choices(events, self.plan.samples)
            generated += sum(len(c.events) for c in samples)
            for choice in _best(samples, self.plan.n):
                text = choice.text
                logprobs = None
                if self.body.logprobs is not None:
                    builder = (
                        self._prompt_logprobs(position, events[0] if events else None)
                        if self.body.echo
                        else LogprobsBuilder(self.state, self.token_bytes)
                    )
                    for e in choice.events:
                        builder.add(e.token_id, e.logprob, e.top_tokens)
                    logprobs = builder.result()
                if self.body.echo:
                    text = self._echo(position) + text
                choices.append(
                    {
                        "index": len(choices),
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": choice.finish_reason,
                    }
                )
        result["choices"] = choices
        result["usage"] = _usage(self.prompt_tokens, generated)
        return result

    async def stream(self, trace: RequestTrace) -> AsyncIterator[bytes]:
        generated = 0
        started: set[int] = set()
        prompt_logprobs: dict[int, TokenEvent] = {}  # per prompt: the event carrying them
        n = self.plan.n
        try:
            streams = [token_events(self.state, r) for r in self.requests]
            async for position, event in merged(streams):
                trace.observe(event)
                generated += 1
                if event.prompt_logprobs is not None:
                    prompt_logprobs[position] = event
                index = position * n + event.index
                first = index not in started
                started.add(index)
                text, logprobs = event.text, None
                if first and self.body.echo:
                    text = self._echo(position) + text
                if self.body.logprobs is not None:
                    builder = (
                        self._prompt_logprobs(position, prompt_logprobs.get(position))
                        if first and self.body.echo
                        else LogprobsBuilder(self.state, self.token_bytes)
                    )
                    builder.add(event.token_id, event.logprob, event.top_tokens)
                    logprobs = builder.result()
                chunk = self._envelope()
                chunk["choices"] = [
                    {
                        "index": index,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": FINISH_REASONS.get(event.finish_reason or ""),
                    }
                ]
                if self.plan.include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            if self.plan.include_usage:
                chunk = self._envelope()
                chunk["choices"] = []
                chunk["usage"] = _usage(self.prompt_tokens, generated)
                yield _sse(chunk)
            trace.succeeded()
        except Exception as exc:
            trace.failed(exc)
            yield _sse(as_api_error(exc).openai_body())
        except BaseException as exc:  # cancelled: the client went away
            trace.failed(exc)
            raise
        yield DONE


class LogprobsBuilder:
    """OpenAI's completions ``logprobs``: tokens, their logprobs, top alternatives, and
    each token's character offset in the text (a character split across tokens starts at
    the offset of its first token)."""

    def __init__(self, state: ServerState, token_bytes: TokenBytes) -> None:
        self.state, self.token_bytes = state, token_bytes
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._bytes = b""

    def add(self, token_id: int, logprob: float | None, top: Sequence[Any]) -> None:
        token = _token_text(self.state, token_id)
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        if logprob is None:
            self.top_logprobs.append(None)
        else:
            alternatives = {t.text: t.logprob for t in top} if top else {token: logprob}
            self.top_logprobs.append(alternatives)
        self.text_offset.append(len(self._bytes.decode("utf-8", "ignore")))
        self._bytes += self.token_bytes(token_id)

    def result(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


# -- routes -------------------------------------------------------------------------------


def _sse_response(slot: Slot, body: AsyncIterator[bytes]) -> Stream:
    return Stream(
        admitted_stream(slot, body),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def build(ctx: FrontendContext) -> list[HTTPRouteHandler]:
    """The OpenAI frontend's routes; ``ctx.engine`` is the server's :class:`ServerState`."""
    state: ServerState = ctx.engine
    token_bytes = TokenBytes(state.tokenizer)

    @post(
        "/v1/chat/completions",
        status_code=200,
        summary="OpenAI chat completions",
        exception_handlers=OPENAI_EXCEPTION_HANDLERS,
    )
    async def chat_completions(
        data: Annotated[ChatCompletionRequest, Body()], request: Request[Any, Any, Any]
    ) -> Response[dict[str, Any]] | Stream:
        trace = RequestTrace(state, "/v1/chat/completions")

        async def run() -> Response[dict[str, Any]] | Stream:
            call = ChatCall(state, data, trace, token_bytes)
            slot = state.admit()
            if data.stream:
                return _sse_response(slot, call.stream(trace))
            try:
                (events,) = await collect(state, [call.request], request)
            finally:
                slot.release()
            for event in events:
                trace.observe(event)
            return Response(call.response(events), headers=trace.succeeded())

        return await traced(trace, run)

    @post(
        "/v1/completions",
        status_code=200,
        summary="OpenAI completions",
        exception_handlers=OPENAI_EXCEPTION_HANDLERS,
    )
    async def completions(
        data: Annotated[CompletionRequest, Body()], request: Request[Any, Any, Any]
    ) -> Response[dict[str, Any]] | Stream:
        trace = RequestTrace(state, "/v1/completions")

        async def run() -> Response[dict[str, Any]] | Stream:
            call = CompletionCall(state, data, trace, token_bytes)
            slot = state.admit()
            if data.stream:
                return _sse_response(slot, call.stream(trace))
            try:
                per_prompt = await collect(state, call.requests, request)
            finally:
                slot.release()
            for events in per_prompt:
                for event in events:
                    trace.observe(event)
            return Response(call.response(per_prompt), headers=trace.succeeded())

        return await traced(trace, run)

    return [chat_completions, completions]
