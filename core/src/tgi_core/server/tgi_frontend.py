"""The TGI frontend (a built-in plugin): TGI's native REST API.

``POST /generate``, ``POST /generate_stream``, ``POST /`` (the ``text-generation``
client's route: a JSON list, or SSE with ``"stream": true``), ``POST /tokenize``,
``POST /chat_tokenize`` and ``GET /v1/models``, with TGI's parameters, defaults, bounds
and verbatim validation messages (``../shared/reference/tgi-contract.md`` §1). One
difference, documented: a request that fails validation, or finds the server full, gets
its 422 or 429 before a stream starts, instead of TGI's in-band error event with
status 200.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Body
from litestar.response import Stream

from tgi_core.context import FrontendContext
from tgi_core.engine.requests import (
    GenerateRequest,
    SamplingParams,
    StoppingParams,
    TokenEvent,
)
from tgi_core.server.chat import render_prompt
from tgi_core.server.errors import as_api_error, validation_error
from tgi_core.server.generation import (
    RequestTrace,
    admitted_stream,
    collect,
    token_events,
    traced,
)
from tgi_core.server.openai_schema import ChatCompletionRequest
from tgi_core.server.state import ServerState


class Parameters(msgspec.Struct, kw_only=True):
    """TGI's ``GenerateParameters``; a missing field takes TGI's serde default."""

    best_of: int | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: Any = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: int | None = None
    stop: list[str] = []
    temperature: float | None = None
    top_k: int | None = None
    top_n_tokens: int | None = None
    top_p: float | None = None
    truncate: int | None = None
    typical_p: float | None = None
    watermark: bool = False
    adapter_id: str | None = None


class TGIRequest(msgspec.Struct, kw_only=True):
    inputs: str
    parameters: Parameters | None = None
    stream: bool = False


def _sampling_requested(p: Parameters) -> bool:
    warpers = (
        p.temperature not in (None, 1.0)
        or (p.top_k or 0) > 0
        or (p.top_p is not None and p.top_p < 1.0)
        or (p.typical_p is not None and p.typical_p < 1.0)
    )
    return p.do_sample or warpers


class Validated(msgspec.Struct):
    request: GenerateRequest
    prompt_ids: list[int]
    params: Parameters
    sampling: bool


def validate(state: ServerState, body: TGIRequest, *, stream: bool) -> Validated:
    """TGI's checks, in TGI's order, with its messages; returns the engine request."""
    config, p = state.config, body.parameters
    if p is None:  # TGI: no parameters at all means default_parameters(), which samples
        p = Parameters(do_sample=True)
    best_of = 1 if p.best_of is None else p.best_of
    if best_of == 0 or best_of > config.max_best_of:
        raise validation_error(
            f"`best_of` must be > 0 and <= {config.max_best_of}. Given: {p.best_of}"
        )
    if best_of > 1:
        if not _sampling_requested(p):
            raise validation_error("you must use sampling when `best_of` is > 1")
        if p.seed is not None:
            raise validation_error("`seed` must not be set when `best_of` > 1")
        if stream:
            raise validation_error("`best_of` != 1 is not supported when streaming tokens")
    if p.temperature is not None and not p.temperature > 0:
        raise validation_error("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and not p.repetition_penalty > 0:
        raise validation_error("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise validation_error("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise validation_error("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise validation_error("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise validation_error("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise validation_error("`max_new_tokens` must be strictly positive")
    if len(p.stop) > config.max_stop_sequences:
        raise validation_error(
            f"`stop` supports up to {config.max_stop_sequences} stop "
            f"sequences. Given: {len(p.stop)}"
        )
    top_n = p.top_n_tokens or 0
    if not 0 <= top_n <= config.max_top_n_tokens:
        raise validation_error(
            f"`top_n_tokens` must be >= 0 and <= {config.max_top_n_tokens}. Given: {top_n}"
        )
    if stream and p.decoder_input_details:
        raise validation_error(
            "`decoder_input_details` == true is not supported when streaming tokens"
        )
    if p.grammar is not None:
        raise validation_error("grammar is not supported")
    if p.seed is not None and not 0 <= p.seed < 2**64:
        raise validation_error("`seed` must be an unsigned 64-bit integer")
    if not body.inputs:
        raise validation_error("`inputs` cannot be empty")
    max_input, max_total = state.model.max_input_tokens, state.model.max_total_tokens
    if p.truncate is not None and not 0 < p.truncate <= max_input:
        raise validation_error(
            f"`truncate` must be strictly positive and less than {max_input}. Given: {p.truncate}"
        )
    try:
        prompt_ids = list(state.tokenizer.encode(body.inputs, add_special_tokens=True))
    except Exception as exc:  # a lone surrogate, for one
        raise validation_error(f"`inputs` cannot be tokenized: {exc}") from None
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]
    if len(prompt_ids) > max_input:
        raise validation_error(
            f"`inputs` must have less than {max_input} tokens. Given: {len(prompt_ids)}"
        )
    max_new = p.max_new_tokens if p.max_new_tokens is not None else max_total - len(prompt_ids)
    if len(prompt_ids) + max_new > max_total:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
            f"Given: {len(prompt_ids)} `inputs` tokens and {max_new} "
            "`max_new_tokens`"
        )
    sampling = _sampling_requested(p)
    seed = p.seed if p.seed is not None else random.getrandbits(63)
    request = GenerateRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=tuple(prompt_ids),
        sampling=SamplingParams(
            do_sample=sampling,
            temperature=p.temperature if p.temperature is not None else 1.0,
            top_k=p.top_k or 0,
            top_p=p.top_p if p.top_p is not None else 1.0,
            typical_p=p.typical_p if p.typical_p is not None else 1.0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            seed=seed if sampling else None,
            top_n_tokens=top_n,
        ),
        stopping=StoppingParams(max_new_tokens=max_new, stop=tuple(p.stop)),
        prompt_logprobs=p.decoder_input_details and state.config.enable_prefill_logprobs,
        n=best_of,
    )
    return Validated(request, prompt_ids, p, sampling)


def _token(state: ServerState, event: TokenEvent) -> dict[str, Any]:
    """TGI's token: its text is what it adds to the output (incremental decoding, so
    SentencePiece spaces and multi-byte characters come out right); a special token's
    text is its own."""
    text = event.text
    if event.special:
        text = state.tokenizer.decode([event.token_id], skip_special_tokens=False)
    return {"id": event.token_id, "text": text, "logprob": event.logprob, "special": event.special}


def _top_tokens(event: TokenEvent) -> list[dict[str, Any]]:
    return [
        {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}
        for t in event.top_tokens
    ]


def _generated_text(v: Validated, body: TGIRequest, text: str, last: TokenEvent) -> str:
    if last.stop_sequence is not None:
        text += last.stop_sequence  # TGI keeps the stop sequence in the output
    if v.params.return_full_text:
        text = body.inputs + text
    return text


def _sequence(
    state: ServerState, v: Validated, body: TGIRequest, events: list[TokenEvent], prefill: Any
) -> dict[str, Any]:
    """One sample as TGI's ``details`` (also the shape of a ``best_of_sequences`` item)."""
    last = events[-1]
    sequence: dict[str, Any] = {
        "generated_text": _generated_text(v, body, "".join(e.text for e in events), last),
        "finish_reason": last.finish_reason,
        "generated_tokens": last.generated_tokens,
        "seed": last.seed if v.sampling else None,
        "prefill": prefill,
        "tokens": [_token(state, e) for e in events],
    }
    if v.request.sampling.top_n_tokens:
        sequence["top_tokens"] = [_top_tokens(e) for e in events]
    return sequence


