"""What every route shares: the config, the engine, the tokenizer, the model's facts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from tgi_core.config import ServeConfig
from tgi_core.engine.async_engine import AsyncEngine
from tgi_core.server.errors import overloaded


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


@dataclass
class ServerState:
    """Shared by the app's routes; ``engine`` runs in its own thread."""

    config: ServeConfig
    engine: AsyncEngine
    tokenizer: Any
    model: ModelInfo
    plugins: list[dict[str, str]] = field(default_factory=list)
    healthy: bool = True
    _slots: asyncio.Semaphore | None = None

    @asynccontextmanager
    async def admission(self) -> AsyncIterator[None]:
        """Hold one of ``max_concurrent_requests`` slots, or fail at once with 429."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.config.max_concurrent_requests)
        if self._slots.locked():
            raise overloaded()
        async with self._slots:
            yield
