"""What every route shares: the config, the engine, the tokenizer, the model's facts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tgi_core.config import ServeConfig
from tgi_core.engine.async_engine import AsyncEngine
from tgi_core.server.errors import overloaded

if TYPE_CHECKING:
    from tgi_core.server.chat_template import ChatTemplate
    from tgi_core.server.metrics import ServerMetrics


@dataclass
class ModelInfo:
    model_id: str
    dtype: str
    attention: str
    block_size: int
    max_input_tokens: int
    max_total_tokens: int
    architecture: str
    is_encoder_decoder: bool = False
    pipeline_tag: str | None = "text-generation"
    kv_tokens: int = 0
    vocab_size: int = 0
    #: sampling settings of the checkpoint's generation_config.json, which OpenAI
    #: requests that leave them out take (``SAMPLING_DEFAULT_FIELDS``)
    sampling_defaults: dict[str, float] = field(default_factory=dict)
    #: tensor-parallel ranks serving the model
    num_shard: int = 1


class Slot:
    """One of ``max_concurrent_requests`` admissions; ``release`` is idempotent."""

    def __init__(self, state: ServerState) -> None:
        self._state: ServerState | None = state

    def release(self) -> None:
        if self._state is not None:
            self._state.in_flight -= 1
            self._state = None


@dataclass
class ServerState:
    """Shared by the app's routes; ``engine`` runs in its own thread.

    ``healthy`` is False until the warm-up generation succeeded, and again after a
    generation failed, until a probe generation succeeds (``/health`` runs it).
    ``failure`` says why the server can never serve again (a rank of its tensor-parallel
    group failed): ``/health`` then answers 503 without probing, while the server shuts
    down. ``on_shutdown`` runs, in order, once the engine thread has stopped.
    """

    config: ServeConfig
    engine: AsyncEngine
    tokenizer: Any
    model: ModelInfo
    plugins: list[dict[str, str]] = field(default_factory=list)
    chat_template: ChatTemplate | None = None
    metrics: ServerMetrics | None = None
    healthy: bool = False
    in_flight: int = 0
    failure: str | None = None
    on_shutdown: list[Callable[[], None]] = field(default_factory=list)

    def admit(self) -> Slot:
        """Take a request slot, or fail at once with 429 (TGI never queues past the limit)."""
        if self.in_flight >= self.config.max_concurrent_requests:
            raise overloaded()
        self.in_flight += 1
        return Slot(self)