def _mean_logprob(events: list[TokenEvent]) -> float:
    return sum(e.logprob for e in events) / max(1, len(events))


def response_body(
    state: ServerState, v: Validated, body: TGIRequest, events: list[TokenEvent]
) -> dict[str, Any]:
    """``/generate``'s JSON; with ``best_of``, the sample with the best mean logprob wins."""
    samples: list[list[TokenEvent]] = [[] for _ in range(v.request.n)]
    for event in events:
        samples[event.index].append(event)
    prefill = [
        {"id": t.id, "text": state.tokenizer.decode([t.id]), "logprob": t.logprob}
        for t in (events[0].prompt_logprobs or ())
    ]
    ranked = sorted(samples, key=_mean_logprob, reverse=True)
    best = _sequence(state, v, body, ranked[0], prefill)
    result: dict[str, Any] = {"generated_text": best.pop("generated_text")}
    if v.params.details or v.params.decoder_input_details:
        if len(ranked) > 1:
            best["best_of_sequences"] = [
                _sequence(state, v, body, sample, prefill) for sample in ranked[1:]
            ]
        result["details"] = best
    return result


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data:" + msgspec.json.encode(payload) + b"\n\n"


async def stream_events(
    state: ServerState, body: TGIRequest, v: Validated, trace: RequestTrace
) -> AsyncIterator[bytes]:
    """TGI's SSE: one ``data:{json}`` event per token, the last with the full text."""
    text = ""
    try:
        index = 0
        async for event in token_events(state, v.request):
            trace.observe(event)
            index += 1
            text += event.text
            last = event.finish_reason is not None
            payload: dict[str, Any] = {"index": index, "token": _token(state, event)}
            if v.request.sampling.top_n_tokens:
                payload["top_tokens"] = _top_tokens(event)
            payload["generated_text"] = _generated_text(v, body, text, event) if last else None
            payload["details"] = None
            if last and v.params.details:
                payload["details"] = {
                    "finish_reason": event.finish_reason,
                    "generated_tokens": event.generated_tokens,
                    "seed": event.seed if v.sampling else None,
                    "input_length": len(v.prompt_ids),
                }
            yield _sse(payload)
        trace.succeeded()
    except Exception as exc:  # errors after the stream started go in-band, as in TGI
        trace.failed(exc)
        yield _sse(as_api_error(exc).body())
    except BaseException as exc:  # cancelled: the client went away
        trace.failed(exc)
        raise


async def _generate(
    state: ServerState, body: TGIRequest, http_request: Request[Any, Any, Any], route: str
) -> Response[dict[str, Any]]:
    trace = RequestTrace(state, route)

    async def run() -> Response[dict[str, Any]]:
        v = validate(state, body, stream=False)
        trace.validated(v.request.request_id, len(v.prompt_ids), v.request.stopping.max_new_tokens)
        slot = state.admit()
        try:
            (events,) = await collect(state, [v.request], http_request)
        finally:
            slot.release()
        for event in events:
            trace.observe(event)
        result = response_body(state, v, body, events)
        return Response(result, headers=trace.succeeded())

    return await traced(trace, run)


async def _stream(state: ServerState, body: TGIRequest, route: str) -> Stream:
    trace = RequestTrace(state, route)

    async def run() -> Stream:
        v = validate(state, body, stream=True)
        trace.validated(v.request.request_id, len(v.prompt_ids), v.request.stopping.max_new_tokens)
        slot = state.admit()  # a 429 comes before the stream starts
        return Stream(
            admitted_stream(slot, stream_events(state, body, v, trace)),
            media_type="text/event-stream",
            headers={
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "x-compute-type": "cpu",
            },
        )

    return await traced(trace, run)


def _compat_body(state: ServerState, data: TGIRequest) -> TGIRequest:
    """On ``/``, ``return_full_text`` defaults to the text-generation pipeline (TGI)."""
    parameters = data.parameters
    if parameters is None:  # TGI's default_parameters(), which sample
        parameters = Parameters(do_sample=True)
    if parameters.return_full_text is None:
        full = state.model.pipeline_tag in (None, "text-generation")
        parameters = msgspec.structs.replace(parameters, return_full_text=full)
    return msgspec.structs.replace(data, parameters=parameters)


def build(ctx: FrontendContext) -> list[HTTPRouteHandler]:
    """The TGI frontend's routes; ``ctx.engine`` is the server's :class:`ServerState`."""
    state: ServerState = ctx.engine

    @post("/generate", status_code=200, summary="Generate tokens")
    async def generate(
        data: Annotated[TGIRequest, Body()], request: Request[Any, Any, Any]
    ) -> Response[dict[str, Any]]:
        return await _generate(state, data, request, "/generate")

    @post("/generate_stream", status_code=200, summary="Generate a stream of tokens (SSE)")
    async def generate_stream(data: Annotated[TGIRequest, Body()]) -> Stream:
        return await _stream(state, data, "/generate_stream")

    @post("/", status_code=200, summary="Generate (the text-generation client's route)")
    async def compat_generate(
        data: Annotated[TGIRequest, Body()], request: Request[Any, Any, Any]
    ) -> Response[list[dict[str, Any]]] | Stream:
        data = _compat_body(state, data)
        if data.stream:
            return await _stream(state, data, "/")
        response = await _generate(state, data, request, "/")
        return Response([response.content], headers=response.headers)

    @post("/tokenize", status_code=200, summary="Tokenize inputs")
    async def tokenize(data: Annotated[TGIRequest, Body()]) -> list[dict[str, Any]]:
        if not data.inputs:
            raise validation_error("`inputs` cannot be empty")
        return _simple_tokens(state, data.inputs, special=True)

    @post("/chat_tokenize", status_code=200, summary="Apply the chat template and tokenize")
    async def chat_tokenize(data: Annotated[ChatCompletionRequest, Body()]) -> dict[str, Any]:
        text = render_prompt(state, data.messages)
        return {
            "tokenize_response": _simple_tokens(state, text, special=False),
            "templated_text": text,
        }

    @get("/v1/models", summary="The model served")
    async def models() -> dict[str, Any]:
        model_id = state.model.model_id
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}],
        }

    return [generate, generate_stream, compat_generate, tokenize, chat_tokenize, models]


def _simple_tokens(state: ServerState, text: str, *, special: bool) -> list[dict[str, Any]]:
    """TGI's ``SimpleToken`` list: each id with the span of ``text`` it covers."""
    try:
        encoding = state.tokenizer(text, return_offsets_mapping=True, add_special_tokens=special)
    except Exception as exc:
        raise validation_error(f"`inputs` cannot be tokenized: {exc}") from None
    return [
        {"id": token, "text": text[start:stop], "start": start, "stop": stop}
        for token, (start, stop) in zip(
            encoding["input_ids"], encoding["offset_mapping"], strict=True
        )
    ]
