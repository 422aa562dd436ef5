"""One generation's state: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tgi_core.engine.requests import FinishReason, GenerateRequest


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens ``[prompt..., generated...]``; the first ``num_computed`` have KV in the cache.

    For an encoder-decoder model, ``encoder_ids`` is the source (the request's prompt)
    and ``token_ids`` starts with the decoder's start token; the sequence's blocks hold
    the source's cross-attention keys and values too, so they cover
    ``max(len(token_ids), len(encoder_ids))`` positions.
    """

    request: GenerateRequest
    arrival: int  # admission order; lower is older
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    num_cached_prompt_tokens: int = 0  # served from the prefix cache at admission
    #: per-sequence state the engine keeps (sampler generator, detokenizer, ...)
    extra: dict[str, Any] = field(default_factory=dict)
    encoder_ids: tuple[int, ...] = ()
    #: tokens of ``token_ids`` that are prompt, not generated (set from ``token_ids``)
    prompt_len: int = -1

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)
        if self.prompt_len < 0:
            self.prompt_len = len(self.token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        """The decoder's prompt: the request's prompt, or the start token (encoder-decoder)."""
        return self.prompt_len

    def kv_positions(self, num_tokens: int) -> int:
        """Cache positions needed once ``num_tokens`` decoder tokens are computed."""
        return max(num_tokens, len(self.encoder_ids))

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        """Tokens whose KV is not yet computed (a prompt, a chunk's rest, or the last sample)."""
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED
