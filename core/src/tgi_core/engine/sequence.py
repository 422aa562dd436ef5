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
    """Tokens ``[prompt..., generated...]``; the first ``num_computed`` have KV in the cache."""

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

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

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
