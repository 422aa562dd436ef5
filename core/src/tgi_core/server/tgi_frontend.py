"""The TGI frontend (a built-in plugin): TGI's native REST API.

``POST /generate``, ``POST /generate_stream``, ``POST /`` (the ``text-generation``
client's route: a JSON list, or SSE with ``"stream": true``), ``POST /tokenize`` and
``GET /v1/models``, with TGI's parameters, defaults, bounds and verbatim validation
messages (``../shared/reference/tgi-contract.md`` §1). One difference, documented: a
request that fails validation gets its 422 before a stream starts, instead of TGI's
in-band error event with status 200.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Body
from litestar.response import Stream

from tgi_core.context import FrontendContext
from tgi_core.engine.engine import RequestError
from tgi_core.engine.requests import (
    GenerateRequest,
    SamplingParams,
    StoppingParams,
    TokenEvent,
)
from tgi_core.server.errors import APIError, generation_error, validation_error
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
    if p.best_of is not None:
        if p.best_of == 0 or p.best_of > config.max_best_of:
            raise validation_error(
                f"`best_of` must be > 0 and <= {config.max_best_of}. Given: {p.best_of}"
            )
        if p.best_of != 1:
            raise validation_error("`best_of` != 1 is not allowed for this endpoint")
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


async def _events(state: ServerState, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
    try:
        async for event in state.engine.generate(request):
            if event.error is not None:
                state.healthy = False
                raise generation_error(event.error)
            yield event
    except RequestError as exc:
        raise validation_error(str(exc)) from None


def _generated_text(v: Validated, body: TGIRequest, text: str, last: TokenEvent) -> str:
    if last.stop_sequence is not None:
        text += last.stop_sequence  # TGI keeps the stop sequence in the output
    if v.params.return_full_text:
        text = body.inputs + text
    return text


async def generate_response(state: ServerState, body: TGIRequest) -> dict[str, Any]:
    """``/generate``: the whole generation as one JSON object."""
    v = validate(state, body, stream=False)
    start = time.perf_counter()
    async with state.admission():
        events = [event async for event in _events(state, v.request)]
    last, text = events[-1], "".join(e.text for e in events)
    result: dict[str, Any] = {"generated_text": _generated_text(v, body, text, last)}
    if v.params.details or v.params.decoder_input_details:
        details: dict[str, Any] = {
            "finish_reason": last.finish_reason,
            "generated_tokens": last.generated_tokens,
            "seed": v.request.sampling.seed if v.sampling else None,
            "prefill": [
                {"id": t.id, "text": state.tokenizer.decode([t.id]), "logprob": t.logprob}
                for t in (events[0].prompt_logprobs or ())
            ],
            "tokens": [_token(state, e) for e in events],
        }
        if v.request.sampling.top_n_tokens:
            details["top_tokens"] = [_top_tokens(e) for e in events]
        result["details"] = details
    result["_timing"] = time.perf_counter() - start
    return result


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data:" + msgspec.json.encode(payload) + b"\n\n"


async def stream_events(state: ServerState, body: TGIRequest, v: Validated) -> AsyncIterator[bytes]:
    """TGI's SSE: one ``data:{json}`` event per token, the last with the full text."""
    text = ""
    try:
        async with state.admission():
            index = 0
            async for event in _events(state, v.request):
                index += 1
                text += event.text
                last = event.finish_reason is not None
                payload: dict[str, Any] = {
                    "index": index,
                    "token": _token(state, event),
                }
                if v.request.sampling.top_n_tokens:
                    payload["top_tokens"] = _top_tokens(event)
                payload["generated_text"] = _generated_text(v, body, text, event) if last else None
                payload["details"] = None
                if last and v.params.details:
                    payload["details"] = {
                        "finish_reason": event.finish_reason,
                        "generated_tokens": event.generated_tokens,
                        "seed": v.request.sampling.seed if v.sampling else None,
                        "input_length": len(v.prompt_ids),
                    }
                yield _sse(payload)
    except APIError as exc:  # errors after the stream started go in-band, as in TGI
        yield _sse(exc.body())


def _stream_response(state: ServerState, body: TGIRequest) -> Stream:
    v = validate(state, body, stream=True)
    return Stream(
        stream_events(state, body, v),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _timed(result: dict[str, Any]) -> Response[dict[str, Any]]:
    seconds = result.pop("_timing")
    return Response(
        result, headers={"x-compute-type": "cpu", "x-total-time": str(int(seconds * 1000))}
    )


def build(ctx: FrontendContext) -> list[HTTPRouteHandler]:
    """The TGI frontend's routes; ``ctx.engine`` is the server's :class:`ServerState`."""
    state: ServerState = ctx.engine

    @post("/generate", status_code=200, summary="Generate tokens")
    async def generate(data: Annotated[TGIRequest, Body()]) -> Response[dict[str, Any]]:
        return _timed(await generate_response(state, data))

    @post("/generate_stream", status_code=200, summary="Generate a stream of tokens (SSE)")
    async def generate_stream(data: Annotated[TGIRequest, Body()]) -> Stream:
        return _stream_response(state, data)

    @post("/", status_code=200, summary="Generate (the text-generation client's route)")
    async def compat_generate(
        data: Annotated[TGIRequest, Body()],
    ) -> Response[list[dict[str, Any]]] | Stream:
        parameters = data.parameters
        if parameters is not None and parameters.return_full_text is None:
            # TGI: on `/`, return_full_text defaults to the text-generation pipeline
            full = state.model.pipeline_tag in (None, "text-generation")
            data = msgspec.structs.replace(
                data, parameters=msgspec.structs.replace(parameters, return_full_text=full)
            )
        if data.stream:
            return _stream_response(state, data)
        result = await generate_response(state, data)
        response = _timed(result)
        return Response([response.content], headers=response.headers)

    @post("/tokenize", status_code=200, summary="Tokenize inputs")
    async def tokenize(data: Annotated[TGIRequest, Body()]) -> list[dict[str, Any]]:
        if not data.inputs:
            raise validation_error("`inputs` cannot be empty")
        encoding = state.tokenizer(data.inputs, return_offsets_mapping=True)
        return [
            {"id": token, "text": data.inputs[start:stop], "start": start, "stop": stop}
            for token, (start, stop) in zip(
                encoding["input_ids"], encoding["offset_mapping"], strict=True
            )
        ]

    @get("/v1/models", summary="The model served")
    async def models() -> dict[str, Any]:
        model_id = state.model.model_id
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}],
        }

    return [generate, generate_stream, compat_generate, tokenize, models]
