"""The two streaming APIs as the load generator speaks them.

- ``tgi``: ``POST /generate_stream`` with ``{"inputs", "parameters"}``; one SSE event
  per token, the last with ``details`` (``generated_tokens``, ``input_length``).
- ``openai``: ``POST /v1/completions`` with ``"stream": true`` and
  ``stream_options.include_usage``; one chunk per token, then a usage chunk and
  ``[DONE]``.

Errors sent in-band (after the stream started) are recognised in both shapes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from tgi_core.bench.workload import PlannedRequest

Api = Literal["tgi", "openai"]
APIS: tuple[Api, ...] = ("tgi", "openai")
ROUTES: dict[Api, str] = {"tgi": "/generate_stream", "openai": "/v1/completions"}


@dataclass(frozen=True, slots=True)
class Sampling:
    """How every request samples: greedy at temperature 0, else seeded per request."""

    temperature: float = 0.0
    ignore_eos: bool = False
    model: str | None = None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """What one SSE event says. ``tokens`` is 1 for an event carrying a token."""

    tokens: int = 0
    finish_reason: str | None = None
    server_output_tokens: int | None = None
    server_prompt_tokens: int | None = None
    error: str | None = None
    done: bool = False  # OpenAI's ``[DONE]``


def request_body(api: Api, planned: PlannedRequest, sampling: Sampling) -> dict[str, Any]:
    """The JSON body for ``planned`` in ``api``'s format (token-id prompts: OpenAI only)."""
    sample = sampling.temperature > 0
    if api == "tgi":
        if not isinstance(planned.prompt, str):
            raise ValueError("TGI's API takes text prompts, not token ids")
        parameters: dict[str, Any] = {
            "max_new_tokens": planned.max_new_tokens,
            "details": True,
            "do_sample": sample,
        }
        if sample:
            parameters |= {"temperature": sampling.temperature, "seed": planned.seed}
        return {"inputs": planned.prompt, "parameters": parameters}
    body: dict[str, Any] = {
        "prompt": planned.prompt if isinstance(planned.prompt, str) else list(planned.prompt),
        "max_tokens": planned.max_new_tokens,
        "temperature": sampling.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if sample:
        body["seed"] = planned.seed
    if sampling.ignore_eos:
        body["ignore_eos"] = True
    if sampling.model is not None:
        body["model"] = sampling.model
    return body


def error_message(payload: Any) -> str | None:
    """The message of an error body in TGI's (``{"error": str}``) or OpenAI's
    (``{"error": {"message": str}}``) shape, or None if ``payload`` is no error."""
    if not isinstance(payload, dict) or "error" not in payload:
        return None
    error = payload["error"]
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


def parse_event(api: Api, data: str) -> StreamEvent:
    """One SSE event's ``data`` field."""
    if data.strip() == "[DONE]":
        return StreamEvent(done=True)
    try:
        payload = json.loads(data)
    except json.JSONDecodeError:
        return StreamEvent(error=f"undecodable event: {data[:200]!r}")
    message = error_message(payload)
    if message is not None:
        return StreamEvent(error=message)
    if api == "tgi":
        details = payload.get("details") or {}
        finish = details.get("finish_reason")
        if finish is None and payload.get("generated_text") is not None:
            finish = "unknown"  # the last event, without details
        return StreamEvent(
            tokens=1 if payload.get("token") is not None else 0,
            finish_reason=finish,
            server_output_tokens=details.get("generated_tokens"),
            server_prompt_tokens=details.get("input_length"),
        )
    choices = payload.get("choices") or []
    usage = payload.get("usage") or {}
    return StreamEvent(
        tokens=1 if choices else 0,
        finish_reason=next((c["finish_reason"] for c in choices if c.get("finish_reason")), None),
        server_output_tokens=usage.get("completion_tokens"),
        server_prompt_tokens=usage.get("prompt_tokens"),
    )
